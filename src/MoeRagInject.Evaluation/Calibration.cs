using System.Diagnostics;
using System.Globalization;
using System.Text.Json.Nodes;
using MoeRagInject.Backend;
using MoeRagInject.Engine;
using MoeRagInject.Model;
using MoeRagInject.Model.Tokenization;
using MoeRagInject.Rag;

namespace MoeRagInject.Evaluation;

/// <summary>Flags of `calibrate`.</summary>
public sealed record CalibrationOptions
{
    /// <summary>--model-path: the checkpoint folder.</summary>
    public required string ModelPath { get; init; }
    /// <summary>--qa: QA JSONL ({id, question, answer, passage_id, split}).</summary>
    public required string Qa { get; init; }
    /// <summary>--corpus: JSONL(.gz) corpus or index .db holding the gold passages by id; null skips the projection fit.</summary>
    public string? Corpus { get; init; }
    /// <summary>--out: the projection file; null = &lt;model&gt;/injector-proj.safetensors. calibration.json is written beside it.</summary>
    public string? Out { get; init; }
    /// <summary>--limit: QA prompts sampled for the signals' distributions and the router probe (deterministic shuffle); null = all.</summary>
    public int? Limit { get; init; } = 1000;
    /// <summary>Tokens greedily decoded per prompt (eval's answer length, so that "answered wrong" means the same in both).</summary>
    public int MaxNewTokens { get; init; } = 48;
    /// <summary>Share of the questions held back from the router probe's fit, on which every signal's AUROC is measured.</summary>
    public double CheckFraction { get; init; } = 0.3;
    /// <summary>--skip-probe: no router probe.</summary>
    public bool SkipProbe { get; init; }
    /// <summary>Pooling windows the probe's cross-validation tries (answer tokens).</summary>
    public IReadOnlyList<int> ProbeWindows { get; init; } = [1, 2, 4];
    /// <summary>L2 strengths the probe's cross-validation tries (on standardised features).</summary>
    public IReadOnlyList<double> ProbeLambdas { get; init; } = [1e-3, 1e-2, 1e-1, 1, 10, 100];
    /// <summary>Folds of the probe's cross-validation (over fit questions, stratified by label).</summary>
    public int ProbeFolds { get; init; } = 5;
    /// <summary>--target-rate: fraction of generated tokens whose max-over-layers entropy should exceed the threshold.</summary>
    public double TargetRate { get; init; } = 0.1;
    /// <summary>--pairs: (question, gold passage) pairs from taught questions for the projection fit.</summary>
    public int Pairs { get; init; } = 512;
    /// <summary>--layer: MoE layer after which the residual stream is captured (and injected); null = the last layer.</summary>
    public int? Layer { get; init; }
    /// <summary>--ridge: λ (absolute); null = chosen on a validation split from <see cref="RidgeScales"/> × trace(CᵀC)/hidden.</summary>
    public double? Ridge { get; init; }
    public IReadOnlyList<double> RidgeScales { get; init; } = [1e-3, 1e-2, 1e-1, 1, 10, 100];
    /// <summary>Fraction of the pairs held out to choose λ and report validation R².</summary>
    public double ValidationFraction { get; init; } = 0.2;
    /// <summary>Positions per pair: the question's last token and up to this many minus one answer tokens.</summary>
    public int MaxPositions { get; init; } = 16;
    /// <summary>--intercept: also fit a bias (saved as the "bias" tensor).</summary>
    public bool Intercept { get; init; }
    /// <summary>--skip-projection: only measure the entropy distribution.</summary>
    public bool SkipProjection { get; init; }
    /// <summary>--concurrency: requests in flight for the entropy runs.</summary>
    public int Concurrency { get; init; } = 8;
    /// <summary>Pairs per forward batch of the projection fit (each pair is two sequences).</summary>
    public int BatchPairs { get; init; } = 8;
    /// <summary>--threads: CPU threads; null = all cores.</summary>
    public int? Threads { get; init; }
    /// <summary>The device the model runs on (the CLI builds it from --device and --threads).</summary>
    public required IRunnerFactory Runner { get; init; }
    public int Seed { get; init; }
    public string LoadFormat { get; init; } = "auto";
}

public sealed record LayerEntropyStats(string Name, double Mean, IReadOnlyDictionary<int, double> Percentiles);

public sealed record RidgeTrial(double Scale, double Lambda, double TrainR2, double ValidationR2);

public sealed record ProjectionFit
{
    public required string Path { get; init; }
    public required int Layer { get; init; }
    public required int Pairs { get; init; }
    public required int TrainPairs { get; init; }
    public required int ValidationPairs { get; init; }
    public required long Rows { get; init; }
    public required IReadOnlyList<RidgeTrial> Trials { get; init; }
    public required double Lambda { get; init; }
    public required double TrainR2 { get; init; }
    public required double ValidationR2 { get; init; }
    /// <summary>R² of the final fit (all pairs) on all pairs.</summary>
    public required double FinalR2 { get; init; }
    public required double DNormMean { get; init; }
    public required double DNormP50 { get; init; }
    public required double DNormP95 { get; init; }
    public required double HiddenNormMean { get; init; }
    public required double FeatureNormMean { get; init; }
    public required double PredictionNormMean { get; init; }
    public required bool Intercept { get; init; }
    public required int SkippedPairs { get; init; }
    /// <summary>
    /// R² of the best any function of the pair could do: c is the same at every position of a pair, so P·c can at most
    /// predict the pair's mean d; this is 1 − Σ‖d − mean_pair(d)‖² / Σ‖d − mean(d)‖² over all rows.
    /// </summary>
    public required double CeilingR2 { get; init; }
}

