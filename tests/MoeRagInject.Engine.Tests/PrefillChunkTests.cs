using MoeRagInject.Backend;
using MoeRagInject.Model;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine.Tests;

/// <summary>
/// The prefill chunk (--chunked-prefill-size): the device's default when none is given (a GPU picks it by its memory, as
/// sglang), the flag's value when one is; counted in the engine's prefill steps for one prompt on the null device.
/// </summary>
public sealed class PrefillChunkTests
{
    private const int PromptTokens = 64;

    /// <summary>The null device, saying what chunk it would take by default.</summary>
    private sealed class DeviceWithDefaultChunk(int chunk) : IRunnerFactory
    {
        private readonly NullRunnerFactory _device = new(0);

        public string Device => _device.Device;

        public int DefaultChunkedPrefillSize => chunk;

        public IModelRunner Create(ModelConfig config, WeightSource weights, RunnerOptions options, Action<string>? progress = null) =>
            _device.Create(config, weights, options, progress);
    }

    private static async Task<long> PrefillStepsAsync(EngineOptions options)
    {
        await using var engine = InferenceEngine.Create(options);
        var before = engine.Counters;
        var request = new GenerationRequest
        {
            PromptIds = [.. Enumerable.Range(0, PromptTokens).Select(i => 10 + i % 200)],
            Sampling = new SamplingParams { Temperature = 0, MaxNewTokens = 2, IgnoreEos = true },
            Rag = new RagOverrides { Mode = InjectionMode.Off },
        };
        await foreach (var _ in engine.GenerateAsync(request, CancellationToken.None))
        {
        }
        var run = engine.Counters - before;
        return run.Steps - run.DecodeSteps;
    }

    private static EngineOptions Options(int deviceDefault, int? chunk) => new()
    {
        ModelPath = TestPaths.DefaultModel,
        Runner = new DeviceWithDefaultChunk(deviceDefault),
        ChunkedPrefillSize = chunk,
    };

    [Fact]
    public async Task WithoutTheFlagTheDevicesDefaultChunksThePrompt()
    {
        var options = Options(deviceDefault: 16, chunk: null);
        Assert.Equal(16, options.ResolvedChunkedPrefillSize);
        Assert.Equal(PromptTokens / 16, await PrefillStepsAsync(options));
    }

    [Fact]
    public async Task TheFlagOverridesTheDevicesDefault()
    {
        var options = Options(deviceDefault: 16, chunk: 32);
        Assert.Equal(32, options.ResolvedChunkedPrefillSize);
        Assert.Equal(PromptTokens / 32, await PrefillStepsAsync(options));
    }

    [Fact]
    public void DevicesWithoutADefaultOfTheirOwnTake2048() =>
        Assert.Equal(2048, new EngineOptions { ModelPath = "", Runner = new NullRunnerFactory(0) }.ResolvedChunkedPrefillSize);
}
