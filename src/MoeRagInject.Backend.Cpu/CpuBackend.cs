using MoeRagInject.Backend.Cpu.Ops;
using MoeRagInject.Model;

namespace MoeRagInject.Backend.Cpu;

/// <summary>
/// The CPU backend: fp32 arithmetic over fp32/fp16/bf16 weights, SIMD kernels with a fixed summation order and
/// multithreading over output features, heads, experts or sequences. Every output element is computed by one thread in
/// one order, so results do not depend on the batch a request shares.
/// </summary>
public sealed class CpuBackend(int threads) : IBackend
{
    private readonly ParallelOptions _parallel = new() { MaxDegreeOfParallelism = Math.Max(1, threads) };

    public string Name => "cpu";

    public string Description => $"cpu ({Threads} threads)";

    public int Threads => _parallel.MaxDegreeOfParallelism;

    public long AvailableMemoryBytes => HostMemory.AvailableBytes();

    /// <summary>Weights stay memory-mapped in the checkpoint's own type.</summary>
    public int WeightBytesPerElement(DType dtype) => dtype.ByteSize();

    public long KvBytesPerTokenPerLayer(int kvHeads, int headDim) => 2L * kvHeads * headDim * sizeof(float);

    public DeviceTensor UploadWeight(params TensorView[] parts) => new CpuWeight(parts);

    public ExpertStack UploadExperts(IReadOnlyList<ExpertWeights> experts) => new CpuExpertStack(experts);

    public DeviceTensor Allocate(int rows, int columns, ActivationKind kind = ActivationKind.Float32) => new CpuActivation(rows, columns);

    /// <summary>fp32 activations of every row, and the MoE scratch: four [rows·k, width] buffers.</summary>
    public long WorkspaceBytes(ModelConfig config, int maxRows, int maxSequences)
    {
        long h = config.HiddenSize, q = (long)config.NumHeads * config.HeadDim, kv = (long)config.NumKvHeads * config.HeadDim;
        var slots = (long)maxRows * config.NumExpertsPerToken;
        return 4 * ((long)maxRows * (4 * h + q + 2 * kv + q) + (long)maxSequences * (h + config.VocabSize)
            + slots * (3 * h + 2 * config.IntermediateSize) + (long)maxRows * config.NumLayers * (1 + config.NumExperts) + maxRows);
    }

    public IKvCache CreateKvCache(int layers, int numBlocks, int blockSize, int kvHeads, int headDim) =>
        new CpuKvCache(layers, numBlocks, blockSize, kvHeads, headDim);

    public IStepBuffers CreateStepBuffers(StepState host) => new CpuStepBuffers(host);

    public void Download(DeviceTensor source, int rows, Span<float> destination) =>
        source.Act().Data.AsSpan(0, rows * source.Columns).CopyTo(destination);

    public void Upload(ReadOnlySpan<float> source, DeviceTensor destination) => source.CopyTo(destination.Act().Data);

    public void Embed(DeviceTensor table, IStepBuffers step, DeviceTensor hidden, int rows) =>
        Embedding.Lookup(table.Weight(), step.Host.TokenIds, hidden.Act(), rows);

    public void RmsNorm(DeviceTensor x, DeviceTensor weight, float eps, DeviceTensor output, int rows) =>
        Norm.RmsNorm(x.Act(), weight.Weight(), eps, output.Act(), rows);

    public void AddRmsNorm(DeviceTensor residual, DeviceTensor delta, DeviceTensor weight, float eps, DeviceTensor output, int rows) =>
        Norm.AddRmsNorm(residual.Act(), delta.Act(), weight.Weight(), eps, output.Act(), rows);

    public void Linear(DeviceTensor x, DeviceTensor weight, DeviceTensor output, int rows) =>
        MatMul.Linear(x.Act(), weight.Weight(), output.Act(), rows, _parallel);

    public void RotaryAndCacheWrite(DeviceTensor qkv, IKvCache cache, int layer, AttentionShape shape, IStepBuffers step, int rows) =>
        Rotary.ApplyAndWrite(qkv.Act(), (CpuKvCache)cache, layer, shape, step.Host, rows);

    public void Attention(DeviceTensor qkv, IKvCache cache, int layer, AttentionShape shape, IStepBuffers step, DeviceTensor output, int rows) =>
        Ops.Attention.Run(qkv.Act(), (CpuKvCache)cache, layer, shape, step.Host, output.Act(), _parallel);

    public void Route(DeviceTensor x, DeviceTensor routerWeight, int layer, int topK, IStepBuffers step, int rows) =>
        Moe.Route(x.Act(), routerWeight.Weight(), layer, topK, (CpuStepBuffers)step, rows);

