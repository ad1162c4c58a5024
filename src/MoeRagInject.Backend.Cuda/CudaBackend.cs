using System.Globalization;
using MoeRagInject.Backend.Cuda.Interop;
using MoeRagInject.Model;

namespace MoeRagInject.Backend.Cuda;

/// <summary>
/// The CUDA backend: bf16 weights and GEMM inputs, fp32 residual stream and accumulation, kernels compiled by NVRTC
/// (Kernels/*.cu) and cuBLAS GEMMs, all enqueued on one stream so that a decode step can be captured as a graph and
/// replayed. The MoE block takes one of three paths by the step's rows (see Kernels/moe.cu); <c>--deterministic</c> keeps
/// to the kernels whose every output is one fixed-order reduction, whatever the batch.
/// </summary>
public sealed class CudaBackend : IBackend, IGraphCapable
{
    /// <summary>Rows up to which the MoE block runs every expert on every row (dense GEMMs), when routed slots exceed <see cref="SmallSlots"/>.</summary>
    public const int DenseMaxRows = 64;
    /// <summary>
    /// (row, k) slots up to which the MoE block runs the warp-per-feature kernels that read routed experts once. Measured on
    /// an H200 (Mixtral-8x7B shape): at 16 slots (batch 8) they reached a third of the bandwidth, the dense GEMMs about 70%.
    /// </summary>
    public const int SmallSlots = 8;
    /// <summary>Rows up to which projections use the warp-per-feature kernel instead of cuBLAS.</summary>
    public const int GemvMaxRows = 8;

    [ThreadStatic] private static CudaBackend? t_current;
    private readonly CudaKernels _kernels;
    private readonly CublasContext _cublas;
    private readonly DeviceBuffer _workspace;
    private readonly HashSet<string> _sharedRaised = [];
    private Dictionary<string, (int Index, bool IsNorm)>? _dummyNumbers;
    private ulong _dummySeed;
    private int _topK = 2;

    internal CudaBackend(CudaDevice device, bool deterministic, Action<string>? progress)
    {
        Device = device;
        t_current = this;
        Deterministic = deterministic;
        Stream = device.CreateStream();
        _kernels = new CudaKernels(device, progress);
        _cublas = device.CreateCublas();
        _workspace = device.Allocate(32L << 20);
        _cublas.SetWorkspace(_workspace);
        _cublas.SetStream(Stream);
        Description = string.Create(CultureInfo.InvariantCulture,
            $"cuda:{device.Ordinal} {device.Name} ({_kernels.Architecture}, {device.TotalMemoryBytes / 1e9:F0} GB, {device.MultiprocessorCount} SMs){(deterministic ? ", deterministic" : "")}");
    }

    internal CudaDevice Device { get; }
    internal CudaStream Stream { get; }
    public bool Deterministic { get; }

    public string Name => "cuda";
    public string Description { get; }

    public long AvailableMemoryBytes
    {
        get
        {
            EnsureCurrent();
            return Device.GetMemoryInfo().Free;
        }
    }

    public int WeightBytesPerElement(DType dtype) => 2;

    public long KvBytesPerTokenPerLayer(int kvHeads, int headDim) => 2L * kvHeads * headDim * 2;

    public long WorkspaceBytes(ModelConfig config, int maxRows, int maxSequences)
    {
        long h = config.HiddenSize, q = (long)config.NumHeads * config.HeadDim, kv = (long)config.NumKvHeads * config.HeadDim;
        var activations = (long)maxRows * (4 * h + 2 * h + 4 * (q + 2 * kv) + 2 * q + 4 * h) + (long)maxSequences * (2 * h + 4L * config.VocabSize);
        return activations + CudaStepBuffers.Bytes(config, maxRows, maxSequences, config.MaxPositionEmbeddings, DenseMaxRows) + (32L << 20);
    }

    /// <summary>Weights whose views carry no data are filled on the device with <see cref="Checkpoint.DummyValue"/>.</summary>
    internal void UseDummyWeights(ModelConfig config, ulong seed)
    {
        _dummyNumbers = MixtralWeightNames.Numbers(config);
        _dummySeed = seed;
    }

    internal void EnsureCurrent()
    {
        if (t_current == this) return;
        Device.MakeCurrent();
        t_current = this;
    }

    internal void Launch(string kernel, uint grid, uint block, params ReadOnlySpan<KernelArg> args) =>
        _kernels[kernel].Launch((grid, 1, 1), (block, 1, 1), 0, Stream, args);

