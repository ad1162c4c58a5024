using System.CommandLine;
using System.CommandLine.Parsing;
using System.Globalization;
using MoeRagInject.Backend;
using MoeRagInject.Backend.Cpu;
using MoeRagInject.Backend.Cuda;
using MoeRagInject.Cli.CommandLine;
using MoeRagInject.Engine;
using MoeRagInject.Rag;

namespace MoeRagInject.Cli;

/// <summary>
/// The model and RAG options that <c>serve</c>, <c>generate</c> and <c>bench</c> share, and their one mapping onto
/// <see cref="EngineOptions"/>. Names and defaults are sglang's where sglang has the flag and the original's for the RAG ones;
/// the defaults come from <see cref="EngineOptions"/> itself, so the engine and the CLI cannot disagree.
/// </summary>
public sealed class EngineFlags
{
    private static readonly EngineOptions Defaults = new() { ModelPath = "", Runner = new NullRunnerFactory(0) };

    public Option<string?> ModelPath { get; } = CliOption.OptionalText("--model-path",
        "Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json)", "PATH", "the embedded assets/models/moe-wordnet-demo");
    public Option<string> Device { get; } = DeviceOption("cpu",
        "compute device: cpu, cuda (GPU 0) or cuda:N, or null (a runner that computes nothing, for measuring the engine itself)",
        "cpu|cuda[:N]|null", allowNull: true);
    public Option<string?> ModelConfig { get; } = CliOption.OptionalText("--model-config",
        "a shipped model shape (assets/configs/NAME) or a folder with a config.json, for --load-format dummy", "NAME|DIR");
    public Option<string> LoadFormat { get; } = CliOption.Choice("--load-format",
        "auto reads the safetensors; dummy makes random weights of the config's shapes", Defaults.LoadFormat, "auto", "dummy");
    public Option<int?> ContextLength { get; } = CliOption.OptionalInt("--context-length",
        "context limit, overriding max_position_embeddings", "N", "from config.json", min: 1);
    public Option<int> MaxRunningRequests { get; } = CliOption.Int("--max-running-requests",
        "requests decoded together", "N", Defaults.MaxRunningRequests, min: 1);
    public Option<int?> KvCacheTokens { get; } = CliOption.OptionalInt("--kv-cache-tokens", "tokens of KV cache in the pool", "N",
        "what --mem-fraction-static leaves after the weights, up to max-running-requests full contexts", min: 1);
    public Option<double> MemFractionStatic { get; } = CliOption.Double("--mem-fraction-static",
        "share of the device's memory for weights plus KV pool", "F", Defaults.MemFractionStatic, min: 0, max: 1);
    public Option<int?> ChunkedPrefillSize { get; } = CliOption.OptionalInt("--chunked-prefill-size",
        "most prompt tokens one request prefills in a step (longer prompts are chunked)", "N",
        "2048; on a GPU by its memory, as sglang: 2048 under 35 GiB, 8192 under 160 GiB, 16384 above", min: 1);
    public Option<int> MaxPrefillTokens { get; } = CliOption.Int("--max-prefill-tokens",
        "most prompt tokens of all requests prefilled in one step", "N", Defaults.MaxPrefillTokens, min: 1);
    public Option<int?> Threads { get; } = CliOption.OptionalInt("--threads", "CPU threads for the forward pass", "N", "all cores", min: 1);
    public Option<int> CudaGraphMaxBs { get; } = CliOption.Int("--cuda-graph-max-bs",
        "largest decode batch replayed from a captured CUDA graph", "N", Defaults.CudaGraphMaxBatchSize, min: 0);
    public Option<bool> DisableCudaGraph { get; } = CliOption.Switch("--disable-cuda-graph", "run every step op by op");
    public Option<bool> Deterministic { get; } = CliOption.Switch("--deterministic",
        "batch-invariant kernels: a request's tokens do not depend on what runs beside it");
    // MOE_RAG_INJECT_BOXED=1 makes boxed the default, for measuring scripts that vary only the environment (run.sh ab).
    public Option<string> ExpertLayout { get; } = CliOption.Choice("--expert-layout",
        "how the experts' weights lie on the GPU: as the checkpoint holds them, or boxed (Hopper GPUs: decode steps at batch 64-256 about 3% shorter, prefill about 15% longer)",
        Environment.GetEnvironmentVariable("MOE_RAG_INJECT_BOXED") is "1" ? "boxed" : "row-major", "row-major", "boxed");
    public Option<string> TriggerSignal { get; } = CliOption.Choice("--trigger-signal",
        "what the trigger watches at every generated token: each router's entropy (the original's), the entropy of the model's next-token distribution, or the score of a logistic probe over all routers' probabilities (trained by calibrate)",
        TriggerSignals.Name(Defaults.Trigger.Signal), [.. TriggerSignals.Names]);
    public Option<double> EntropyThreshold { get; } = CliOption.Double("--entropy-threshold",
        "entropy (nats; router: at most ln E, output: at most ln V) above which retrieval fires; with router-probe a probability in [0, 1], and without this flag the probe's calibrated threshold",
        "NATS", Defaults.Trigger.Threshold, min: 0);
    public Option<string?> RouterProbe { get; } = CliOption.OptionalText("--router-probe",
        "the router probe (router-probe.json, written by calibrate); loaded when present, needed by --trigger-signal router-probe and by requests that ask for it",
        "FILE", "<model>/router-probe.json");
    public Option<string> LogDir { get; } = CliOption.Text("--log-dir", "where rag-events.jsonl is written", "DIR", Defaults.LogDir);
    public Option<bool> LogFsync { get; } = CliOption.Switch("--log-fsync", "force each RAG event line to disk before its request goes on");
    public Option<string> RagMode { get; } = CliOption.Choice("--rag-mode",
        "off: measure only; latent: add α·f(passages) to the hidden states (f: P·mean(embed(passages)), or a projector file's MLP or attention reader); prompt: put passages ahead of the prompt",
        Lower(Defaults.Mode), "off", "latent", "prompt");
    public Option<string> PromptRagRestart { get; } = CliOption.Choice("--prompt-rag-restart",
        $"prompt mode firing within the first {EngineOptions.PromptRestartWindowTokens} answer tokens: answer drops the answer so far and generates it again after the rebuilt context (those tokens are held back until then); continue keeps it (FLARE's)",
        "answer", "answer", "continue");
    public Option<string> LatentRagRestart { get; } = CliOption.Choice("--latent-rag-restart",
        $"latent mode with a projector of one vector an answer position, firing within the first {EngineOptions.PromptRestartWindowTokens} answer tokens: answer generates the answer again from the prompt's last position (those tokens are held back until then); continue keeps it and injects from the trigger's position on",
        "answer", "answer", "continue");
    public Option<bool> RetrieveFirst { get; } = CliOption.Switch("--retrieve-first",
        "every RAG request retrieves once with its prompt before the prompt is computed (prompt mode: passages ahead of it; latent: injected from its last position), then the trigger watches the answer; counts towards --max-retrievals");
    public Option<IReadOnlyList<int>?> TriggerLayers { get; } = CliOption.IntList("--trigger-layers",
        "MoE layers whose entropy counts", "all|0,2,3", "all", allWord: "all", min: 0);
    public Option<string> TriggerAggregation { get; } = CliOption.Choice("--trigger-aggregation",
        "how the counted layers' entropies combine", Lower(Defaults.Trigger.Aggregation), "any", "max", "mean");
    public Option<int> CooldownTokens { get; } = CliOption.Int("--cooldown-tokens",
        "tokens after a retrieval before the next may fire", "N", Defaults.Trigger.CooldownTokens, min: 0);
    public Option<int> MaxRetrievals { get; } = CliOption.Int("--max-retrievals",
        "retrievals per request at most", "N", Defaults.Trigger.MaxRetrievalsPerRequest, min: 0);
    public Option<int> TriggerWindow { get; } = CliOption.Int("--trigger-window",
        "the trigger fires within the first N answer tokens only (0: at any token)", "N", 0, min: 0);
    public Option<double> InjectionScale { get; } = CliOption.Double("--injection-scale", "α in α·P·c", "α", Defaults.InjectionScale);
    public Option<IReadOnlyList<int>?> InjectionLayers { get; } = CliOption.IntList("--injection-layers",
        "MoE layers to inject at", "fired|0,2,3", "the layers that fired", allWord: "fired", min: 0);
    public Option<int> InjectionTokens { get; } = InjectionTokensOption();
    public Option<string> InjectorProj { get; } = InjectorProjOption();
    public Option<int> ProjectionSeed { get; } = CliOption.Int("--projection-seed", "seed of the random projection", "N", Defaults.ProjectionSeed);
    public Option<string?> Retriever { get; } = CliOption.OptionalText("--retriever",
        "index.db, corpus .jsonl, http(s)://… (JSON contract) or es+http(s)://host:port/index", "SPEC",
        "the embedded assets/corpus/wordnet/wordnet-demo.jsonl.gz with the embedded model");
    public Option<double> RetrievalTimeoutMs { get; } = CliOption.Double("--retrieval-timeout-ms",
        "per-retrieval timeout", "MS", Defaults.RetrievalTimeout.TotalMilliseconds, min: 1);
    public Option<int> RetrievalTopK { get; } = CliOption.Int("--retrieval-top-k", "passages per retrieval", "K", Defaults.RetrievalTopK, min: 1);
    public Option<int> QueryWindow { get; } = CliOption.Int("--query-window",
        "the query is the last N tokens of prompt plus output", "N", Defaults.QueryWindowTokens, min: 1);

