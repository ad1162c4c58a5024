using System.Globalization;
using System.Text;
using MoeRagInject.Rag;
using ScottPlot;

namespace MoeRagInject.Evaluation;

/// <summary>The markdown report and the PNG plots of an evaluation (ScottPlot 5, rendered with SkiaSharp).</summary>
public static class Report
{
    private static readonly Color[] s_palette =
    [
        Color.FromHex("#1f77b4"), Color.FromHex("#ff7f0e"), Color.FromHex("#2ca02c"),
        Color.FromHex("#d62728"), Color.FromHex("#9467bd"), Color.FromHex("#8c564b"),
    ];

    private static string F(double v, string format = "F3") => JsonOut.F(v, format);

    /// <summary>Writes the three plots next to <paramref name="outBase"/>; returns their paths.</summary>
    public static IReadOnlyList<string> WritePlots(EvaluationResult result, string outBase, double maxEntropy)
    {
        var paths = new List<string>();
        if (result.Trigger is { } trigger)
        {
            var path = outBase + "-entropy-hist.png";
            EntropyHistogram(trigger, maxEntropy, path);
            paths.Add(path);
        }
        if (result.Modes.Count > 0)
        {
            var path = outBase + "-f1-by-mode.png";
            QualityByMode(result, path);
            paths.Add(path);
        }
        if (result.Sweep.Count > 0)
        {
            var path = outBase + "-f1-vs-retrievals.png";
            QualityVsRetrievals(result, path);
            paths.Add(path);
        }
        if (result.Curves.Count > 0)
        {
            var path = outBase + "-signals-f1.png";
            SignalCurves(result, path, heldout: false);
            paths.Add(path);
            path = outBase + "-signals-heldout-f1.png";
            SignalCurves(result, path, heldout: true);
            paths.Add(path);
        }
        return paths;
    }

    /// <summary>
    /// Each signal's curve: F1 against retrievals per question (all curve questions), or held-out F1 against the share of
    /// questions that retrieved, with the trigger goal's region (at most half the questions, within 0.03 of prompt_always).
    /// </summary>
    private static void SignalCurves(EvaluationResult result, string path, bool heldout)
    {
        var plot = new Plot();
        var colorIndex = 0;
        foreach (var group in result.Curves.GroupBy(c => c.Signal))
        {
            var points = group.OrderBy(c => c.TargetFraction).ToList();
            var color = s_palette[colorIndex++ % s_palette.Length];
            double[] xs = [.. points.Select(p => heldout ? p.RetrievedFraction : p.Overall.RetrievalsPerQuestion)];
            double[] ys = [.. points.Select(p => heldout ? p.HeldoutF1 : p.Overall.TokenF1)];
            var line = plot.Add.Scatter(xs, ys, color);
            line.LegendText = group.Key;
            line.MarkerSize = 8;
            line.LineWidth = 2;
        }
        var none = result.CurveNone;
        var prompt = result.CurvePromptAlways;
        foreach (var (name, metrics, f1, shape) in new[]
                 {
                     (EvalModes.None, none, result.CurveNoneHeldoutF1, MarkerShape.FilledSquare),
                     (EvalModes.PromptAlways, prompt, result.CurvePromptAlwaysHeldoutF1, MarkerShape.FilledDiamond),
                 })
        {
            if (metrics is null) continue;
            var x = heldout ? (name == EvalModes.None ? 0 : 1) : metrics.RetrievalsPerQuestion;
            var marker = plot.Add.Marker(x, heldout ? f1 : metrics.TokenF1, shape, 12, Colors.Black);
            marker.LegendText = name;
        }
        if (heldout && prompt is not null && double.IsFinite(result.CurvePromptAlwaysHeldoutF1))
        {
            var goal = plot.Add.HorizontalLine(result.CurvePromptAlwaysHeldoutF1 - Evaluator.F1Tolerance, 1, Colors.Gray, LinePattern.Dashed);
            goal.LegendText = string.Create(CultureInfo.InvariantCulture, $"goal: prompt_always − {Evaluator.F1Tolerance}, at most {Evaluator.RetrievalBudget} of the questions");
            plot.Add.VerticalLine(Evaluator.RetrievalBudget, 1, Colors.Gray, LinePattern.Dashed);
        }
        plot.ShowLegend(Edge.Bottom);
        var n = result.Curves[0].Run.Runs.Count;
        plot.Title(heldout
            ? string.Create(CultureInfo.InvariantCulture, $"Held-out F1 against the share of questions retrieving, prompt_trigger by signal (n = {n})")
            : string.Create(CultureInfo.InvariantCulture, $"F1 against retrievals per question, prompt_trigger by signal (n = {n})"));
        plot.XLabel(heldout ? "share of questions with a retrieval" : "retrievals per question");
        plot.YLabel(heldout ? "token F1, held-out questions" : "token F1 (all curve questions)");
        plot.Axes.Margins(0.08, 0.12);
        plot.SavePng(path, 860, 560);
    }

