using MoeRagInject.Backend;
using MoeRagInject.Model;
using MoeRagInject.Model.Tokenization;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine;

/// <summary>A checkpoint folder loaded onto a device: config, tokenizer, and the runner that holds the weights.</summary>
public sealed class LoadedModel : IDisposable
{
    private readonly Checkpoint? _checkpoint;

    private LoadedModel(ModelConfig config, Tokenizer tokenizer, Checkpoint? checkpoint, IModelRunner runner, ITokenEmbeddings embeddings)
    {
        Config = config;
        Tokenizer = tokenizer;
        _checkpoint = checkpoint;
        Runner = runner;
        Embeddings = embeddings;
    }

    public ModelConfig Config { get; }
    public Tokenizer Tokenizer { get; }
    public IModelRunner Runner { get; }
    /// <summary>The token embedding table as the injector reads it (host memory).</summary>
    public ITokenEmbeddings Embeddings { get; }

    /// <param name="loadFormat">"auto" reads the safetensors; "dummy" builds random weights of the config's shapes.</param>
    /// <param name="options">The runner's sizes, given the model's config.</param>
    public static LoadedModel Load(string path, string loadFormat, IRunnerFactory device, Func<ModelConfig, RunnerOptions> options,
        Action<string>? progress = null)
    {
        if (!Directory.Exists(path)) throw new DirectoryNotFoundException($"model folder not found: {path}");
        var config = ModelConfig.Load(path);
        // A config-only folder (a shape for dummy weights) gets a synthetic tokenizer of the config's vocabulary.
        var tokenizer = loadFormat == "dummy" && !File.Exists(Path.Combine(path, "tokenizer.json"))
            ? Tokenizer.CreateSynthetic(config.VocabSize)
            : Tokenizer.Load(path);
        Checkpoint? checkpoint = null;
        try
        {
            WeightSource source;
            ITokenEmbeddings embeddings;
            switch (loadFormat)
            {
                case "auto" or "safetensors":
                    checkpoint = Checkpoint.Open(path);
                    var weights = MixtralWeights.Resolve(checkpoint, config);
                    source = new CheckpointWeights(weights, checkpoint.Tensors.Values.Sum(t => t.ByteLength), weights.Embedding.DType);
                    embeddings = new EmbeddingTable(weights.Embedding);
                    break;
                case "dummy":
                    source = new DummyWeights(Seed: 0);
                    embeddings = new DummyEmbeddings(config, Seed: 0);
                    break;
                default:
                    throw new ArgumentException($"unknown load format \"{loadFormat}\" (expected auto or dummy)");
            }
            var runner = device.Create(config, source, options(config), progress);
            return new LoadedModel(config, tokenizer, checkpoint, runner, embeddings);
        }
        catch
        {
            checkpoint?.Dispose();
            throw;
        }
    }

    public void Dispose()
    {
        Runner.Dispose();
        _checkpoint?.Dispose();
    }
}