/// <summary>
/// One trigger signal over the calibration runs (RAG off): the threshold at which it fires on <see cref="AchievedRate"/> of
/// generated tokens (the target rate), and the AUROC of held-out against taught terms of its value at the first answer
/// token (j = 0) and of its maximum over the first <see cref="Calibrator.Window"/> answer tokens (a trigger watching the answer
/// as it is written fires within them when that maximum crosses the threshold).
/// </summary>
/// <remarks>The AUROCs are measured on calibrate's check questions (never used to fit the router probe).</remarks>
public sealed record SignalCalibration(string Signal, double Threshold, double AchievedRate, double HeldoutAurocJ0, double HeldoutAurocWindow)
{
    /// <summary>AUROC for a wrong RAG-off answer (token F1 below <see cref="Evaluator.WrongBelowF1"/>), at j = 0.</summary>
    public double WrongAurocJ0 { get; init; } = double.NaN;
    /// <summary>The same for the maximum over the first <see cref="Calibrator.Window"/> answer tokens.</summary>
    public double WrongAurocWindow { get; init; } = double.NaN;
}

public sealed record CalibrationResult
{
    public required int Layer { get; init; }
    public required double Threshold { get; init; }
    public required double TargetRate { get; init; }
    /// <summary>Fraction of generated tokens whose max-over-layers entropy exceeds <see cref="Threshold"/>.</summary>
    public required double AchievedRate { get; init; }
    public required int Prompts { get; init; }
    public required int Tokens { get; init; }
    /// <summary>Per layer, then "max" and "mean" over layers, over all generated tokens.</summary>
    public required IReadOnlyList<LayerEntropyStats> Entropy { get; init; }
    /// <summary>AUROC of the j = 0 max-over-layers router entropy for held-out vs taught (NaN when a split is missing).</summary>
    public required double HeldoutAurocJ0 { get; init; }
    /// <summary>Each trigger signal (--trigger-signal) measured on the same runs: its threshold for the target rate and how well it tells held-out terms.</summary>
    public required IReadOnlyList<SignalCalibration> Signals { get; init; }
    /// <summary>The signal with the highest AUROC for a wrong answer over the first answer tokens, on the check questions.</summary>
    public required string BestSignal { get; init; }
    /// <summary>The trained router probe (null when skipped), saved at <see cref="RouterProbePath"/>.</summary>
    public RouterProbe? RouterProbe { get; init; }
    public string? RouterProbePath { get; init; }
    /// <summary>Question ids the probe was fitted on, and those the AUROCs were measured on.</summary>
    public required IReadOnlyList<string> FitQuestions { get; init; }
    public required IReadOnlyList<string> CheckQuestions { get; init; }
    public ProjectionFit? Projection { get; init; }
    /// <summary>calibration.json.</summary>
    public required string JsonPath { get; init; }
    public required JsonObject Json { get; init; }
}

/// <summary>
/// `calibrate`: the trigger signals' distributions and thresholds (router entropy, output entropy, the router probe it trains),
/// their AUROCs, and a ridge-fitted projection P for latent injection.
/// </summary>
public static class Calibrator
{
    public const string CalibrationFileName = "calibration.json";
    /// <summary>Answer tokens over which <see cref="SignalCalibration.HeldoutAurocWindow"/> takes the maximum.</summary>
    public const int Window = 4;
    public const string ProjectionFileName = "injector-proj.safetensors";

