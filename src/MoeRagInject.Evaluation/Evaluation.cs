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
    /// <summary>--modes: any of <see cref="EvalModes.Known"/>; null = the seven of <see cref="EvalModes.All"/>.</summary>
    public IReadOnlyList<string>? Modes { get; init; }
    /// <summary>--threshold: the trigger threshold of the triggered modes, in the signal's units; null = calibration.json's for the signal.</summary>
    public double? Threshold { get; init; }
    /// <summary>--trigger-signal: what the triggered modes (prompt_trigger, latent_*) watch; null = calibration.json's best signal, else router entropy.</summary>
    public TriggerSignal? Signal { get; init; }
    /// <summary>The router probe: null = router-probe.json beside calibration.json, else in the model folder, when present.</summary>
    public string? RouterProbe { get; init; }
    /// <summary>Shares of the questions at which each signal's curve places a threshold (from the none run's answers).</summary>
    public IReadOnlyList<double> CurveFractions { get; init; } = [0.1, 0.2, 0.3, 0.4, 0.5, 0.75];
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
    /// <summary>--max-retrievals: retrievals per question at most in the triggered modes (the server's default, 4).</summary>
    public int MaxRetrievals { get; init; } = 4;
    /// <summary>--trigger-window: the triggered modes fire within the first N answer tokens only; null = at any token (the server's default).</summary>
    public int? TriggerWindow { get; init; }
    /// <summary>--latent-rag-restart: what latent_trained does with the answer written before its trigger (the server's default, answer).</summary>
    public LatentRagRestart LatentRagRestart { get; init; } = LatentRagRestart.Answer;
    public string LoadFormat { get; init; } = "auto";
    /// <summary>--no-plots skips the PNGs.</summary>
    public bool Plots { get; init; } = true;
    /// <summary>Runs a few questions through prompt and latent mode first (discarded) so that JIT compilation does not land in the first mode's latencies.</summary>
    public bool Warmup { get; init; } = true;
    /// <summary>Questions per turn when the modes take turns (no flag); null = <see cref="Evaluator.LatencyBlockSize"/>.</summary>
    public int? LatencyBlock { get; init; }

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
        if (Signal is { } signal) Add("--trigger-signal", TriggerSignals.Name(signal));
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
        if (MaxRetrievals != 4) Add("--max-retrievals", MaxRetrievals.ToString(CultureInfo.InvariantCulture));
        if (TriggerWindow is int window) Add("--trigger-window", window.ToString(CultureInfo.InvariantCulture));
        if (LatentRagRestart == LatentRagRestart.Continue) Add("--latent-rag-restart", "continue");
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
    public const string LatentTrainedAlways = "latent_trained_always";
    /// <summary>The modes eval runs by default.</summary>
    public static readonly IReadOnlyList<string> All = [None, PromptAlways, PromptTrigger, LatentRandom, LatentIdentity, LatentCalibrated, LatentTrained];

    /// <summary>Every mode --modes accepts: the default ones, then those run only when named.</summary>
    public static readonly IReadOnlyList<string> Known = [.. All, LatentTrainedAlways];

    public static string Describe(string mode) => mode switch
    {
        None => "RAG off (entropy measured only)",
        PromptAlways => "prompt RAG, retrieves once with the question before computing it (--retrieve-first, 1 retrieval)",
        PromptTrigger => "prompt RAG when the trigger signal crosses the threshold",
        LatentRandom => "latent injection, random P (seed 0), at the layers that fired",
        LatentIdentity => "latent injection, identity P, at the layers that fired",
        LatentCalibrated => "latent injection, ridge-fitted P, at the calibration layer, α = 1",
        LatentTrained => "latent injection, projector trained through the frozen model (tools/projector), at its layers and α",
        LatentTrainedAlways => "latent_trained's injection, retrieving once with the question before computing it (--retrieve-first, 1 retrieval), as prompt_always does",
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
    /// <summary>The trigger threshold the mode ran with (null for none, and for the modes that retrieve before the prompt).</summary>
    public double? Threshold { get; init; }
    public required IReadOnlyList<QuestionRun> Runs { get; init; }
    public required IReadOnlyList<double> TokenF1 { get; init; }
    public required IReadOnlyList<bool> Contains { get; init; }
    public required GroupMetrics Overall { get; init; }
    public required IReadOnlyDictionary<string, GroupMetrics> BySplit { get; init; }
    public required double WallSeconds { get; init; }
    /// <summary>
    /// CPU seconds (all threads, user and system) the process used while the mode answered its questions, engine start and
    /// stop excluded: the work the mode costs, which other programs on the machine move far less than its latency.
    /// </summary>
    public double CpuSeconds { get; init; }
    public string? Settings { get; init; }
    /// <summary>Mean latency of each block of questions the modes took turns over, in question order (one block: the whole run).</summary>
    public IReadOnlyList<double> BlockLatencyMeans { get; init; } = [];
    /// <summary>Questions a turn of the modes held (question i ran in turn i / this), or 0 when the modes did not take turns.</summary>
    public int LatencyBlockSize { get; init; }

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

    /// <summary><see cref="CpuSeconds"/> a question, in milliseconds.</summary>
    public double CpuMillisecondsPerQuestion => Runs.Count == 0 ? double.NaN : CpuSeconds * 1e3 / Runs.Count;
}

public sealed record SweepPoint(string Mode, double Percentile, double Threshold, GroupMetrics Overall, double HeldoutF1, double TaughtF1)
{
    /// <summary>The signal the sweep's thresholds are on.</summary>
    public string Signal { get; init; } = "router-entropy";
}