    /// <summary>In the order help lists them.</summary>
    public IReadOnlyList<Option> All =>
    [
        ModelPath, Device, ModelConfig, LoadFormat, ContextLength, MaxRunningRequests, KvCacheTokens, MemFractionStatic,
        ChunkedPrefillSize, MaxPrefillTokens, Threads, CudaGraphMaxBs, DisableCudaGraph, Deterministic, ExpertLayout, TriggerSignal, EntropyThreshold, RouterProbe, LogDir,
        LogFsync, RagMode, PromptRagRestart, LatentRagRestart, RetrieveFirst, TriggerLayers, TriggerAggregation, CooldownTokens, MaxRetrievals, TriggerWindow, InjectionScale, InjectionLayers,
        InjectionTokens, InjectorProj, ProjectionSeed, Retriever, RetrievalTimeoutMs, RetrievalTopK, QueryWindow,
    ];

    /// <summary>Adds the options to <paramref name="command"/>, with the checks that concern more than one of them.</summary>
    public void AddTo(Command command)
    {
        ArgumentNullException.ThrowIfNull(command);
        foreach (var option in All) command.Options.Add(option);
        MemFractionStatic.Validators.Add(r =>
        {
            if (r.GetValueOrDefault<double>() <= 0) r.AddError("invalid value for --mem-fraction-static: expected a number in (0, 1]");
        });
        command.Validators.Add(result =>
        {
            if (result.GetValue(ModelConfig) is null) return;
            if (result.GetValue(LoadFormat) != "dummy")
                result.AddError("--model-config gives a shape without weights: use it with --load-format dummy");
            else if (result.GetValue(ModelPath) is not null)
                result.AddError("give --model-path or --model-config, not both");
        });
        command.Validators.Add(result =>
        {
            // Read from the tokens: a value that failed to parse has its own error already.
            if (result.GetResult(TriggerSignal)?.Tokens is not { Count: > 0 } signal
                || !signal[^1].Value.Equals("router-probe", StringComparison.OrdinalIgnoreCase)) return;
            if (result.GetResult(EntropyThreshold) is { Implicit: false, Tokens: { Count: > 0 } given }
                && double.TryParse(given[^1].Value, NumberStyles.Float, CultureInfo.InvariantCulture, out var threshold) && threshold > 1)
                result.AddError($"invalid value for --entropy-threshold: {given[^1].Value} (with --trigger-signal router-probe it is a probability in [0, 1])");
        });
    }

