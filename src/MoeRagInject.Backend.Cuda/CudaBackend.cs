using System.Globalization;
using MoeRagInject.Backend.Cuda.Interop;
using MoeRagInject.Model;

namespace MoeRagInject.Backend.Cuda;

/// <summary>
/// The CUDA backend: bf16 weights and GEMM inputs, fp32 residual stream and accumulation, kernels compiled by NVRTC
/// (Kernels/*.cu) and cuBLAS GEMMs, all enqueued on one stream so that a decode step can be captured as a graph and
/// replayed. The MoE block takes a path by the step's rows (<see cref="MoePath"/>: warp-per-feature kernels for one row,
/// the wgmma grouped GEMMs of Kernels/gemm_wgmma.cu on Hopper up to <see cref="WgmmaMaxRows"/> and their TMA-fed,
/// warp-specialised form up to <see cref="TmaMaxRows"/> (elsewhere the mma.sync ones of Kernels/gemm.cu up to
/// <see cref="TensorMaxRows"/>), cuBLAS per expert above); attention takes tensor-core
/// kernels (flash-style for prompt rows, one warp per row and KV head for decode rows). <c>--deterministic</c> keeps to
/// kernels whose every output is one fixed-order reduction whatever the batch (the tile kernels at every row count, k
/// split by the weight's shape alone, the decode attention kernel for every row, its keys in a fixed number of splits).
/// </summary>
public sealed partial class CudaBackend : IBackend, IGraphCapable
{
    /// <summary>
    /// Rows up to which the dense path (every expert on every row, strided-batched cuBLAS) can run: kept only to be measured
    /// against (gemm-bench, MOE_RAG_INJECT_MOE_PATH=dense); its buffers are sized for this many rows per expert.
    /// </summary>
    public const int DenseMaxRows = 64;
    /// <summary>
    /// (row, k) slots up to which the MoE block runs the warp-per-feature kernels that read routed experts once (one row, with
    /// top-2). Measured on an H200 at Mixtral-8x7B's shape (check-device --groups gemm-bench): 0.17 ms a layer at batch 1
    /// against 0.26 for the tensor-core kernel; from 2 rows on the tensor-core kernel is as fast or ahead (0.33 ms at 2 rows
    /// either way, 0.48 against 0.61 at 4).
    /// </summary>
    public const int SmallSlots = 2;
    /// <summary>
    /// Rows up to which projections use the warp-per-feature kernel instead of cuBLAS: measured, only a single row gains
    /// (0.007 against 0.011 ms for a 4096² projection); at 8 rows it took 0.077 ms where cuBLAS takes 0.016.
    /// </summary>
    public const int GemvMaxRows = 1;

    [ThreadStatic] private static CudaBackend? t_current;
    private readonly CudaKernels _kernels;
    private readonly CublasContext _cublas;
    private readonly CublasLtGemms _expertGemms;
    private readonly DeviceBuffer _workspace;
    private readonly Action<string>? _progress;
    private readonly HashSet<string> _sharedRaised = [];
    private Dictionary<string, (int Index, bool IsNorm)>? _dummyNumbers;
    private ulong _dummySeed;
    private int _topK = 2;
    private readonly OpProfile? _profile;

    /// <summary>Times an op when profiling (<see cref="OpProfile"/>); otherwise, and while capturing, does nothing.</summary>
    private OpProfile.Scope Op(string name) => _profile is { } p && !_capturing ? p.Time(name) : default;

