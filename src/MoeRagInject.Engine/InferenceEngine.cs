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
        var loaded = LoadedModel.Load(options.ModelPath, options.LoadFormat, options.Runner, config => RunnerOptionsOf(options, config), progress);
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
            return new LlmEngine(options, loaded, retriever, injector);
        }
        catch
        {
            retriever?.Dispose();
            loaded.Dispose();
            throw;
        }
    }

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
    };
}