    private static void EntropyHistogram(TriggerQuality trigger, double maxEntropy, string path)
    {
        const int bins = 20;
        var all = trigger.MaxEntropyJ0Taught.Concat(trigger.MaxEntropyJ0Heldout).ToList();
        var lo = 0.0;
        var hi = maxEntropy;
        if (all.Count > 0)
        {
            // Zoom to the occupied range (with a margin) when it is much narrower than [0, ln E].
            var min = all.Min();
            var max = all.Max();
            var pad = Math.Max(0.02, (max - min) * 0.1);
            lo = Math.Max(0, min - pad);
            hi = Math.Min(maxEntropy, max + pad);
            if (hi <= lo) hi = lo + 0.1;
        }
        var width = (hi - lo) / bins;
        var plot = new Plot();
        var groups = new[] { ("taught", trigger.MaxEntropyJ0Taught, s_palette[0]), ("held-out", trigger.MaxEntropyJ0Heldout, s_palette[1]) };
        var bars = new List<Bar>();
        for (var g = 0; g < groups.Length; g++)
        {
            var (_, values, color) = groups[g];
            if (values.Count == 0) continue;
            var counts = new int[bins];
            foreach (var v in values) counts[Math.Clamp((int)((v - lo) / width), 0, bins - 1)]++;
            for (var b = 0; b < bins; b++)
            {
                if (counts[b] == 0) continue;
                var center = lo + (b + 0.5) * width + (g == 0 ? -0.22 : 0.22) * width;
                bars.Add(new Bar
                {
                    Position = center,
                    Value = counts[b] / (double)values.Count,
                    Size = width * 0.44,
                    FillColor = color,
                    LineWidth = 0,
                });
            }
        }
        plot.Add.Bars(bars);
        foreach (var (label, values, color) in groups)
            plot.Legend.ManualItems.Add(new LegendItem { LabelText = $"{label} (n = {values.Count})", FillColor = color });
        plot.ShowLegend(Alignment.UpperLeft);
        plot.Title("Router entropy at j = 0 (max over layers), none mode");
        plot.XLabel(string.Create(CultureInfo.InvariantCulture, $"entropy (nats; ln E = {maxEntropy:F3})"));
        plot.YLabel("fraction of questions");
        plot.Axes.SetLimitsX(lo, hi);
        plot.Axes.Margins(bottom: 0);
        plot.SavePng(path, 800, 480);
    }

