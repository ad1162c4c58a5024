using System.Globalization;
using System.Text.Json.Nodes;
using MoeRagInject.Rag;

namespace MoeRagInject.Evaluation;

/// <summary>
/// A question's trigger signals in the none run (RAG off), as the `questions` array of eval.json gives them: each signal at
/// the first answer token (j = 0, the forward pass of the last prompt position) and its largest value over the first
/// <see cref="Calibrator.Window"/> answer tokens (<c>*_w4</c>). NaN where the run has no value (no router probe, no token).
/// </summary>
public sealed record QuestionSignals(double RouterEntropyMax, double RouterEntropyMean, double RouterProbe, double OutputEntropy,
    double RouterEntropyMaxW4, double RouterEntropyMeanW4, double RouterProbeW4, double OutputEntropyW4)
{
    /// <summary>The columns in the order the report lists them, with their names in eval.json.</summary>
    public static readonly IReadOnlyList<(string Name, Func<QuestionSignals, double> Value)> Columns =
    [
        ("router_entropy_max", s => s.RouterEntropyMax),
        ("router_entropy_max_w4", s => s.RouterEntropyMaxW4),
        ("router_entropy_mean", s => s.RouterEntropyMean),
        ("router_entropy_mean_w4", s => s.RouterEntropyMeanW4),
        ("router_probe", s => s.RouterProbe),
        ("router_probe_w4", s => s.RouterProbeW4),
        ("output_entropy", s => s.OutputEntropy),
        ("output_entropy_w4", s => s.OutputEntropyW4),
    ];

    public static QuestionSignals Of(QuestionRun run)
    {
        double At(Func<int, double> value) => run.Tokens.Count > 0 ? value(0) : double.NaN;
        double Window(Func<int, double> value)
        {
            var count = Math.Min(Calibrator.Window, run.Tokens.Count);
            if (count == 0) return double.NaN;
            var best = double.NegativeInfinity;
            for (var j = 0; j < count; j++) best = Math.Max(best, value(j));
            return best;
        }
        double Max(int j) => run.RouterEntropy[j].Max();
        double Mean(int j) => run.RouterEntropy[j].Average(v => (double)v);
        double Probe(int j) => j < run.RouterProbe.Count ? run.RouterProbe[j] : double.NaN;
        double Output(int j) => run.OutputEntropy[j];
        return new QuestionSignals(At(Max), At(Mean), At(Probe), At(Output), Window(Max), Window(Mean), Window(Probe), Window(Output));
    }

    public JsonObject ToJson()
    {
        var o = new JsonObject();
        foreach (var (name, value) in Columns) o[name] = JsonOut.Num(value(this), 8);
        return o;
    }
}

/// <summary>A signal column's AUROC for one label, with its 95% interval (AUROC ± 1.96 × the Hanley–McNeil standard error).</summary>
public sealed record SignalAuroc(string Column, string Label, double Auroc, double Low, double High, int Count, int Positives);

/// <summary>One point of a signal's curve: prompt_trigger run on the curve questions at a threshold on that signal.</summary>
/// <param name="TargetFraction">The share of questions whose none-run maximum of the signal over the answer exceeds the threshold.</param>
/// <param name="RetrievedFraction">The share of questions that made at least one retrieval.</param>
/// <param name="Run">The run itself (per-question F1 for the bootstrap).</param>
public sealed record CurvePoint(string Signal, double TargetFraction, double Threshold, GroupMetrics Overall, double HeldoutF1, double TaughtF1,
    double RetrievedFraction, ModeResult Run);

/// <summary>Percentile bootstrap over questions, seeded: the same resamples for every statistic of one call.</summary>
public static class Bootstrap
{
    public const int Resamples = 2000;

    /// <summary>
    /// The 2.5th and 97.5th percentiles of <paramref name="statistic"/> over <paramref name="resamples"/> resamples (with
    /// replacement) of the indices 0..n−1, drawn from <paramref name="seed"/>; resamples where it is not finite are left out.
    /// </summary>
    public static (double Low, double High) Ci95(int n, Func<int[], double> statistic, int seed, int resamples = Resamples)
    {
        if (n == 0) return (double.NaN, double.NaN);
        var rng = new Random(seed);
        var values = new List<double>(resamples);
        var sample = new int[n];
        for (var b = 0; b < resamples; b++)
        {
            for (var i = 0; i < n; i++) sample[i] = rng.Next(n);
            var v = statistic(sample);
            if (double.IsFinite(v)) values.Add(v);
        }
        if (values.Count == 0) return (double.NaN, double.NaN);
        values.Sort();
        return (Stats.QuantileSorted(values, 0.025), Stats.QuantileSorted(values, 0.975));
    }

