using MoeRagInject.Backend.Cpu;
using MoeRagInject.Model;
using MoeRagInject.Model.Tokenization;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine;

public static class InferenceEngine
{
    /// <summary>Loads the checkpoint, builds the backend and starts the scheduling loop.</summary>
    public static Task<IGenerationEngine> CreateAsync(EngineOptions options, CancellationToken cancellationToken = default) =>
        Task.Run<IGenerationEngine>(() => Create(options), cancellationToken);

    public static LlmEngine Create(EngineOptions options)
    {
        if (!Directory.Exists(options.ModelPath))
            throw new DirectoryNotFoundException($"model folder not found: {options.ModelPath}");
        if (options.Device != "cpu")
            throw new NotSupportedException($"device \"{options.Device}\" is not available: this build has the cpu backend only (the CUDA backend is not built yet)");

        var config = ModelConfig.Load(options.ModelPath);
        var tokenizer = Tokenizer.Load(options.ModelPath);
        var checkpoint = options.LoadFormat switch
        {
            "auto" or "safetensors" => Checkpoint.Open(options.ModelPath),
            "dummy" => Checkpoint.CreateDummy(config),
            _ => throw new ArgumentException($"unknown load format \"{options.LoadFormat}\" (expected auto or dummy)"),
        };
        IRetriever? retriever = null;
        try
        {
            var weights = MixtralWeights.Resolve(checkpoint, config);
            var backend = new CpuBackend(options.Threads ?? Environment.ProcessorCount);
            var model = new MixtralModel(backend, config, weights);
            var embeddings = new EmbeddingTable(weights.Embedding);
            var injector = options.Projection switch
            {
                ProjectionKind.Identity => ContextInjector.CreateIdentity(embeddings),
                ProjectionKind.File => ContextInjector.LoadFromFile(embeddings,
                    options.ProjectionPath ?? throw new ArgumentException("a projection file is needed for --injector-proj file")),
                _ => ContextInjector.CreateRandom(embeddings, options.ProjectionSeed),
            };
            if (options.Retriever is { } spec)
                retriever = RetrieverFactory.Create(spec, Path.Combine(Path.GetTempPath(), "moe-rag-inject", "index-cache"));
            return new LlmEngine(options, config, model, tokenizer, retriever, injector, [backend, checkpoint]);
        }
        catch
        {
            retriever?.Dispose();
            checkpoint.Dispose();
            throw;
        }
    }
}