    private static void QualityByMode(EvaluationResult result, string path)
    {
        var plot = new Plot();
        var modes = result.Modes.Values.ToList();
        string[] groups = ["overall", "taught", "heldout"];
        var bars = new List<Bar>();
        for (var m = 0; m < modes.Count; m++)
        {
            for (var g = 0; g < groups.Length; g++)
            {
                var value = g == 0 ? modes[m].Overall.TokenF1
                    : modes[m].BySplit.TryGetValue(groups[g], out var split) ? split.TokenF1 : double.NaN;
                if (double.IsNaN(value)) continue;
                bars.Add(new Bar
                {
                    Position = m + (g - 1) * 0.27,
                    Value = value,
                    Size = 0.25,
                    FillColor = s_palette[g],
                    LineWidth = 0,
                    Label = value.ToString("F2", CultureInfo.InvariantCulture),
                });
            }
        }
        var barPlot = plot.Add.Bars(bars);
        barPlot.ValueLabelStyle.FontSize = 11;
        for (var g = 0; g < groups.Length; g++)
            plot.Legend.ManualItems.Add(new LegendItem { LabelText = groups[g] == "heldout" ? "held-out" : groups[g], FillColor = s_palette[g] });
        plot.ShowLegend(Edge.Bottom);
        plot.Axes.Bottom.TickGenerator = new ScottPlot.TickGenerators.NumericManual(
            [.. Enumerable.Range(0, modes.Count).Select(i => (double)i)], [.. modes.Select(m => m.Mode)]);
        plot.Axes.Bottom.MajorTickStyle.Length = 0;
        plot.Title(string.Create(CultureInfo.InvariantCulture, $"Answer token F1 by mode (n = {modes[0].Overall.Count})"));
        plot.YLabel("token F1");
        var top = Math.Max(0.1, bars.Count == 0 ? 1 : bars.Max(b => b.Value));
        plot.Axes.SetLimitsY(0, Math.Min(1.05, top * 1.25 + 0.02));
        plot.Axes.SetLimitsX(-0.6, modes.Count - 0.4);
        plot.SavePng(path, Math.Max(700, 150 * modes.Count), 520);
    }

    private static void QualityVsRetrievals(EvaluationResult result, string path)
    {
        var plot = new Plot();
        var colorIndex = 0;
        foreach (var group in result.Sweep.GroupBy(p => p.Mode))
        {
            var points = group.OrderBy(p => p.Percentile).ToList();
            var series = colorIndex;
            var color = s_palette[colorIndex++ % s_palette.Length];
            double[] xs = [.. points.Select(p => p.Overall.RetrievalsPerQuestion)];
            double[] ys = [.. points.Select(p => p.Overall.TokenF1)];
            var line = plot.Add.Scatter(xs, ys, color);
            line.LegendText = $"{group.Key} (threshold sweep)";
            line.MarkerSize = 8;
            line.LineWidth = 2;
            foreach (var p in points)
            {
                var text = plot.Add.Text(string.Create(CultureInfo.InvariantCulture, $"p{p.Percentile:G4}"), p.Overall.RetrievalsPerQuestion, p.Overall.TokenF1);
                text.LabelFontSize = 11;
                text.LabelFontColor = color;
                text.LabelOffsetX = 6;
                text.LabelOffsetY = series % 2 == 0 ? -18 : 4;
            }
        }
        foreach (var (mode, shape) in new[] { (EvalModes.None, MarkerShape.FilledSquare), (EvalModes.PromptAlways, MarkerShape.FilledDiamond) })
        {
            if (!result.Modes.TryGetValue(mode, out var r)) continue;
            var marker = plot.Add.Marker(r.Overall.RetrievalsPerQuestion, r.Overall.TokenF1, shape, 12, Colors.Black);
            marker.LegendText = mode;
        }
        plot.ShowLegend(Edge.Bottom);
        plot.Title("Quality vs retrievals per question as the threshold moves");
        plot.XLabel("retrievals per question");
        plot.YLabel("token F1 (all questions)");
        plot.Axes.Margins(0.12, 0.15);
        plot.SavePng(path, 860, 560);
    }