    private void Launch3(string kernel, (uint, uint, uint) grid, uint block, uint shared, params ReadOnlySpan<KernelArg> args) =>
        _kernels[kernel].Launch(grid, (block, 1, 1), shared, Stream, args);

    // ---- Memory.

    public DeviceTensor UploadWeight(params TensorView[] parts)
    {
        EnsureCurrent();
        var columns = parts[0].RowLength;
        var rows = parts.Sum(p => p.Rows);
        var buffer = Device.Allocate(2L * rows * columns);
        long offset = 0;
        foreach (var part in parts)
        {
            if (part.RowLength != columns) throw new ArgumentException($"fused weight parts differ in width: {parts[0].Name} and {part.Name}");
            Store(part, buffer, offset);
            offset += 2L * part.Rows * columns;
        }
        return new CudaTensor(buffer, rows, columns, bf16: true);
    }

    public ExpertStack UploadExperts(IReadOnlyList<ExpertWeights> experts)
    {
        EnsureCurrent();
        int count = experts.Count, intermediate = experts[0].Gate.Rows, hidden = experts[0].Gate.RowLength;
        var gateUp = Device.Allocate(2L * count * 2 * intermediate * hidden);
        var down = Device.Allocate(2L * count * hidden * intermediate);
        for (var e = 0; e < count; e++)
        {
            Store(experts[e].Gate, gateUp, 2L * e * 2 * intermediate * hidden);
            Store(experts[e].Up, gateUp, 2L * (e * 2L * intermediate + intermediate) * hidden);
            Store(experts[e].Down, down, 2L * e * hidden * intermediate);
        }
        return new CudaExpertStack(gateUp, down, count, hidden, intermediate);
    }

    /// <summary>Writes one tensor as bf16 at a byte offset: copied as it is, converted from fp32/fp16 on the host, or (dummy) generated on the device.</summary>
    private unsafe void Store(TensorView view, DeviceBuffer destination, long byteOffset)
    {
        var elements = view.ElementCount;
        if (view.Pointer is null)
        {
            var (index, isNorm) = _dummyNumbers?[view.Name] ?? throw new InvalidOperationException($"tensor {view.Name} has no data");
            var grid = (uint)Math.Clamp((elements + 255) / 256, 1, 65536);
            Launch("fill_dummy", grid, 256, destination.Pointer + (ulong)byteOffset, elements, _dummySeed, index, isNorm ? 1 : 0);
            return;
        }
        const long chunk = 1L << 26;  // elements per host copy
        if (view.DType == DType.BF16)
        {
            for (long start = 0; start < elements; start += chunk)
            {
                var n = (int)Math.Min(chunk, elements - start);
                destination.Upload(new ReadOnlySpan<ushort>((ushort*)view.Pointer + start, n), Stream, byteOffset + 2 * start);
            }
            return;
        }
        var converted = new ushort[(int)Math.Min(chunk, elements)];
        var floats = new float[converted.Length];
        for (long start = 0; start < elements; start += chunk)
        {
            var n = (int)Math.Min(chunk, elements - start);
            view.ReadFloats(start, floats.AsSpan(0, n));
            for (var i = 0; i < n; i++) converted[i] = HalfConversion.FloatToBFloat16(floats[i]);
            destination.Upload<ushort>(converted.AsSpan(0, n), Stream, byteOffset + 2 * start);
        }
    }

    public DeviceTensor Allocate(int rows, int columns, ActivationKind kind = ActivationKind.Float32)
    {
        EnsureCurrent();
        var bf16 = kind == ActivationKind.GemmInput;
        return new CudaTensor(Device.Allocate((long)rows * columns * (bf16 ? 2 : 4)), rows, columns, bf16);
    }

    public IKvCache CreateKvCache(int layers, int numBlocks, int blockSize, int kvHeads, int headDim)
    {
        EnsureCurrent();
        var bytes = 2L * layers * numBlocks * blockSize * kvHeads * headDim;
        var keys = Device.Allocate(bytes);
        var values = Device.Allocate(bytes);
        return new CudaKvCache(keys, values, numBlocks, blockSize, kvHeads * headDim);
    }

    public IStepBuffers CreateStepBuffers(StepState host)
    {
        EnsureCurrent();
        _topK = host.ExpertsPerToken;
        return new CudaStepBuffers(this, host, DenseMaxRows);
    }

