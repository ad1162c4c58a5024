using MoeRagInject.Model;

namespace MoeRagInject.Engine.Tests;

/// <summary>
/// A deliberately plain Mixtral forward in double precision over a whole sequence (no cache, no batching, no SIMD):
/// the independent scalar truth for the backend's fast paths.
/// </summary>
public static class ScalarOracle
{
    /// <param name="routerProbs">When given ([position][layer] filled), each position's router softmax over all experts per layer.</param>
    public static (double[][] Logits, double[][] Entropies) Forward(ModelConfig c, MixtralWeights w, IReadOnlyList<int> ids,
        double[][][]? routerProbs = null)
    {
        var t = ids.Count;
        var h = new double[t][];
        for (var i = 0; i < t; i++) h[i] = Row(w.Embedding, ids[i]);
        var entropies = new double[t][];
        for (var i = 0; i < t; i++) entropies[i] = new double[c.NumLayers];

        for (var l = 0; l < c.NumLayers; l++)
        {
            var layer = w.Layers[l];
            var x = h.Select(r => RmsNorm(r, layer.InputNorm, c.RmsNormEps)).ToArray();
            var q = x.Select((r, i) => Rope(MatVec(layer.QProj, r), c.NumHeads, c.HeadDim, c.RopeTheta, i)).ToArray();
            var k = x.Select((r, i) => Rope(MatVec(layer.KProj, r), c.NumKvHeads, c.HeadDim, c.RopeTheta, i)).ToArray();
            var v = x.Select(r => MatVec(layer.VProj, r)).ToArray();
            for (var i = 0; i < t; i++)
            {
                var attention = new double[c.NumHeads * c.HeadDim];
                for (var head = 0; head < c.NumHeads; head++)
                {
                    var kvHead = head / (c.NumHeads / c.NumKvHeads);
                    var lo = c.SlidingWindow is { } window ? Math.Max(0, i - window + 1) : 0;
                    var scores = new double[i + 1];
                    var max = double.NegativeInfinity;
                    for (var j = lo; j <= i; j++)
                    {
                        double s = 0;
                        for (var d = 0; d < c.HeadDim; d++) s += q[i][head * c.HeadDim + d] * k[j][kvHead * c.HeadDim + d];
                        scores[j] = s / Math.Sqrt(c.HeadDim);
                        max = Math.Max(max, scores[j]);
                    }
                    double sum = 0;
                    for (var j = lo; j <= i; j++) sum += scores[j] = Math.Exp(scores[j] - max);
                    for (var j = lo; j <= i; j++)
                        for (var d = 0; d < c.HeadDim; d++)
                            attention[head * c.HeadDim + d] += scores[j] / sum * v[j][kvHead * c.HeadDim + d];
                }
                var o = MatVec(layer.OProj, attention);
                for (var d = 0; d < c.HiddenSize; d++) h[i][d] += o[d];
            }
            for (var i = 0; i < t; i++)
            {
                var y = RmsNorm(h[i], layer.PostAttentionNorm, c.RmsNormEps);
                var logits = MatVec(layer.Router, y);
                var max = logits.Max();
                var probs = logits.Select(z => Math.Exp(z - max)).ToArray();
                var total = probs.Sum();
                for (var e = 0; e < probs.Length; e++) probs[e] /= total;
                entropies[i][l] = -probs.Where(p => p > 0).Sum(p => p * Math.Log(p));
                if (routerProbs is not null) routerProbs[i][l] = probs;
                var top = Enumerable.Range(0, probs.Length).OrderByDescending(e => probs[e]).Take(c.NumExpertsPerToken).ToArray();
                var topSum = top.Sum(e => probs[e]);
                foreach (var e in top)
                {
                    var expert = layer.Experts[e];
                    var gate = MatVec(expert.Gate, y);
                    var up = MatVec(expert.Up, y);
                    var act = gate.Select((g, n) => g / (1 + Math.Exp(-g)) * up[n]).ToArray();
                    var down = MatVec(expert.Down, act);
                    for (var d = 0; d < c.HiddenSize; d++) h[i][d] += probs[e] / topSum * down[d];
                }
            }
        }
        var result = h.Select(r => MatVec(w.LmHead, RmsNorm(r, w.FinalNorm, c.RmsNormEps))).ToArray();
        return (result, entropies);
    }

    /// <summary>Each position's router softmax over all experts at every layer, [position][layer][expert].</summary>
    public static double[][][] RouterProbabilities(ModelConfig c, MixtralWeights w, IReadOnlyList<int> ids)
    {
        var probs = ids.Select(_ => new double[c.NumLayers][]).ToArray();
        Forward(c, w, ids, probs);
        return probs;
    }

    private static double[] Row(TensorView m, int r)
    {
        var row = new float[m.RowLength];
        m.ReadFloats((long)r * m.RowLength, row);
        return row.Select(x => (double)x).ToArray();
    }

    private static double[] MatVec(TensorView m, double[] x)
    {
        var y = new double[m.Rows];
        for (var r = 0; r < m.Rows; r++)
        {
            var row = Row(m, r);
            double s = 0;
            for (var i = 0; i < x.Length; i++) s += row[i] * x[i];
            y[r] = s;
        }
        return y;
    }

    private static double[] RmsNorm(double[] x, TensorView weight, double eps)
    {
        var w = Row(weight, 0);
        var inv = 1 / Math.Sqrt(x.Sum(v => v * v) / x.Length + eps);
        return x.Select((v, i) => w[i] * v * inv).ToArray();
    }

    private static double[] Rope(double[] x, int heads, int headDim, double theta, int position)
    {
        var half = headDim / 2;
        for (var head = 0; head < heads; head++)
            for (var i = 0; i < half; i++)
            {
                var angle = position * Math.Pow(theta, -2.0 * i / headDim);
                double a = x[head * headDim + i], b = x[head * headDim + i + half];
                x[head * headDim + i] = a * Math.Cos(angle) - b * Math.Sin(angle);
                x[head * headDim + i + half] = b * Math.Cos(angle) + a * Math.Sin(angle);
            }
        return x;
    }
}