    /// <summary>The --device option: cpu, cuda, cuda:N and (where <paramref name="allowNull"/>) null.</summary>
    public static Option<string> DeviceOption(string @default, string description, string valueName, bool allowNull)
    {
        var expected = allowNull ? "cpu, cuda, cuda:N or null" : "cpu, cuda or cuda:N";
        var option = new Option<string>("--device")
        {
            Description = description,
            HelpName = valueName,
            DefaultValueFactory = _ => @default,
            CustomParser = r =>
            {
                if (r.Tokens.Count == 0) return @default;
                var value = r.Tokens[^1].Value.ToLowerInvariant();
                if (value is "cpu" or "cuda" || (allowNull && value == "null") || IsCudaOrdinal(value)) return value;
                r.AddError($"invalid value for --device: '{r.Tokens[^1].Value}' (expected {expected})");
                return @default;
            },
        };
        option.CompletionSources.Add(allowNull ? ["cpu", "cuda", "cuda:0", "null"] : ["cpu", "cuda", "cuda:0"]);
        return option;
    }

    private static bool IsCudaOrdinal(string device)
        => device.StartsWith("cuda:", StringComparison.Ordinal)
           && int.TryParse(device.AsSpan(5), NumberStyles.None, CultureInfo.InvariantCulture, out _);