    /// <summary>The markdown report.</summary>
    public static string Markdown(EvaluationResult result, EvaluationOptions options)
    {
        var md = new StringBuilder();
        var config = result.Json["config"]!;
        var n = config["n"]!.GetValue<int>();
        md.AppendLine("# moe-rag-inject evaluation").AppendLine();
        md.AppendLine(Inv($"- model: `{config["model"]}`"));
        md.AppendLine(Inv($"- questions: {n} from `{config["qa"]}`") + (options.Limit is { } l ? Inv($" (--limit {l}, seed {options.Seed})") : ""));
        md.AppendLine(Inv($"- corpus: `{options.Corpus}`; top-{options.RetrievalTopK} passages per retrieval, at most {options.MaxRetrievals} retrievals per question in the triggered modes{(options.TriggerWindow is int window ? $", which fire within the first {window} answer tokens only" : "")}"));
        md.AppendLine(Inv($"- trigger signal of prompt_trigger and the latent modes: `{TriggerSignals.Name(result.Signal)}` (from {result.SignalSource}); threshold {F(result.Threshold, "F4")} {Units(result.Signal)} (from {result.ThresholdSource})"));
        md.AppendLine(Inv($"- greedy decoding, up to {options.MaxNewTokens} new tokens, stop at EOS or a newline; answer = first line, trimmed"));
        var machine = config["machine"]!;
        md.AppendLine(Inv($"- machine: {machine["cores"]} cores, {machine["os"]} ({machine["arch"]}), {machine["runtime"]}; date {config["date"]}; total {config["elapsed_s"]} s"));
        md.AppendLine();

        md.AppendLine("## Modes").AppendLine();
        var block = config["latency_block"]!.GetValue<int>();
        var blocks = (n + block - 1) / block;
        var turns = blocks > 1
            ? Inv($"The modes take turns over {blocks} blocks of up to {block} questions (every mode answers a block before the next begins; the first mode of a block rotates), after a discarded warm-up, so that anything else running on the machine falls on every mode alike; it still shows in the timings (each mode's mean latency per block is `latency_mean_by_block_s` in the JSON).")
            : "The modes run one after another on the same machine, after a discarded warm-up; anything else running on the machine shows in the timings.";
        md.AppendLine(Inv($"Latency is end to end per question with {options.Concurrency} questions in flight at once (continuous batching), so it includes queueing behind the other questions of the batch; it also grows with the number of tokens generated (tokens/q). ") + turns
            + (Evaluator.TieredCompilationEnabled ? " Tiered JIT compilation was on: set DOTNET_TieredCompilation=0 for steadier latencies." : " Tiered JIT compilation was off."));
        md.AppendLine();
        md.AppendLine("| mode | token F1 (± 95% CI) | contains | F1 taught | F1 held-out (± 95% CI) | retrievals/q | with error/q | latency mean (s) | p50 | p95 | tokens/q | wall (s) | CPU ms/q |");
        md.AppendLine("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        foreach (var r in result.Modes.Values)
        {
            var o = r.Overall;
            md.AppendLine(Inv($"| {r.Mode} | {F(o.TokenF1)} ± {F(Stats.MeanCi95(r.TokenF1))} | {F(o.Contains)} | {F(SplitF1(r, "taught"))} | {F(SplitF1(r, "heldout"))} ± {F(Stats.MeanCi95(HeldoutF1s(r)))} | {F(o.RetrievalsPerQuestion, "F2")} | {F(o.RetrievalErrorsPerQuestion, "F2")} | {F(o.LatencyMean)} | {F(o.LatencyP50)} | {F(o.LatencyP95)} | {F(o.CompletionTokensMean, "F1")} | {F(r.WallSeconds, "F1")} | {F(r.CpuMillisecondsPerQuestion, "F1")} |"));
        }
        foreach (var (mode, reason) in result.Skipped) md.AppendLine($"| {mode} | skipped: {reason} | | | | | | | | | | | |");
        md.AppendLine();
        md.AppendLine("The ± columns are normal-approximation 95% confidence intervals of the mean over questions (1.96·sd/√n). CPU ms/q is the CPU time (all threads, user and system) the process used while the mode answered, per question: the work a mode costs, which other programs on the machine move far less than its latency.");
        md.AppendLine();
        foreach (var r in result.Modes.Values) md.AppendLine($"- `{r.Mode}`: {r.Description} ({r.Settings})");
        md.AppendLine();
        AppendHeldoutRetrieval(md, result);
        AppendRepetition(md, result);

        md.AppendLine("## Trigger quality (from the none run)").AppendLine();
        if (result.Trigger is { } t)
        {
            md.AppendLine(Inv($"{t.Count} questions, {t.Wrong} answered wrong without RAG (token F1 < {Evaluator.WrongBelowF1}), {t.Heldout} held-out. AUROC by Mann–Whitney (ties count half); n/a when a label has one class only."));
            md.AppendLine();
            md.AppendLine("| score | AUROC: no-RAG answer wrong (95% CI) | AUROC: held-out vs taught (95% CI) |");
            md.AppendLine("|---|---|---|");
            string WithCi(double auroc, long positives) =>
                $"{F(auroc)} ({F(auroc - 1.96 * Stats.AurocStandardError(auroc, positives, t.Count - positives))}–{F(auroc + 1.96 * Stats.AurocStandardError(auroc, positives, t.Count - positives))})";
            foreach (var key in t.AurocWrong.Keys)
                md.AppendLine($"| {key} | {WithCi(t.AurocWrong[key], t.Wrong)} | {WithCi(t.AurocHeldout[key], t.Heldout)} |");
            md.AppendLine();
            md.AppendLine("Confidence intervals: AUROC ± 1.96 × the Hanley–McNeil standard error.");
            md.AppendLine();
            md.AppendLine(Inv($"j = 0 is the forward pass of the last prompt position; *_mean_answer / output_entropy_mean average over the generated tokens. Max-over-layers entropy at j = 0: taught mean {F(Stats.Mean(t.MaxEntropyJ0Taught))}, held-out mean {F(Stats.Mean(t.MaxEntropyJ0Heldout))}."));
        }
        else
        {
            md.AppendLine("Not measured: the none mode was not run.");
        }
        md.AppendLine();

        md.AppendLine("## Trigger signals").AppendLine();
        if (result.SignalAurocs.Count > 0)
        {
            var first = result.SignalAurocs[0];
            md.AppendLine(Inv($"From the none run, on the {result.SignalQuestions} questions that `calibrate` did not use ({result.CalibrationQuestionsLeftOut} of the evaluated questions fitted the router probe or chose the best signal there, and are left out). Each signal at the first answer token (j = 0, the forward pass of the last prompt position) and its largest value over the first {Calibrator.Window} answer tokens (`_w4`), as a trigger watching the answer sees it. Labels: a wrong no-RAG answer (token F1 < {Evaluator.WrongBelowF1}), and a held-out term. Every question's values are in `questions` of the JSON, to recompute these or others."));
            md.AppendLine();
            md.AppendLine("| signal | AUROC: no-RAG answer wrong (95% CI) | AUROC: held-out vs taught (95% CI) |");
            md.AppendLine("|---|---|---|");
            foreach (var group in result.SignalAurocs.GroupBy(a => a.Column))
            {
                string Cell(string label) => group.FirstOrDefault(a => a.Label == label) is { } a
                    ? $"{F(a.Auroc)} ({F(a.Low)}–{F(a.High)})" : "n/a";
                md.AppendLine($"| {group.Key} | {Cell("wrong")} | {Cell("heldout")} |");
            }
            md.AppendLine();
            md.AppendLine(Inv($"{first.Count} questions with a value, {first.Positives} answered wrong without RAG. Confidence intervals: AUROC ± 1.96 × the Hanley–McNeil standard error."));
        }
        else
        {
            md.AppendLine("Not measured: the none mode was not run.");
        }
        md.AppendLine();

        md.AppendLine("## F1 against retrievals, by signal").AppendLine();
        if (result.Curves.Count > 0)
        {
            var curveQuestions = result.Curves[0].Run.Runs.Count;
            md.AppendLine(Inv($"prompt_trigger on {curveQuestions} questions (a seeded sample of those `calibrate` did not use), on each signal at thresholds where its largest none-run value over the answer is exceeded for a target share of the questions (prompt RAG emits the RAG-off tokens until it first fires, so about that share retrieves). The answer restarts after the passages when the trigger fires within its first {Engine.EngineOptions.PromptRestartWindowTokens} tokens. none and prompt_always on the same questions: F1 {F(result.CurveNone?.TokenF1 ?? double.NaN)} and {F(result.CurvePromptAlways?.TokenF1 ?? double.NaN)}, held-out {F(result.CurveNoneHeldoutF1)} and {F(result.CurvePromptAlwaysHeldoutF1)}."));
            md.AppendLine();
            md.AppendLine("| signal | target share | threshold | share retrieving | retrievals/q | token F1 | F1 held-out | F1 taught | latency mean (s) |");
            md.AppendLine("|---|---|---|---|---|---|---|---|---|");
            foreach (var c in result.Curves)
                md.AppendLine(Inv($"| {c.Signal} | {c.TargetFraction:G3} | {F(c.Threshold, "G4")} | {F(c.RetrievedFraction, "F2")} | {F(c.Overall.RetrievalsPerQuestion, "F2")} | {F(c.Overall.TokenF1)} | {F(c.HeldoutF1)} | {F(c.TaughtF1)} | {F(c.Overall.LatencyMean)} |"));
        }
        else
        {
            md.AppendLine(options.Sweep ? "Not run (needs the none, prompt_always and prompt_trigger modes)." : "Not run (--no-sweep).");
        }
        md.AppendLine();

        md.AppendLine("## Threshold sweep").AppendLine();
        if (result.Sweep.Count > 0)
        {
            md.AppendLine(Inv($"Thresholds are percentiles of the none run's values of the triggered modes' signal (`{result.Sweep[0].Signal}`) over all generated tokens.")).AppendLine();
            md.AppendLine("| mode | percentile | threshold | token F1 | F1 held-out | retrievals/q | latency mean (s) |");
            md.AppendLine("|---|---|---|---|---|---|---|");
            foreach (var p in result.Sweep)
                md.AppendLine(Inv($"| {p.Mode} | p{p.Percentile:G4} | {F(p.Threshold, "F4")} | {F(p.Overall.TokenF1)} | {F(p.HeldoutF1)} | {F(p.Overall.RetrievalsPerQuestion, "F2")} | {F(p.Overall.LatencyMean)} |"));
        }
        else
        {
            md.AppendLine(options.Sweep ? "Not run (needs the none mode and prompt_trigger or a latent mode)." : "Not run (--no-sweep).");
        }
        md.AppendLine();

        md.AppendLine("## Goals").AppendLine();
        foreach (var g in result.Goals)
            md.AppendLine(Inv($"- **{g.Status}** — {g.Description} ({g.Comparison} {g.Target}): {F(g.Value)}") + (double.IsNaN(g.CiLow) ? "" : Inv($" (95% CI {F(g.CiLow)} to {F(g.CiHigh)})")) + Inv($". {g.Detail}"));
        md.AppendLine();
        md.AppendLine(Inv($"Intervals of the goals: percentile bootstrap over questions ({Bootstrap.Resamples} resamples, seed {options.Seed}; paired: a resample takes the same questions from every mode)."));
        md.AppendLine();

        if (result.PlotPaths.Count > 0)
        {
            md.AppendLine("## Plots").AppendLine();
            foreach (var plot in result.PlotPaths) md.AppendLine($"![{Path.GetFileNameWithoutExtension(plot)}]({Path.GetFileName(plot)})").AppendLine();
        }

        md.AppendLine("## Reproduce").AppendLine();
        md.AppendLine("```").AppendLine(options.ToCommandLine()).AppendLine("```").AppendLine();
        md.AppendLine(Inv($"Per-question predictions: `{Path.GetFileName(result.PredictionsPath)}`; all numbers: `{Path.GetFileName(result.JsonPath)}`."));
        return md.ToString();
    }

    /// <summary>
    /// Per retrieving mode, what happened on the held-out questions: how many retrieved, how many of those got their gold
    /// passage, their F1 in the mode and without RAG, and the answer token of the first retrieval. It tells a retrieval that
    /// misses from an injection that does not carry the passage.
    /// </summary>
    private static void AppendHeldoutRetrieval(StringBuilder md, EvaluationResult result)
    {
        var modes = result.Modes.Values.Where(r => r.Runs.Any(x => x.Events.Count > 0)).ToList();
        if (modes.Count == 0 || !modes[0].Runs.Any(x => x.Item.Split == "heldout")) return;
        var noneF1 = result.Modes.TryGetValue(EvalModes.None, out var none)
            ? none.Runs.Select((x, i) => (x.Item.Id, F1: none.TokenF1[i])).ToDictionary(x => x.Id, x => x.F1)
            : null;
        md.AppendLine("## Retrieval on held-out questions").AppendLine();
        md.AppendLine("For each mode that retrieves, on the held-out questions: the share that retrieved at all, the share of those whose gold passage was among the retrieved ones (any retrieval), the F1 of those with their gold passage in this mode and in none (the same questions), and the answer token at which the first retrieval fired (j = 0: the forward pass of the last prompt position), with the number of questions. A low gold share is retrieval missing; a high one with a low F1 is the mode not using the passage.");
        md.AppendLine();
        md.AppendLine("| mode | held-out questions | retrieving | gold passage among them | F1 with the gold passage | none's F1 on them | first retrieval at answer token j: questions |");
        md.AppendLine("|---|---|---|---|---|---|---|");
        foreach (var r in modes)
        {
            var held = Enumerable.Range(0, r.Runs.Count).Where(i => r.Runs[i].Item.Split == "heldout").ToList();
            var retrieving = held.Where(i => r.Runs[i].Events.Count > 0).ToList();
            var gold = retrieving.Where(i => r.Runs[i].Item.PassageId is { } id && r.Runs[i].Events.Any(e => e.SnippetIds.Contains(id))).ToList();
            var firsts = string.Join(", ", retrieving.GroupBy(i => r.Runs[i].Events[0].TokenIndex).OrderBy(g => g.Key).Select(g => Inv($"{g.Key}: {g.Count()}")));
            var goldNone = noneF1 is null ? double.NaN : Stats.Mean([.. gold.Select(i => noneF1.GetValueOrDefault(r.Runs[i].Item.Id, double.NaN))]);
            md.AppendLine(Inv($"| {r.Mode} | {held.Count} | {F(retrieving.Count / (double)Math.Max(1, held.Count), "F3")} | {F(gold.Count / (double)Math.Max(1, retrieving.Count), "F3")} | {F(Stats.Mean([.. gold.Select(i => r.TokenF1[i])]))} | {F(goldNone)} | {firsts} |"));
        }
        md.AppendLine();
    }

    /// <summary>
    /// Per mode, the answers that loop: the share that repeat a three-word sequence three or more times
    /// (<see cref="AnswerMetrics.RepeatsAPhrase"/>), on the held-out questions and on all, and the mean answer length
    /// against the gold's. A latent injection that carries a passage's words but not their order shows here.
    /// </summary>
    private static void AppendRepetition(StringBuilder md, EvaluationResult result)
    {
        if (result.Modes.Count == 0) return;
        md.AppendLine("## Answers that repeat themselves").AppendLine();
        md.AppendLine("Per mode: the share of answers in which some three-word sequence occurs three or more times (held-out questions, then all), and the mean answer length in words against the gold answers'.");
        md.AppendLine();
        md.AppendLine("| mode | held-out: repeating | all: repeating | words an answer (held-out) | gold words (held-out) |");
        md.AppendLine("|---|---|---|---|---|");
        foreach (var r in result.Modes.Values)
        {
            var held = r.Runs.Where(x => x.Item.Split == "heldout").ToList();
            static double Share(IReadOnlyCollection<QuestionRun> runs) =>
                runs.Count == 0 ? double.NaN : runs.Count(x => AnswerMetrics.RepeatsAPhrase(x.Answer)) / (double)runs.Count;
            static double Words(string? text) => (text ?? "").Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries).Length;
            md.AppendLine(Inv($"| {r.Mode} | {F(Share(held), "F3")} | {F(Share(r.Runs), "F3")} | {F(Stats.Mean([.. held.Select(x => Words(x.Answer))]), "F1")} | {F(Stats.Mean([.. held.Select(x => Words(x.Item.Answer))]), "F1")} |"));
        }
        md.AppendLine();
    }

    /// <summary>Per-question token F1 of the held-out questions (the runs and F1 lists share their order).</summary>
    private static List<double> HeldoutF1s(ModeResult r) =>
        [.. r.Runs.Select((run, i) => (run.Item.Split, F1: r.TokenF1[i])).Where(x => x.Split == "heldout").Select(x => x.F1)];

    private static double SplitF1(ModeResult r, string split) => r.BySplit.TryGetValue(split, out var g) ? g.TokenF1 : double.NaN;

    private static string Units(TriggerSignal signal) => signal == TriggerSignal.RouterProbe ? "(a probability)" : "nats";

    private static string Inv(FormattableString s) => s.ToString(CultureInfo.InvariantCulture);
}