    internal CudaBackend(CudaDevice device, bool deterministic, Action<string>? progress)
    {
        Device = device;
        t_current = this;
        Deterministic = deterministic;
        Stream = device.CreateStream();
        // Programmatic dependent launch by default; not under --deterministic, whose batch-1 step it slowed by 7% (9.37 →
        // 10.02 ms in a same-run comparison on an H200, three sessions ago) while the default step was unchanged or faster.
        // MOE_RAG_INJECT_PDL=1 turns it on there too, to measure again (it changes no result: only when blocks start).
        _kernels = new CudaKernels(device, progress,
            programmaticLaunch: !deterministic || Environment.GetEnvironmentVariable("MOE_RAG_INJECT_PDL") == "1");
        _cublas = device.CreateCublas();
        _workspace = device.Allocate(32L << 20);
        _cublas.SetWorkspace(_workspace);
        _cublas.SetStream(Stream);
        _expertGemms = device.CreateCublasLt(Stream, _workspace);
        _progress = progress;
        _profile = OpProfile.FromEnvironment(device, Stream);
        Description = string.Create(CultureInfo.InvariantCulture,
            $"cuda:{device.Ordinal} {device.Name} ({_kernels.Architecture}, {device.TotalMemoryBytes / 1e9:F0} GB, {device.MultiprocessorCount} SMs){(deterministic ? ", deterministic" : "")}");
    }

    internal CudaDevice Device { get; }

    /// <summary>The cuBLASLt GEMMs with an algorithm kept for each shape (the expert GEMMs of prefill chunks; gemm-bench's candidates).</summary>
    internal CublasLtGemms LtGemms => _expertGemms;
    internal CudaStream Stream { get; }
    public bool Deterministic { get; }

    public string Name => "cuda";
    public string Description { get; }

    /// <summary>
    /// The kernels whose wgmma instructions ptxas serialised when it compiled this program, by its advice (C7514, C7515, C7520;
    /// <see cref="CudaKernels.SerialisedWgmma"/>): empty when every wgmma pipeline stayed in flight.
    /// </summary>
    public IReadOnlyList<string> SerialisedWgmmaKernels => CudaKernels.SerialisedWgmma(_kernels.CompilerMessages);

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
        return activations + CudaStepBuffers.Bytes(config, maxRows, maxSequences, config.MaxPositionEmbeddings, DenseMaxRows) + (32L << 20)
            + SplitWorkspaceBytes(config, maxRows, maxSequences) + AttentionPartialBound(config, maxRows, AttentionSplits);
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

    internal void Launch(string kernel, uint grid, uint block, params ReadOnlySpan<KernelArg> args)
    {
        if (!TimingSkips(kernel)) _kernels[kernel].Launch((grid, 1, 1), (block, 1, 1), 0, Stream, args);
    }

    private void Launch3(string kernel, (uint, uint, uint) grid, uint block, uint shared, params ReadOnlySpan<KernelArg> args)
    {
        if (!TimingSkips(kernel)) _kernels[kernel].Launch(grid, (block, 1, 1), shared, Stream, args);
    }

