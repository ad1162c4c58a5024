using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json.Nodes;
using MoeRagInject.Backend;
using MoeRagInject.Engine;
using MoeRagInject.Model;
using MoeRagInject.Rag;

namespace MoeRagInject.Evaluation;

/// <summary>Flags of `eval`.</summary>
public sealed record EvaluationOptions
{
    /// <summary>--model-path: the checkpoint folder.</summary>
    public required string ModelPath { get; init; }
    /// <summary>--qa: QA JSONL ({id, question, answer, passage_id, split}).</summary>
    public required string Qa { get; init; }
    /// <summary>--corpus: the retriever (JSONL/.jsonl.gz corpus or index .db; any RetrieverFactory spec works).</summary>
    public required string Corpus { get; init; }
    /// <summary>--out: the JSON results; the markdown report (&lt;out without .json&gt;.md), PNG plots and predictions JSONL go beside it.</summary>
    public required string Out { get; init; }
    /// <summary>--limit: questions evaluated (deterministic shuffle, splits keep their proportions); null = all.</summary>
    public int? Limit { get; init; }
    /// <summary>--modes: any of <see cref="EvalModes.All"/>; null = all seven.</summary>
    public IReadOnlyList<string>? Modes { get; init; }
    /// <summary>--threshold: router-entropy threshold (nats); null = calibration.json's, else 0.8.</summary>
    public double? Threshold { get; init; }
    /// <summary>--injector-proj: the calibrated projection; null = &lt;model&gt;/injector-proj.safetensors when present.</summary>
    public string? InjectorProj { get; init; }
    /// <summary>--trained-proj: the projector of latent_trained (tools/projector); null = &lt;model&gt;/projector.safetensors when present.</summary>
    public string? TrainedProj { get; init; }
    /// <summary>--calibration: calibration.json; null = beside the projection file, else in the model folder, when present.</summary>
    public string? Calibration { get; init; }
    /// <summary>--max-new-tokens.</summary>
    public int MaxNewTokens { get; init; } = 48;
    /// <summary>--concurrency: questions in flight at once (latencies are measured under this load).</summary>
    public int Concurrency { get; init; } = 8;
    /// <summary>--threads: CPU threads; null = all cores.</summary>
    public int? Threads { get; init; }
    /// <summary>The device the model runs on (the CLI builds it from --device and --threads).</summary>
    public required IRunnerFactory Runner { get; init; }
    /// <summary>--seed: the --limit sample.</summary>
    public int Seed { get; init; }
    /// <summary>--no-sweep turns the threshold sweep off.</summary>
    public bool Sweep { get; init; } = true;
    /// <summary>--sweep-percentiles: percentiles of the none run's max-over-layers entropy (all generated tokens) used as thresholds.</summary>
    public IReadOnlyList<double> SweepPercentiles { get; init; } = [50, 75, 90, 95, 99];
    /// <summary>--sweep-limit: questions (a seeded sample of those evaluated) each sweep point runs; null = all.</summary>
    public int? SweepLimit { get; init; } = 1000;
    /// <summary>--latent-scale: α of latent_random and latent_identity (the original's injection has α = 1); latent_calibrated keeps 1, the fit's own scale.</summary>
    public float LatentScale { get; init; } = 1;
    /// <summary>--top-k: passages per retrieval.</summary>
    public int RetrievalTopK { get; init; } = 3;
    public string LoadFormat { get; init; } = "auto";
    /// <summary>--no-plots skips the PNGs.</summary>
    public bool Plots { get; init; } = true;
    /// <summary>Runs a few questions through prompt and latent mode first (discarded) so that JIT compilation does not land in the first mode's latencies.</summary>
    public bool Warmup { get; init; } = true;

    /// <summary>The command line that reproduces this run.</summary>
    public string ToCommandLine()
    {
        var b = new StringBuilder("./moe-rag-inject eval");
        void Add(string flag, string? value)
        {
            if (value is null) return;
            b.Append(' ').Append(flag);
            if (value.Length > 0) b.Append(' ').Append(value.Any(char.IsWhiteSpace) ? $"\"{value}\"" : value);
        }
        Add("--model-path", ModelPath);
        Add("--qa", Qa);
        Add("--corpus", Corpus);
        Add("--out", Out);
        if (Limit is { } l) Add("--limit", l.ToString(CultureInfo.InvariantCulture));
        if (Modes is { } m) Add("--modes", string.Join(',', m));
        if (Threshold is { } t) Add("--threshold", t.ToString("R", CultureInfo.InvariantCulture));
        Add("--injector-proj", InjectorProj);
        Add("--trained-proj", TrainedProj);
        Add("--calibration", Calibration);
        Add("--max-new-tokens", MaxNewTokens.ToString(CultureInfo.InvariantCulture));
        Add("--concurrency", Concurrency.ToString(CultureInfo.InvariantCulture));
        if (Threads is { } th) Add("--threads", th.ToString(CultureInfo.InvariantCulture));
        if (Seed != 0) Add("--seed", Seed.ToString(CultureInfo.InvariantCulture));
        if (!Sweep) Add("--no-sweep", "");
        else if (!SweepPercentiles.SequenceEqual([50, 75, 90, 95, 99]))
            Add("--sweep-percentiles", string.Join(',', SweepPercentiles.Select(p => p.ToString(CultureInfo.InvariantCulture))));
        if (Sweep && SweepLimit != 1000) Add("--sweep-limit", SweepLimit?.ToString(CultureInfo.InvariantCulture) ?? "all");
        if (LatentScale != 1) Add("--latent-scale", LatentScale.ToString("R", CultureInfo.InvariantCulture));
        if (RetrievalTopK != 3) Add("--top-k", RetrievalTopK.ToString(CultureInfo.InvariantCulture));
        if (!Plots) Add("--no-plots", "");
        return b.ToString();
    }
}

