using System.Globalization;

namespace MoeRagInject.Evaluation;

/// <summary>L2-regularised logistic regression by Newton's method, in double precision.</summary>
public static class LogisticRegression
{
    /// <summary>
    /// Minimises (Σ_i c_i·ℓ(y_i, x_i·w + b)) / Σ_i c_i + (λ/2)·‖w‖² with ℓ the log-loss and c_i the example weights (the bias is
    /// not penalised). Newton steps, halved while the objective does not fall, until the largest step is below 1e-10.
    /// </summary>
    public static (double[] W, double B) Fit(IReadOnlyList<double[]> x, IReadOnlyList<bool> y, IReadOnlyList<double> weights, double lambda,
        int maxIterations = 100)
    {
        var n = x.Count;
        if (n == 0 || y.Count != n || weights.Count != n) throw new ArgumentException("examples, labels and weights differ in number, or there are none");
        if (!(lambda >= 0)) throw new ArgumentOutOfRangeException(nameof(lambda), lambda, "λ must be >= 0");
        var d = x[0].Length;
        var total = weights.Sum();
        var theta = new double[d + 1];  // w, then b
        var objective = Objective(x, y, weights, total, lambda, theta);
        var gradient = new double[d + 1];
        var hessian = new double[(d + 1) * (d + 1)];
        for (var iteration = 0; iteration < maxIterations; iteration++)
        {
            Array.Clear(gradient);
            Array.Clear(hessian);
            for (var i = 0; i < n; i++)
            {
                var xi = x[i];
                var p = Sigmoid(Dot(xi, theta) + theta[d]);
                var c = weights[i] / total;
                var r = c * (p - (y[i] ? 1 : 0));
                var v = c * p * (1 - p);
                for (var a = 0; a < d; a++)
                {
                    gradient[a] += r * xi[a];
                    var va = v * xi[a];
                    for (var b = 0; b <= a; b++) hessian[a * (d + 1) + b] += va * xi[b];
                    hessian[d * (d + 1) + a] += va;
                }
                gradient[d] += r;
                hessian[d * (d + 1) + d] += v;
            }
            for (var a = 0; a < d; a++)
            {
                gradient[a] += lambda * theta[a];
                hessian[a * (d + 1) + a] += lambda;
            }
            hessian[d * (d + 1) + d] += 1e-12;
            for (var a = 0; a <= d; a++)
                for (var b = a + 1; b <= d; b++) hessian[a * (d + 1) + b] = hessian[b * (d + 1) + a];
            var step = (double[])gradient.Clone();
            Cholesky.Solve(Cholesky.Factor(hessian, d + 1), d + 1, step);
            var scale = 1.0;
            double[] next;
            double nextObjective;
            while (true)
            {
                next = [.. theta.Select((t, k) => t - scale * step[k])];
                nextObjective = Objective(x, y, weights, total, lambda, next);
                if (nextObjective <= objective + 1e-15 || scale < 1e-6) break;
                scale /= 2;
            }
            var largest = step.Max(Math.Abs) * scale;
            theta = next;
            objective = nextObjective;
            if (largest < 1e-10) break;
        }
        return (theta[..d], theta[d]);
    }

    /// <summary>The objective <see cref="Fit"/> minimises, at θ = (w, b).</summary>
    public static double Objective(IReadOnlyList<double[]> x, IReadOnlyList<bool> y, IReadOnlyList<double> weights, double total, double lambda,
        ReadOnlySpan<double> theta)
    {
        var d = theta.Length - 1;
        double loss = 0;
        for (var i = 0; i < x.Count; i++)
        {
            var eta = Dot(x[i], theta) + theta[d];
            // −log σ(η) = log(1 + e^−η), −log(1 − σ(η)) = log(1 + e^η), computed without overflow.
            var z = y[i] ? -eta : eta;
            loss += weights[i] * (z > 0 ? z + Math.Log(1 + Math.Exp(-z)) : Math.Log(1 + Math.Exp(z)));
        }
        double penalty = 0;
        for (var a = 0; a < d; a++) penalty += theta[a] * theta[a];
        return loss / total + lambda / 2 * penalty;
    }

    public static double Sigmoid(double x) => x >= 0 ? 1 / (1 + Math.Exp(-x)) : Math.Exp(x) / (1 + Math.Exp(x));

    private static double Dot(double[] x, ReadOnlySpan<double> theta)
    {
        double s = 0;
        for (var a = 0; a < x.Length; a++) s += x[a] * theta[a];
        return s;
    }
}

/// <summary>One calibration question as the router probe sees it: its router probabilities at each answer token and its label.</summary>
/// <param name="Probs">[answer token j][layer × expert]: the router softmax of the forward pass that produced token j.</param>
/// <param name="Wrong">The RAG-off answer's token F1 is below <see cref="Evaluator.WrongBelowF1"/>.</param>
public sealed record ProbeQuestion(string Id, float[][] Probs, bool Wrong);

/// <summary>One (window, λ) of the cross-validated search, with its mean AUROC over the folds.</summary>
public sealed record ProbeTrial(int Window, double Lambda, double CvAuroc);

/// <summary>The probe <see cref="RouterProbeTrainer.Train"/> chose, in raw probability units (what the device multiplies).</summary>
public sealed record TrainedProbe(int Window, double Lambda, float[] Weights, double Bias, IReadOnlyList<ProbeTrial> Trials, int Questions,
    int Examples, int Folds);

