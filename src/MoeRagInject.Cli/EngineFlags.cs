using MoeRagInject.Backend;
using MoeRagInject.Backend.Cpu;
using MoeRagInject.Backend.Cuda;
using MoeRagInject.Cli.Flags;
using MoeRagInject.Engine;
using MoeRagInject.Rag;

namespace MoeRagInject.Cli;

/// <summary>The model and RAG flags that <c>serve</c> and <c>generate</c> share, and their one mapping onto <see cref="EngineOptions"/>.</summary>
public static class EngineFlags
{
    public static IEnumerable<FlagSpec> Specs()
    {
        var d = Defaults;
        return
        [
            new("model-path", FlagKind.String, "Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json)", "the embedded assets/models/moe-wordnet-demo", "PATH"),
            new("device", FlagKind.String, "compute device: cpu, cuda (GPU 0) or cuda:N, or null (a runner that computes nothing, for measuring the engine itself)", "cpu", "cpu|cuda[:N]|null"),
            new("model-config", FlagKind.String, "a shipped model shape (assets/configs/NAME) or a folder with a config.json, for --load-format dummy", null, "NAME|DIR"),
            new("load-format", FlagKind.String, "auto reads the safetensors; dummy makes random weights of the config's shapes", d.LoadFormat, "auto|dummy"),
            new("context-length", FlagKind.Int, "context limit, overriding max_position_embeddings", "from config.json", "N"),
            new("max-running-requests", FlagKind.Int, "requests decoded together", I(d.MaxRunningRequests), "N"),
            new("kv-cache-tokens", FlagKind.Int, "tokens of KV cache in the pool", "what --mem-fraction-static leaves after the weights, up to max-running-requests full contexts", "N"),
            new("mem-fraction-static", FlagKind.Double, "share of the device's memory for weights plus KV pool", I(d.MemFractionStatic), "F"),
            new("chunked-prefill-size", FlagKind.Int, "most prompt tokens one request prefills in a step (longer prompts are chunked)", I(d.ChunkedPrefillSize), "N"),
            new("max-prefill-tokens", FlagKind.Int, "most prompt tokens of all requests prefilled in one step", I(d.MaxPrefillTokens), "N"),
            new("threads", FlagKind.Int, "CPU threads for the forward pass", "all cores", "N"),
            new("cuda-graph-max-bs", FlagKind.Int, "largest decode batch replayed from a captured CUDA graph", I(d.CudaGraphMaxBatchSize), "N"),
            new("disable-cuda-graph", FlagKind.Bool, "run every step op by op"),
            new("deterministic", FlagKind.Bool, "batch-invariant kernels: a request's tokens do not depend on what runs beside it"),
            new("entropy-threshold", FlagKind.Double, "router entropy (nats; at most ln E) above which retrieval fires", I(d.Trigger.Threshold), "NATS"),
            new("log-dir", FlagKind.String, "where rag-events.jsonl is written", d.LogDir, "DIR"),
            new("log-fsync", FlagKind.Bool, "force each RAG event line to disk before its request goes on"),
            new("rag-mode", FlagKind.String, "off: measure only; latent: add α·P·mean(embed(passages)) to the hidden states; prompt: put passages ahead of the prompt", Mode(d.Mode), "off|latent|prompt"),
            new("trigger-layers", FlagKind.List, "MoE layers whose entropy counts", "all", "all|0,2,3"),
            new("trigger-aggregation", FlagKind.String, "how the counted layers' entropies combine", d.Trigger.Aggregation.ToString().ToLowerInvariant(), "any|max|mean"),
            new("cooldown-tokens", FlagKind.Int, "tokens after a retrieval before the next may fire", I(d.Trigger.CooldownTokens), "N"),
            new("max-retrievals", FlagKind.Int, "retrievals per request at most", I(d.Trigger.MaxRetrievalsPerRequest), "N"),
            new("injection-scale", FlagKind.Double, "α in α·P·c", I(d.InjectionScale), "α"),
            new("injection-layers", FlagKind.List, "MoE layers to inject at", "the layers that fired", "fired|0,2,3"),
            new("injection-tokens", FlagKind.String, "tokens (the triggering one included) that receive the injection", "rest", "N|rest"),
            new("injector-proj", FlagKind.String, "the projection P: random (seeded), identity, or a safetensors file holding \"proj\"", "random", "random|identity|FILE"),
            new("projection-seed", FlagKind.Int, "seed of the random projection", I(d.ProjectionSeed), "N"),
            new("retriever", FlagKind.String, "index.db, corpus .jsonl, http(s)://… (JSON contract) or es+http(s)://host:port/index", "the embedded assets/corpus/wordnet/wordnet-demo.jsonl.gz with the embedded model", "SPEC"),
            new("retrieval-timeout-ms", FlagKind.Double, "per-retrieval timeout", I(d.RetrievalTimeout.TotalMilliseconds), "MS"),
            new("retrieval-top-k", FlagKind.Int, "passages per retrieval", I(d.RetrievalTopK), "K"),
            new("query-window", FlagKind.Int, "the query is the last N tokens of prompt plus output", I(d.QueryWindowTokens), "N"),
        ];
    }