public static class EvalModes
{
    public const string None = "none";
    public const string PromptAlways = "prompt_always";
    public const string PromptTrigger = "prompt_trigger";
    public const string LatentRandom = "latent_random";
    public const string LatentIdentity = "latent_identity";
    public const string LatentCalibrated = "latent_calibrated";
    public const string LatentTrained = "latent_trained";
    public static readonly IReadOnlyList<string> All = [None, PromptAlways, PromptTrigger, LatentRandom, LatentIdentity, LatentCalibrated, LatentTrained];

    public static string Describe(string mode) => mode switch
    {
        None => "RAG off (entropy measured only)",
        PromptAlways => "prompt RAG, retrieves once at the first step (threshold 0, 1 retrieval)",
        PromptTrigger => "prompt RAG when the router entropy crosses the threshold",
        LatentRandom => "latent injection, random P (seed 0), at the layers that fired",
        LatentIdentity => "latent injection, identity P, at the layers that fired",
        LatentCalibrated => "latent injection, ridge-fitted P, at the calibration layer, α = 1",
        LatentTrained => "latent injection, projector trained through the frozen model (tools/projector), at its layers and α",
        _ => mode,
    };
}

/// <summary>Quality, retrievals and latency of a group of questions.</summary>
public sealed record GroupMetrics(int Count, double TokenF1, double Contains, double RetrievalsPerQuestion,
    double RetrievalErrorsPerQuestion, double LatencyMean, double LatencyP50, double LatencyP95, double CompletionTokensMean)
{
    internal static GroupMetrics Of(IReadOnlyList<QuestionRun> runs, IReadOnlyList<double> f1, IReadOnlyList<bool> contains)
    {
        var latencies = runs.Select(r => r.LatencySeconds).ToList();
        return new GroupMetrics(runs.Count, Stats.Mean(f1), Stats.Mean(contains.Select(c => c ? 1.0 : 0.0)),
            Stats.Mean(runs.Select(r => (double)r.Events.Count)), Stats.Mean(runs.Select(r => (double)r.Events.Count(e => e.Error is not null))),
            Stats.Mean(latencies), Stats.Quantile(latencies, 0.5), Stats.Quantile(latencies, 0.95), Stats.Mean(runs.Select(r => (double)r.Tokens.Count)));
    }

    internal JsonObject ToJson() => new()
    {
        ["n"] = Count,
        ["token_f1"] = JsonOut.Num(TokenF1),
        ["contains"] = JsonOut.Num(Contains),
        ["retrievals_per_question"] = JsonOut.Num(RetrievalsPerQuestion),
        ["retrieval_errors_per_question"] = JsonOut.Num(RetrievalErrorsPerQuestion),
        ["latency_s"] = new JsonObject { ["mean"] = JsonOut.Num(LatencyMean), ["p50"] = JsonOut.Num(LatencyP50), ["p95"] = JsonOut.Num(LatencyP95) },
        ["completion_tokens_mean"] = JsonOut.Num(CompletionTokensMean, 3),
    };
}

public sealed record ModeResult
{
    public required string Mode { get; init; }
    public required string Description { get; init; }
    /// <summary>The trigger threshold the mode ran with (null for none).</summary>
    public double? Threshold { get; init; }
    public required IReadOnlyList<QuestionRun> Runs { get; init; }
    public required IReadOnlyList<double> TokenF1 { get; init; }
    public required IReadOnlyList<bool> Contains { get; init; }
    public required GroupMetrics Overall { get; init; }
    public required IReadOnlyDictionary<string, GroupMetrics> BySplit { get; init; }
    public required double WallSeconds { get; init; }
    public string? Settings { get; init; }