    /// <summary>
    /// MOE_RAG_INJECT_TIMING_SKIP=prefix[,prefix…], for measuring only: kernels whose names start with one of the prefixes
    /// (and with <c>cublas</c>, the cuBLAS projections) are not launched, so that a bench's step time with and without
    /// them says what they cost inside a replayed graph, where the op profile's timing events cannot look. Every result
    /// is then wrong, and so are the activations, which the routing follows: the expert GEMMs' work can change too (with
    /// dummy weights, leaving out a layer's last norm, the gather or the combine made a batch-256 step 7 ms longer).
    /// </summary>
    private static readonly string[] s_timingSkip =
        (Environment.GetEnvironmentVariable("MOE_RAG_INJECT_TIMING_SKIP") ?? "").Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);

    private static bool TimingSkips(string kernel) => s_timingSkip.Length > 0 && s_timingSkip.Any(p => kernel.StartsWith(p, StringComparison.Ordinal));

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
        var stack = new CudaExpertStack(gateUp, down, count, hidden, intermediate);
        BoxInPlace(stack);
        return stack;
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
        // The tensor-core attention kernels find a key's block by shifting its position.
        if (!System.Numerics.BitOperations.IsPow2(blockSize))
            throw new NotSupportedException($"the CUDA backend takes KV blocks of a power-of-two size, not {blockSize}");
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
        EnsureSplitWorkspace(SplitWorkspaceBytes(host.Config, host.Limits.MaxRows, host.Limits.MaxSequences));
        EnsureAttentionPartial(AttentionPartialBound(host.Config, host.Limits.MaxRows, AttentionSplits));
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

    public void Embed(DeviceTensor table, IStepBuffers step, DeviceTensor hidden, int rows)
    {
        if (!_capturing) _profile?.Step(rows);
        using var _ = Op("embed");
        Launch("embed", (uint)rows, 256, T(table).Pointer, S(step).TokenIds, T(hidden).Pointer, T(hidden).Columns, T(table).Rows);
    }

    /// <summary>Blocks of 256 columns across a row: small batches still spread over the multiprocessors.</summary>
    private static uint ColumnBlocks(int columns) => (uint)((columns + 255) / 256);

    /// <summary>
    /// Threads of a norm or router block (one row a block, held in registers, ROW_HELD chunks of 4 a thread): 1,024 while
    /// the rows are no more than the multiprocessors (the row's loads spread over as many threads as possible) and always
    /// under --deterministic (the block size sets the order of a row's sums, which must not change with the batch); 256
    /// above, so that several rows share a multiprocessor (the op profile on an H200 had the 1,024-thread norm and router
    /// at 125 µs for a 1,969-row prefill chunk, 10 times what its bytes take). route and router_probe take the same count,
    /// so their logits are the fused kernel's bit for bit.
    /// </summary>
    private uint NormThreads(int rows, int hidden)
    {
        if (hidden % 8 != 0 || hidden > 16 * 1024)
            throw new NotSupportedException($"the norm and router kernels take rows of a multiple of 8 up to 16,384 elements, not {hidden}");
        var threads = Deterministic || rows <= Device.MultiprocessorCount ? 1024 : 256;
        return (uint)Math.Max(threads, (hidden / 16 + 31) / 32 * 32);
    }

    public void RmsNorm(DeviceTensor x, DeviceTensor weight, float eps, DeviceTensor output, int rows)
    {
        using var _ = Op("rms_norm");
        Launch("rms_norm", (uint)rows, NormThreads(rows, T(x).Columns), T(x).Pointer, T(weight).Pointer, T(output).Pointer, T(x).Columns, eps);
    }

    public void AddRmsNorm(DeviceTensor residual, DeviceTensor delta, DeviceTensor weight, float eps, DeviceTensor output, int rows)
    {
        using var _ = Op("add_rms_norm");
        Launch("add_rms_norm", (uint)rows, NormThreads(rows, T(residual).Columns), T(residual).Pointer, T(delta).Pointer, T(weight).Pointer, T(output).Pointer, T(residual).Columns, eps);
    }

    public void Linear(DeviceTensor x, DeviceTensor weight, DeviceTensor output, int rows)
    {
        var (a, w, y) = (T(x), T(weight), T(output));
        using var _ = Op($"linear {w.Rows}x{w.Columns}");
        if (!a.IsBf16 || !w.IsBf16 || y.IsBf16) throw new ArgumentException("linear: bf16 input and weight, fp32 output expected");
        var path = LinearPathForced ?? (Deterministic ? LinearPath.Wgmma : rows <= GemvMaxRows ? LinearPath.Gemv : LinearPath.Cublas);
        if (path == LinearPath.Wgmma && (!WgmmaAvailable || w.Columns % 64 != 0)) path = LinearPath.Tensor;
        if (path == LinearPath.Wgmma)
        {
            // --deterministic on Hopper: wgmma at every row count, k split by a count from the weight's shape and the card
            // alone, partial sums added in split order: each row's reduction is the same whatever the batch.
            if ((long)rows * w.Columns >= int.MaxValue) throw new NotSupportedException($"wgmma linear: {rows} rows of {w.Columns} exceed 32-bit offsets");
            var n = WgmmaNForced ?? WgmmaRows(rows);
            var splits = WgmmaSplitsFor(w.Rows);
            var stride = (long)rows * w.Rows;
            if (splits > 1) EnsureSplitWorkspace(4L * splits * stride);
            var tile = new WgmmaTile(n, 64);
            LaunchWgmma(tile, gateUp: false, ((uint)((rows + n - 1) / n), tile.FeatureTiles(gateUp: false, w.Rows), (uint)splits),
                a.Pointer, w.Pointer, 0UL, 0UL, 1, rows, 1, w.Rows, w.Columns, 0UL, splits > 1 ? _splitWorkspace!.Pointer : y.Pointer, stride);
            if (splits > 1)
                Launch3("gemm_split_sum", ((uint)rows, ColumnBlocks(w.Rows), 1), 256, 0, _splitWorkspace!.Pointer, y.Pointer, 0UL, 1, rows,
                    w.Rows, splits, stride);
            return;
        }
        if (path == LinearPath.Tensor)
        {
            // The tensor-core kernel at every row count: each row's reduction is the same whatever the batch.
            GemmGrouped(gateUp: false, a.Pointer, w.Pointer, 0, 0, 1, rows, 1, w.Rows, w.Columns, y.Pointer, rows);
            return;
        }
        if (path == LinearPath.Gemv)
        {
            // Rows per pass: as few accumulators as the rows need (more warps resident), at most 8.
            var perPass = Math.Min(GemvMaxRows, Bound(rows));
            Launch3($"linear_rows_t{perPass}", ((uint)((w.Rows + 7) / 8), (uint)((rows + perPass - 1) / perPass), 1), 256, 0,
                a.Pointer, w.Pointer, y.Pointer, rows, w.Rows, w.Columns);
            return;
        }
        if (!TimingSkips("cublas")) _cublas.GemmBf16(rows, w.Rows, w.Columns, a.Pointer, w.Pointer, y.Pointer);
    }

    private static int Bound(int n) => n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : n <= 8 ? 8 : 16;  // the instantiated bounds

    public void Route(DeviceTensor x, DeviceTensor routerWeight, int layer, int topK, IStepBuffers step, int rows)
    {
        var s = S(step);
        var w = T(routerWeight);
        using var _ = Op("route");
        if (w.Rows > 64) throw new NotSupportedException($"the router kernel handles at most 64 experts, not {w.Rows}");
        Launch("route", (uint)rows, NormThreads(rows, w.Columns), T(x).Pointer, w.Pointer, w.Columns, w.Rows, topK, s.RowSequence, s.SeqSlot, s.TopIds, s.TopWeights,
            s.RowEntropies, layer, s.Host.Layers);
    }

    public void AddRmsNormRoute(DeviceTensor residual, DeviceTensor delta, DeviceTensor weight, float eps, DeviceTensor output,
        DeviceTensor routerWeight, int layer, int topK, IStepBuffers step, int rows)
    {
        if (_unfused)
        {
            AddRmsNorm(residual, delta, weight, eps, output, rows);
            Route(output, routerWeight, layer, topK, step, rows);
            return;
        }
        var s = S(step);
        var w = T(routerWeight);
        using var _ = Op("add_rms_norm_route");
        if (w.Rows > 64) throw new NotSupportedException($"the router kernel handles at most 64 experts, not {w.Rows}");
        Launch("add_rms_norm_route", (uint)rows, NormThreads(rows, T(residual).Columns), T(residual).Pointer, T(delta).Pointer, T(weight).Pointer, T(output).Pointer,
            T(residual).Columns, eps, w.Pointer, w.Rows, topK, s.RowSequence, s.SeqSlot, s.TopIds, s.TopWeights, s.RowEntropies, layer,
            s.Host.Layers);
    }

    /// <summary>MOE_RAG_INJECT_FUSE=0: the fused ops run as their parts, to measure the fusion against.</summary>
    private readonly bool _unfused = Environment.GetEnvironmentVariable("MOE_RAG_INJECT_FUSE") == "0";

    public void AddInjection(DeviceTensor x, int layer, IStepBuffers step, int rows)
    {
        var s = S(step);
        using var _ = Op("add_injection");
        Launch("add_injection", (uint)rows, 256, T(x).Pointer, s.InjectionVectors, s.InjectionScales, s.InjectionStarts, s.InjectionEnds,
            s.Positions, s.RowSequence, s.SeqSlot, layer, s.Host.Layers, T(x).Columns);
    }

    public void AddInjectionRmsNorm(DeviceTensor residual, DeviceTensor delta, int layer, IStepBuffers step, DeviceTensor weight, float eps,
        DeviceTensor output, int rows)
    {
        if (_unfused)
        {
            AddInjection(delta, layer, step, rows);
            AddRmsNorm(residual, delta, weight, eps, output, rows);
            return;
        }
        var s = S(step);
        using var _ = Op("add_injection_rms_norm");
        Launch("add_injection_rms_norm", (uint)rows, NormThreads(rows, T(residual).Columns), T(residual).Pointer, T(delta).Pointer, T(weight).Pointer, T(output).Pointer,
            T(residual).Columns, eps, s.InjectionVectors, s.InjectionScales, s.InjectionStarts, s.InjectionEnds, s.Positions, s.RowSequence,
            s.SeqSlot, layer, s.Host.Layers);
    }

    public void GatherLastRows(DeviceTensor x, IStepBuffers step, DeviceTensor output, int count)
    {
        var (a, o) = (T(x), T(output));
        if (!a.IsBf16 || !o.IsBf16) throw new ArgumentException("gather: bf16 rows expected");
        using var _ = Op("gather_last_rows");
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
        using var _ = Op("sample");
        Launch("sample", (uint)count, 1024, l.Pointer, s.SampleWork, l.Columns, s.QueryStart, s.SeqSlot, s.SeqFlags, s.Uniforms,
            s.SlotParams, s.Suppressed, s.Counts, s.PromptMask, s.RowEntropies, s.Host.Layers,
            s.OutTokens, s.OutLogprobs, s.OutEntropy, s.OutRouter, s.OutStatus);
    }

    // ---- Graphs.

    private bool _capturing;
    private int _captures;

    public bool CanCapture(int rows) => _profile is null && PathFor(rows, _topK) != MoePath.Cublas;

    public IDisposable Capture(Action enqueue)
    {
        EnsureCurrent();
        Stream.BeginCapture();
        _capturing = true;
        try
        {
            enqueue();
        }
        catch
        {
            using var abandoned = Stream.EndCapture();
            throw;
        }
        finally
        {
            _capturing = false;
        }
        using var graph = Stream.EndCapture();
        _captures++;
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
        if (_profile is not null)
        {
            Console.Error.Write(_profile.Report());
            _profile.Dispose();
        }
        _expertGemms.Dispose();
        _cublas.Dispose();
        _workspace.Dispose();
        _splitWorkspace?.Dispose();
        _attentionPartial?.Dispose();
        foreach (var map in _tensorMaps.Values) map.Dispose();
        _kernels.Dispose();
        Stream.Dispose();
        Device.Dispose();
    }

    // ---- The router probe (--trigger-signal router-probe; Kernels/probe.cu).

    public void RouterProbe(DeviceTensor x, DeviceTensor routerWeight, DeviceTensor probe, int layer, IStepBuffers step, int rows)
    {
        var s = S(step);
        var w = T(routerWeight);
        var weights = T(probe);
        if (w.Rows > 64) throw new NotSupportedException($"the router probe kernel handles at most 64 experts, not {w.Rows}");
        if (weights.IsBf16 || weights.Columns != w.Rows) throw new ArgumentException("router probe: fp32 weights [layers, experts] expected");
        Launch("router_probe", (uint)rows, NormThreads(rows, w.Columns), T(x).Pointer, w.Pointer, w.Columns, w.Rows, weights.Pointer, s.RowSequence, s.SeqSlot,
            s.QueryStart, s.RouterProbs, s.ProbeSums, s.OutProbe, layer, s.Host.Layers);
    }
}
