using MoeRagInject.Rag;

namespace MoeRagInject.Engine;

public static class InferenceEngine
{
    /// <summary>Loads the checkpoint, builds the backend and starts the scheduling loop.</summary>
    public static Task<IGenerationEngine> CreateAsync(EngineOptions options, CancellationToken cancellationToken = default) =>
        Task.Run<IGenerationEngine>(() => Create(options), cancellationToken);

    public static LlmEngine Create(EngineOptions options)
    {
        var loaded = LoadedModel.Load(options.ModelPath, options.LoadFormat, options.Device, options.Threads);
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
}