    public void Download(DeviceTensor source, int rows, Span<float> destination)
    {
        EnsureCurrent();
        var t = (CudaTensor)source;
        var n = rows * t.Columns;
        if (!t.IsBf16)
        {
            t.Buffer.Download(destination[..n], Stream);
            return;
        }
        var raw = new ushort[n];
        t.Buffer.Download<ushort>(raw, Stream);
        for (var i = 0; i < n; i++) destination[i] = BitConverter.UInt32BitsToSingle((uint)raw[i] << 16);
    }

    public void Upload(ReadOnlySpan<float> source, DeviceTensor destination)
    {
        EnsureCurrent();
        var t = (CudaTensor)destination;
        if (!t.IsBf16)
        {
            t.Buffer.Upload(source, Stream);
            return;
        }
        var raw = new ushort[source.Length];
        for (var i = 0; i < raw.Length; i++) raw[i] = HalfConversion.FloatToBFloat16(source[i]);
        t.Buffer.Upload<ushort>(raw, Stream);
    }

    // ---- Ops.

    private static CudaTensor T(DeviceTensor t) => (CudaTensor)t;

    private static CudaStepBuffers S(IStepBuffers s) => (CudaStepBuffers)s;

    public void Embed(DeviceTensor table, IStepBuffers step, DeviceTensor hidden, int rows) =>
        Launch("embed", (uint)rows, 256, T(table).Pointer, S(step).TokenIds, T(hidden).Pointer, T(hidden).Columns, T(table).Rows);

    /// <summary>Blocks of 256 columns across a row: small batches still spread over the multiprocessors.</summary>
    private static uint ColumnBlocks(int columns) => (uint)((columns + 255) / 256);

    /// <summary>Threads of a norm block: the whole row in one pass for small batches.</summary>
    private const uint NormThreads = 1024;

    public void RmsNorm(DeviceTensor x, DeviceTensor weight, float eps, DeviceTensor output, int rows) =>
        Launch("rms_norm", (uint)rows, NormThreads, T(x).Pointer, T(weight).Pointer, T(output).Pointer, T(x).Columns, eps);

    public void AddRmsNorm(DeviceTensor residual, DeviceTensor delta, DeviceTensor weight, float eps, DeviceTensor output, int rows) =>
        Launch("add_rms_norm", (uint)rows, NormThreads, T(residual).Pointer, T(delta).Pointer, T(weight).Pointer, T(output).Pointer, T(residual).Columns, eps);

    public void Linear(DeviceTensor x, DeviceTensor weight, DeviceTensor output, int rows)
    {
        var (a, w, y) = (T(x), T(weight), T(output));
        if (!a.IsBf16 || !w.IsBf16 || y.IsBf16) throw new ArgumentException("linear: bf16 input and weight, fp32 output expected");
        if (Deterministic || rows <= GemvMaxRows)
        {
            // Rows per pass: as few accumulators as the rows need (more warps resident), at most 8.
            var perPass = Math.Min(GemvMaxRows, Bound(rows));
            Launch3($"linear_rows_t{perPass}", ((uint)((w.Rows + 7) / 8), (uint)((rows + perPass - 1) / perPass), 1), 256, 0,
                a.Pointer, w.Pointer, y.Pointer, rows, w.Rows, w.Columns);
            return;
        }
        _cublas.GemmBf16(rows, w.Rows, w.Columns, a.Pointer, w.Pointer, y.Pointer);
    }

    public void RotaryAndCacheWrite(DeviceTensor qkv, IKvCache cache, int layer, AttentionShape shape, IStepBuffers step, int rows)
    {
        var kv = (CudaKvCache)cache;
        Launch3("rope_kv_write", ((uint)rows, (uint)(shape.Heads + shape.KvHeads), 1), (uint)Math.Max(32, (shape.HeadDim / 2 + 31) / 32 * 32), 0, T(qkv).Pointer, kv.KeysOf(layer), kv.ValuesOf(layer), S(step).Positions, S(step).KvSlots,
            shape.Heads, shape.KvHeads, shape.HeadDim, shape.RopeTheta, shape.QkvWidth);
    }