    /// <summary>The one place a device is chosen: --device picks the runner the engine gets (the parser has checked the name).</summary>
    public static IRunnerFactory Runner(string device, int? threads, float nullTriggerRate = 0, TimeSpan nullStepTime = default)
    {
        ArgumentNullException.ThrowIfNull(device);
        return device switch
        {
            "cpu" => new CpuRunnerFactory(threads ?? Environment.ProcessorCount),
            "null" => new NullRunnerFactory(nullTriggerRate, nullStepTime),
            "cuda" => new CudaRunnerFactory(0),
            _ when IsCudaOrdinal(device) => new CudaRunnerFactory(int.Parse(device.AsSpan(5), NumberStyles.None, CultureInfo.InvariantCulture)),
            _ => throw new ArgumentException($"not a device: '{device}' (expected cpu, cuda, cuda:N or null)", nameof(device)),
        };
    }

    /// <summary>A positive count, or rest: 0, which a user cannot give (System.CommandLine takes a parser's null for a failure).</summary>
    private static Option<int> InjectionTokensOption()
    {
        var option = new Option<int>("--injection-tokens")
        {
            Description = "tokens (the triggering one included) that receive the injection [default: rest]",
            HelpName = "N|rest",
            CustomParser = r =>
            {
                if (r.Tokens.Count == 0) return RestOfRequest;
                var text = r.Tokens[^1].Value;
                if (text.Equals("rest", StringComparison.OrdinalIgnoreCase) || text.Equals("all", StringComparison.OrdinalIgnoreCase))
                    return RestOfRequest;
                if (int.TryParse(text, NumberStyles.Integer, CultureInfo.InvariantCulture, out var n) && n >= 1) return n;
                r.AddError($"invalid value for --injection-tokens: '{text}' (expected a positive integer or rest)");
                return RestOfRequest;
            },
        };
        option.CompletionSources.Add("rest");
        return option;
    }

    /// <summary>--injection-tokens rest: every token from the triggering one on.</summary>
    public const int RestOfRequest = 0;