public sealed record GoalResult(string Key, string Description, double Value, string Comparison, double Target, string Status, string Detail)
{
    /// <summary>Percentile-bootstrap 95% interval of <see cref="Value"/> over questions (seeded), where measured.</summary>
    public double CiLow { get; init; } = double.NaN;
    public double CiHigh { get; init; } = double.NaN;
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
    /// <summary>The signal of the triggered modes, and why that one.</summary>
    public TriggerSignal Signal { get; init; }
    public string SignalSource { get; init; } = "default";
    /// <summary>Every signal column's AUROCs over the questions no calibration choice saw (see <see cref="SignalQuestions"/>).</summary>
    public IReadOnlyList<SignalAuroc> SignalAurocs { get; init; } = [];
    /// <summary>Questions the signal AUROCs and curves are measured on, and those left out because calibrate used them.</summary>
    public int SignalQuestions { get; init; }
    public int CalibrationQuestionsLeftOut { get; init; }
    /// <summary>Each signal's curve: prompt_trigger at thresholds for shares of the curve questions.</summary>
    public IReadOnlyList<CurvePoint> Curves { get; init; } = [];
    /// <summary>none and prompt_always on the curve questions (the curves' ends).</summary>
    public GroupMetrics? CurveNone { get; init; }
    public GroupMetrics? CurvePromptAlways { get; init; }
    public double CurveNoneHeldoutF1 { get; init; } = double.NaN;
    public double CurvePromptAlwaysHeldoutF1 { get; init; } = double.NaN;
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
            if (!EvalModes.Known.Contains(m)) throw new ArgumentException($"unknown mode \"{m}\" (expected {string.Join(", ", EvalModes.Known)})");
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
        var signalThresholds = new Dictionary<string, double>(StringComparer.Ordinal);
        string? bestSignal = null;
        // Questions calibrate used (to fit the probe, or to measure its AUROCs and pick the best signal): left out of the
        // signal measurements here, so that they are made on questions no choice has seen.
        var calibrationRole = new Dictionary<string, string>(StringComparer.Ordinal);
        if (calibrationPath is not null)
        {
            var calibration = JsonNode.Parse(File.ReadAllText(calibrationPath)) as JsonObject
                ?? throw new InvalidDataException($"{calibrationPath} is not a JSON object");
            calibratedThreshold = calibration["threshold"]?.GetValue<double>();
            calibratedLayer = calibration["layer"]?.GetValue<int>();
            if (calibration["signals"] is JsonObject signalsJson)
                foreach (var (name, value) in signalsJson)
                    if (value?["threshold"]?.GetValue<double>() is { } t) signalThresholds[name] = t;
            bestSignal = calibration["best_signal"]?["signal"]?.GetValue<string>();
            foreach (var role in new[] { "fit", "check" })
                if (calibration["questions"]?[role] is JsonArray ids)
                    foreach (var id in ids)
                        if (id?.GetValue<string>() is { } text) calibrationRole[text] = role;
        }

        // The router probe: beside calibration.json, else in the model folder.
        var probePath = options.RouterProbe
            ?? new[] { calibrationPath is null ? null : Path.Combine(Path.GetDirectoryName(Path.GetFullPath(calibrationPath))!, RouterProbe.FileName),
                       Path.Combine(options.ModelPath, RouterProbe.FileName) }
               .FirstOrDefault(p => p is not null && File.Exists(p));
        if (options.RouterProbe is not null && !File.Exists(options.RouterProbe))
            throw new FileNotFoundException($"router probe {options.RouterProbe} does not exist", options.RouterProbe);
        var probe = probePath is null ? null : RouterProbe.Load(probePath);

        // The triggered modes' signal and threshold.
        var signal = options.Signal ?? (bestSignal is null ? null : TriggerSignals.Parse(bestSignal)) ?? TriggerSignal.RouterEntropy;
        var signalSource = options.Signal is not null ? "--trigger-signal"
            : bestSignal is not null ? $"{calibrationPath}: the best AUROC for a wrong answer over the first {Calibrator.Window} answer tokens, on calibrate's check questions"
            : "default (no calibration.json names a best signal)";
        if (signal == TriggerSignal.RouterProbe && probe is null)
            throw new FileNotFoundException($"the router-probe signal needs router-probe.json beside {calibrationPath ?? "calibration.json"} or in {options.ModelPath}: run `./moe-rag-inject calibrate` first");
        var signalName = TriggerSignals.Name(signal);
        double? calibratedForSignal = signal switch
        {
            TriggerSignal.RouterEntropy => calibratedThreshold,
            TriggerSignal.RouterProbe => signalThresholds.TryGetValue(signalName, out var pt) ? pt : probe!.Threshold,
            _ => signalThresholds.TryGetValue(signalName, out var ot) ? ot : null,
        };
        var threshold = options.Threshold ?? calibratedForSignal ?? DefaultThreshold;
        var thresholdSource = options.Threshold is not null ? "--threshold"
            : calibratedForSignal is not null ? (calibrationPath ?? probePath)! : "default";
        if (signal == TriggerSignal.RouterProbe && !(threshold >= 0 && threshold <= 1))
            throw new ArgumentException($"--threshold {threshold} is no probability: with the router-probe signal it must be in [0, 1]");
        var trainedProjection = options.TrainedProj ?? Path.Combine(options.ModelPath, TrainedProjectorFileName);
        if (options.TrainedProj is not null && !File.Exists(trainedProjection))
            throw new FileNotFoundException($"--trained-proj {options.TrainedProj} does not exist", options.TrainedProj);
        var injectionLayer = calibratedLayer ?? config.NumLayers - 1;

