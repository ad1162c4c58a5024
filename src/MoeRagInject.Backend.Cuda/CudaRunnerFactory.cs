using MoeRagInject.Backend.Cuda.Interop;
using MoeRagInject.Model;

namespace MoeRagInject.Backend.Cuda;

/// <summary>--device cuda[:N]: a <see cref="ModelRunner"/> over the <see cref="CudaBackend"/> on GPU N.</summary>
public sealed class CudaRunnerFactory(int ordinal = 0) : IRunnerFactory
{
    public string Device => "cuda";

    public int Ordinal => ordinal;

    /// <summary>The backend alone on GPU <paramref name="ordinal"/> (op checks run it against the CPU backend).</summary>
    public static IBackend OpenBackend(int ordinal, bool deterministic, Action<string>? progress = null)
    {
        if (!IsAvailable(out var reason)) throw new InvalidOperationException($"--device cuda: {reason}");
        var device = CudaDevice.Open(ordinal);
        try
        {
            return new CudaBackend(device, deterministic, progress);
        }
        catch
        {
            device.Dispose();
            throw;
        }
    }

    /// <summary>
    /// The card's device-to-device copy rate in bytes per second, counting bytes read plus written: the median of ten copies
    /// of a 4 GiB buffer after three warm-ups, timed with events. Measured before a model takes the memory.
    /// </summary>
    public static double MeasureCopyBandwidth(int ordinal = 0)
    {
        if (!IsAvailable(out var reason)) throw new InvalidOperationException($"--device cuda: {reason}");
        using var device = CudaDevice.Open(ordinal);
        using var stream = device.CreateStream();
        const long bytes = 4L << 30;
        using var source = device.Allocate(bytes);
        using var destination = device.Allocate(bytes);
        source.Memset(1, stream);
        using var start = device.CreateEvent(timing: true);
        using var end = device.CreateEvent(timing: true);
        var times = new List<float>();
        for (var i = 0; i < 13; i++)
        {
            start.Record(stream);
            source.CopyTo(destination, bytes, stream);
            end.Record(stream);
            end.Synchronize();
            if (i >= 3) times.Add(CudaEvent.ElapsedMilliseconds(start, end));
        }
        times.Sort();
        return 2.0 * bytes / (times[times.Count / 2] / 1e3);
    }

    /// <summary>
    /// sglang's rule for the prefill chunk by the card's memory: 2,048 tokens under 35 GiB, 8,192 under 160 GiB (an H100 or
    /// H200), 16,384 above. On an H200 8,192 prefills batch 256's 128-token prompts in four steps instead of sixteen, so
    /// its requests decoded at a mean batch of 252 instead of 240 (docs/performance.md); 2,048 where CUDA is missing, so
    /// that the error comes from <see cref="Create"/>.
    /// </summary>
    public int DefaultChunkedPrefillSize => _defaultChunk.Value;

    private readonly Lazy<int> _defaultChunk = new(() =>
    {
        if (!IsAvailable(out _)) return 2048;
        var gib = CudaDevice.TotalMemoryOf(ordinal) / (double)(1L << 30);
        return gib < 35 ? 2048 : gib < 160 ? 8192 : 16384;
    });

    /// <summary>False, with the reason, when the NVIDIA driver, CUDA libraries or a GPU are missing.</summary>
    public static bool IsAvailable(out string reason) => CudaLibraries.TryProbe(out reason);

    public IModelRunner Create(ModelConfig config, WeightSource weights, RunnerOptions options, Action<string>? progress = null)
    {
        var backend = (CudaBackend)OpenBackend(ordinal, options.Deterministic, progress);
        try
        {
            if (options.ExpertLayout == ExpertLayout.Boxed && !backend.CanBoxExperts)
                throw new InvalidOperationException($"--expert-layout boxed needs a Hopper GPU (sm_90a), where the kernels that read it run; {backend.Description} keeps the experts row-major");
            backend.BoxExperts = options.ExpertLayout == ExpertLayout.Boxed;  // the option, whatever MOE_RAG_INJECT_BOXED says
            // Weights are bf16 on the device whatever the checkpoint holds; the check runs before anything is uploaded.
            var limits = ModelRunner.Plan(backend, config, MemoryPlan.WeightElements(config) * 2, options);
            progress?.Invoke(FormattableString.Invariant(
                $"{backend.Description}: weights {MemoryPlan.Gb(limits.WeightBytes)} with workspace, KV pool {limits.KvTokens} tokens ({MemoryPlan.Gb(limits.KvTokens * limits.KvBytesPerToken)})"));
            switch (weights)
            {
                case CheckpointWeights checkpoint:
                    return new ModelRunner(backend, config, checkpoint.Weights, limits, progress, options: options);
                case DummyWeights dummy:
                    var shapes = Checkpoint.CreateShapes(config);
                    backend.UseDummyWeights(config, dummy.Seed);
                    return new ModelRunner(backend, config, MixtralWeights.Resolve(shapes, config), limits, progress, shapes, options);
                default:
                    throw new ArgumentException($"unknown weight source {weights.GetType().Name}");
            }
        }
        catch
        {
            backend.Dispose();
            throw;
        }
    }
}