    internal static ModeResult Create(string mode, double? threshold, QuestionRun[] runs, double wall, string? settings)
    {
        var f1 = runs.Select(r => AnswerMetrics.TokenF1(r.Answer, r.Item.Answer)).ToList();
        var contains = runs.Select(r => AnswerMetrics.Contains(r.Answer, r.Item.Answer)).ToList();
        var bySplit = new SortedDictionary<string, GroupMetrics>(StringComparer.Ordinal);
        foreach (var group in Enumerable.Range(0, runs.Length).GroupBy(i => runs[i].Item.Split))
            bySplit[group.Key] = GroupMetrics.Of([.. group.Select(i => runs[i])], [.. group.Select(i => f1[i])], [.. group.Select(i => contains[i])]);
        var readingOnly = Enumerable.Range(0, runs.Length).Where(i => runs[i].Item.ReadingOnly).ToList();
        if (readingOnly.Count > 0)
            bySplit["reading_only"] = GroupMetrics.Of([.. readingOnly.Select(i => runs[i])], [.. readingOnly.Select(i => f1[i])], [.. readingOnly.Select(i => contains[i])]);
        return new ModeResult
        {
            Mode = mode,
            Description = EvalModes.Describe(mode),
            Threshold = threshold,
            Runs = runs,
            TokenF1 = f1,
            Contains = contains,
            Overall = GroupMetrics.Of(runs, f1, contains),
            BySplit = bySplit,
            WallSeconds = wall,
            Settings = settings,
        };
    }

    public double HeldoutF1 => BySplit.TryGetValue("heldout", out var g) ? g.TokenF1 : double.NaN;
}

public sealed record SweepPoint(string Mode, double Percentile, double Threshold, GroupMetrics Overall, double HeldoutF1, double TaughtF1);

public sealed record GoalResult(string Key, string Description, double Value, string Comparison, double Target, string Status, string Detail)
{
    /// <summary>A 95% confidence interval of <see cref="Value"/> where one is computed (bootstrap), else null.</summary>
    public IReadOnlyList<double>? Ci95 { get; init; }
}

/// <summary>How well each score predicts a label: AUROC by score name.</summary>
public sealed record TriggerQuality(
    int Count, int Wrong, int Heldout,
    IReadOnlyDictionary<string, double> AurocWrong,
    IReadOnlyDictionary<string, double> AurocHeldout,
    IReadOnlyList<double> MaxEntropyJ0Taught,
    IReadOnlyList<double> MaxEntropyJ0Heldout);

public sealed record EvaluationResult
{
    public required IReadOnlyDictionary<string, ModeResult> Modes { get; init; }
    /// <summary>Modes asked for but not run, with the reason.</summary>
    public required IReadOnlyDictionary<string, string> Skipped { get; init; }
    public TriggerQuality? Trigger { get; init; }
    public required IReadOnlyList<SweepPoint> Sweep { get; init; }
    public required IReadOnlyList<GoalResult> Goals { get; init; }
    public required double Threshold { get; init; }
    public required string ThresholdSource { get; init; }
    public required string JsonPath { get; init; }
    public required string MarkdownPath { get; init; }
    public required string PredictionsPath { get; init; }
    public required IReadOnlyList<string> PlotPaths { get; init; }
    public required JsonObject Json { get; init; }
}

/// <summary>`eval`: every question through every mode; quality, retrievals, latency, trigger AUROCs, threshold sweep, goals.</summary>
public static class Evaluator
{
    public const double DefaultThreshold = 0.8;
    /// <summary>The trained projector's file name in the model folder (written by tools/projector/train_projector.py).</summary>
    public const string TrainedProjectorFileName = "projector.safetensors";
    /// <summary>A no-RAG answer with token F1 below this counts as wrong.</summary>
    public const double WrongBelowF1 = 0.5;