    public void AddRmsNormRoute(DeviceTensor residual, DeviceTensor delta, DeviceTensor weight, float eps, DeviceTensor output,
        DeviceTensor routerWeight, int layer, int topK, IStepBuffers step, int rows)
    {
        AddRmsNorm(residual, delta, weight, eps, output, rows);
        Route(output, routerWeight, layer, topK, step, rows);
    }

    /// <summary>From the probabilities <see cref="Route"/> kept for this layer (x and the router weight are not read again).</summary>
    public void RouterProbe(DeviceTensor x, DeviceTensor routerWeight, DeviceTensor probe, int layer, IStepBuffers step, int rows) =>
        Moe.Probe(probe.Act(), layer, step.Host, rows);

    public void MoeExperts(DeviceTensor x, ExpertStack experts, int topK, IStepBuffers step, DeviceTensor output, int rows) =>
        Moe.Experts(x.Act(), (CpuExpertStack)experts, topK, (CpuStepBuffers)step, output.Act(), rows, _parallel);

    public void AddInjection(DeviceTensor x, int layer, IStepBuffers step, int rows)
    {
        var s = step.Host;
        var a = x.Act();
        for (var r = 0; r < rows; r++)
        {
            var slot = s.SeqSlot[s.RowSequence[r]];
            var scale = s.InjectionScales[slot * s.Layers + layer];
            var position = s.Positions[r];
            if (scale == 0f || position < s.InjectionStart[slot] || position >= s.InjectionEnd[slot]) continue;
            Kernels.AddScaled(a.Row(r), s.InjectionVector(slot), scale);
        }
    }

    public void AddInjectionRmsNorm(DeviceTensor residual, DeviceTensor delta, int layer, IStepBuffers step, DeviceTensor weight, float eps,
        DeviceTensor output, int rows)
    {
        AddInjection(delta, layer, step, rows);
        AddRmsNorm(residual, delta, weight, eps, output, rows);
    }

    public void GatherLastRows(DeviceTensor x, IStepBuffers step, DeviceTensor output, int count)
    {
        var s = step.Host;
        for (var i = 0; i < count; i++) x.Act().Row(s.QueryStart[i + 1] - 1).CopyTo(output.Act().Row(i));
    }

    public void Copy(DeviceTensor x, DeviceTensor output, int rows) =>
        x.Act().Data.AsSpan(0, rows * x.Columns).CopyTo(output.Act().Data);

    public void Sample(DeviceTensor logits, IStepBuffers step, int count) => Ops.Sample.Run(logits.Act(), step.Host, count, _parallel);

    public void Dispose()
    {
    }
}

/// <summary>--device cpu: a <see cref="ModelRunner"/> over the <see cref="CpuBackend"/>.</summary>
public sealed class CpuRunnerFactory(int threads) : IRunnerFactory
{
    public string Device => "cpu";

    public int Threads => threads;

    public IModelRunner Create(ModelConfig config, WeightSource weights, RunnerOptions options, Action<string>? progress = null)
    {
        if (options.ExpertLayout != ExpertLayout.RowMajor)
            throw new InvalidOperationException("--expert-layout boxed is a layout for Hopper GPUs (--device cuda); the CPU backend reads the experts row-major");
        var backend = new CpuBackend(threads);
        try
        {
            var weightBytes = weights switch
            {
                CheckpointWeights c => c.TotalBytes,
                DummyWeights => MemoryPlan.WeightElements(config) * DType.BF16.ByteSize(),
                _ => throw new ArgumentException($"unknown weight source {weights.GetType().Name}"),
            };
            var limits = ModelRunner.Plan(backend, config, weightBytes, options);
            if (weights is CheckpointWeights checkpoint) return new ModelRunner(backend, config, checkpoint.Weights, limits, progress, options: options);
            var dummy = Checkpoint.CreateDummy(config, DType.BF16, ((DummyWeights)weights).Seed, threads, progress);
            try
            {
                return new ModelRunner(backend, config, MixtralWeights.Resolve(dummy, config), limits, progress, dummy, options);
            }
            catch
            {
                dummy.Dispose();
                throw;
            }
        }
        catch
        {
            backend.Dispose();
            throw;
        }
    }
}

/// <summary>Host memory available to this process: MemAvailable (Linux), else what the GC says the machine or container allows.</summary>
public static class HostMemory
{
    public static long AvailableBytes()
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/meminfo"))
            {
                if (!line.StartsWith("MemAvailable:", StringComparison.Ordinal)) continue;
                var kb = long.Parse(line.AsSpan(13).Trim().TrimEnd("kB").Trim(), System.Globalization.CultureInfo.InvariantCulture);
                return Math.Min(kb * 1024, GC.GetGCMemoryInfo().TotalAvailableMemoryBytes);
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException)
        {
        }
        return GC.GetGCMemoryInfo().TotalAvailableMemoryBytes;
    }
}