    private static EngineOptions Defaults => new() { ModelPath = "", Runner = new NullRunnerFactory(0) };

    private static string I(double value) => value.ToString(System.Globalization.CultureInfo.InvariantCulture);

    /// <summary>The one place a device is chosen: --device picks the runner the engine gets.</summary>
    public static IRunnerFactory Runner(string device, int? threads, float nullTriggerRate = 0, TimeSpan nullStepTime = default) => device switch
    {
        "cpu" => new CpuRunnerFactory(threads ?? Environment.ProcessorCount),
        "null" => new NullRunnerFactory(nullTriggerRate, nullStepTime),
        "cuda" => new CudaRunnerFactory(0),
        _ when device.StartsWith("cuda:", StringComparison.Ordinal) && int.TryParse(device.AsSpan(5), System.Globalization.NumberStyles.None,
            System.Globalization.CultureInfo.InvariantCulture, out var ordinal) => new CudaRunnerFactory(ordinal),
        _ => throw new UsageException($"invalid value for --device: '{device}' (expected cpu, cuda, cuda:N or null)"),
    };

    private static string Mode(InjectionMode mode) => mode.ToString().ToLowerInvariant();

    /// <summary>EngineOptions from the flags; without --model-path the embedded model (and its default corpus) are served.</summary>
    /// <param name="nullTriggerRate">For --device null: the share of tokens whose router entropies fire the trigger.</param>
    /// <param name="nullStepTime">For --device null: how long a step lasts.</param>
    public static EngineOptions ToOptions(ParsedFlags flags, float nullTriggerRate = 0, TimeSpan nullStepTime = default)
    {
        ArgumentNullException.ThrowIfNull(flags);
        var defaults = Defaults;

        var device = (flags.String("device") ?? "cpu").ToLowerInvariant();
        var runner = Runner(device, flags.IntIn("threads", 1), nullTriggerRate, nullStepTime);

        var trigger = defaults.Trigger with
        {
            Threshold = flags.DoubleIn("entropy-threshold", 0) ?? defaults.Trigger.Threshold,
            Layers = flags.IntList("trigger-layers", all: "all"),
            Aggregation = flags.Choice("trigger-aggregation", "any", "max", "mean") switch
            {
                "max" => LayerAggregation.Max,
                "mean" => LayerAggregation.Mean,
                "any" => LayerAggregation.Any,
                _ => defaults.Trigger.Aggregation,
            },
            CooldownTokens = flags.IntIn("cooldown-tokens", 0) ?? defaults.Trigger.CooldownTokens,
            MaxRetrievalsPerRequest = flags.IntIn("max-retrievals", 0) ?? defaults.Trigger.MaxRetrievalsPerRequest,
        };
        if (trigger.Layers?.Any(l => l < 0) == true) throw new UsageException("invalid value for --trigger-layers: layers are numbered from 0");

        var (projection, projectionPath) = (flags.String("injector-proj") ?? "random") switch
        {
            var p when p.Equals("random", StringComparison.OrdinalIgnoreCase) => (ProjectionKind.Random, (string?)null),
            var p when p.Equals("identity", StringComparison.OrdinalIgnoreCase) => (ProjectionKind.Identity, null),
            var file => File.Exists(file)
                ? (ProjectionKind.File, Path.GetFullPath(file))
                : throw new UsageException($"invalid value for --injector-proj: '{file}' is not random, identity or an existing .safetensors file"),
        };

        IReadOnlyList<int>? injectionLayers = flags.String("injection-layers") is { } il && il.Equals("fired", StringComparison.OrdinalIgnoreCase)
            ? null
            : flags.IntList("injection-layers");
        if (injectionLayers?.Any(l => l < 0) == true) throw new UsageException("invalid value for --injection-layers: layers are numbered from 0");

        int? injectionTokens = flags.String("injection-tokens") switch
        {
            null => defaults.InjectionTokens,
            var t when t.Equals("rest", StringComparison.OrdinalIgnoreCase) || t.Equals("all", StringComparison.OrdinalIgnoreCase) => null,
            var t when int.TryParse(t, System.Globalization.NumberStyles.Integer, System.Globalization.CultureInfo.InvariantCulture, out var n) && n >= 1 => n,
            var t => throw new UsageException($"invalid value for --injection-tokens: '{t}' (expected a positive integer or rest)"),
        };

        var mode = flags.Choice("rag-mode", "off", "latent", "prompt");
        var loadFormat = flags.Choice("load-format", "auto", "dummy");

        // The model last, so that every flag value is checked before any file is looked for.
        string modelPath;
        string? retriever = flags.String("retriever");
        if (flags.String("model-config") is { } shape)
        {
            if (loadFormat != "dummy") throw new UsageException("--model-config gives a shape without weights: use it with --load-format dummy");
            if (flags.String("model-path") is not null) throw new UsageException("give --model-path or --model-config, not both");
            var shipped = Path.Combine(Home.Locate(), "assets", "configs", shape);
            modelPath = Directory.Exists(shipped) ? shipped : Path.GetFullPath(shape);
        }
        else if (flags.String("model-path") is { } given)
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

        var memFraction = flags.DoubleIn("mem-fraction-static", 0) ?? defaults.MemFractionStatic;
        if (!(memFraction > 0 && memFraction <= 1)) throw new UsageException("invalid value for --mem-fraction-static: expected a number in (0, 1]");
        return defaults with
        {
            ModelPath = modelPath,
            Runner = runner,
            LoadFormat = loadFormat ?? defaults.LoadFormat,
            ContextLength = flags.IntIn("context-length", 1),
            MaxRunningRequests = flags.IntIn("max-running-requests", 1) ?? defaults.MaxRunningRequests,
            KvCacheTokens = flags.IntIn("kv-cache-tokens", 1),
            MemFractionStatic = memFraction,
            ChunkedPrefillSize = flags.IntIn("chunked-prefill-size", 1) ?? defaults.ChunkedPrefillSize,
            MaxPrefillTokens = flags.IntIn("max-prefill-tokens", 1) ?? defaults.MaxPrefillTokens,
            LogFsync = flags.Bool("log-fsync"),
            CudaGraphMaxBatchSize = flags.IntIn("cuda-graph-max-bs", 0) ?? defaults.CudaGraphMaxBatchSize,
            DisableCudaGraph = flags.Bool("disable-cuda-graph"),
            Deterministic = flags.Bool("deterministic"),
            Mode = mode switch
            {
                "off" => InjectionMode.Off,
                "latent" => InjectionMode.Latent,
                "prompt" => InjectionMode.Prompt,
                _ => defaults.Mode,
            },
            Trigger = trigger,
            InjectionScale = (float)(flags.Double("injection-scale") ?? defaults.InjectionScale),
            InjectionLayers = injectionLayers,
            InjectionTokens = injectionTokens,
            Projection = projection,
            ProjectionPath = projectionPath,
            ProjectionSeed = flags.Int("projection-seed") ?? defaults.ProjectionSeed,
            Retriever = retriever,
            RetrievalTimeout = flags.DoubleIn("retrieval-timeout-ms", 1) is { } ms ? TimeSpan.FromMilliseconds(ms) : defaults.RetrievalTimeout,
            RetrievalTopK = flags.IntIn("retrieval-top-k", 1) ?? defaults.RetrievalTopK,
            QueryWindowTokens = flags.IntIn("query-window", 1) ?? defaults.QueryWindowTokens,
            LogDir = flags.String("log-dir") ?? defaults.LogDir,
        };
    }
}