/// <summary>
/// Trains the router probe: logistic regression (L2) from the pooled router probabilities of each of a question's first
/// <c>positions</c> answer tokens to the question's label, every question weighing the same. Features are standardised for
/// the fit and the weights folded back into raw units. The window and λ are chosen by k-fold cross-validation over
/// questions (seeded folds): the pair with the highest mean AUROC of the question's largest score over those positions.
/// </summary>
public static class RouterProbeTrainer
{
    /// <summary>The pooled feature of answer token <paramref name="j"/>: the mean of tokens max(0, j − W + 1) … j.</summary>
    public static double[] Feature(float[][] probs, int j, int window)
    {
        var first = Math.Max(0, j - window + 1);
        var f = new double[probs[j].Length];
        for (var t = first; t <= j; t++)
            for (var i = 0; i < f.Length; i++) f[i] += probs[t][i];
        for (var i = 0; i < f.Length; i++) f[i] /= j - first + 1;
        return f;
    }

    /// <summary>A question's score at token j under raw weights: σ(w·f_j + b).</summary>
    public static double Score(float[][] probs, int j, int window, ReadOnlySpan<float> weights, double bias)
    {
        var f = Feature(probs, j, window);
        double z = bias;
        for (var i = 0; i < f.Length; i++) z += weights[i] * f[i];
        return LogisticRegression.Sigmoid(z);
    }

    /// <summary>The largest score over a question's first <paramref name="positions"/> answer tokens.</summary>
    public static double MaxScore(ProbeQuestion q, int positions, int window, ReadOnlySpan<float> weights, double bias)
    {
        var best = double.NegativeInfinity;
        for (var j = 0; j < Math.Min(positions, q.Probs.Length); j++) best = Math.Max(best, Score(q.Probs, j, window, weights, bias));
        return best;
    }

    public static TrainedProbe Train(IReadOnlyList<ProbeQuestion> questions, int positions, IReadOnlyList<int> windows, IReadOnlyList<double> lambdas,
        int folds, int seed)
    {
        var usable = questions.Where(q => q.Probs.Length > 0).ToList();
        if (usable.Count(q => q.Wrong) < 2 || usable.Count(q => !q.Wrong) < 2)
            throw new InvalidOperationException(string.Create(CultureInfo.InvariantCulture,
                $"the probe needs at least two questions of each label ({usable.Count(q => q.Wrong)} wrong, {usable.Count(q => !q.Wrong)} right)"));
        folds = Math.Clamp(folds, 2, Math.Min(usable.Count(q => q.Wrong), usable.Count(q => !q.Wrong)));
        // Seeded folds, stratified by label so that every fold holds both.
        var fold = new int[usable.Count];
        foreach (var label in new[] { true, false })
        {
            var members = Enumerable.Range(0, usable.Count).Where(i => usable[i].Wrong == label).ToArray();
            new Random(seed).Shuffle(members);
            for (var k = 0; k < members.Length; k++) fold[members[k]] = k % folds;
        }
        var trials = new List<ProbeTrial>();
        foreach (var window in windows)
            foreach (var lambda in lambdas)
            {
                var aurocs = new List<double>();
                for (var f = 0; f < folds; f++)
                {
                    var train = usable.Where((_, i) => fold[i] != f).ToList();
                    var test = usable.Where((_, i) => fold[i] == f).ToList();
                    var (weights, bias) = FitRaw(train, positions, window, lambda);
                    aurocs.Add(Stats.Auroc([.. test.Select(q => MaxScore(q, positions, window, weights, bias))], [.. test.Select(q => q.Wrong)]));
                }
                trials.Add(new ProbeTrial(window, lambda, Stats.Mean(aurocs)));
            }
        // The best mean AUROC; ties to the smaller window, then the larger λ (the simpler probe).
        var best = trials.OrderByDescending(t => double.IsNaN(t.CvAuroc) ? double.NegativeInfinity : t.CvAuroc)
            .ThenBy(t => t.Window).ThenByDescending(t => t.Lambda).First();
        var (finalWeights, finalBias) = FitRaw(usable, positions, best.Window, best.Lambda);
        var examples = usable.Sum(q => Math.Min(positions, q.Probs.Length));
        return new TrainedProbe(best.Window, best.Lambda, finalWeights, finalBias, trials, usable.Count, examples, folds);
    }

    /// <summary>Fits on standardised features and returns the weights and bias for raw probabilities.</summary>
    internal static (float[] Weights, double Bias) FitRaw(IReadOnlyList<ProbeQuestion> questions, int positions, int window, double lambda)
    {
        var x = new List<double[]>();
        var y = new List<bool>();
        var c = new List<double>();
        foreach (var q in questions)
        {
            var count = Math.Min(positions, q.Probs.Length);
            for (var j = 0; j < count; j++)
            {
                x.Add(Feature(q.Probs, j, window));
                y.Add(q.Wrong);
                c.Add(1.0 / count);
            }
        }
        var d = x[0].Length;
        var mean = new double[d];
        var sd = new double[d];
        var total = c.Sum();
        for (var i = 0; i < x.Count; i++)
            for (var a = 0; a < d; a++) mean[a] += c[i] * x[i][a] / total;
        for (var i = 0; i < x.Count; i++)
            for (var a = 0; a < d; a++) sd[a] += c[i] * (x[i][a] - mean[a]) * (x[i][a] - mean[a]) / total;
        for (var a = 0; a < d; a++) sd[a] = Math.Sqrt(sd[a]);
        // A feature that never varies carries nothing: it is left at 0 (and its weight is 0).
        var standardised = x.Select(row => row.Select((v, a) => sd[a] > 1e-9 ? (v - mean[a]) / sd[a] : 0).ToArray()).ToList();
        var (w, b) = LogisticRegression.Fit(standardised, y, c, lambda);
        var weights = new float[d];
        var bias = b;
        for (var a = 0; a < d; a++)
        {
            if (!(sd[a] > 1e-9)) continue;
            weights[a] = (float)(w[a] / sd[a]);
            bias -= w[a] * mean[a] / sd[a];
        }
        return (weights, bias);
    }
}