    /// <summary>
    /// <see cref="Ci95"/> over clusters: each resample draws as many clusters as there are (with replacement), each bringing
    /// all its indices (row i is in cluster <paramref name="clusterOf"/>[i]), for rows that share a cause of variation.
    /// </summary>
    public static (double Low, double High) Ci95Clustered(int[] clusterOf, Func<int[], double> statistic, int seed, int resamples = Resamples)
    {
        var clusters = Enumerable.Range(0, clusterOf.Length).GroupBy(i => clusterOf[i]).Select(g => g.ToArray()).ToArray();
        return Ci95(clusters.Length, picked => statistic([.. picked.SelectMany(c => clusters[c])]), seed, resamples);
    }
}

/// <summary>The trigger signals as eval measures them: per-token values, AUROCs, the questions array, curve thresholds.</summary>
public static class SignalAnalysis
{
    /// <summary>The value of <paramref name="signal"/> that the trigger compares with its threshold at answer token j.</summary>
    public static double PerToken(TriggerSignal signal, QuestionRun run, int j) => signal switch
    {
        TriggerSignal.OutputEntropy => run.OutputEntropy[j],
        TriggerSignal.RouterProbe => j < run.RouterProbe.Count ? run.RouterProbe[j] : double.NaN,
        _ => run.RouterEntropy[j].Max(),  // --trigger-aggregation any: any layer above = the max above
    };

    /// <summary>The largest value of the signal over the whole answer (NaN without tokens or values).</summary>
    public static double AnswerMax(TriggerSignal signal, QuestionRun run)
    {
        var best = double.NaN;
        for (var j = 0; j < run.Tokens.Count; j++)
        {
            var v = PerToken(signal, run, j);
            if (!double.IsNaN(v) && !(v <= best)) best = v;
        }
        return best;
    }

    /// <summary>
    /// Thresholds at which a prompt-mode trigger on the signal fires for about each target share of the questions: prompt RAG
    /// emits exactly the RAG-off tokens until its first fire, so a question fires when its RAG-off maximum over the answer
    /// exceeds the threshold; the threshold is that maximum's (1 − share) quantile over the questions.
    /// </summary>
    public static double[] CurveThresholds(IEnumerable<double> answerMaxima, IReadOnlyList<double> shares)
    {
        var sorted = answerMaxima.Where(v => !double.IsNaN(v)).Order().ToArray();
        return [.. shares.Select(q => Stats.QuantileSorted(sorted, 1 - q))];
    }

    /// <summary>Every column's AUROC for a wrong RAG-off answer and for a held-out term, over the given questions.</summary>
    public static List<SignalAuroc> Aurocs(IReadOnlyList<QuestionSignals> signals, IReadOnlyList<bool> wrong, IReadOnlyList<bool> heldout)
    {
        var result = new List<SignalAuroc>();
        foreach (var (name, value) in QuestionSignals.Columns)
        {
            var scores = signals.Select(value).ToList();
            foreach (var (label, labels) in new[] { ("wrong", wrong), ("heldout", heldout) })
            {
                var present = Enumerable.Range(0, scores.Count).Where(i => !double.IsNaN(scores[i])).ToList();
                var positives = present.Count(i => labels[i]);
                var auroc = Stats.Auroc([.. present.Select(i => scores[i])], [.. present.Select(i => labels[i])]);
                var se = Stats.AurocStandardError(auroc, positives, present.Count - positives);
                result.Add(new SignalAuroc(name, label, auroc, auroc - 1.96 * se, auroc + 1.96 * se, present.Count, positives));
            }
        }
        return result;
    }

    /// <summary>The `questions` array: each question's text, split, calibration role, every mode's answer and F1, the none run's signals.</summary>
    public static JsonArray QuestionsJson(IReadOnlyList<QaItem> items, IReadOnlyDictionary<string, ModeResult> modes,
        IReadOnlyDictionary<string, string> calibrationRole)
    {
        var byMode = modes.ToDictionary(kv => kv.Key, kv =>
            kv.Value.Runs.Select((r, i) => (r, i)).ToDictionary(x => x.r.Item.Id, x => (Run: x.r, F1: kv.Value.TokenF1[x.i]), StringComparer.Ordinal));
        var array = new JsonArray();
        foreach (var item in items)
        {
            var perMode = new JsonObject();
            foreach (var (mode, runs) in byMode)
            {
                if (!runs.TryGetValue(item.Id, out var r)) continue;
                perMode[mode] = new JsonObject
                {
                    ["f1"] = JsonOut.Num(r.F1, 5),
                    ["answer"] = r.Run.Answer,
                    ["retrievals"] = r.Run.Events.Count,
                };
            }
            var question = new JsonObject
            {
                ["id"] = item.Id,
                ["question"] = item.Question,
                ["split"] = item.Split,
                ["gold"] = item.Answer,
                ["calibration"] = calibrationRole.TryGetValue(item.Id, out var role) ? role : null,
                ["modes"] = perMode,
                ["signals"] = byMode.TryGetValue(EvalModes.None, out var none) && none.TryGetValue(item.Id, out var n)
                    ? QuestionSignals.Of(n.Run).ToJson() : null,
            };
            array.Add(question);
        }
        return array;
    }

    public static string Name(SignalAuroc a) => string.Create(CultureInfo.InvariantCulture, $"{a.Column} ({a.Label})");
}
