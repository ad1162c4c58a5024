using MoeRagInject.Backend;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine;

public static class InferenceEngine
{
    /// <summary>Loads the checkpoint onto the options' device and starts the scheduling loop.</summary>
    public static Task<IGenerationEngine> CreateAsync(EngineOptions options, CancellationToken cancellationToken = default) =>
        Task.Run<IGenerationEngine>(() => Create(options), cancellationToken);

    /// <param name="progress">Told of loading steps (weights generated or uploaded, layer by layer).</param>
    public static LlmEngine Create(EngineOptions options, Action<string>? progress = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        if (options.Validate() is { } invalid) throw new ArgumentException(invalid);
        var probe = LoadRouterProbe(options);
        var loaded = LoadedModel.Load(options.ModelPath, options.LoadFormat, options.Runner, config =>
        {
            probe?.EnsureFits(config.NumLayers, config.NumExperts);
            return RunnerOptionsOf(options, config) with { RouterProbe = probe?.Weights };
        }, progress);
        IRetriever? retriever = null;
        try
        {
            var injector = options.Projection switch
            {
                ProjectionKind.Identity => ContextInjector.CreateIdentity(loaded.Embeddings),
                ProjectionKind.File => ContextInjector.LoadFromFile(loaded.Embeddings,
                    options.ProjectionPath ?? throw new ArgumentException("a projection file is needed for --injector-proj file")),
                _ => ContextInjector.CreateRandom(loaded.Embeddings, options.ProjectionSeed),
            };
            if (options.Retriever is { } spec)
                retriever = RetrieverFactory.Create(spec, Path.Combine(Path.GetTempPath(), "moe-rag-inject", "index-cache"));
            return new LlmEngine(options, loaded, retriever, injector, probe);
        }
        catch
        {
            retriever?.Dispose();
            loaded.Dispose();
            throw;
        }
    }

    /// <summary>
    /// The router probe the options name, or the one beside the model: loaded when its file exists, required when the trigger
    /// watches router-probe (then a missing file is an error that says how to make one).
    /// </summary>
    public static RouterProbe? LoadRouterProbe(EngineOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        var path = options.ResolvedRouterProbePath;
        if (File.Exists(path)) return RouterProbe.Load(path);
        if (options.Trigger.Signal == TriggerSignal.RouterProbe || options.RouterProbePath is not null)
            throw new FileNotFoundException(MissingProbeMessage(path), path);
        return null;
    }

    /// <summary>What to say when the router probe is needed and not there.</summary>
    public static string MissingProbeMessage(string path) =>
        $"the router-probe trigger signal needs a router probe, and {path} does not exist: run `./moe-rag-inject calibrate` to train one beside the model (or pass --router-probe FILE)";

    /// <summary>How the engine's options size the runner: a slot per running request, and a step of one prefill budget plus a decode row per slot.</summary>
    public static RunnerOptions RunnerOptionsOf(EngineOptions options, Model.ModelConfig config) => new()
    {
        MaxSequences = options.MaxRunningRequests,
        MaxRows = options.PrefillBudget + options.MaxRunningRequests,
        ContextLength = options.ContextLength ?? config.MaxPositionEmbeddings,
        KvCacheTokens = options.KvCacheTokens,
        MemFractionStatic = options.MemFractionStatic,
        CudaGraphMaxBatchSize = options.CudaGraphMaxBatchSize,
        DisableCudaGraph = options.DisableCudaGraph,
        Deterministic = options.Deterministic,
        ExpertLayout = options.ExpertLayout,
    };
}
