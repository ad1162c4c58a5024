using MoeRagInject.Model;

namespace MoeRagInject.Evaluation.Tests;

/// <summary>The router probe's training: the logistic fit against its optimality conditions and a known generating model.</summary>
public sealed class ProbeTrainingTests
{
    /// <summary>Labels drawn from σ(x·w* + b*) for Gaussian x, with unequal example weights.</summary>
    private static (List<double[]> X, List<bool> Y, List<double> C) Synthetic(int n, double[] w, double b, ulong seed)
    {
        var rng = new SplitMix64(seed);
        var x = new List<double[]>();
        var y = new List<bool>();
        var c = new List<double>();
        for (var i = 0; i < n; i++)
        {
            var xi = w.Select(_ => rng.NextGaussian()).ToArray();
            var p = 1 / (1 + Math.Exp(-(xi.Zip(w, (a, v) => a * v).Sum() + b)));
            x.Add(xi);
            y.Add(rng.NextDouble() < p);
            c.Add(0.5 + rng.NextDouble());
        }
        return (x, y, c);
    }

    /// <summary>At the optimum the gradient, computed here from its definition, vanishes: Σ c_i(σ_i − y_i)x_i / Σc + λw = 0, Σ c_i(σ_i − y_i) = 0.</summary>
    [Theory]
    [InlineData(0.0)]
    [InlineData(0.1)]
    [InlineData(3.0)]
    public void Fit_SatisfiesTheOptimalityConditions(double lambda)
    {
        var (x, y, c) = Synthetic(400, [1.5, -2, 0.5, 0], 0.3, 7);
        var (w, b) = LogisticRegression.Fit(x, y, c, lambda);
        var total = c.Sum();
        var gradient = new double[w.Length + 1];
        for (var i = 0; i < x.Count; i++)
        {
            var p = 1 / (1 + Math.Exp(-(x[i].Zip(w, (a, v) => a * v).Sum() + b)));
            var r = c[i] * (p - (y[i] ? 1 : 0)) / total;
            for (var a = 0; a < w.Length; a++) gradient[a] += r * x[i][a];
            gradient[^1] += r;
        }
        for (var a = 0; a < w.Length; a++) gradient[a] += lambda * w[a];
        Assert.All(gradient, g => Assert.True(Math.Abs(g) < 1e-9, $"gradient {string.Join(", ", gradient)}"));
        // A stronger penalty shrinks the weights.
        if (lambda > 0)
        {
            var (loose, _) = LogisticRegression.Fit(x, y, c, lambda / 10);
            Assert.True(Math.Sqrt(w.Sum(v => v * v)) < Math.Sqrt(loose.Sum(v => v * v)));
        }
    }

    [Fact]
    public void Fit_RecoversTheGeneratingModel()
    {
        double[] truth = [1.5, -2, 0.5, 0];
        var (x, y, c) = Synthetic(20_000, truth, 0.3, 11);
        var (w, b) = LogisticRegression.Fit(x, y, c, 0);
        for (var a = 0; a < truth.Length; a++) Assert.True(Math.Abs(w[a] - truth[a]) < 0.1, $"w[{a}] = {w[a]}, truth {truth[a]}");
        Assert.True(Math.Abs(b - 0.3) < 0.1, $"b = {b}");
    }

    /// <summary>Perfectly separable labels: the penalty keeps the fit finite, and it still ranks every positive above every negative.</summary>
    [Fact]
    public void Fit_OnSeparableData_StaysFinite()
    {
        var x = Enumerable.Range(0, 40).Select(i => new double[] { i - 19.5 }).ToList();
        var y = x.Select(v => v[0] > 0).ToList();
        var (w, b) = LogisticRegression.Fit(x, y, [.. Enumerable.Repeat(1.0, 40)], 1e-3);
        Assert.True(double.IsFinite(w[0]) && double.IsFinite(b) && w[0] > 0);
    }

    /// <summary>
    /// Questions whose label shows in one expert's probability at one layer: the trainer finds it, its raw weights give the
    /// scores the standardised fit gives, pooling averages the window, and the cross-validation tried every pair.
    /// </summary>
    [Fact]
    public void Trainer_FindsTheInformativeExpert_InRawUnits()
    {
        const int layers = 2, experts = 4, positions = 4;
        var rng = new SplitMix64(3);
        float[] Probabilities(bool wrong)
        {
            var p = new float[layers * experts];
            for (var l = 0; l < layers; l++)
            {
                var logits = Enumerable.Range(0, experts).Select(_ => rng.NextGaussian()).ToArray();
                if (l == 1 && wrong) logits[2] += 2.5;
                var sum = logits.Sum(Math.Exp);
                for (var e = 0; e < experts; e++) p[l * experts + e] = (float)(Math.Exp(logits[e]) / sum);
            }
            return p;
        }
        var questions = Enumerable.Range(0, 300).Select(i =>
        {
            var wrong = i % 3 == 0;
            return new ProbeQuestion($"q{i}", [.. Enumerable.Range(0, 2 + i % 5).Select(_ => Probabilities(wrong))], wrong);
        }).ToList();
        var trained = RouterProbeTrainer.Train(questions, positions, [1, 2], [1e-2, 1], folds: 4, seed: 0);
        Assert.Equal(4, trained.Trials.Count);
        Assert.True(trained.Trials.Max(t => t.CvAuroc) > 0.9, $"cross-validated AUROC {trained.Trials.Max(t => t.CvAuroc)}");
        // A layer's probabilities sum to one, so only differences within a layer mean anything: expert 2 of layer 1 stands
        // out above the rest of its layer, and layer 0 (which carries nothing) hardly varies.
        Assert.Equal(1 * experts + 2, Enumerable.Range(0, layers * experts).MaxBy(i => trained.Weights[i]));
        double Spread(int l) => trained.Weights[(l * experts)..((l + 1) * experts)].Max() - trained.Weights[(l * experts)..((l + 1) * experts)].Min();
        Assert.True(Spread(1) > 5 * Spread(0), $"weights {string.Join(", ", trained.Weights)}");

        // The score by hand from the raw weights: σ(w · mean of the window's probabilities + b).
        var q = questions[5];
        var j = Math.Min(3, q.Probs.Length - 1);
        var first = Math.Max(0, j - trained.Window + 1);
        double z = trained.Bias;
        for (var i = 0; i < layers * experts; i++)
            z += trained.Weights[i] * Enumerable.Range(first, j - first + 1).Average(t => (double)q.Probs[t][i]);
        Assert.Equal(1 / (1 + Math.Exp(-z)), RouterProbeTrainer.Score(q.Probs, j, trained.Window, trained.Weights, trained.Bias), 12);
    }

    [Fact]
    public void Trainer_RefusesOneLabelOnly()
    {
        var questions = Enumerable.Range(0, 10).Select(i => new ProbeQuestion($"q{i}", [[0.5f, 0.5f]], Wrong: false)).ToList();
        var error = Assert.Throws<InvalidOperationException>(() => RouterProbeTrainer.Train(questions, 4, [1], [1], 5, 0));
        Assert.Contains("two questions of each label", error.Message);
    }
}