    public void Attention(DeviceTensor qkv, IKvCache cache, int layer, AttentionShape shape, IStepBuffers step, DeviceTensor output, int rows)
    {
        var kv = (CudaKvCache)cache;
        var s = S(step);
        var group = shape.Heads / shape.KvHeads;
        var perLane = (shape.HeadDim + 31) / 32;
        var groupBound = Bound(group);
        var laneBound = Bound(perLane);
        if (groupBound > 8 || laneBound > 8) throw new NotSupportedException($"attention: {group} query heads per KV head or head_dim {shape.HeadDim} is beyond this kernel (at most 8 and 256)");
        var name = $"attention_g{groupBound}_d{laneBound}";
        var shared = (uint)(AttentionWarps * group * shape.HeadDim * 4);
        if (shared > 48 * 1024 && _sharedRaised.Add(name)) _kernels[name].SetMaxDynamicSharedMemory((int)shared);
        Launch3(name, ((uint)rows, (uint)shape.KvHeads, 1), 32 * AttentionWarps, shared,
            T(qkv).Pointer, kv.KeysOf(layer), kv.ValuesOf(layer), T(output).Pointer, s.Positions, s.RowSequence, s.SeqSlot,
            s.BlockTables, s.Host.Limits.MaxBlocksPerSequence, kv.BlockSize, shape.Heads, shape.KvHeads, shape.HeadDim,
            shape.SlidingWindow ?? 0, 1f / MathF.Sqrt(shape.HeadDim), shape.QkvWidth);
    }

    /// <summary>Warps of an attention block (ATT_WARPS in attention.cu).</summary>
    private const int AttentionWarps = 16;

    private static int Bound(int n) => n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : n <= 8 ? 8 : 16;  // the instantiated bounds

    public void Route(DeviceTensor x, DeviceTensor routerWeight, int layer, int topK, IStepBuffers step, int rows)
    {
        var s = S(step);
        var w = T(routerWeight);
        if (w.Rows > 64) throw new NotSupportedException($"the router kernel handles at most 64 experts, not {w.Rows}");
        Launch("route", (uint)rows, 256, T(x).Pointer, w.Pointer, w.Columns, w.Rows, topK, s.RowSequence, s.SeqSlot, s.TopIds, s.TopWeights,
            s.RowEntropies, layer, s.Host.Layers);
    }

    private enum MoePath { Small, Dense, Grouped }

    private MoePath PathFor(int rows, int topK) =>
        Deterministic || rows * topK <= SmallSlots ? MoePath.Small : rows <= DenseMaxRows ? MoePath.Dense : MoePath.Grouped;

    public void MoeExperts(DeviceTensor x, ExpertStack experts, int topK, IStepBuffers step, DeviceTensor output, int rows)
    {
        var stack = (CudaExpertStack)experts;
        var s = S(step);
        var input = T(x);
        var delta = T(output);
        int e = stack.Count, h = stack.Hidden, i = stack.Intermediate, slots = rows * topK;
        switch (PathFor(rows, topK))
        {
            case MoePath.Small:
            {
                // Slots per pass over an expert's weights: enough for every slot routed to it (at most all slots), at most 16.
                var perPass = Math.Min(16, Bound(slots));
                Launch3($"moe_small_gate_up_t{perPass}", ((uint)e, (uint)((i + 7) / 8), 1), 256, 0, input.Pointer, stack.GateUp, s.TopIds, s.MoeAct, slots, topK, h, i);
                Launch3($"moe_small_down_t{perPass}", ((uint)e, (uint)((h + 7) / 8), 1), 256, 0, s.MoeAct, stack.Down, s.TopIds, s.TopWeights, s.MoeOut, slots, h, i);
                Launch3("moe_combine_slots", ((uint)rows, ColumnBlocks(h), 1), 256, 0, s.MoeOut, s.TopIds, delta.Pointer, topK, h);
                break;
            }
            case MoePath.Dense:
                // Every expert on every row: [E, rows, 2I] = x · gate_upᵀ, silu·mul, [E, rows, H] = act · downᵀ; each row sums its own.
                _cublas.GemmBf16Batched(rows, 2 * i, h, input.Pointer, 0, stack.GateUp.Pointer, 2L * i * h, s.MoeGateUp.Pointer, (long)rows * 2 * i, e);
                Launch("moe_silu_mul", (uint)(e * rows), 256, s.MoeGateUp, s.MoeAct, i);
                _cublas.GemmBf16Batched(rows, h, i, s.MoeAct.Pointer, (long)rows * i, stack.Down.Pointer, (long)h * i, s.MoeOut.Pointer, (long)rows * h, e);
                Launch3("moe_combine_dense", ((uint)rows, ColumnBlocks(h), 1), 256, 0, s.MoeOut, s.TopIds, s.TopWeights, delta.Pointer, rows, topK, h);
                break;
            default:
                Grouped(input, stack, topK, s, delta, rows);
                break;
        }
    }

