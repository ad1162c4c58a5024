using MoeRagInject.Backend.Cpu;
using MoeRagInject.Model;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine.Tests;

/// <summary>A trained projector file (tools/projector) in the engine: where it injects, and what it adds.</summary>
public sealed class ProjectorTests : IDisposable
{
    private readonly string _temp = Directory.CreateTempSubdirectory("moe-rag-projector-").FullName;

    public void Dispose() => Directory.Delete(_temp, recursive: true);

    private string WriteCorpus()
    {
        var path = Path.Combine(_temp, "corpus.jsonl");
        File.WriteAllLines(path,
        [
            """{"id": "q1", "title": "Quantum", "text": "A quantum is the smallest discrete amount of a physical quantity, such as energy carried by light."}""",
            """{"id": "f1", "title": "Fox", "text": "The red fox is a quick and clever animal that jumps over obstacles and hunts at dusk."}""",
        ]);
        return path;
    }

    /// <summary>A seeded MLP projector for the tiny checkpoint (hidden 128) that names its layers.</summary>
    private string WriteProjector(IReadOnlyList<int> layers)
    {
        const int Hidden = 128;
        const int Inner = 16;
        var rng = new SplitMix64(9);
        float[] Values(int n, double std) => [.. Enumerable.Range(0, n).Select(_ => (float)(rng.NextGaussian() * std))];
        var path = Path.Combine(_temp, $"projector-{string.Join("-", layers)}.safetensors");
        ContextInjector.SaveMlp(path, Hidden, Inner, Values(Inner * Hidden, 1.0), Values(Inner, 0.1), Values(Hidden * Inner, 0.5), Values(Hidden, 0.1),
            layers: layers, alpha: 1);
        return path;
    }

    private LlmEngine Engine(string projector, IReadOnlyList<int>? injectionLayers) => InferenceEngine.Create(new EngineOptions
    {
        ModelPath = TestPaths.DefaultModel,
        Runner = new CpuRunnerFactory(2),
        Retriever = WriteCorpus(),
        Trigger = new TriggerOptions { Threshold = 0, MaxRetrievalsPerRequest = 1 },
        Projection = ProjectionKind.File,
        ProjectionPath = projector,
        InjectionLayers = injectionLayers,
        LogDir = Path.Combine(_temp, "logs"),
        Notices = TextWriter.Null,
        KvCacheTokens = 1024,
    });

    private static async Task<List<RagEvent>> Events(IGenerationEngine engine)
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        var request = new GenerationRequest
        {
            PromptIds = reference.Prompts[3].InputIds,
            Sampling = new SamplingParams { Temperature = 0, MaxNewTokens = 4, IgnoreEos = true },
            Rag = new RagOverrides { Mode = InjectionMode.Latent },
        };
        var events = new List<RagEvent>();
        await foreach (var update in engine.GenerateAsync(request)) events.AddRange(update.NewEvents);
        return events;
    }

    [Fact]
    public async Task TheProjectorsLayersAreTheInjectionLayersUnlessTheOptionsNameOthers()
    {
        var projector = WriteProjector([1, 3]);
        await using (var engine = Engine(projector, null))
        {
            var events = await Events(engine);
            var e = Assert.Single(events);
            Assert.Null(e.Error);
            // Threshold 0 fires every layer; the projector says where it was trained to be added.
            Assert.Equal([0, 1, 2, 3], e.Layers);
            Assert.Equal([1, 3], e.InjectionLayers);
            Assert.True(e.InjectionNorm > 0);
        }
        await using (var engine = Engine(projector, [2]))
        {
            var e = Assert.Single(await Events(engine));
            Assert.Equal([2], e.InjectionLayers);
        }
    }

    [Fact]
    public void AProjectorNamingALayerTheModelLacksIsRejectedAtLoad()
    {
        var projector = WriteProjector([0, 4]);
        var ex = Assert.Throws<ArgumentException>(() => Engine(projector, null));
        Assert.Contains("layer 4", ex.Message, StringComparison.Ordinal);
    }
}