    public static async Task<CalibrationResult> RunAsync(CalibrationOptions options, TextWriter progress, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(options);
        progress ??= TextWriter.Null;
        if (!(options.TargetRate > 0 && options.TargetRate < 1)) throw new ArgumentException("--target-rate must be in (0, 1)");
        if (options.Pairs < 2 && !options.SkipProjection) throw new ArgumentException("--pairs must be at least 2");
        if (options.MaxPositions < 1) throw new ArgumentException("MaxPositions must be >= 1");
        var clock = Stopwatch.StartNew();
        var outPath = Path.GetFullPath(options.Out ?? Path.Combine(options.ModelPath, ProjectionFileName));
        var jsonPath = Path.Combine(Path.GetDirectoryName(outPath)!, CalibrationFileName);
        var allItems = QaData.Load(options.Qa);
        var items = QaData.Sample(allItems, options.Limit, options.Seed);
        if (items.Count == 0) throw new ArgumentException($"{options.Qa} holds no questions");

        // (a) Router-entropy distribution with RAG off.
        progress.WriteLine($"[calibrate] entropy distribution over {items.Count} prompts (greedy, up to {options.MaxNewTokens} tokens, RAG off)");
        var logDir = Directory.CreateTempSubdirectory("moe-rag-calibrate-").FullName;
        QuestionRun[] runs;
        int layers, experts;
        try
        {
            await using var engine = InferenceEngine.Create(new EngineOptions
            {
                ModelPath = options.ModelPath,
                LoadFormat = options.LoadFormat,
                Runner = options.Runner,
                MaxRunningRequests = options.Concurrency,
                Mode = InjectionMode.Off,
                LogDir = logDir,
                Notices = TextWriter.Null,
            });
            layers = engine.Config.NumLayers;
            experts = engine.Config.NumExperts;
            runs = await QuestionRunner.RunAsync(engine, items, options.MaxNewTokens, options.Concurrency, stopAtNewline: true,
                new RagOverrides { Mode = InjectionMode.Off }, progress, "calibrate", cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            TryDeleteDirectory(logDir);
        }
        var layer = options.Layer ?? layers - 1;
        if (layer < 0 || layer >= layers) throw new ArgumentException($"--layer {layer} is out of range: the model has MoE layers 0..{layers - 1}");

        var perLayer = Enumerable.Range(0, layers).Select(_ => new List<double>()).ToArray();
        var maxes = new List<double>();
        var means = new List<double>();
        foreach (var run in runs)
            foreach (var row in run.RouterEntropy)
            {
                for (var l = 0; l < layers; l++) perLayer[l].Add(row[l]);
                maxes.Add(row.Max());
                means.Add(row.Average());
            }
        if (maxes.Count == 0) throw new InvalidOperationException("no tokens were generated");
        var threshold = Stats.Quantile(maxes, 1 - options.TargetRate);
        var achieved = maxes.Count(m => m > threshold) / (double)maxes.Count;
        var entropyStats = new List<LayerEntropyStats>();
        for (var l = 0; l < layers; l++) entropyStats.Add(Describe($"layer{l}", perLayer[l]));
        entropyStats.Add(Describe("max", maxes));
        entropyStats.Add(Describe("mean", means));

        var j0 = runs.Where(r => r.RouterEntropy.Count > 0).ToList();
        var j0Max = j0.Select(r => (double)r.RouterEntropy[0].Max()).ToList();
        var j0Mean = j0.Select(r => (double)r.RouterEntropy[0].Average()).ToList();
        var heldout = j0.Select(r => IsHeldout(r.Item)).ToList();
        var aurocMax = Stats.Auroc(j0Max, heldout);
        var aurocMean = Stats.Auroc(j0Mean, heldout);
        // The questions split once, by a seeded shuffle: the probe is fitted on the fit part alone, and every signal's AUROCs
        // are measured on the check part, which no fit has seen.
        var answered = runs.Where(r => r.Tokens.Count > 0).ToList();
        var order = Enumerable.Range(0, answered.Count).ToArray();
        new Random(options.Seed + 2).Shuffle(order);
        var checkCount = answered.Count < 4 ? 0 : Math.Clamp((int)Math.Round(answered.Count * options.CheckFraction), 1, answered.Count - 2);
        var check = order.Take(checkCount).Order().Select(i => answered[i]).ToList();
        var fit = order.Skip(checkCount).Order().Select(i => answered[i]).ToList();
        static bool Wrong(QuestionRun r) => AnswerMetrics.TokenF1(r.Answer, r.Item.Answer) < Evaluator.WrongBelowF1;

        // The router probe: every answer token's router probabilities (the answers replayed through the model), a logistic fit.
        RouterProbe? probe = null;
        TrainedProbe? trained = null;
        string? probeSkipped = null;
        Dictionary<QuestionRun, float[][]>? probabilities = null;
        if (options.SkipProbe) probeSkipped = "--skip-probe";
        else if (fit.Count(Wrong) < 2 || fit.Count(r => !Wrong(r)) < 2)
            probeSkipped = string.Create(CultureInfo.InvariantCulture,
                $"the fit questions need at least two of each label ({fit.Count(Wrong)} answered wrong, {fit.Count(r => !Wrong(r))} right)");
        if (probeSkipped is null)
        {
            progress.WriteLine($"[calibrate] router probabilities of {answered.Count} answers (replayed, eager)");
            probabilities = RouterProbabilities(options, answered, cancellationToken);
            trained = RouterProbeTrainer.Train([.. fit.Select(r => new ProbeQuestion(r.Item.Id, probabilities[r], Wrong(r)))], Window,
                options.ProbeWindows, options.ProbeLambdas, options.ProbeFolds, options.Seed);
            progress.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"[calibrate] router probe: window {trained.Window}, λ {trained.Lambda:G3} (cross-validated AUROC {trained.Trials.Max(t => t.CvAuroc):F3} over {trained.Folds} folds of {trained.Questions} fit questions)"));
        }
        else
        {
            progress.WriteLine($"[calibrate] router probe not trained: {probeSkipped}");
        }