        var outPath = Path.GetFullPath(options.Out);
        var outBase = outPath.EndsWith(".json", StringComparison.OrdinalIgnoreCase) ? outPath[..^5] : outPath;
        Directory.CreateDirectory(Path.GetDirectoryName(outPath)!);
        progress.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"[eval] {items.Count} questions, modes {string.Join(",", modes)}, trigger signal {signalName} ({signalSource}), threshold {threshold:G5} ({thresholdSource}), concurrency {options.Concurrency}"));

        var logRoot = Directory.CreateTempSubdirectory("moe-rag-eval-").FullName;
        var results = new Dictionary<string, ModeResult>(StringComparer.Ordinal);
        var skipped = new Dictionary<string, string>(StringComparer.Ordinal);
        var sweep = new List<SweepPoint>();
        var curves = new List<CurvePoint>();
        // The questions no calibration choice saw: signal AUROCs and curves are measured on them.
        var untouched = items.Where(i => !calibrationRole.ContainsKey(i.Id)).ToList();
        var curveItems = QaData.Sample(untouched, options.SweepLimit, options.Seed);
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
                    await RunModeAsync(options, warmMode, TriggerSignal.RouterEntropy, 0, probePath, projection, injectionLayer, warmItems, logRoot,
                        TextWriter.Null, cancellationToken, "warmup " + warmMode).ConfigureAwait(false);
                }
                progress.WriteLine(Inv($"[eval] warm-up: {warmCount} question runs in none, prompt_always and latent_random mode ({warmClock.Elapsed.TotalSeconds:F1} s, discarded)"));
            }
            var measured = new List<string>();
            foreach (var mode in modes)
            {
                if (mode == EvalModes.LatentCalibrated && !projectionExists)
                {
                    skipped[mode] = $"no projection file ({projection} does not exist; run `calibrate` first or pass --injector-proj)";
                    progress.WriteLine($"[eval] {mode}: skipped: {skipped[mode]}");
                    continue;
                }
                if (mode is EvalModes.LatentTrained or EvalModes.LatentTrainedAlways && !File.Exists(trainedProjection))
                {
                    skipped[mode] = $"no trained projector ({trainedProjection} does not exist; run tools/projector/run-gpu.sh on a GPU machine or pass --trained-proj)";
                    progress.WriteLine($"[eval] {mode}: skipped: {skipped[mode]}");
                    continue;
                }
                measured.Add(mode);
            }
            foreach (var measuredMode in await RunInTurnsAsync(options, measured, signal, threshold, probePath, projection, injectionLayer, trainedProjection,
                         items, logRoot, progress, cancellationToken).ConfigureAwait(false))
                results[measuredMode.Mode] = measuredMode;

            if (options.Sweep && results.TryGetValue(EvalModes.None, out var noneRun))
            {
                // The triggered modes at thresholds that are percentiles of the signal's per-token values in the none run.
                var latentSweepMode = projectionExists ? EvalModes.LatentCalibrated : EvalModes.LatentRandom;
                var sweepModes = new[] { EvalModes.PromptTrigger, latentSweepMode }.Where(modes.Contains).ToList();
                var values = noneRun.Runs.SelectMany(r => Enumerable.Range(0, r.Tokens.Count).Select(j => SignalAnalysis.PerToken(signal, r, j)))
                    .Where(v => !double.IsNaN(v)).Order().ToArray();
                var sweepItems = QaData.Sample(items, options.SweepLimit, options.Seed);
                progress.WriteLine(Inv($"[eval] threshold sweep on {signalName} over {sweepItems.Count} questions"));
                foreach (var mode in sweepModes)
                    foreach (var percentile in options.SweepPercentiles)
                    {
                        var t = Stats.QuantileSorted(values, percentile / 100.0);
                        var run = await RunModeAsync(options, mode, signal, t, probePath, projection, injectionLayer, sweepItems, logRoot, progress,
                            cancellationToken, string.Create(CultureInfo.InvariantCulture, $"sweep {mode} p{percentile}")).ConfigureAwait(false);
                        sweep.Add(new SweepPoint(mode, percentile, t, run.Overall, run.HeldoutF1,
                            run.BySplit.TryGetValue("taught", out var taught) ? taught.TokenF1 : double.NaN) { Signal = signalName });
                    }

                // Each signal's curve: prompt_trigger on the questions no calibration choice saw, at the thresholds where the
                // signal's none-run maximum over the answer exceeds them for each share of the questions.
                if (modes.Contains(EvalModes.PromptTrigger) && curveItems.Count > 0)
                {
                    var noneById = noneRun.Runs.ToDictionary(r => r.Item.Id, StringComparer.Ordinal);
                    var available = new List<TriggerSignal> { TriggerSignal.RouterEntropy, TriggerSignal.OutputEntropy };
                    if (probe is not null) available.Add(TriggerSignal.RouterProbe);
                    progress.WriteLine(Inv($"[eval] signal curves over {curveItems.Count} questions ({items.Count - untouched.Count} calibration questions left out)"));
                    foreach (var curveSignal in available)
                    {
                        var thresholds = SignalAnalysis.CurveThresholds(curveItems.Select(i => SignalAnalysis.AnswerMax(curveSignal, noneById[i.Id])),
                            options.CurveFractions);
                        for (var k = 0; k < thresholds.Length; k++)
                        {
                            var name = TriggerSignals.Name(curveSignal);
                            var run = await RunModeAsync(options, EvalModes.PromptTrigger, curveSignal, thresholds[k], probePath, projection, injectionLayer,
                                curveItems, logRoot, progress, cancellationToken,
                                string.Create(CultureInfo.InvariantCulture, $"curve {name} q{options.CurveFractions[k]:G3}")).ConfigureAwait(false);
                            curves.Add(new CurvePoint(name, options.CurveFractions[k], thresholds[k], run.Overall, run.HeldoutF1,
                                run.BySplit.TryGetValue("taught", out var taught) ? taught.TokenF1 : double.NaN,
                                run.Runs.Count(r => r.Events.Count > 0) / (double)run.Runs.Count, run));
                        }
                    }
                }
            }
        }
        finally
        {
            Calibrator.TryDeleteDirectory(logRoot);
        }

        var trigger = results.TryGetValue(EvalModes.None, out var none) ? MeasureTrigger(none, config.NumLayers) : null;
        // The signals' AUROCs on the questions no calibration choice saw.
        List<SignalAuroc> signalAurocs = [];
        var signalQuestions = 0;
        if (none is not null)
        {
            var measured = Enumerable.Range(0, none.Runs.Count).Where(i => !calibrationRole.ContainsKey(none.Runs[i].Item.Id) && none.Runs[i].Tokens.Count > 0).ToList();
            signalQuestions = measured.Count;
            signalAurocs = SignalAnalysis.Aurocs([.. measured.Select(i => QuestionSignals.Of(none.Runs[i]))],
                [.. measured.Select(i => none.TokenF1[i] < WrongBelowF1)], [.. measured.Select(i => Calibrator.IsHeldout(none.Runs[i].Item))]);
        }
        var curveIds = curveItems.Select(i => i.Id).ToHashSet(StringComparer.Ordinal);
        ModeResult? OnCurveQuestions(string mode) => results.TryGetValue(mode, out var r) && curves.Count > 0
            ? ModeResult.Create(mode, r.Threshold, [.. r.Runs.Where(x => curveIds.Contains(x.Item.Id))], r.WallSeconds, r.Settings) : null;
        var curveNone = OnCurveQuestions(EvalModes.None);
        var curvePrompt = OnCurveQuestions(EvalModes.PromptAlways);
        var goals = Goals(results, trigger, curves, curvePrompt, options.Seed);

        var json = new JsonObject();
        var modesJson = new JsonObject();
        foreach (var (mode, r) in results)
        {
            var o = r.Overall.ToJson();
            o["description"] = r.Description;
            o["threshold"] = r.Threshold is { } th ? JsonOut.Num(th) : null;
            o["settings"] = r.Settings;
            o["wall_s"] = JsonOut.Num(r.WallSeconds, 3);
            o["cpu_ms_per_question"] = JsonOut.Num(r.CpuMillisecondsPerQuestion, 3);
            if (r.BlockLatencyMeans.Count > 1) o["latency_mean_by_block_s"] = JsonOut.Array(r.BlockLatencyMeans);
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
            o["signal"] = p.Signal;
            return (JsonNode?)o;
        })]);
        json["trigger_signal"] = new JsonObject
        {
            ["signal"] = signalName,
            ["source"] = signalSource,
            ["threshold"] = JsonOut.Num(threshold),
            ["threshold_source"] = thresholdSource,
            ["router_probe"] = probePath is null ? null : Path.GetFullPath(probePath),
            ["calibrated_thresholds"] = new JsonObject([.. signalThresholds.Select(kv => KeyValuePair.Create(kv.Key, JsonOut.Num(kv.Value)))]),
        };
        json["signal_auroc"] = SignalAurocJson(signalAurocs, signalQuestions, items.Count(i => calibrationRole.ContainsKey(i.Id)));
        json["signal_curves"] = CurvesJson(curves, curveItems.Count, curveNone, curvePrompt, options.CurveFractions);
        var goalsJson = new JsonObject();
        foreach (var g in goals)
            goalsJson[g.Key] = new JsonObject
            {
                ["description"] = g.Description,
                ["value"] = JsonOut.Num(g.Value),
                ["target"] = $"{g.Comparison} {g.Target.ToString(CultureInfo.InvariantCulture)}",
                ["status"] = g.Status,
                ["detail"] = g.Detail,
                ["ci95"] = double.IsNaN(g.CiLow) ? null : new JsonArray(JsonOut.Num(g.CiLow), JsonOut.Num(g.CiHigh)),
            };
        json["goals"] = goalsJson;
        json["questions"] = SignalAnalysis.QuestionsJson(items, results, calibrationRole);
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
            ["trigger_signal"] = signalName,
            ["router_probe"] = probePath is null ? null : Path.GetFullPath(probePath),
            ["bootstrap"] = Inv($"{Bootstrap.Resamples} resamples of the questions, seed {options.Seed}, percentile intervals"),
            ["injector_proj"] = projectionExists ? Path.GetFullPath(projection) : null,
            ["calibration"] = calibrationPath is null ? null : Path.GetFullPath(calibrationPath),
            ["injection_layer_calibrated"] = injectionLayer,
            ["trained_proj"] = File.Exists(trainedProjection) ? Path.GetFullPath(trainedProjection) : null,
            ["max_new_tokens"] = options.MaxNewTokens,
            ["concurrency"] = options.Concurrency,
            ["latency_block"] = options.LatencyBlock ?? LatencyBlockSize(items.Count, options.Concurrency),
            ["threads"] = options.Threads ?? Environment.ProcessorCount,
            ["retrieval_top_k"] = options.RetrievalTopK,
            ["max_retrievals"] = options.MaxRetrievals,
            ["trigger_window"] = options.TriggerWindow,
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
            Signal = signal,
            SignalSource = signalSource,
            SignalAurocs = signalAurocs,
            SignalQuestions = signalQuestions,
            CalibrationQuestionsLeftOut = items.Count(i => calibrationRole.ContainsKey(i.Id)),
            Curves = curves,
            CurveNone = curveNone?.Overall,
            CurvePromptAlways = curvePrompt?.Overall,
            CurveNoneHeldoutF1 = curveNone?.HeldoutF1 ?? double.NaN,
            CurvePromptAlwaysHeldoutF1 = curvePrompt?.HeldoutF1 ?? double.NaN,
            JsonPath = outPath,
            MarkdownPath = markdownPath,
            PredictionsPath = predictionsPath,
            PlotPaths = plotPaths,
            Json = json,
        };
        if (options.Plots) plotPaths.AddRange(Report.WritePlots(result, outBase, Math.Log(config.NumExperts)));
        json["config"]!["plots"] = JsonOut.Array(plotPaths);
        json["config"]!["elapsed_s"] = JsonOut.Num(clock.Elapsed.TotalSeconds, 2);
        JsonOut.WriteWithLineItems(outPath, json, "questions");
        File.WriteAllText(markdownPath, Report.Markdown(result, options));
        progress.WriteLine($"[eval] wrote {outPath}, {markdownPath}, {predictionsPath}" + (plotPaths.Count > 0 ? $" and {plotPaths.Count} plots" : ""));
        return result;
    }

    /// <summary>
    /// Questions per turn of <see cref="RunInTurnsAsync"/>: a twentieth of the questions, and at least 25 times the concurrency,
    /// so that the few questions at the end of a turn, which run with fewer beside them, stay a small share.
    /// </summary>
    public static int LatencyBlockSize(int questions, int concurrency) =>
        Math.Max(1, Math.Max(25 * concurrency, (questions + 19) / 20));

    /// <summary>
    /// The modes answer the questions in turns: block by block (<see cref="LatencyBlockSize"/> questions), every mode runs the
    /// block, the first mode of a block rotating. Whatever else the machine does during the run then falls on every mode
    /// alike; run one after another, one mode could take all of a busy spell and another none of it (three full runs of the
    /// same none mode on a shared 2-core machine measured 0.078, 0.145 and 0.206 s per question).
    /// </summary>
    private static async Task<List<ModeResult>> RunInTurnsAsync(EvaluationOptions options, IReadOnlyList<string> modes, TriggerSignal signal,
        double threshold, string? probePath, string projection, int injectionLayer, string trainedProjection, IReadOnlyList<QaItem> items,
        string logRoot, TextWriter progress, CancellationToken cancellationToken)
    {
        if (modes.Count == 0) return [];
        var size = options.LatencyBlock ?? LatencyBlockSize(items.Count, options.Concurrency);
        ArgumentOutOfRangeException.ThrowIfLessThan(size, 1, nameof(options.LatencyBlock));
        var blocks = (items.Count + size - 1) / size;
        // None and the modes that retrieve before the prompt (once, so their trigger never fires) have no threshold.
        static double? ThresholdOf(string mode, double threshold) => mode is EvalModes.None or EvalModes.PromptAlways or EvalModes.LatentTrainedAlways ? null : threshold;
        var runs = modes.ToDictionary(m => m, _ => new QuestionRun[items.Count], StringComparer.Ordinal);
        var wall = modes.ToDictionary(m => m, _ => 0.0, StringComparer.Ordinal);
        var cpu = modes.ToDictionary(m => m, _ => 0.0, StringComparer.Ordinal);
        var settings = modes.ToDictionary(m => m, _ => (string?)null, StringComparer.Ordinal);
        var blockLatency = modes.ToDictionary(m => m, _ => new List<double>(), StringComparer.Ordinal);
        if (blocks > 1)
            progress.WriteLine(Inv($"[eval] the modes take turns over {blocks} blocks of up to {size} questions"));
        for (var b = 0; b < blocks; b++)
        {
            var start = b * size;
            var block = items.Skip(start).Take(size).ToList();
            for (var k = 0; k < modes.Count; k++)
            {
                var mode = modes[(b + k) % modes.Count];
                var label = blocks == 1 ? mode : Inv($"{mode} block {b + 1}");
                var run = await RunModeAsync(options, mode, signal, ThresholdOf(mode, threshold) ?? threshold, probePath, projection, injectionLayer, block,
                    logRoot, blocks == 1 ? progress : TextWriter.Null, cancellationToken, label, trainedProjection).ConfigureAwait(false);
                for (var i = 0; i < block.Count; i++) runs[mode][start + i] = run.Runs[i];
                wall[mode] += run.WallSeconds;
                cpu[mode] += run.CpuSeconds;
                settings[mode] = run.Settings;
                blockLatency[mode].Add(run.Overall.LatencyMean);
            }
            if (blocks > 1)
                progress.WriteLine(Inv($"[eval] block {b + 1}/{blocks} (questions {start + 1}-{start + block.Count}): mean latency ")
                    + string.Join(", ", modes.Select(m => Inv($"{m} {blockLatency[m][b]:F3} s"))));
        }
        var results = new List<ModeResult>(modes.Count);
        foreach (var mode in modes)
        {
            var result = ModeResult.Create(mode, ThresholdOf(mode, threshold), runs[mode], wall[mode], settings[mode]) with
            {
                BlockLatencyMeans = blockLatency[mode], LatencyBlockSize = blocks > 1 ? size : 0, CpuSeconds = cpu[mode],
            };
            if (blocks > 1)
                progress.WriteLine(Inv($"[{mode}] F1 {result.Overall.TokenF1:F3}, contains {result.Overall.Contains:F3}, retrievals/q {result.Overall.RetrievalsPerQuestion:F2}, latency mean {result.Overall.LatencyMean:F3} s, wall {result.WallSeconds:F1} s"));
            results.Add(result);
        }
        return results;
    }

    private static async Task<ModeResult> RunModeAsync(EvaluationOptions options, string mode, TriggerSignal signal, double threshold,
        string? probePath, string projection, int injectionLayer, IReadOnlyList<QaItem> items, string logRoot, TextWriter progress,
        CancellationToken cancellationToken, string? label = null, string? trainedProjection = null)
    {
        // The triggered modes watch the signal; the router probe's threshold goes where the engine takes it for that signal.
        var trigger = new TriggerOptions
        {
            Signal = signal,
            Threshold = signal == TriggerSignal.RouterProbe ? DefaultThreshold : threshold,
            MaxRetrievalsPerRequest = options.MaxRetrievals,
            WindowTokens = options.TriggerWindow,
        };
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
            Trigger = trigger,
            RouterProbePath = probePath,
            RouterProbeThreshold = signal == TriggerSignal.RouterProbe ? threshold : null,
        };
        var on = Inv($"signal={TriggerSignals.Name(signal)} threshold={threshold:G6}");
        string settings;
        (engineOptions, settings) = mode switch
        {
            EvalModes.None => (engineOptions with { Mode = InjectionMode.Off }, "mode=off"),
            EvalModes.PromptAlways => (engineOptions with
            {
                Mode = InjectionMode.Prompt,
                RetrieveFirst = true,
                Trigger = new TriggerOptions { MaxRetrievalsPerRequest = 1 },
                RouterProbeThreshold = null,
            }, "mode=prompt retrieve_first max_retrievals=1"),
            EvalModes.PromptTrigger => (engineOptions with { Mode = InjectionMode.Prompt }, $"mode=prompt {on}"),
            EvalModes.LatentRandom => (engineOptions with { Mode = InjectionMode.Latent, Projection = ProjectionKind.Random, ProjectionSeed = 0, InjectionScale = options.LatentScale },
                Inv($"mode=latent projection=random(seed 0) layers=fired scale={options.LatentScale:G6} {on}")),
            EvalModes.LatentIdentity => (engineOptions with { Mode = InjectionMode.Latent, Projection = ProjectionKind.Identity, InjectionScale = options.LatentScale },
                Inv($"mode=latent projection=identity layers=fired scale={options.LatentScale:G6} {on}")),
            EvalModes.LatentCalibrated => (engineOptions with
            {
                Mode = InjectionMode.Latent,
                Projection = ProjectionKind.File,
                ProjectionPath = projection,
                InjectionLayers = [injectionLayer],
                InjectionScale = 1,
            }, Inv($"mode=latent projection=file({Path.GetFileName(projection)}) layers=[{injectionLayer}] scale=1 {on}")),
            EvalModes.LatentTrained => TrainedMode(engineOptions with { LatentRagRestart = options.LatentRagRestart },
                trainedProjection ?? throw new ArgumentException("latent_trained needs a projector file"),
                $"{on} restart={options.LatentRagRestart.ToString().ToLowerInvariant()}"),
            EvalModes.LatentTrainedAlways => TrainedMode(engineOptions with
            {
                RetrieveFirst = true,
                Trigger = new TriggerOptions { MaxRetrievalsPerRequest = 1 },
                RouterProbeThreshold = null,
            }, trainedProjection ?? throw new ArgumentException("latent_trained_always needs a projector file"), "retrieve_first max_retrievals=1"),
            _ => throw new ArgumentException($"unknown mode {mode}"),
        };
        label ??= mode;
        var clock = Stopwatch.StartNew();
        QuestionRun[] runs;
        TimeSpan cpu;
        await using (var engine = InferenceEngine.Create(engineOptions))
        {
            var cpuBefore = Environment.CpuUsage.TotalTime;
            runs = await QuestionRunner.RunAsync(engine, items, options.MaxNewTokens, options.Concurrency, stopAtNewline: true,
                rag: null, progress, label, cancellationToken).ConfigureAwait(false);
            cpu = Environment.CpuUsage.TotalTime - cpuBefore;
        }
        var result = ModeResult.Create(mode, threshold, runs, clock.Elapsed.TotalSeconds, settings) with { CpuSeconds = cpu.TotalSeconds };
        progress.WriteLine(Inv($"[{label}] F1 {result.Overall.TokenF1:F3}, contains {result.Overall.Contains:F3}, retrievals/q {result.Overall.RetrievalsPerQuestion:F2}, latency mean {result.Overall.LatencyMean:F3} s, wall {result.WallSeconds:F1} s"));
        return result;
    }

    /// <summary>
    /// latent_trained: the trained projector at the layers and α it was trained with (its metadata; without them the layers
    /// that fired and α = 1), with the same trigger as the other latent modes.
    /// </summary>
    private static (EngineOptions, string) TrainedMode(EngineOptions engineOptions, string path, string trigger)
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
        }, Inv($"mode=latent projection=file({Path.GetFileName(path)}, {info.Architecture.ToString().ToLowerInvariant()}) layers={(info.Layers is null ? "fired" : "[" + string.Join(",", info.Layers) + "]")} scale={alpha:G6} {trigger}"));
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

    /// <summary>Most of the questions a signal's trigger may retrieve for (the trigger goal).</summary>
    public const double RetrievalBudget = 0.5;
    /// <summary>How far below prompt_always's held-out F1 the trigger goal allows.</summary>
    public const double F1Tolerance = 0.03;

    /// <param name="curves">The signals' curves (the trigger goal), with <paramref name="curvePrompt"/> prompt_always on the same questions.</param>
    /// <param name="seed">Seed of the bootstrap resamples.</param>
    internal static List<GoalResult> Goals(IReadOnlyDictionary<string, ModeResult> modes, TriggerQuality? trigger,
        IReadOnlyList<CurvePoint>? curves = null, ModeResult? curvePrompt = null, int seed = 0)
    {
        var goals = new List<GoalResult>();
        static string Status(double value, bool met) => double.IsNaN(value) ? "UNDEFINED" : met ? "MET" : "NOT MET";

        var auroc = trigger?.AurocHeldout.GetValueOrDefault("router_max_j0", double.NaN) ?? double.NaN;
        goals.Add(new GoalResult("heldout_auroc", "router entropy (max over layers, j = 0) separates held-out from taught questions",
            auroc, ">=", 0.7,
            trigger is null ? "NOT MEASURED" : Status(auroc, auroc >= 0.7),
            trigger is null ? "the none mode was not run"
                : Inv($"AUROC = {JsonOut.F(auroc)} over {trigger.Count} questions ({trigger.Heldout} held-out)")));

        goals.Add(TriggerGoal(curves ?? [], curvePrompt, seed));

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
        // The modes ran the same questions in the same order: a resample takes the same questions from each.
        var heldout = Enumerable.Range(0, none.Runs.Count).Where(i => Calibrator.IsHeldout(none.Runs[i].Item)).ToArray();
        var (recoveryLow, recoveryHigh) = Bootstrap.Ci95(heldout.Length, sample =>
        {
            double Mean(ModeResult m) => sample.Average(k => m.TokenF1[heldout[k]]);
            var g = Mean(prompt) - Mean(none);
            return g > 0 ? (Mean(latent) - Mean(none)) / g : double.NaN;
        }, seed);
        goals.Add(new GoalResult("latent_recovery", "latent_calibrated recovers prompt RAG's gain over none (held-out F1)", recovery, ">=", 0.3,
            Status(recovery, recovery >= 0.3),
            Inv($"(F1_latcal − F1_none) / (F1_prompt_always − F1_none) on held-out = ({JsonOut.F(fLatent)} − {JsonOut.F(fNone)}) / ({JsonOut.F(fPrompt)} − {JsonOut.F(fNone)})")
                + (gain > 0 ? "" : "; undefined: prompt RAG gains nothing over none")) { CiLow = recoveryLow, CiHigh = recoveryHigh });
        double lNone = none.Overall.LatencyMean, lPrompt = prompt.Overall.LatencyMean, lLatent = latent.Overall.LatencyMean;
        var added = lPrompt - lNone;
        var ratio = added > 0 ? (lLatent - lNone) / added : double.NaN;
        var (ratioLow, ratioHigh) = Bootstrap.Ci95(none.Runs.Count, sample =>
        {
            double Mean(ModeResult m) => sample.Average(k => m.Runs[k].LatencySeconds);
            var a = Mean(prompt) - Mean(none);
            return a > 0 ? (Mean(latent) - Mean(none)) / a : double.NaN;
        }, seed + 1);
        goals.Add(new GoalResult("latency_ratio", "latent_calibrated's added latency relative to prompt RAG's", ratio, "<=", 0.1,
            Status(ratio, ratio <= 0.1),
            Inv($"(lat_latcal − lat_none) / (lat_prompt_always − lat_none) = ({lLatent:F4} − {lNone:F4}) / ({lPrompt:F4} − {lNone:F4}) s (mean per question)")
                + (added > 0 ? "" : "; undefined: prompt RAG adds no latency")) { CiLow = ratioLow, CiHigh = ratioHigh });
        goals.AddRange(TrainedProjectorGoals.Compute(modes));
        return goals;
    }

    /// <summary>
    /// Issue 9's trigger goal: a signal whose prompt-mode trigger, retrieving for at most <see cref="RetrievalBudget"/> of the
    /// questions, reaches prompt_always's held-out F1 within <see cref="F1Tolerance"/>. Each signal is judged at its curve point
    /// with the most questions retrieving within the budget (a rule fixed before the numbers: it does not look at F1); the
    /// value is the smallest F1 gap over the signals, with a bootstrap interval over the curve questions.
    /// </summary>
    internal static GoalResult TriggerGoal(IReadOnlyList<CurvePoint> curves, ModeResult? prompt, int seed)
    {
        const string Key = "trigger_budget";
        var description = Inv($"a trigger signal reaches prompt_always's held-out F1 within {F1Tolerance} while retrieving for at most {RetrievalBudget} of the questions");
        if (curves.Count == 0 || prompt is null)
            return new GoalResult(Key, description, double.NaN, "<=", F1Tolerance, "NOT MEASURED",
                "needs modes none, prompt_always and prompt_trigger and the sweep (the signal curves)");
        var details = new List<string>();
        (string Signal, CurvePoint Point, double Gap)? best = null;
        foreach (var group in curves.GroupBy(c => c.Signal))
        {
            var within = group.Where(c => c.RetrievedFraction <= RetrievalBudget).OrderByDescending(c => c.RetrievedFraction).ThenBy(c => c.Threshold).FirstOrDefault();
            if (within is null)
            {
                details.Add(Inv($"{group.Key}: no curve point retrieves for at most {RetrievalBudget} of the questions (fewest: {group.Min(c => c.RetrievedFraction):F2})"));
                continue;
            }
            var gap = prompt.HeldoutF1 - within.HeldoutF1;
            details.Add(Inv($"{group.Key}: at threshold {within.Threshold:G4}, {within.RetrievedFraction:F2} of the questions retrieve ({within.Overall.RetrievalsPerQuestion:F2} retrievals/q), held-out F1 {JsonOut.F(within.HeldoutF1)} (gap {JsonOut.F(gap)})"));
            if (best is null || gap < best.Value.Gap) best = (group.Key, within, gap);
        }
        var head = Inv($"prompt_always's held-out F1 on the {prompt.Runs.Count} curve questions {JsonOut.F(prompt.HeldoutF1)}; ");
        if (best is not { } b)
            return new GoalResult(Key, description, double.NaN, "<=", F1Tolerance, "NOT MET", head + string.Join("; ", details));
        // Paired resamples of the curve's held-out questions (the point's run and prompt_always's are in the same order).
        var byId = prompt.Runs.Select((r, i) => (r.Item.Id, F1: prompt.TokenF1[i])).ToDictionary(x => x.Id, x => x.F1, StringComparer.Ordinal);
        var point = b.Point.Run;
        var heldout = Enumerable.Range(0, point.Runs.Count).Where(i => Calibrator.IsHeldout(point.Runs[i].Item)).ToArray();
        var (low, high) = Bootstrap.Ci95(heldout.Length,
            sample => sample.Average(k => byId[point.Runs[heldout[k]].Item.Id] - point.TokenF1[heldout[k]]), seed + 2);
        var met = b.Gap <= F1Tolerance;
        return new GoalResult(Key, description, b.Gap, "<=", F1Tolerance, met ? "MET" : "NOT MET",
            head + Inv($"best: {b.Signal}; ") + string.Join("; ", details)) { CiLow = low, CiHigh = high };
    }

    private static JsonObject SignalAurocJson(IReadOnlyList<SignalAuroc> aurocs, int questions, int leftOut)
    {
        var columns = new JsonObject();
        foreach (var group in aurocs.GroupBy(a => a.Column))
        {
            var o = new JsonObject();
            foreach (var a in group)
                o[a.Label] = new JsonObject
                {
                    ["auroc"] = JsonOut.Num(a.Auroc),
                    ["ci95"] = new JsonArray(JsonOut.Num(a.Low), JsonOut.Num(a.High)),
                    ["n"] = a.Count,
                    ["positives"] = a.Positives,
                };
            columns[group.Key] = o;
        }
        return new JsonObject
        {
            ["n"] = questions,
            ["calibration_questions_left_out"] = leftOut,
            ["labels"] = Inv($"wrong: none-mode answer token F1 < {WrongBelowF1}; heldout: split == heldout"),
            ["ci"] = "AUROC ± 1.96 × the Hanley–McNeil standard error",
            ["columns"] = "each signal at j = 0 (the forward pass of the last prompt position) and its maximum over j < 4 (*_w4); per question in `questions`",
            ["auroc"] = columns,
        };
    }

    private static JsonObject CurvesJson(IReadOnlyList<CurvePoint> curves, int questions, ModeResult? none, ModeResult? prompt, IReadOnlyList<double> fractions)
    {
        JsonObject? End(ModeResult? m)
        {
            if (m is null) return null;
            var o = m.Overall.ToJson();
            o["heldout_token_f1"] = JsonOut.Num(m.HeldoutF1);
            o["retrieved_fraction"] = JsonOut.Num(m.Runs.Count(r => r.Events.Count > 0) / (double)Math.Max(1, m.Runs.Count));
            return o;
        }
        return new JsonObject
        {
            ["n"] = questions,
            ["questions"] = "a seeded sample (--sweep-limit, --seed) of the questions calibrate did not use",
            ["thresholds"] = "for each target share q, the (1 − q) quantile over the curve questions of the signal's largest value over the none-mode answer",
            ["target_fractions"] = JsonOut.Array(fractions),
            ["none"] = End(none),
            ["prompt_always"] = End(prompt),
            ["points"] = new JsonArray([.. curves.Select(c =>
            {
                var o = c.Overall.ToJson();
                o["signal"] = c.Signal;
                o["target_fraction"] = JsonOut.Num(c.TargetFraction);
                o["threshold"] = JsonOut.Num(c.Threshold);
                o["retrieved_fraction"] = JsonOut.Num(c.RetrievedFraction);
                o["heldout_token_f1"] = JsonOut.Num(c.HeldoutF1);
                o["taught_token_f1"] = JsonOut.Num(c.TaughtF1);
                return (JsonNode?)o;
            })]),
        };
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