    /// <summary>The grouped path: slots sorted by expert on the device, their counts read back (a host synchronisation), one GEMM pair per expert.</summary>
    private void Grouped(CudaTensor input, CudaExpertStack stack, int topK, CudaStepBuffers s, CudaTensor delta, int rows)
    {
        int e = stack.Count, h = stack.Hidden, i = stack.Intermediate, slots = rows * topK;
        Launch("moe_align", 1, (uint)(32 * Math.Min(e, 32)), s.TopIds, slots, e, s.Offsets, s.Sorted, s.PlaceOf);
        Launch("moe_gather", (uint)slots, 128, input.Pointer, s.Sorted, s.Offsets, e, s.MoeInputs, topK, h);
        var offsets = new int[e + 1];
        s.Offsets.Download<int>(offsets, Stream);
        for (var x = 0; x < e; x++)
        {
            var n = offsets[x + 1] - offsets[x];
            if (n == 0) continue;
            _cublas.GemmBf16(n, 2 * i, h, s.MoeInputs.Pointer + 2UL * (ulong)offsets[x] * (ulong)h,
                stack.GateUp.Pointer + 2UL * (ulong)x * 2 * (ulong)i * (ulong)h, s.MoeGateUp.Pointer + 4UL * (ulong)offsets[x] * 2 * (ulong)i);
        }
        var total = offsets[e];
        if (total > 0) Launch("moe_silu_mul", (uint)total, 256, s.MoeGateUp, s.MoeAct, i);
        for (var x = 0; x < e; x++)
        {
            var n = offsets[x + 1] - offsets[x];
            if (n == 0) continue;
            _cublas.GemmBf16(n, h, i, s.MoeAct.Pointer + 2UL * (ulong)offsets[x] * (ulong)i,
                stack.Down.Pointer + 2UL * (ulong)x * (ulong)h * (ulong)i, s.MoeOut.Pointer + 4UL * (ulong)offsets[x] * (ulong)h);
        }
        Launch3("moe_combine_grouped", ((uint)rows, ColumnBlocks(h), 1), 256, 0, s.MoeOut, s.PlaceOf, s.TopWeights, delta.Pointer, topK, h);
    }

    public void AddInjection(DeviceTensor x, int layer, IStepBuffers step, int rows)
    {
        var s = S(step);
        Launch("add_injection", (uint)rows, 256, T(x).Pointer, s.InjectionVectors, s.InjectionScales, s.InjectionStarts, s.InjectionEnds,
            s.Positions, s.RowSequence, s.SeqSlot, layer, s.Host.Layers, T(x).Columns);
    }

    public void GatherLastRows(DeviceTensor x, IStepBuffers step, DeviceTensor output, int count)
    {
        var (a, o) = (T(x), T(output));
        if (!a.IsBf16 || !o.IsBf16) throw new ArgumentException("gather: bf16 rows expected");
        Launch("gather_last_rows", (uint)count, 128, a.Pointer, o.Pointer, S(step).QueryStart, a.Columns);
    }

    public void Copy(DeviceTensor x, DeviceTensor output, int rows)
    {
        var (a, o) = (T(x), T(output));
        a.Buffer.CopyTo(o.Buffer, (long)rows * a.Columns * (a.IsBf16 ? 2 : 4), Stream);
    }

    public void Sample(DeviceTensor logits, IStepBuffers step, int count)
    {
        var s = S(step);
        var l = T(logits);
        Launch("sample", (uint)count, 1024, l.Pointer, s.SampleWork, l.Columns, s.QueryStart, s.SeqSlot, s.SeqFlags, s.Uniforms,
            s.SlotParams, s.Suppressed, s.Counts, s.PromptMask, s.RowEntropies, s.Host.Layers,
            s.OutTokens, s.OutLogprobs, s.OutEntropy, s.OutRouter, s.OutStatus);
    }

    // ---- Graphs.

    public bool CanCapture(int rows) => PathFor(rows, _topK) != MoePath.Grouped;

    public IDisposable Capture(Action enqueue)
    {
        EnsureCurrent();
        Stream.BeginCapture();
        try
        {
            enqueue();
        }
        catch
        {
            using var abandoned = Stream.EndCapture();
            throw;
        }
        using var graph = Stream.EndCapture();
        return graph.Instantiate();
    }

    public void Replay(IDisposable graph) => ((CudaGraphExec)graph).Launch(Stream);

    private bool _disposed;

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        EnsureCurrent();
        Stream.Synchronize();
        _cublas.Dispose();
        _workspace.Dispose();
        _kernels.Dispose();
        Stream.Dispose();
        Device.Dispose();
    }
}