        // Each trigger signal, per generated token: the router's (max over layers, as --trigger-aggregation any fires), the
        // output distribution's, and the router probe's.
        var signals = new List<SignalCalibration>();
        var perTokenSignals = new List<(string, Func<QuestionRun, int, double>)>
        {
            ("router-entropy", (r, j) => r.RouterEntropy[j].Max()),
            ("output-entropy", (r, j) => r.OutputEntropy[j]),
        };
        if (trained is not null)
            perTokenSignals.Add(("router-probe", (r, j) => RouterProbeTrainer.Score(probabilities![r], j, trained.Window, trained.Weights, trained.Bias)));
        foreach (var (name, perToken) in perTokenSignals)
        {
            var all = answered.SelectMany(r => Enumerable.Range(0, r.Tokens.Count).Select(j => perToken(r, j))).ToList();
            var signalThreshold = Stats.Quantile(all, 1 - options.TargetRate);
            var rate = all.Count(v => v > signalThreshold) / (double)all.Count;
            double AtJ0(IEnumerable<QuestionRun> group, Func<QuestionRun, bool> label) =>
                Stats.Auroc([.. group.Select(r => perToken(r, 0))], [.. group.Select(label)]);
            double OverWindow(IEnumerable<QuestionRun> group, Func<QuestionRun, bool> label) =>
                Stats.Auroc([.. group.Select(r => Enumerable.Range(0, Math.Min(Window, r.Tokens.Count)).Max(j => perToken(r, j)))], [.. group.Select(label)]);
            var signal = new SignalCalibration(name, signalThreshold, rate, AtJ0(check, IsHeldout), OverWindow(check, IsHeldout))
            {
                WrongAurocJ0 = AtJ0(check, Wrong),
                WrongAurocWindow = OverWindow(check, Wrong),
            };
            signals.Add(signal);
            progress.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"[calibrate] {name}: threshold for rate {options.TargetRate:G3} = {signalThreshold:F4} (achieved {rate:P1}); on {check.Count} check questions, AUROC for a wrong answer at j=0 {JsonOut.F(signal.WrongAurocJ0)}, max over j<{Window} {JsonOut.F(signal.WrongAurocWindow)}; for a held-out term {JsonOut.F(signal.HeldoutAurocJ0)}, {JsonOut.F(signal.HeldoutAurocWindow)}"));
        }
        var best = signals.MaxBy(x => double.IsNaN(x.WrongAurocWindow) ? double.NegativeInfinity : x.WrongAurocWindow)!;
        progress.WriteLine($"[calibrate] best signal by AUROC (wrong answer, max over j<{Window}, check questions): {best.Signal}");
        if (trained is not null)
        {
            probe = new RouterProbe
            {
                Layers = layers,
                Experts = experts,
                Window = trained.Window,
                Weights = trained.Weights,
                Bias = trained.Bias,
                Threshold = Math.Clamp(signals.First(x => x.Signal == "router-probe").Threshold, 0, 1),
                Training = ProbeTrainingJson(options, trained, signals.First(x => x.Signal == "router-probe"), fit, check, Wrong),
            };
        }
        progress.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"[calibrate] {maxes.Count} tokens; max-over-layers p50={Stats.Quantile(maxes, 0.5):F3} p90={Stats.Quantile(maxes, 0.9):F3}; threshold for rate {options.TargetRate:G3} = {threshold:F4} (achieved {achieved:P1}); j=0 held-out AUROC (max) = {JsonOut.F(aurocMax)}"));

        var json = new JsonObject
        {
            ["layer"] = layer,
            ["threshold"] = JsonOut.Num(threshold),
            ["target_rate"] = options.TargetRate,
            ["achieved_rate"] = JsonOut.Num(achieved),
            ["model"] = Path.GetFullPath(options.ModelPath),
            ["qa"] = Path.GetFullPath(options.Qa),
            ["corpus"] = options.Corpus is null ? null : Path.GetFullPath(options.Corpus),
            ["date"] = DateTimeOffset.UtcNow.ToString("yyyy-MM-dd'T'HH:mm:ss'Z'", CultureInfo.InvariantCulture),
            ["num_layers"] = layers,
            ["num_experts"] = experts,
            ["max_entropy"] = JsonOut.Num(Math.Log(experts)),
        };
        var entropyJson = new JsonObject
        {
            ["prompts"] = runs.Length,
            ["tokens"] = maxes.Count,
            ["max_new_tokens"] = options.MaxNewTokens,
        };
        var layerArray = new JsonArray();
        for (var l = 0; l < layers; l++)
        {
            var summary = JsonOut.Summary(perLayer[l]);
            summary["layer"] = l;
            layerArray.Add(summary);
        }
        entropyJson["per_layer"] = layerArray;
        entropyJson["max_over_layers"] = JsonOut.Summary(maxes);
        entropyJson["mean_over_layers"] = JsonOut.Summary(means);
        json["entropy"] = entropyJson;
        var splitJson = new JsonObject();
        foreach (var group in j0.GroupBy(r => r.Item.Split).OrderBy(g => g.Key, StringComparer.Ordinal))
        {
            splitJson[group.Key] = new JsonObject
            {
                ["max_over_layers"] = JsonOut.Summary(group.Select(r => (double)r.RouterEntropy[0].Max())),
                ["mean_over_layers"] = JsonOut.Summary(group.Select(r => (double)r.RouterEntropy[0].Average())),
            };
        }
        var signalsJson = new JsonObject();
        foreach (var signal in signals)
            signalsJson[signal.Signal] = new JsonObject
            {
                ["threshold"] = JsonOut.Num(signal.Threshold),
                ["achieved_rate"] = JsonOut.Num(signal.AchievedRate),
                ["auroc_heldout_j0"] = JsonOut.Num(signal.HeldoutAurocJ0),
                [$"auroc_heldout_max_j0_{Window - 1}"] = JsonOut.Num(signal.HeldoutAurocWindow),
                ["auroc_wrong_j0"] = JsonOut.Num(signal.WrongAurocJ0),
                [$"auroc_wrong_max_j0_{Window - 1}"] = JsonOut.Num(signal.WrongAurocWindow),
            };
        json["signals"] = signalsJson;
        json["signals_note"] = string.Create(CultureInfo.InvariantCulture,
            $"threshold: the signal's value exceeded on target_rate of all generated tokens (RAG off); AUROCs on the {check.Count} check questions (never used to fit the probe): label heldout = split is heldout, label wrong = RAG-off answer token F1 < {Evaluator.WrongBelowF1}; j0 = first answer token, max_j0_{Window - 1} = the largest value over the first {Window}");
        json["best_signal"] = new JsonObject
        {
            ["signal"] = best.Signal,
            ["by"] = $"auroc_wrong_max_j0_{Window - 1} on the check questions",
        };
        json["questions"] = new JsonObject
        {
            ["fit"] = JsonOut.Array(fit.Select(r => r.Item.Id)),
            ["check"] = JsonOut.Array(check.Select(r => r.Item.Id)),
            ["note"] = "calibrate's questions (RAG off): the router probe is fitted on fit; AUROCs are measured on check; eval leaves both out of its trigger measurements",
        };
        var probePath = Path.Combine(Path.GetDirectoryName(jsonPath)!, RouterProbe.FileName);
        if (probe is not null)
        {
            probe.Save(probePath);
            json["router_probe"] = new JsonObject { ["path"] = probePath, ["window"] = probe.Window, ["threshold"] = JsonOut.Num(probe.Threshold) };
            progress.WriteLine($"[calibrate] wrote {probePath}");
        }
        else
        {
            json["router_probe"] = new JsonObject { ["skipped"] = probeSkipped };
        }
        json["j0"] = new JsonObject
        {
            ["by_split"] = splitJson,
            ["auroc_heldout_max"] = JsonOut.Num(aurocMax),
            ["auroc_heldout_mean"] = JsonOut.Num(aurocMean),
        };

        // (b) The projection.
        ProjectionFit? projectionFit = null;
        if (options.SkipProjection || options.Corpus is null)
        {
            json["projection"] = new JsonObject { ["skipped"] = options.SkipProjection ? "--skip-projection" : "no --corpus given" };
            progress.WriteLine("[calibrate] projection fit skipped (" + (options.SkipProjection ? "--skip-projection" : "no --corpus") + ")");
        }
        else
        {
            projectionFit = FitProjection(options, allItems, layer, outPath, progress, cancellationToken);
            json["projection"] = ProjectionJson(projectionFit);
        }
        json["elapsed_s"] = JsonOut.Num(clock.Elapsed.TotalSeconds, 2);
        JsonOut.Write(jsonPath, json);
        progress.WriteLine($"[calibrate] wrote {jsonPath}" + (projectionFit is null ? "" : $" and {projectionFit.Path}"));

        return new CalibrationResult
        {
            Layer = layer,
            Threshold = threshold,
            TargetRate = options.TargetRate,
            AchievedRate = achieved,
            Prompts = runs.Length,
            Tokens = maxes.Count,
            Entropy = entropyStats,
            HeldoutAurocJ0 = aurocMax,
            Signals = signals,
            BestSignal = best.Signal,
            RouterProbe = probe,
            RouterProbePath = probe is null ? null : probePath,
            FitQuestions = [.. fit.Select(r => r.Item.Id)],
            CheckQuestions = [.. check.Select(r => r.Item.Id)],
            Projection = projectionFit,
            JsonPath = jsonPath,
            Json = json,
        };
    }

    internal static bool IsHeldout(QuestionRun run) => IsHeldout(run.Item);

    /// <summary>
    /// The model with a runner for eager batches of up to <paramref name="sequences"/> sequences of at most
    /// <paramref name="maxLength"/> tokens: one greedy slot per sequence, each with its own run of KV blocks.
    /// </summary>
    private static LoadedModel LoadEagerRunner(CalibrationOptions options, int sequences, int maxLength)
    {
        const int blockSize = 16;
        var blocksPerSequence = (maxLength + blockSize - 1) / blockSize;
        var loaded = LoadedModel.Load(options.ModelPath, options.LoadFormat, options.Runner, _ => new RunnerOptions
        {
            MaxSequences = sequences,
            MaxRows = sequences * maxLength,
            ContextLength = blocksPerSequence * blockSize,
            BlockSize = blockSize,
            KvCacheTokens = sequences * blocksPerSequence * blockSize,
        });
        try
        {
            for (var slot = 0; slot < sequences; slot++)
            {
                loaded.Runner.BindSlot(slot, SlotSampling.Greedy, []);
                loaded.Runner.SetBlocks(slot, 0, Enumerable.Range(slot * blocksPerSequence, blocksPerSequence).ToArray());
            }
            return loaded;
        }
        catch
        {
            loaded.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Each answer's router probabilities at every answer token [j][layer × expert]: the prompt and the answer's tokens replayed
    /// through the model in eager steps (token j comes from the forward pass at the prompt's last position plus j).
    /// </summary>
    private static Dictionary<QuestionRun, float[][]> RouterProbabilities(CalibrationOptions options, IReadOnlyList<QuestionRun> runs,
        CancellationToken cancellationToken)
    {
        const int batch = 16;
        var tokenizer = Tokenizer.Load(options.ModelPath);
        var sequences = runs.Select(r => (Run: r, Prompt: tokenizer.Encode(r.Item.Question))).ToList();
        using var loaded = LoadEagerRunner(options, batch, sequences.Max(s => s.Prompt.Length + s.Run.Tokens.Count));
        var runner = loaded.Runner;
        var width = loaded.Config.NumLayers * loaded.Config.NumExperts;
        var result = new Dictionary<QuestionRun, float[][]>();
        for (var start = 0; start < sequences.Count; start += batch)
        {
            cancellationToken.ThrowIfCancellationRequested();
            var group = sequences.Skip(start).Take(batch).ToList();
            var output = runner.ForwardEager(group.Select((s, slot) =>
                new EagerSequence(slot, [.. s.Prompt, .. s.Run.Tokens.Take(s.Run.Tokens.Count - 1)], 0)).ToList());
            var row = 0;
            foreach (var (run, prompt) in group)
            {
                var length = prompt.Length + run.Tokens.Count - 1;
                var probs = new float[run.Tokens.Count][];
                for (var j = 0; j < probs.Length; j++) probs[j] = output.RouterProbsRow(row + prompt.Length - 1 + j).ToArray();
                result[run] = probs;
                row += length;
            }
        }
        return result;
    }

    private static JsonObject ProbeTrainingJson(CalibrationOptions options, TrainedProbe trained, SignalCalibration measured,
        IReadOnlyList<QuestionRun> fit, IReadOnlyList<QuestionRun> check, Func<QuestionRun, bool> wrong) => new()
    {
        ["by"] = "moe-rag-inject calibrate",
        ["date"] = DateTimeOffset.UtcNow.ToString("yyyy-MM-dd'T'HH:mm:ss'Z'", CultureInfo.InvariantCulture),
        ["model"] = Path.GetFullPath(options.ModelPath),
        ["qa"] = Path.GetFullPath(options.Qa),
        ["label"] = string.Create(CultureInfo.InvariantCulture, $"wrong: the RAG-off greedy answer's token F1 < {Evaluator.WrongBelowF1} (up to {options.MaxNewTokens} tokens, first line)"),
        ["positions"] = string.Create(CultureInfo.InvariantCulture, $"answer tokens j < {Window}, each question weighing the same"),
        ["fit_questions"] = fit.Count,
        ["fit_wrong"] = fit.Count(wrong),
        ["examples"] = trained.Examples,
        ["regularisation"] = "L2 on standardised features (bias not penalised), Newton's method; weights folded back into raw probabilities",
        ["cross_validation"] = new JsonObject
        {
            ["folds"] = trained.Folds,
            ["seed"] = options.Seed,
            ["metric"] = $"AUROC of the largest score over j < {Window}, mean over folds",
            ["trials"] = new JsonArray([.. trained.Trials.Select(t => (JsonNode?)new JsonObject
            {
                ["window"] = t.Window,
                ["lambda"] = t.Lambda,
                ["auroc"] = JsonOut.Num(t.CvAuroc),
            })]),
        },
        ["lambda"] = trained.Lambda,
        ["check_questions"] = check.Count,
        ["check_wrong"] = check.Count(wrong),
        ["check_auroc_wrong_j0"] = JsonOut.Num(measured.WrongAurocJ0),
        [$"check_auroc_wrong_max_j0_{Window - 1}"] = JsonOut.Num(measured.WrongAurocWindow),
        ["check_auroc_heldout_j0"] = JsonOut.Num(measured.HeldoutAurocJ0),
        [$"check_auroc_heldout_max_j0_{Window - 1}"] = JsonOut.Num(measured.HeldoutAurocWindow),
        ["threshold_rule"] = string.Create(CultureInfo.InvariantCulture, $"exceeded on {options.TargetRate:G3} of all generated tokens of calibrate's questions (achieved {measured.AchievedRate:G4})"),
        ["questions"] = "the fit and check ids are in calibration.json beside this file",
    };

    internal static bool IsHeldout(QaItem item) => item.Split.Equals("heldout", StringComparison.OrdinalIgnoreCase)
        || item.Split.Equals("held-out", StringComparison.OrdinalIgnoreCase) || item.Split.Equals("held_out", StringComparison.OrdinalIgnoreCase);

    private static LayerEntropyStats Describe(string name, List<double> values)
    {
        var sorted = values.Order().ToArray();
        return new LayerEntropyStats(name, Stats.Mean(sorted),
            Stats.ReportedPercentiles.ToDictionary(p => p, p => Stats.QuantileSorted(sorted, p / 100.0)));
    }

    private static JsonObject ProjectionJson(ProjectionFit fit) => new()
    {
        ["path"] = fit.Path,
        ["layer"] = fit.Layer,
        ["pairs"] = fit.Pairs,
        ["train_pairs"] = fit.TrainPairs,
        ["validation_pairs"] = fit.ValidationPairs,
        ["skipped_pairs"] = fit.SkippedPairs,
        ["rows"] = fit.Rows,
        ["intercept"] = fit.Intercept,
        ["ridge_search"] = new JsonArray([.. fit.Trials.Select(t => (JsonNode?)new JsonObject
        {
            ["scale"] = JsonOut.Num(t.Scale, 8),
            ["lambda"] = JsonOut.Num(t.Lambda, 8),
            ["train_r2"] = JsonOut.Num(t.TrainR2),
            ["validation_r2"] = JsonOut.Num(t.ValidationR2),
        })]),
        ["lambda"] = JsonOut.Num(fit.Lambda, 8),
        ["train_r2"] = JsonOut.Num(fit.TrainR2),
        ["validation_r2"] = JsonOut.Num(fit.ValidationR2),
        ["final_r2_all_pairs"] = JsonOut.Num(fit.FinalR2),
        ["ceiling_r2_pair_mean"] = JsonOut.Num(fit.CeilingR2),
        ["d_norm"] = new JsonObject { ["mean"] = JsonOut.Num(fit.DNormMean), ["p50"] = JsonOut.Num(fit.DNormP50), ["p95"] = JsonOut.Num(fit.DNormP95) },
        ["hidden_norm_mean"] = JsonOut.Num(fit.HiddenNormMean),
        ["feature_norm_mean"] = JsonOut.Num(fit.FeatureNormMean),
        ["prediction_norm_mean"] = JsonOut.Num(fit.PredictionNormMean),
    };

    /// <summary>One (question, passage) pair's tokens: run A (no context) and run B (prompt-mode context).</summary>
    internal sealed record PairTokens(int[] A, int QuestionLastA, int[] B, int QuestionLastB, int Positions, int[] PassageTokens);

    /// <summary>
    /// Tokenises a pair as the engine does: A = Encode(question) (BOS added) + answer; B = BOS + Encode("Context:\n" + passage +
    /// "\n\n") + the question's tokens without BOS + answer. The answer tokens are those that follow the question when
    /// question + " " + answer is encoded whole (the tokens the model emits after the prompt); when that split does not
    /// line up with the question's own tokens, Encode(answer) without special tokens.
    /// </summary>
    internal static PairTokens TokenizePair(Tokenizer tokenizer, string question, string answer, string passage, int maxPositions)
    {
        var prompt = tokenizer.Encode(question);
        var joint = tokenizer.Encode(question + " " + answer);
        int[] answerTokens;
        if (joint.Length > prompt.Length && joint.AsSpan(0, prompt.Length).SequenceEqual(prompt))
            answerTokens = joint[prompt.Length..];
        else
            answerTokens = tokenizer.Encode(answer, addSpecialTokens: false);
        var eos = tokenizer.EosTokenId;
        if (eos is { } e && answerTokens.Length > 0 && answerTokens[^1] == e) answerTokens = answerTokens[..^1];

        var bos = tokenizer.BosTokenId;
        var questionTokens = prompt.ToList();
        if (bos is { } b && questionTokens.Count > 0 && questionTokens[0] == b) questionTokens.RemoveAt(0);
        var context = tokenizer.Encode("Context:\n" + passage + "\n\n", addSpecialTokens: false);
        var bTokens = new List<int>();
        if (bos is { } b2) bTokens.Add(b2);
        bTokens.AddRange(context);
        bTokens.AddRange(questionTokens);
        var questionLastB = bTokens.Count - 1;
        bTokens.AddRange(answerTokens);

        var positions = Math.Min(maxPositions, 1 + answerTokens.Length);
        return new PairTokens([.. prompt, .. answerTokens], prompt.Length - 1, [.. bTokens], questionLastB, positions,
            tokenizer.Encode(passage, addSpecialTokens: false));
    }

    internal sealed record PairData(double[] Feature, double[][] Targets);

    private static ProjectionFit FitProjection(CalibrationOptions options, List<QaItem> allItems, int layer, string outPath,
        TextWriter progress, CancellationToken cancellationToken)
    {
        var clock = Stopwatch.StartNew();
        var passages = QaData.LoadPassages(options.Corpus!);
        var taught = allItems.Where(i => !IsHeldout(i) && i.PassageId is not null && passages.ContainsKey(i.PassageId)).ToList();
        var missing = allItems.Count(i => !IsHeldout(i) && (i.PassageId is null || !passages.ContainsKey(i.PassageId)));
        if (taught.Count < 2)
            throw new InvalidOperationException($"only {taught.Count} taught questions have their passage in {options.Corpus}; the fit needs at least 2");
        var order = Enumerable.Range(0, taught.Count).ToArray();
        new Random(options.Seed).Shuffle(order);
        var chosen = order.Take(options.Pairs).Select(i => taught[i]).ToList();
        progress.WriteLine($"[calibrate] fitting P at layer {layer} from {chosen.Count} taught (question, gold passage) pairs" +
            (missing > 0 ? $" ({missing} taught questions lack their passage)" : ""));

        var tokenizer = Tokenizer.Load(options.ModelPath);
        var config = ModelConfig.Load(options.ModelPath);
        var hidden = config.HiddenSize;
        var contextLimit = config.MaxPositionEmbeddings;
        var pairs = new List<PairTokens>();
        var skipped = 0;
        foreach (var item in chosen)
        {
            var pair = TokenizePair(tokenizer, item.Question, item.Answer, passages[item.PassageId!], options.MaxPositions);
            if (pair.B.Length > contextLimit || pair.PassageTokens.Length == 0) skipped++;
            else pairs.Add(pair);
        }
        if (pairs.Count < 2) throw new InvalidOperationException("fewer than 2 pairs fit the model's context");

        // The runner's eager path with the l_out hook.
        var sequencesPerBatch = 2 * Math.Max(1, options.BatchPairs);
        using var loaded = LoadEagerRunner(options, sequencesPerBatch, pairs.Max(p => Math.Max(p.A.Length, p.B.Length)));
        var runner = loaded.Runner;
        int[] capture = [layer];

        var data = new List<PairData>(pairs.Count);
        var dNorms = new List<double>();
        var hNorms = new List<double>();
        for (var start = 0; start < pairs.Count; start += options.BatchPairs)
        {
            cancellationToken.ThrowIfCancellationRequested();
            var batch = pairs.Skip(start).Take(options.BatchPairs).ToList();
            var sequences = new List<(int[] Tokens, int QuestionLast, int Positions)>();
            foreach (var p in batch)
            {
                sequences.Add((p.A, p.QuestionLastA, p.Positions));
                sequences.Add((p.B, p.QuestionLastB, p.Positions));
            }
            // The prefix up to (not including) the question's last token fills the cache; then the fitted positions run with every row a logit row.
            runner.ForwardEager(sequences.Select((s, i) => new EagerSequence(i, s.Tokens[..s.QuestionLast], 0)).ToList());
            var output = runner.ForwardEager(sequences.Select((s, i) =>
                new EagerSequence(i, s.Tokens[s.QuestionLast..(s.QuestionLast + s.Positions)], s.QuestionLast, AllLogits: true)).ToList(), capture);
            var captured = output.Captured ?? throw new InvalidOperationException("the forward pass returned no hidden states");

            var row = 0;
            for (var i = 0; i < batch.Count; i++)
            {
                var k = batch[i].Positions;
                var rowA = row;
                var rowB = row + k;
                row += 2 * k;
                var targets = new double[k][];
                for (var j = 0; j < k; j++)
                {
                    var hA = captured.AsSpan((rowA + j) * hidden, hidden);
                    var hB = captured.AsSpan((rowB + j) * hidden, hidden);
                    var d = new double[hidden];
                    double dn = 0, hn = 0;
                    for (var x = 0; x < hidden; x++)
                    {
                        d[x] = (double)hB[x] - hA[x];
                        dn += d[x] * d[x];
                        hn += (double)hA[x] * hA[x];
                    }
                    targets[j] = d;
                    dNorms.Add(Math.Sqrt(dn));
                    hNorms.Add(Math.Sqrt(hn));
                }
                data.Add(new PairData(MeanEmbedding(loaded.Embeddings, batch[i].PassageTokens), targets));
            }
            if ((start / options.BatchPairs) % 16 == 15)
                progress.WriteLine(string.Create(CultureInfo.InvariantCulture, $"[calibrate] {data.Count}/{pairs.Count} pairs ({clock.Elapsed.TotalSeconds:F1} s)"));
        }

        // Split by pair: the last ValidationFraction of a seeded shuffle is the validation set.
        var shuffled = Enumerable.Range(0, data.Count).ToArray();
        new Random(options.Seed + 1).Shuffle(shuffled);
        var validationCount = (int)Math.Round(data.Count * Math.Clamp(options.ValidationFraction, 0, 0.9));
        if (data.Count >= 4) validationCount = Math.Clamp(validationCount, 1, data.Count - 2);
        else validationCount = 0;
        var validation = shuffled.Take(validationCount).Select(i => data[i]).ToList();
        var train = shuffled.Skip(validationCount).Select(i => data[i]).ToList();

        var trainAcc = Accumulate(train, hidden);
        var trials = new List<RidgeTrial>();
        double bestScale;
        if (options.Ridge is { } fixedLambda)
        {
            var (p, bias) = trainAcc.Solve(fixedLambda, options.Intercept);
            trials.Add(new RidgeTrial(fixedLambda / trainAcc.MeanDiagonal, fixedLambda, R2(train, p, bias), validation.Count == 0 ? double.NaN : R2(validation, p, bias)));
            bestScale = fixedLambda / trainAcc.MeanDiagonal;
        }
        else
        {
            foreach (var scale in options.RidgeScales)
            {
                var lambda = scale * trainAcc.MeanDiagonal;
                var (p, bias) = trainAcc.Solve(lambda, options.Intercept);
                var trial = new RidgeTrial(scale, lambda, R2(train, p, bias), validation.Count == 0 ? double.NaN : R2(validation, p, bias));
                trials.Add(trial);
                progress.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"[calibrate] λ = {scale:G2}·tr(CᵀC)/h = {lambda:G4}: train R² = {trial.TrainR2:F4}, validation R² = {JsonOut.F(trial.ValidationR2, "F4")}"));
            }
            var best = validation.Count == 0
                ? trials.MinBy(t => Math.Abs(Math.Log10(t.Scale) + 1))!
                : trials.MaxBy(t => double.IsNaN(t.ValidationR2) ? double.NegativeInfinity : t.ValidationR2)!;
            bestScale = best.Scale;
        }
        var chosenTrial = trials.First(t => t.Scale == bestScale);

        var allAcc = Accumulate(data, hidden);
        var finalLambda = options.Ridge ?? bestScale * allAcc.MeanDiagonal;
        var (finalP, finalBias) = allAcc.Solve(finalLambda, options.Intercept);
        var finalR2 = R2(data, finalP, finalBias);
        var predictionNorms = data.Select(d =>
        {
            var y = new double[hidden];
            RidgeAccumulator.Apply(finalP, finalBias, d.Feature, y);
            return Math.Sqrt(y.Sum(v => v * v));
        }).ToList();

        var directory = Path.GetDirectoryName(outPath);
        if (!string.IsNullOrEmpty(directory)) Directory.CreateDirectory(directory);
        ContextInjector.SaveProjection(outPath, [.. finalP.Select(v => (float)v)], hidden, finalBias?.Select(v => (float)v).ToArray());
        progress.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"[calibrate] λ = {finalLambda:G4}: train R² = {chosenTrial.TrainR2:F4}, validation R² = {JsonOut.F(chosenTrial.ValidationR2, "F4")}, all-pairs R² = {finalR2:F4} (ceiling for a per-pair vector {CeilingR2(data):F4}); ‖d‖ mean {Stats.Mean(dNorms):F3} (‖h‖ mean {Stats.Mean(hNorms):F3}); {clock.Elapsed.TotalSeconds:F1} s"));

        return new ProjectionFit
        {
            Path = outPath,
            Layer = layer,
            Pairs = data.Count,
            TrainPairs = train.Count,
            ValidationPairs = validation.Count,
            Rows = allAcc.Rows,
            Trials = trials,
            Lambda = finalLambda,
            TrainR2 = chosenTrial.TrainR2,
            ValidationR2 = chosenTrial.ValidationR2,
            FinalR2 = finalR2,
            DNormMean = Stats.Mean(dNorms),
            DNormP50 = Stats.Quantile(dNorms, 0.5),
            DNormP95 = Stats.Quantile(dNorms, 0.95),
            HiddenNormMean = Stats.Mean(hNorms),
            FeatureNormMean = Stats.Mean(data.Select(d => Math.Sqrt(d.Feature.Sum(v => v * v)))),
            PredictionNormMean = Stats.Mean(predictionNorms),
            Intercept = options.Intercept,
            SkippedPairs = skipped,
            CeilingR2 = CeilingR2(data),
        };
    }

    private static double[] MeanEmbedding(ITokenEmbeddings embeddings, int[] tokens)
    {
        var sum = new float[embeddings.HiddenSize];
        foreach (var t in tokens) embeddings.AccumulateRow(t, sum);
        return [.. sum.Select(v => (double)v / tokens.Length)];
    }

    private static RidgeAccumulator Accumulate(List<PairData> pairs, int hidden)
    {
        var acc = new RidgeAccumulator(hidden, hidden);
        var sum = new double[hidden];
        foreach (var pair in pairs)
        {
            Array.Clear(sum);
            foreach (var d in pair.Targets)
                for (var x = 0; x < hidden; x++) sum[x] += d[x];
            acc.Add(pair.Feature, sum, pair.Targets.Length);
        }
        return acc;
    }

    /// <summary>The mean of every target row of every pair.</summary>
    private static double[] MeanTarget(IReadOnlyList<PairData> pairs, int hidden)
    {
        var mean = new double[hidden];
        long rows = 0;
        foreach (var pair in pairs)
            foreach (var d in pair.Targets)
            {
                for (var x = 0; x < hidden; x++) mean[x] += d[x];
                rows++;
            }
        for (var x = 0; x < hidden; x++) mean[x] /= rows;
        return mean;
    }

    private static double CeilingR2(List<PairData> pairs)
    {
        var hidden = pairs[0].Feature.Length;
        var mean = MeanTarget(pairs, hidden);
        double within = 0, total = 0;
        var pairMean = new double[hidden];
        foreach (var pair in pairs)
        {
            Array.Clear(pairMean);
            foreach (var d in pair.Targets)
                for (var x = 0; x < hidden; x++) pairMean[x] += d[x] / pair.Targets.Length;
            foreach (var d in pair.Targets)
                for (var x = 0; x < hidden; x++)
                {
                    within += (d[x] - pairMean[x]) * (d[x] - pairMean[x]);
                    total += (d[x] - mean[x]) * (d[x] - mean[x]);
                }
        }
        return total > 0 ? 1 - within / total : double.NaN;
    }

    /// <summary>R² = 1 − Σ‖d − (P·c + b)‖² / Σ‖d − mean(d)‖² over the rows of <paramref name="pairs"/>.</summary>
    internal static double R2(IReadOnlyList<PairData> pairs, double[] p, double[]? bias)
    {
        if (pairs.Count == 0) return double.NaN;
        var hidden = pairs[0].Feature.Length;
        var mean = MeanTarget(pairs, hidden);
        double sse = 0, sst = 0;
        var y = new double[hidden];
        foreach (var pair in pairs)
        {
            RidgeAccumulator.Apply(p, bias, pair.Feature, y);
            foreach (var d in pair.Targets)
                for (var x = 0; x < hidden; x++)
                {
                    var e = d[x] - y[x];
                    sse += e * e;
                    var t = d[x] - mean[x];
                    sst += t * t;
                }
        }
        return sst > 0 ? 1 - sse / sst : double.NaN;
    }

    internal static void TryDeleteDirectory(string path)
    {
        try
        {
            Directory.Delete(path, recursive: true);
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
    }
}