    /// <summary>null for the word that means every layer (parsed to the empty list), else the layers given.</summary>
    private static IReadOnlyList<int>? Layers(IReadOnlyList<int>? layers) => layers is { Count: > 0 } ? layers : null;

    private static Option<string> InjectorProjOption()
    {
        var option = new Option<string>("--injector-proj")
        {
            Description = "the projection P: random (seeded), identity, or a safetensors file: \"proj\" [hidden, hidden], or a projector "
                + "trained by tools/projector (its layers are the injection layers unless --injection-layers is given)",
            HelpName = "random|identity|FILE",
            DefaultValueFactory = _ => "random",
        };
        option.Validators.Add(r =>
        {
            var value = r.GetValueOrDefault<string>();
            if (value.Equals("random", StringComparison.OrdinalIgnoreCase) || value.Equals("identity", StringComparison.OrdinalIgnoreCase)
                || File.Exists(value)) return;
            r.AddError($"invalid value for --injector-proj: '{value}' is not random, identity or an existing .safetensors file");
        });
        option.CompletionSources.Add("random", "identity");
        return option;
    }

    private static string Lower<T>(T value) where T : struct, Enum => value.ToString().ToLowerInvariant();

    /// <summary>EngineOptions from a parse; without --model-path the embedded model (and its default corpus) are served.</summary>
    /// <param name="nullTriggerRate">For --device null: the share of tokens whose router entropies fire the trigger.</param>
    /// <param name="nullStepTime">For --device null: how long a step lasts.</param>
    public EngineOptions ToOptions(ParseResult parse, float nullTriggerRate = 0, TimeSpan nullStepTime = default)
    {
        ArgumentNullException.ThrowIfNull(parse);
        var runner = Runner(parse.GetRequiredValue(Device), parse.GetValue(Threads), nullTriggerRate, nullStepTime);

        var (projection, projectionPath) = parse.GetRequiredValue(InjectorProj) switch
        {
            var p when p.Equals("random", StringComparison.OrdinalIgnoreCase) => (ProjectionKind.Random, (string?)null),
            var p when p.Equals("identity", StringComparison.OrdinalIgnoreCase) => (ProjectionKind.Identity, null),
            var file => (ProjectionKind.File, Path.GetFullPath(file)),
        };

        // The model last: the parser has checked every value before any file is looked for.
        string modelPath;
        var retriever = parse.GetValue(Retriever);
        if (parse.GetValue(ModelConfig) is { } shape)
        {
            var shipped = Path.Combine(Home.Locate(), "assets", "configs", shape);
            modelPath = Directory.Exists(shipped) ? shipped : Path.GetFullPath(shape);
        }
        else if (parse.GetValue(ModelPath) is { } given)
        {
            modelPath = Path.GetFullPath(given);
        }
        else
        {
            var home = Home.Locate();
            modelPath = Path.Combine(home, "assets", "models", "moe-wordnet-demo");
            if (!Directory.Exists(modelPath))
                throw new CliException($"the embedded model was not found at {modelPath}; pass --model-path");
            var corpus = Path.Combine(home, "assets", "corpus", "wordnet", "wordnet-demo.jsonl.gz");
            if (retriever is null && File.Exists(corpus)) retriever = corpus;
        }
        if (!Directory.Exists(modelPath)) throw new CliException($"model folder not found: {modelPath}");
        if (!File.Exists(Path.Combine(modelPath, "config.json")))
            throw new CliException($"{modelPath} is not a model folder: it has no config.json");
        var signal = TriggerSignals.Parse(parse.GetRequiredValue(TriggerSignal)) ?? Rag.TriggerSignal.RouterEntropy;
        var probePath = parse.GetValue(RouterProbe) is { } probeFile ? Path.GetFullPath(probeFile) : null;
        var resolvedProbe = probePath ?? Path.Combine(modelPath, Rag.RouterProbe.FileName);
        if ((signal == Rag.TriggerSignal.RouterProbe || probePath is not null) && !File.Exists(resolvedProbe))
            throw new CliException(InferenceEngine.MissingProbeMessage(resolvedProbe));
        var thresholdGiven = parse.GetResult(EntropyThreshold) is { Implicit: false };

        return Defaults with
        {
            ModelPath = modelPath,
            Runner = runner,
            LoadFormat = parse.GetRequiredValue(LoadFormat),
            ContextLength = parse.GetValue(ContextLength),
            MaxRunningRequests = parse.GetValue(MaxRunningRequests),
            KvCacheTokens = parse.GetValue(KvCacheTokens),
            MemFractionStatic = parse.GetValue(MemFractionStatic),
            ChunkedPrefillSize = parse.GetValue(ChunkedPrefillSize),
            MaxPrefillTokens = parse.GetValue(MaxPrefillTokens),
            LogFsync = parse.GetValue(LogFsync),
            CudaGraphMaxBatchSize = parse.GetValue(CudaGraphMaxBs),
            DisableCudaGraph = parse.GetValue(DisableCudaGraph),
            Deterministic = parse.GetValue(Deterministic),
            ExpertLayout = parse.GetRequiredValue(ExpertLayout) == "boxed" ? Backend.ExpertLayout.Boxed : Backend.ExpertLayout.RowMajor,
            Mode = parse.GetRequiredValue(RagMode) switch
            {
                "off" => InjectionMode.Off,
                "prompt" => InjectionMode.Prompt,
                _ => InjectionMode.Latent,
            },
            PromptRagRestart = parse.GetRequiredValue(PromptRagRestart) == "continue" ? Engine.PromptRagRestart.Continue : Engine.PromptRagRestart.Answer,
            LatentRagRestart = parse.GetRequiredValue(LatentRagRestart) == "continue" ? Engine.LatentRagRestart.Continue : Engine.LatentRagRestart.Answer,
            RetrieveFirst = parse.GetValue(RetrieveFirst),
            RouterProbePath = probePath,
            // --entropy-threshold given with --trigger-signal router-probe is the probe's threshold; the entropy signals keep the default.
            RouterProbeThreshold = signal == Rag.TriggerSignal.RouterProbe && thresholdGiven ? parse.GetValue(EntropyThreshold) : null,
            Trigger = Defaults.Trigger with
            {
                Signal = signal,
                Threshold = signal == Rag.TriggerSignal.RouterProbe && thresholdGiven ? Defaults.Trigger.Threshold : parse.GetValue(EntropyThreshold),
                Layers = Layers(parse.GetValue(TriggerLayers)),
                Aggregation = parse.GetRequiredValue(TriggerAggregation) switch
                {
                    "max" => LayerAggregation.Max,
                    "mean" => LayerAggregation.Mean,
                    _ => LayerAggregation.Any,
                },
                CooldownTokens = parse.GetValue(CooldownTokens),
                MaxRetrievalsPerRequest = parse.GetValue(MaxRetrievals),
                WindowTokens = parse.GetValue(TriggerWindow) is var window and > 0 ? window : null,
            },
            InjectionScale = (float)parse.GetValue(InjectionScale),
            InjectionLayers = Layers(parse.GetValue(InjectionLayers)),
            InjectionTokens = parse.GetValue(InjectionTokens) is var n and > 0 ? n : null,
            Projection = projection,
            ProjectionPath = projectionPath,
            ProjectionSeed = parse.GetValue(ProjectionSeed),
            Retriever = retriever,
            RetrievalTimeout = TimeSpan.FromMilliseconds(parse.GetValue(RetrievalTimeoutMs)),
            RetrievalTopK = parse.GetValue(RetrievalTopK),
            QueryWindowTokens = parse.GetValue(QueryWindow),
            LogDir = parse.GetRequiredValue(LogDir),
        };
    }
}