    public static async Task<EvaluationResult> RunAsync(EvaluationOptions options, TextWriter progress, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(options);
        progress ??= TextWriter.Null;
        var clock = Stopwatch.StartNew();
        var started = DateTimeOffset.UtcNow;
        if (options.Concurrency < 1) throw new ArgumentException("--concurrency must be >= 1");
        if (options.MaxNewTokens < 1) throw new ArgumentException("--max-new-tokens must be >= 1");
        var modes = (options.Modes ?? EvalModes.All).Select(m => m.Trim().ToLowerInvariant()).Where(m => m.Length > 0).Distinct().ToList();
        foreach (var m in modes)
            if (!EvalModes.All.Contains(m)) throw new ArgumentException($"unknown mode \"{m}\" (expected {string.Join(", ", EvalModes.All)})");
        if (modes.Count == 0) throw new ArgumentException("--modes names no mode");
        if (!File.Exists(options.Corpus) && !options.Corpus.Contains("://", StringComparison.Ordinal))
            throw new FileNotFoundException($"corpus not found: {options.Corpus}", options.Corpus);

        var config = ModelConfig.Load(options.ModelPath);
        var items = QaData.Sample(QaData.Load(options.Qa), options.Limit, options.Seed);
        if (items.Count == 0) throw new ArgumentException($"{options.Qa} holds no questions");

        // Projection and calibration.
        var projection = options.InjectorProj ?? Path.Combine(options.ModelPath, Calibrator.ProjectionFileName);
        var projectionExists = File.Exists(projection);
        if (options.InjectorProj is not null && !projectionExists)
            throw new FileNotFoundException($"--injector-proj {options.InjectorProj} does not exist", options.InjectorProj);
        var calibrationPath = options.Calibration
            ?? new[] { projectionExists ? Path.Combine(Path.GetDirectoryName(Path.GetFullPath(projection))!, Calibrator.CalibrationFileName) : null,
                       Path.Combine(options.ModelPath, Calibrator.CalibrationFileName) }
               .FirstOrDefault(p => p is not null && File.Exists(p));
        double? calibratedThreshold = null;
        int? calibratedLayer = null;
        if (calibrationPath is not null)
        {
            var calibration = JsonNode.Parse(File.ReadAllText(calibrationPath)) as JsonObject
                ?? throw new InvalidDataException($"{calibrationPath} is not a JSON object");
            calibratedThreshold = calibration["threshold"]?.GetValue<double>();
            calibratedLayer = calibration["layer"]?.GetValue<int>();
        }
        var trainedProjection = options.TrainedProj ?? Path.Combine(options.ModelPath, TrainedProjectorFileName);
        if (options.TrainedProj is not null && !File.Exists(trainedProjection))
            throw new FileNotFoundException($"--trained-proj {options.TrainedProj} does not exist", options.TrainedProj);
        var threshold = options.Threshold ?? calibratedThreshold ?? DefaultThreshold;
        var thresholdSource = options.Threshold is not null ? "--threshold" : calibratedThreshold is not null ? calibrationPath! : "default";
        var injectionLayer = calibratedLayer ?? config.NumLayers - 1;

        var outPath = Path.GetFullPath(options.Out);
        var outBase = outPath.EndsWith(".json", StringComparison.OrdinalIgnoreCase) ? outPath[..^5] : outPath;
        Directory.CreateDirectory(Path.GetDirectoryName(outPath)!);
        progress.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"[eval] {items.Count} questions, modes {string.Join(",", modes)}, threshold {threshold:F4} ({thresholdSource}), concurrency {options.Concurrency}"));

        var logRoot = Directory.CreateTempSubdirectory("moe-rag-eval-").FullName;
        var results = new Dictionary<string, ModeResult>(StringComparer.Ordinal);
        var skipped = new Dictionary<string, string>(StringComparer.Ordinal);
        var sweep = new List<SweepPoint>();
        try
        {
            if (options.Warmup)
            {
                // Full-length decoding in each kind of mode so that the hot loops reach tier-1 code before anything is timed:
                // with tiered compilation the first pass over a few dozen questions runs about twice as slow as later ones.
                var warmClock = Stopwatch.StartNew();
                var warmCount = 0;
                foreach (var (warmMode, count) in new[] { (EvalModes.None, 4 * options.Concurrency), (EvalModes.PromptAlways, 2 * options.Concurrency), (EvalModes.LatentRandom, 2 * options.Concurrency) })
                {
                    var warmItems = items.Take(Math.Min(items.Count, count)).ToList();
                    warmCount += warmItems.Count;
                    await RunModeAsync(options, warmMode, 0, projection, injectionLayer, warmItems, logRoot, TextWriter.Null, cancellationToken,
                        "warmup " + warmMode).ConfigureAwait(false);
                }
                progress.WriteLine(Inv($"[eval] warm-up: {warmCount} question runs in none, prompt_always and latent_random mode ({warmClock.Elapsed.TotalSeconds:F1} s, discarded)"));
            }
            foreach (var mode in modes)
            {
                if (mode == EvalModes.LatentCalibrated && !projectionExists)
                {
                    skipped[mode] = $"no projection file ({projection} does not exist; run `calibrate` first or pass --injector-proj)";
                    progress.WriteLine($"[eval] {mode}: skipped: {skipped[mode]}");
                    continue;
                }
                if (mode == EvalModes.LatentTrained && !File.Exists(trainedProjection))
                {
                    skipped[mode] = $"no trained projector ({trainedProjection} does not exist; run tools/projector/run-gpu.sh on a GPU machine or pass --trained-proj)";
                    progress.WriteLine($"[eval] {mode}: skipped: {skipped[mode]}");
                    continue;
                }
                var modeThreshold = mode switch { EvalModes.None => (double?)null, EvalModes.PromptAlways => 0, _ => threshold };
                results[mode] = await RunModeAsync(options, mode, modeThreshold ?? threshold, projection, injectionLayer, items, logRoot, progress, cancellationToken,
                    trainedProjection: trainedProjection).ConfigureAwait(false);
                results[mode] = results[mode] with { Threshold = modeThreshold };
            }

            if (options.Sweep && results.TryGetValue(EvalModes.None, out var noneRun))
            {
                var latentSweepMode = projectionExists ? EvalModes.LatentCalibrated : EvalModes.LatentRandom;
                var sweepModes = new[] { EvalModes.PromptTrigger, latentSweepMode }.Where(modes.Contains).ToList();
                var maxes = noneRun.Runs.SelectMany(r => r.RouterEntropy.Select(e => (double)e.Max())).Order().ToArray();
                var sweepItems = QaData.Sample(items, options.SweepLimit, options.Seed);
                progress.WriteLine(Inv($"[eval] threshold sweep over {sweepItems.Count} questions"));
                foreach (var mode in sweepModes)
                    foreach (var percentile in options.SweepPercentiles)
                    {
                        var t = Stats.QuantileSorted(maxes, percentile / 100.0);
                        var run = await RunModeAsync(options, mode, t, projection, injectionLayer, sweepItems, logRoot, progress, cancellationToken,
                            string.Create(CultureInfo.InvariantCulture, $"sweep {mode} p{percentile}")).ConfigureAwait(false);
                        sweep.Add(new SweepPoint(mode, percentile, t, run.Overall, run.HeldoutF1,
                            run.BySplit.TryGetValue("taught", out var taught) ? taught.TokenF1 : double.NaN));
                    }
            }
        }
        finally
        {
            Calibrator.TryDeleteDirectory(logRoot);
        }

        var trigger = results.TryGetValue(EvalModes.None, out var none) ? MeasureTrigger(none, config.NumLayers) : null;
        var goals = Goals(results, trigger);

        var json = new JsonObject();
        var modesJson = new JsonObject();
        foreach (var (mode, r) in results)
        {
            var o = r.Overall.ToJson();
            o["description"] = r.Description;
            o["threshold"] = r.Threshold is { } th ? JsonOut.Num(th) : null;
            o["settings"] = r.Settings;
            o["wall_s"] = JsonOut.Num(r.WallSeconds, 3);
            var splits = new JsonObject();
            foreach (var (split, g) in r.BySplit) splits[split] = g.ToJson();
            o["by_split"] = splits;
            modesJson[mode] = o;
        }
        foreach (var (mode, reason) in skipped) modesJson[mode] = new JsonObject { ["skipped"] = reason };
        json["modes"] = modesJson;
        json["trigger"] = trigger is null ? new JsonObject { ["skipped"] = "the none mode was not run" } : TriggerJson(trigger);
        json["sweep"] = new JsonArray([.. sweep.Select(p =>
        {
            var o = p.Overall.ToJson();
            o["mode"] = p.Mode;
            o["percentile"] = JsonOut.Num(p.Percentile);
            o["threshold"] = JsonOut.Num(p.Threshold);
            o["heldout_token_f1"] = JsonOut.Num(p.HeldoutF1);
            o["taught_token_f1"] = JsonOut.Num(p.TaughtF1);
            return (JsonNode?)o;
        })]);
        var goalsJson = new JsonObject();
        foreach (var g in goals)
            goalsJson[g.Key] = new JsonObject
            {
                ["description"] = g.Description,
                ["value"] = JsonOut.Num(g.Value),
                ["target"] = $"{g.Comparison} {g.Target.ToString(CultureInfo.InvariantCulture)}",
                ["status"] = g.Status,
                ["detail"] = g.Detail,
                ["ci95"] = g.Ci95 is { } ci ? JsonOut.Array(ci) : null,
            };
        json["goals"] = goalsJson;
        var plotPaths = new List<string>();
        var markdownPath = outBase + ".md";
        var predictionsPath = outBase + ".predictions.jsonl";
        json["config"] = new JsonObject
        {
            ["model"] = Path.GetFullPath(options.ModelPath),
            ["qa"] = Path.GetFullPath(options.Qa),
            ["corpus"] = options.Corpus,
            ["n"] = items.Count,
            ["limit"] = options.Limit,
            ["seed"] = options.Seed,
            ["modes"] = JsonOut.Array(modes),
            ["threshold"] = JsonOut.Num(threshold),
            ["threshold_source"] = thresholdSource,
            ["injector_proj"] = projectionExists ? Path.GetFullPath(projection) : null,
            ["calibration"] = calibrationPath is null ? null : Path.GetFullPath(calibrationPath),
            ["injection_layer_calibrated"] = injectionLayer,
            ["trained_proj"] = File.Exists(trainedProjection) ? Path.GetFullPath(trainedProjection) : null,
            ["max_new_tokens"] = options.MaxNewTokens,
            ["concurrency"] = options.Concurrency,
            ["threads"] = options.Threads ?? Environment.ProcessorCount,
            ["retrieval_top_k"] = options.RetrievalTopK,
            ["wrong_below_f1"] = WrongBelowF1,
            ["machine"] = new JsonObject
            {
                ["cores"] = Environment.ProcessorCount,
                ["os"] = RuntimeInformation.OSDescription,
                ["arch"] = RuntimeInformation.OSArchitecture.ToString(),
                ["runtime"] = RuntimeInformation.FrameworkDescription,
                ["tiered_compilation"] = TieredCompilationEnabled,
            },
            ["date"] = started.ToString("yyyy-MM-dd'T'HH:mm:ss'Z'", CultureInfo.InvariantCulture),
            ["elapsed_s"] = JsonOut.Num(clock.Elapsed.TotalSeconds, 2),
            ["command"] = options.ToCommandLine(),
            ["markdown"] = markdownPath,
            ["predictions"] = predictionsPath,
        };

        WritePredictions(predictionsPath, results.Values);
        var result = new EvaluationResult
        {
            Modes = results,
            Skipped = skipped,
            Trigger = trigger,
            Sweep = sweep,
            Goals = goals,
            Threshold = threshold,
            ThresholdSource = thresholdSource,
            JsonPath = outPath,
            MarkdownPath = markdownPath,
            PredictionsPath = predictionsPath,
            PlotPaths = plotPaths,
            Json = json,
        };
        if (options.Plots) plotPaths.AddRange(Report.WritePlots(result, outBase, Math.Log(config.NumExperts)));
        json["config"]!["plots"] = JsonOut.Array(plotPaths);
        json["config"]!["elapsed_s"] = JsonOut.Num(clock.Elapsed.TotalSeconds, 2);
        JsonOut.Write(outPath, json);
        File.WriteAllText(markdownPath, Report.Markdown(result, options));
        progress.WriteLine($"[eval] wrote {outPath}, {markdownPath}, {predictionsPath}" + (plotPaths.Count > 0 ? $" and {plotPaths.Count} plots" : ""));
        return result;
    }

    private static async Task<ModeResult> RunModeAsync(EvaluationOptions options, string mode, double threshold, string projection,
        int injectionLayer, IReadOnlyList<QaItem> items, string logRoot, TextWriter progress, CancellationToken cancellationToken,
        string? label = null, string? trainedProjection = null)
    {
        var engineOptions = new EngineOptions
        {
            ModelPath = options.ModelPath,
            LoadFormat = options.LoadFormat,
            Runner = options.Runner,
            MaxRunningRequests = options.Concurrency,
            Retriever = options.Corpus,
            RetrievalTopK = options.RetrievalTopK,
            LogDir = Path.Combine(logRoot, (label ?? mode).Replace(' ', '-')),
            Notices = TextWriter.Null,
            Trigger = new TriggerOptions { Threshold = threshold },
        };
        string settings;
        (engineOptions, settings) = mode switch
        {
            EvalModes.None => (engineOptions with { Mode = InjectionMode.Off }, "mode=off"),
            EvalModes.PromptAlways => (engineOptions with
            {
                Mode = InjectionMode.Prompt,
                Trigger = new TriggerOptions { Threshold = 0, MaxRetrievalsPerRequest = 1 },
            }, "mode=prompt threshold=0 max_retrievals=1"),
            EvalModes.PromptTrigger => (engineOptions with { Mode = InjectionMode.Prompt }, Inv($"mode=prompt threshold={threshold:G6}")),
            EvalModes.LatentRandom => (engineOptions with { Mode = InjectionMode.Latent, Projection = ProjectionKind.Random, ProjectionSeed = 0, InjectionScale = options.LatentScale },
                Inv($"mode=latent projection=random(seed 0) layers=fired scale={options.LatentScale:G6} threshold={threshold:G6}")),
            EvalModes.LatentIdentity => (engineOptions with { Mode = InjectionMode.Latent, Projection = ProjectionKind.Identity, InjectionScale = options.LatentScale },
                Inv($"mode=latent projection=identity layers=fired scale={options.LatentScale:G6} threshold={threshold:G6}")),
            EvalModes.LatentCalibrated => (engineOptions with
            {
                Mode = InjectionMode.Latent,
                Projection = ProjectionKind.File,
                ProjectionPath = projection,
                InjectionLayers = [injectionLayer],
                InjectionScale = 1,
            }, Inv($"mode=latent projection=file({Path.GetFileName(projection)}) layers=[{injectionLayer}] scale=1 threshold={threshold:G6}")),
            EvalModes.LatentTrained => TrainedMode(engineOptions, trainedProjection ?? throw new ArgumentException("latent_trained needs a projector file"), threshold),
            _ => throw new ArgumentException($"unknown mode {mode}"),
        };
        label ??= mode;
        var clock = Stopwatch.StartNew();
        QuestionRun[] runs;
        await using (var engine = InferenceEngine.Create(engineOptions))
        {
            runs = await QuestionRunner.RunAsync(engine, items, options.MaxNewTokens, options.Concurrency, stopAtNewline: true,
                rag: null, progress, label, cancellationToken).ConfigureAwait(false);
        }
        var result = ModeResult.Create(mode, threshold, runs, clock.Elapsed.TotalSeconds, settings);
        progress.WriteLine(Inv($"[{label}] F1 {result.Overall.TokenF1:F3}, contains {result.Overall.Contains:F3}, retrievals/q {result.Overall.RetrievalsPerQuestion:F2}, latency mean {result.Overall.LatencyMean:F3} s, wall {result.WallSeconds:F1} s"));
        return result;
    }

    /// <summary>
    /// latent_trained: the trained projector at the layers and α it was trained with (its metadata; without them the layers
    /// that fired and α = 1), with the same trigger as the other latent modes.
    /// </summary>
    private static (EngineOptions, string) TrainedMode(EngineOptions engineOptions, string path, double threshold)
    {
        var info = ContextInjector.ReadFileInfo(path);
        var alpha = info.Alpha ?? 1f;
        return (engineOptions with
        {
            Mode = InjectionMode.Latent,
            Projection = ProjectionKind.File,
            ProjectionPath = path,
            InjectionLayers = info.Layers,
            InjectionScale = alpha,
        }, Inv($"mode=latent projection=file({Path.GetFileName(path)}, {info.Architecture.ToString().ToLowerInvariant()}) layers={(info.Layers is null ? "fired" : "[" + string.Join(",", info.Layers) + "]")} scale={alpha:G6} threshold={threshold:G6}"));
    }

    /// <summary>Whether the runtime JITs in tiers (the default); off (DOTNET_TieredCompilation=0 or the runtimeconfig switch) gives steadier latencies.</summary>
    internal static bool TieredCompilationEnabled
    {
        get
        {
            var variable = Environment.GetEnvironmentVariable("DOTNET_TieredCompilation") ?? Environment.GetEnvironmentVariable("COMPlus_TieredCompilation");
            if (variable is not null) return variable.Trim() != "0";
            return AppContext.GetData("System.Runtime.TieredCompilation") is not (false or "false" or "False");
        }
    }

    private static string Inv(FormattableString s) => s.ToString(CultureInfo.InvariantCulture);

    internal static TriggerQuality MeasureTrigger(ModeResult none, int layers)
    {
        var runs = none.Runs.Where(r => r.RouterEntropy.Count > 0).ToList();
        var index = none.Runs.Select((r, i) => (r, i)).Where(x => x.r.RouterEntropy.Count > 0).Select(x => x.i).ToList();
        var wrong = index.Select(i => none.TokenF1[i] < WrongBelowF1).ToList();
        var heldout = runs.Select(r => Calibrator.IsHeldout(r.Item)).ToList();
        var scores = new Dictionary<string, List<double>>(StringComparer.Ordinal)
        {
            ["router_max_j0"] = [.. runs.Select(r => (double)r.RouterEntropy[0].Max())],
            ["router_mean_j0"] = [.. runs.Select(r => (double)r.RouterEntropy[0].Average())],
        };
        for (var l = 0; l < layers; l++)
        {
            var layer = l;
            scores[$"router_layer{l}_j0"] = [.. runs.Select(r => (double)r.RouterEntropy[0][layer])];
        }
        scores["router_max_mean_answer"] = [.. runs.Select(r => r.RouterEntropy.Average(e => (double)e.Max()))];
        scores["output_entropy_j0"] = [.. runs.Select(r => r.OutputEntropy.Count > 0 ? r.OutputEntropy[0] : double.NaN)];
        scores["output_entropy_mean"] = [.. runs.Select(r => r.OutputEntropy.Count > 0 ? r.OutputEntropy.Average(e => (double)e) : double.NaN)];
        var aurocWrong = scores.ToDictionary(kv => kv.Key, kv => Stats.Auroc(kv.Value, wrong), StringComparer.Ordinal);
        var aurocHeldout = scores.ToDictionary(kv => kv.Key, kv => Stats.Auroc(kv.Value, heldout), StringComparer.Ordinal);
        var maxJ0 = scores["router_max_j0"];
        return new TriggerQuality(runs.Count, wrong.Count(w => w), heldout.Count(h => h), aurocWrong, aurocHeldout,
            [.. maxJ0.Where((_, i) => !heldout[i])], [.. maxJ0.Where((_, i) => heldout[i])]);
    }

    private static JsonObject TriggerJson(TriggerQuality t)
    {
        var wrong = new JsonObject();
        foreach (var (k, v) in t.AurocWrong) wrong[k] = JsonOut.Num(v);
        var heldout = new JsonObject();
        foreach (var (k, v) in t.AurocHeldout) heldout[k] = JsonOut.Num(v);
        return new JsonObject
        {
            ["n"] = t.Count,
            ["n_wrong"] = t.Wrong,
            ["n_heldout"] = t.Heldout,
            ["label_wrong"] = $"none-mode answer token F1 < {WrongBelowF1.ToString(CultureInfo.InvariantCulture)}",
            ["label_heldout"] = "split == heldout",
            ["auroc_wrong"] = wrong,
            ["auroc_heldout"] = heldout,
            ["router_max_j0"] = new JsonObject
            {
                ["taught"] = JsonOut.Summary(t.MaxEntropyJ0Taught),
                ["heldout"] = JsonOut.Summary(t.MaxEntropyJ0Heldout),
            },
        };
    }

    internal static List<GoalResult> Goals(IReadOnlyDictionary<string, ModeResult> modes, TriggerQuality? trigger)
    {
        var goals = new List<GoalResult>();
        static string Status(double value, bool met) => double.IsNaN(value) ? "UNDEFINED" : met ? "MET" : "NOT MET";

        var auroc = trigger?.AurocHeldout.GetValueOrDefault("router_max_j0", double.NaN) ?? double.NaN;
        goals.Add(new GoalResult("heldout_auroc", "router entropy (max over layers, j = 0) separates held-out from taught questions",
            auroc, ">=", 0.7,
            trigger is null ? "NOT MEASURED" : Status(auroc, auroc >= 0.7),
            trigger is null ? "the none mode was not run"
                : Inv($"AUROC = {JsonOut.F(auroc)} over {trigger.Count} questions ({trigger.Heldout} held-out)")));

        modes.TryGetValue(EvalModes.None, out var none);
        modes.TryGetValue(EvalModes.PromptAlways, out var prompt);
        modes.TryGetValue(EvalModes.LatentCalibrated, out var latent);
        if (none is null || prompt is null || latent is null)
        {
            var missing = string.Join(", ", new[] { (EvalModes.None, none), (EvalModes.PromptAlways, prompt), (EvalModes.LatentCalibrated, latent) }
                .Where(x => x.Item2 is null).Select(x => x.Item1));
            goals.Add(new GoalResult("latent_recovery", "latent_calibrated recovers prompt RAG's gain over none (held-out F1)", double.NaN, ">=", 0.3,
                "NOT MEASURED", $"needs modes none, prompt_always and latent_calibrated (missing: {missing})"));
            goals.Add(new GoalResult("latency_ratio", "latent_calibrated's added latency relative to prompt RAG's", double.NaN, "<=", 0.1,
                "NOT MEASURED", $"needs modes none, prompt_always and latent_calibrated (missing: {missing})"));
            goals.AddRange(TrainedProjectorGoals.Compute(modes));
            return goals;
        }
        double fNone = none.HeldoutF1, fPrompt = prompt.HeldoutF1, fLatent = latent.HeldoutF1;
        var gain = fPrompt - fNone;
        var recovery = gain > 0 ? (fLatent - fNone) / gain : double.NaN;
        goals.Add(new GoalResult("latent_recovery", "latent_calibrated recovers prompt RAG's gain over none (held-out F1)", recovery, ">=", 0.3,
            Status(recovery, recovery >= 0.3),
            Inv($"(F1_latcal − F1_none) / (F1_prompt_always − F1_none) on held-out = ({JsonOut.F(fLatent)} − {JsonOut.F(fNone)}) / ({JsonOut.F(fPrompt)} − {JsonOut.F(fNone)})")
                + (gain > 0 ? "" : "; undefined: prompt RAG gains nothing over none")));
        double lNone = none.Overall.LatencyMean, lPrompt = prompt.Overall.LatencyMean, lLatent = latent.Overall.LatencyMean;
        var added = lPrompt - lNone;
        var ratio = added > 0 ? (lLatent - lNone) / added : double.NaN;
        goals.Add(new GoalResult("latency_ratio", "latent_calibrated's added latency relative to prompt RAG's", ratio, "<=", 0.1,
            Status(ratio, ratio <= 0.1),
            Inv($"(lat_latcal − lat_none) / (lat_prompt_always − lat_none) = ({lLatent:F4} − {lNone:F4}) / ({lPrompt:F4} − {lNone:F4}) s (mean per question)")
                + (added > 0 ? "" : "; undefined: prompt RAG adds no latency")));
        goals.AddRange(TrainedProjectorGoals.Compute(modes));
        return goals;
    }

    private static void WritePredictions(string path, IEnumerable<ModeResult> modes)
    {
        using var writer = new StreamWriter(path, append: false, new UTF8Encoding(false));
        foreach (var mode in modes)
            for (var i = 0; i < mode.Runs.Count; i++)
            {
                var r = mode.Runs[i];
                var line = new JsonObject
                {
                    ["mode"] = mode.Mode,
                    ["id"] = r.Item.Id,
                    ["split"] = r.Item.Split,
                    ["question"] = r.Item.Question,
                    ["gold"] = r.Item.Answer,
                    ["prediction"] = r.Answer,
                    ["token_f1"] = JsonOut.Num(mode.TokenF1[i]),
                    ["contains"] = mode.Contains[i],
                    ["retrievals"] = r.Events.Count,
                    ["retrieval_errors"] = r.Events.Count(e => e.Error is not null),
                    ["retrieval_error_messages"] = JsonOut.Array(r.Events.Where(e => e.Error is not null).Select(e => e.Error!).Distinct()),
                    ["retrieved_ids"] = JsonOut.Array(r.Events.SelectMany(e => e.SnippetIds)),
                    ["trigger_tokens"] = JsonOut.Array(r.Events.Select(e => e.TokenIndex)),
                    ["gold_retrieved"] = r.Item.PassageId is null ? null : r.Events.Any(e => e.SnippetIds.Contains(r.Item.PassageId)),
                    ["latency_s"] = JsonOut.Num(r.LatencySeconds),
                    ["completion_tokens"] = r.Tokens.Count,
                    ["finish"] = r.Finish?.Kind.ToString().ToLowerInvariant(),
                    ["router_entropy_j0"] = r.RouterEntropy.Count > 0 ? JsonOut.Array(r.RouterEntropy[0].Select(v => (double)v), 4) : null,
                    ["output_entropy_j0"] = r.OutputEntropy.Count > 0 ? JsonOut.Num(r.OutputEntropy[0], 4) : null,
                };
                writer.WriteLine(line.ToJsonString(JsonOut.Line));
            }
    }
}
