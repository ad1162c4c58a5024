using MoeRagInject.Backend.Cpu;
using MoeRagInject.Model;
using MoeRagInject.Model.Tokenization;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine;

/// <summary>A checkpoint folder loaded onto a backend: config, tokenizer, weights and the model that runs them.</summary>
public sealed class LoadedModel : IDisposable
{
    private readonly Checkpoint _checkpoint;
    private readonly CpuBackend _backend;

    private LoadedModel(ModelConfig config, Tokenizer tokenizer, Checkpoint checkpoint, CpuBackend backend, MixtralModel model)
    {
        Config = config;
        Tokenizer = tokenizer;
        _checkpoint = checkpoint;
        _backend = backend;
        Model = model;
        Embeddings = new EmbeddingTable(model.Weights.Embedding);
    }

    public ModelConfig Config { get; }
    public Tokenizer Tokenizer { get; }
    public MixtralModel Model { get; }
    /// <summary>The token embedding table as the injector reads it.</summary>
    public ITokenEmbeddings Embeddings { get; }

    /// <param name="loadFormat">"auto" reads the safetensors; "dummy" builds random weights of the config's shapes.</param>
    public static LoadedModel Load(string path, string loadFormat = "auto", string device = "cpu", int? threads = null)
    {
        if (!Directory.Exists(path)) throw new DirectoryNotFoundException($"model folder not found: {path}");
        if (device != "cpu")
            throw new NotSupportedException($"device \"{device}\" is not available: this build has the cpu backend only (the CUDA backend is not built yet)");
        var config = ModelConfig.Load(path);
        var tokenizer = Tokenizer.Load(path);
        var checkpoint = loadFormat switch
        {
            "auto" or "safetensors" => Checkpoint.Open(path),
            "dummy" => Checkpoint.CreateDummy(config),
            _ => throw new ArgumentException($"unknown load format \"{loadFormat}\" (expected auto or dummy)"),
        };
        try
        {
            var backend = new CpuBackend(threads ?? Environment.ProcessorCount);
            return new LoadedModel(config, tokenizer, checkpoint, backend, new MixtralModel(backend, config, MixtralWeights.Resolve(checkpoint, config)));
        }
        catch
        {
            checkpoint.Dispose();
            throw;
        }
    }

    public void Dispose()
    {
        Model.Dispose();
        _backend.Dispose();
        _checkpoint.Dispose();
    }
}
