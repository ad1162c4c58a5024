using System.Diagnostics;
using System.Globalization;
using MoeRagInject.Backend.Cuda.Interop;
using MoeRagInject.Model;

namespace MoeRagInject.Backend.Cuda;

/// <summary>
/// The CUDA backend's MoE block (its paths by rows, Kernels/moe.cu, gemm.cu, gemm_wgmma.cu, cuBLAS per expert) and the
/// grouped tensor-core GEMMs it shares with the projections.
/// </summary>
public sealed partial class CudaBackend
{
    /// <summary>
    /// How the MoE block runs: <c>Small</c>, warp-per-feature kernels for a few routed slots; <c>Tensor</c> (mma.sync) and
    /// <c>Wgmma</c> (Hopper), rows grouped by expert on the device and tensor-core grouped GEMMs that read each touched
    /// expert once (graph-capturable); <c>Tma</c> (Hopper), the same fed by tensor-memory-access copies, warp-specialised;
    /// <c>TmaTokens</c> (Hopper, prefill chunks when asked or when the experts are boxed), the same with 128 group rows
    /// against 256 weight rows a tile; <c>Dense</c>, every expert on every row by strided-batched cuBLAS; <c>Cublas</c>, one cuBLAS GEMM per expert after a
    /// host read of the group sizes (eager only). The last two are kept to be measured against (MOE_RAG_INJECT_MOE_PATH).
    /// </summary>
    internal enum MoePath { Small, Tensor, Wgmma, Tma, TmaTokens, Dense, Cublas }

    private MoePath? _moePathOverride = Environment.GetEnvironmentVariable("MOE_RAG_INJECT_MOE_PATH") is { Length: > 0 } forced
        ? Enum.Parse<MoePath>(forced, ignoreCase: true) : null;

    /// <summary>
    /// Rows above which the MoE block takes cuBLAS per expert (eager) instead of the tensor-core kernel. Measured on an H200 at
    /// Mixtral-8x7B's shape: at 128 rows the tensor-core kernel takes 0.74 ms a layer against 0.84; at 256 rows 1.22 against
    /// 0.91, and at 2,048 rows 5.5 against 2.4 (cuBLAS's Hopper kernels compute about twice as fast as ours).
    /// </summary>
    public const int TensorMaxRows = 128;

    /// <summary>
    /// Rows up to which the MoE block takes the wgmma kernel (gemm_wgmma.cu) on a Hopper card, above which the TMA-fed
    /// kernels (<see cref="TmaMaxRows"/>). Measured on an H200 at Mixtral-8x7B's shape, the engine's decode step with the
    /// TMA kernels against wgmma in one call (docs/gpu-runs/9-ab-experts-projections.txt): batch 8 21.52 against 21.92 ms,
    /// 16 23.04 against 23.93, 32 24.23 against 25.09; at batch 2 and 4 wgmma ahead, 12.04 against 12.17 and 16.50
    /// against 17.22. In gemm-bench's hot loop wgmma looked ahead at 8 rows (0.489 against 0.524 ms a layer; L2 then holds
    /// part of what a step reads from memory); at 64 and 128 rows the TMA kernels were ahead there too
    /// (docs/gpu-runs/8-gemm-bench-tma.txt, 9-gemm-bench.txt).
    /// </summary>
    public const int WgmmaMaxRows = 7;

    /// <summary>
    /// Rows up to which the MoE block takes the TMA-fed kernels, above which cuBLAS per expert (prefill chunks). Measured
    /// on an H200 at Mixtral-8x7B's shape (gemm-bench, ms a layer, against cuBLAS per expert, in one run;
    /// docs/gpu-runs/8-gemm-bench-tma.txt): 0.685 against 0.825 at 64 rows, 0.754 against 0.926 at 256 (3.74 TB/s), 1.132
    /// against 1.024 at 512, 2.85 against 2.54 at 2,048 (507 against 569 TFLOP/s). Up to 256 rows every decode batch
    /// replays a graph.
    /// </summary>
    public const int TmaMaxRows = 256;

    /// <summary>
    /// Whether the TMA-fed kernels take a row count below <see cref="WgmmaMaxRows"/>: at 2 rows, where they have been
    /// ahead since their tensor maps lost the 256-byte L2 promotion. Lockstep decode on H200s, ms a step, wgmma against
    /// TMA, two rounds each (docs/performance.md, session 32): batch 2 11.85–11.88 against 11.45–11.47 (call 3) and
    /// 12.35–12.41 against 11.77–11.81 (call 4, another machine); wgmma ahead at 3 and 4 rows (14.76 against 15.15–15.21,
    /// 16.22–16.39 against 16.72–16.83), the two level at 5 to 7.
    /// </summary>
    private static bool TmaAheadOfWgmma(int rows) => rows == 2;

    internal MoePath PathFor(int rows, int topK)
    {
        // Batch-invariant at every row count: a row's sums are one fixed order whichever tile it lands in (checked bit for bit),
        // the down product's k cut in shares by the shape and the card alone (TmaDownSplits; DownSplits for the wgmma kernels).
        if (Deterministic) return !WgmmaAvailable ? MoePath.Tensor : s_deterministicWgmma ? MoePath.Wgmma : MoePath.Tma;
        if (_moePathOverride is { } forced && (forced != MoePath.Dense || rows <= DenseMaxRows)) return forced;
        if (rows * topK <= SmallSlots) return MoePath.Small;
        if (rows <= WgmmaMaxRows && WgmmaAvailable) return TmaAheadOfWgmma(rows) ? MoePath.Tma : MoePath.Wgmma;
        if (rows <= TmaMaxRows && WgmmaAvailable) return MoePath.Tma;
        if (s_prefillTokens && WgmmaAvailable) return MoePath.TmaTokens;
        return rows <= TensorMaxRows ? MoePath.Tensor : MoePath.Cublas;
    }

    /// <summary>
    /// --deterministic's experts through the cp.async wgmma kernels (MOE_RAG_INJECT_DETERMINISTIC_MOE=wgmma, to measure
    /// against) instead of the TMA-fed ones.
    /// </summary>
    private static readonly bool s_deterministicWgmma = Environment.GetEnvironmentVariable("MOE_RAG_INJECT_DETERMINISTIC_MOE") is "wgmma";

    public void MoeExperts(DeviceTensor x, ExpertStack experts, int topK, IStepBuffers step, DeviceTensor output, int rows)
    {
        var stack = (CudaExpertStack)experts;
        var s = S(step);
        var input = T(x);
        var delta = T(output);
        int e = stack.Count, h = stack.Hidden, i = stack.Intermediate, slots = rows * topK;
        var path = PathFor(rows, topK);
        if (path == MoePath.Wgmma && !WgmmaFits(h, i)) path = MoePath.Tensor;  // all three graph-capturable
        if (path == MoePath.Tma && !TmaFits(h, i)) path = WgmmaFits(h, i) ? MoePath.Wgmma : MoePath.Tensor;
        if (path == MoePath.TmaTokens && !(TmaFits(h, i) && h % 256 == 0)) path = TmaFits(h, i) ? MoePath.Tma : MoePath.Cublas;
        // Weights in the boxed layout are read by the small kernels and the moe_tma kernels alone.
        if (stack.BoxedInPlace && path is not (MoePath.Small or MoePath.Tma or MoePath.TmaTokens))
            path = rows > TmaMaxRows && h % 256 == 0 ? MoePath.TmaTokens : MoePath.Tma;
        var boxed = stack.BoxedInPlace ? 1 : 0;
        using var _ = Op($"moe ({path})");
        switch (path)
        {
            case MoePath.Small when rows == 1:
            {
                // Blocks for the routed experts only; with top-2 the two experts add straight into delta (no combine).
                var fused = topK <= 2 && i >= h ? 1 : 0;
                Launch3("moe_row_gate_up", ((uint)topK, (uint)((i + 3) / 4), 1), 256, 0, input.Pointer, stack.GateUp, s.TopIds, s.MoeAct, delta.Pointer, fused, h, i, boxed);
                Launch3("moe_row_down", ((uint)topK, (uint)((h + 7) / 8), 1), 256, 0, s.MoeAct, stack.Down, s.TopIds, s.TopWeights, s.MoeOut, delta.Pointer, fused, h, i, boxed);
                if (fused == 0) Launch3("moe_combine_slots", (1, ColumnBlocks(h), 1), 256, 0, s.MoeOut, s.TopIds, delta.Pointer, topK, h);
                break;
            }
            case MoePath.Small:
            {
                // Slots per pass over an expert's weights: enough for every slot routed to it (at most all slots), at most 16.
                var perPass = Math.Min(16, Bound(slots));
                Launch3($"moe_small_gate_up_t{perPass}", ((uint)e, (uint)((i + 7) / 8), 1), 256, 0, input.Pointer, stack.GateUp, s.TopIds, s.MoeAct, slots, topK, h, i, boxed);
                Launch3($"moe_small_down_t{perPass}", ((uint)e, (uint)((h + 7) / 8), 1), 256, 0, s.MoeAct, stack.Down, s.TopIds, s.TopWeights, s.MoeOut, slots, h, i, boxed);
                Launch3("moe_combine_slots", ((uint)rows, ColumnBlocks(h), 1), 256, 0, s.MoeOut, s.TopIds, delta.Pointer, topK, h);
                break;
            }
            case MoePath.Tensor:
            {
                // Slots sorted by expert on the device; gate·up with silu·mul gathered through the sort; down; each row sums its own.
                using (Op("  moe: sort"))
                    LaunchSort(s, slots, e);
                var touched = Math.Min(e, slots);
                var perExpert = (slots + touched - 1) / touched;
                using (Op("  moe: gate_up GEMM"))
                    GemmGrouped(gateUp: true, input.Pointer, stack.GateUp.Pointer, s.Offsets.Pointer, s.Sorted.Pointer, e, slots, topK, i, h, s.MoeAct.Pointer, perExpert);
                using (Op("  moe: down GEMM"))
                    GemmGrouped(gateUp: false, s.MoeAct.Pointer, stack.Down.Pointer, s.Offsets.Pointer, 0, e, slots, topK, h, i, s.MoeOut.Pointer, perExpert);
                using (Op("  moe: combine"))
                    LaunchCombine(s, s.MoeOut.Pointer, delta, rows, topK, h);
                break;
            }
            case MoePath.Wgmma:
            {
                using (Op("  moe: sort"))
                    LaunchSort(s, slots, e);
                if ((long)slots * Math.Max(h, i) >= int.MaxValue)
                    throw new NotSupportedException($"wgmma GEMM: {slots} routed rows of {Math.Max(h, i)} exceed 32-bit offsets");
                var touched = Math.Min(e, slots);
                var n = WgmmaNForced ?? WgmmaRows((slots + touched - 1) / touched);
                var tile = new WgmmaTile(n, n >= 64 ? WgmmaMForced ?? 128 : 64);
                var rowTiles = (uint)((slots + n - 1) / n + Math.Min(e, slots));
                var splits = DownSplits(h, i);
                var (downOut, splitStride) = DownOutput(s, splits, slots, h);
                using (Op("  moe: gate_up GEMM"))
                    LaunchWgmma(tile, gateUp: true, (rowTiles, tile.FeatureTiles(gateUp: true, i), 1),
                        input.Pointer, stack.GateUp.Pointer, s.Offsets.Pointer, s.Sorted.Pointer, e, 0, topK, i, h, s.MoeAct.Pointer, 0UL, 0L);
                using (Op("  moe: down GEMM"))
                    LaunchWgmma(tile, gateUp: false, (rowTiles, tile.FeatureTiles(gateUp: false, h), (uint)splits),
                        s.MoeAct.Pointer, stack.Down.Pointer, s.Offsets.Pointer, 0UL, e, 0, topK, h, i, 0UL, downOut, splitStride);
                using (Op("  moe: combine"))
                    LaunchCombine(s, downOut, delta, rows, topK, h, splits, splitStride);
                break;
            }
            case MoePath.Tma:
            {
                SortAndGather(s, input, slots, e, topK, h);
                var touched = Math.Min(e, slots);
                var n = TmaNForced ?? TmaRows((slots + touched - 1) / touched);
                var nGateUp = Math.Min(n, 128);  // the gate-up kernel keeps two accumulator sets
                using (Op("  moe: gate_up GEMM"))
                    LaunchTma(gateUp: true, wide: false, nGateUp, ((slots + nGateUp - 1) / nGateUp + touched) * (i / 128),
                        MapOf(stack.GateUp.Pointer, 2L * i * e, h, 128), stack.BoxedPointers.GateUp,
                        MapOf(s.MoeInputs.Pointer, s.MoeSlots, h, nGateUp),
                        s.Offsets, e, i, h, s.MoeAct, 0UL, s_tmaFitRows, 1, 0L);
                var wide = TmaDownWide(n, h);
                var splits = TmaDownSplits(h, i);
                var (downOut, splitStride) = DownOutput(s, splits, slots, h);
                using (Op("  moe: down GEMM"))
                    LaunchTma(gateUp: false, wide, n, ((slots + n - 1) / n + touched) * (h / (wide ? 256 : 128)) * splits,
                        MapOf(stack.Down.Pointer, (long)h * e, i, 128), stack.BoxedPointers.Down,
                        MapOf(s.MoeAct.Pointer, s.MoeRows, i, n),
                        s.Offsets, e, h, i, 0UL, downOut, s_tmaFitRows, splits, splitStride);
                using (Op("  moe: combine"))
                    LaunchCombine(s, downOut, delta, rows, topK, h, splits, splitStride);
                break;
            }
            case MoePath.TmaTokens:
            {
                SortAndGather(s, input, slots, e, topK, h);
                var rowTiles = (slots + 127) / 128 + Math.Min(e, slots);
                using (Op("  moe: gate_up GEMM"))
                    LaunchTmaTokens(gateUp: true, rowTiles * (i / 128), MapOf(stack.GateUp.Pointer, 2L * i * e, h, 128),
                        stack.BoxedPointers.GateUp, MapOf(s.MoeInputs.Pointer, s.MoeSlots, h, 128), s.Offsets, e, i, h, s.MoeAct, 0UL);
                using (Op("  moe: down GEMM"))
                    LaunchTmaTokens(gateUp: false, rowTiles * (h / 256), MapOf(stack.Down.Pointer, (long)h * e, i, 128),
                        stack.BoxedPointers.Down, MapOf(s.MoeAct.Pointer, s.MoeRows, i, 128), s.Offsets, e, h, i, 0UL, s.MoeOut);
                using (Op("  moe: combine"))
                    LaunchCombine(s, s.MoeOut.Pointer, delta, rows, topK, h);
                break;
            }
            case MoePath.Dense:
                // Every expert on every row: [E, rows, 2I] = x · gate_upᵀ, silu·mul, [E, rows, H] = act · downᵀ; each row sums its own.
                _cublas.GemmBf16Batched(rows, 2 * i, h, input.Pointer, 0, stack.GateUp.Pointer, 2L * i * h, s.MoeGateUp.Pointer, (long)rows * 2 * i, e,
                    CudaDataType.R16BF);
                LaunchSiluMul(s, e * rows, i);
                _cublas.GemmBf16Batched(rows, h, i, s.MoeAct.Pointer, (long)rows * i, stack.Down.Pointer, (long)h * i, s.MoeOut.Pointer, (long)rows * h, e);
                Launch3("moe_combine_dense", ((uint)rows, ColumnBlocks(h), 1), 256, 0, s.MoeOut, s.TopIds, s.TopWeights, delta.Pointer, rows, topK, h);
                break;
            default:
                GroupedCublas(input, stack, topK, s, delta, rows);
                break;
        }
    }

    /// <summary>moe_align: the routed slots sorted by expert on the device (group offsets, sorted slots, each slot's place).</summary>
    private void LaunchSort(CudaStepBuffers s, int slots, int experts) =>
        Launch("moe_align", 1, (uint)Math.Clamp((slots + 31) / 32 * 32, 64, 1024), s.TopIds, slots, experts, s.Offsets, s.Sorted, s.PlaceOf);

    /// <summary>
    /// moe_silu_mul over <paramref name="rows"/> rows of cuBLAS's gate-up product in bf16 (as a bf16 Linear rounds its
    /// output; fp32 took twice the bytes to write and read: 238 µs a layer for a 2,048-token prefill chunk on an H200).
    /// </summary>
    private void LaunchSiluMul(CudaStepBuffers s, int rows, int intermediate)
    {
        if (intermediate % 8 != 0) throw new NotSupportedException($"silu·mul: the intermediate size {intermediate} is not a multiple of 8");
        Launch3("moe_silu_mul", ((uint)rows, ColumnBlocks(intermediate / 8), 1), 256, 0, s.MoeGateUp, s.MoeAct, intermediate);
    }

    /// <summary>The TMA paths' first two steps: the slots sorted by expert, then the input rows gathered in that order.</summary>
    private void SortAndGather(CudaStepBuffers s, CudaTensor input, int slots, int experts, int topK, int hidden)
    {
        using (Op("  moe: sort"))
            LaunchSort(s, slots, experts);
        using (Op("  moe: gather"))
            LaunchGather(s, input, slots, experts, topK, hidden);
    }

    /// <summary>moe_gather: the input rows copied into MoeInputs in the sort's order.</summary>
    private void LaunchGather(CudaStepBuffers s, CudaTensor input, int slots, int experts, int topK, int hidden) =>
        Launch("moe_gather", (uint)slots, 128, input.Pointer, s.Sorted, s.Offsets, experts, s.MoeInputs, topK, hidden);

    /// <summary>
    /// moe_combine_grouped: each row's expert outputs (sorted slots at <paramref name="source"/>, k split in
    /// <paramref name="splits"/> partial sums <paramref name="splitStride"/> floats apart) weighted by the routing into delta.
    /// </summary>
    private void LaunchCombine(CudaStepBuffers s, ulong source, CudaTensor delta, int rows, int topK, int hidden, int splits = 1,
        long splitStride = 0) =>
        Launch3("moe_combine_grouped", ((uint)rows, ColumnBlocks(hidden / 4), 1), 256, 0, source, s.PlaceOf, s.TopWeights, delta.Pointer,
            topK, hidden, splits, splitStride);

    /// <summary>Whether the expert shape suits the moe_tma kernels (whole 128-feature tiles).</summary>
    private bool TmaFits(int hidden, int intermediate) => WgmmaFits(hidden, intermediate) && hidden % 128 == 0 && intermediate % 128 == 0;

    /// <summary>
    /// Group rows a moe_tma tile takes for groups of about this many rows: one tile for most groups, and no more rows than
    /// that, since every tile row costs tensor-core time whether a group fills it or not (at batch 256, 64 rows a group on
    /// average, 128-row tiles did half their products on padding), and every stage copies the tile's rows whether a group
    /// fills them or not (at batch 64, 16 rows a group, 32-row tiles made the step about 0.6 ms shorter than 64-row ones: the
    /// copies of padding rows cost L2 bandwidth the weights need).
    /// </summary>
    private static int TmaRows(int rowsPerGroup) => rowsPerGroup switch
    {
        <= 4 => 16,
        <= 16 => 32,
        <= 32 => 64,
        <= 64 => 96,
        <= 96 => 128,
        _ => 256,
    };

    /// <summary>The moe_tma tile's group rows, forced: by gemm-bench, or MOE_RAG_INJECT_TMA_N (16, 32, 64, 96, 128 or 256; gate-up at most 128) for same-run comparisons.</summary>
    internal int? TmaNForced { get; set; } =
        int.TryParse(Environment.GetEnvironmentVariable("MOE_RAG_INJECT_TMA_N"), out var n) && n is 16 or 32 or 64 or 96 or 128 or 256 ? n : null;

    /// <summary>
    /// Whether the down product takes the wide moe_tma kernel (256 features a tile, so each group row copied serves twice
    /// the weight rows) for a tile of <paramref name="n"/> group rows: from 32 rows where the hidden size is a multiple of
    /// 256, unless MOE_RAG_INJECT_TMA_DOWN=narrow (kept to measure against) or gemm-bench forces one form.
    /// </summary>
    private bool TmaDownWide(int n, int hidden) => (TmaDownWideForced ?? !s_tmaDownNarrow) && (n is 32 or 64 or 96 or 128) && hidden % 256 == 0;

    /// <summary>
    /// 1: the moe_tma kernels narrow each tile's products to the group rows it holds (the tensor cores skip its padding,
    /// a third of a 96-row tile's products at batch 256, where the card runs at its power cap); 0 with
    /// MOE_RAG_INJECT_TMA_FIT=0, kept to measure against.
    /// </summary>
    private static readonly int s_tmaFitRows = Environment.GetEnvironmentVariable("MOE_RAG_INJECT_TMA_FIT") is "0" ? 0 : 1;

    private static readonly bool s_tmaDownNarrow = Environment.GetEnvironmentVariable("MOE_RAG_INJECT_TMA_DOWN") is "narrow";

    /// <summary>The down product's moe_tma form, forced (gemm-bench): true wide, false narrow, null the default.</summary>
    internal bool? TmaDownWideForced { get; set; }

    /// <summary>A persistent moe_tma launch: a block a multiprocessor, at most one a tile of the bound.</summary>
    private void LaunchTma(bool gateUp, bool wide, int n, int tilesBound, params ReadOnlySpan<KernelArg> args)
    {
        var name = $"moe_tma_{(gateUp ? "gate_up" : wide ? "down_wide" : "down")}_n{n}";
        // TmaWeightRows and TmaStages in gemm_wgmma.cu: 256 or 128 weight rows a stage, as many stages as fit in 200 KB (≤ 8).
        var stageBytes = ((gateUp || wide ? 256 : 128) + n) * 128;
        var stages = Math.Min(8, 200 * 1024 / stageBytes);
        var shared = (uint)(stages * (stageBytes + 16));
        if (_sharedRaised.Add(name)) _kernels[name].SetMaxDynamicSharedMemory((int)shared);
        Launch3(name, ((uint)Math.Min(Device.MultiprocessorCount, tilesBound), 1, 1), 384, shared, args);
    }

    /// <summary>
    /// Gives a layer's experts copies in the boxed layout that the moe_tma kernels then read by plain bulk copies (each
    /// 128 × 64 box 16 KB contiguous, pre-swizzled), for gemm-bench to time against the row-major weights read through
    /// the tensor map (session 22: 2-D boxes read 6–7% below a contiguous stream). Other paths keep the row-major copy.
    /// </summary>
    internal void BoxCopy(ExpertStack experts)
    {
        var stack = (CudaExpertStack)experts;
        if (stack.Boxed is not null) return;
        var gateUp = Device.Allocate(stack.GateUp.ByteLength);
        var down = Device.Allocate(stack.Down.ByteLength);
        LaunchBox(stack, stack.GateUp, gateUp, gateUp: true);
        LaunchBox(stack, stack.Down, down, gateUp: false);
        stack.Boxed = (gateUp, down);
    }

    /// <summary>moe_box_weights: a stack's gate-up ([E · 2I, H]) or down ([E · H, I]) weights, row-major at source, boxed at destination.</summary>
    private void LaunchBox(CudaExpertStack stack, DeviceBuffer source, DeviceBuffer destination, bool gateUp) =>
        Launch("moe_box_weights", 4 * (uint)Device.MultiprocessorCount, 256, source, destination,
            gateUp ? 2L * stack.Intermediate * stack.Count : (long)stack.Hidden * stack.Count, gateUp ? stack.Hidden : stack.Intermediate);

    /// <summary>
    /// --expert-layout boxed (and MOE_RAG_INJECT_BOXED=1, the default of that flag and of backends opened without it, as
    /// check-device's op checks are): every layer's experts boxed in place at upload on a Hopper card, where the moe_tma
    /// kernels take the shape. The small kernels (one row), the moe_tma kernels and, for prefill chunks, the moe_tma_tokens
    /// kernels read that layout; every other row count takes the moe_tma kernels. Measured on H200s (docs/performance.md,
    /// session 29, lockstep): the batch-64 step 2.9% shorter, batch 256 3.4%; a 2,048-token prefill 15% longer (the
    /// moe_tma_tokens kernels multiply at 565–575 TFLOP/s on boxed weights where cuBLAS per expert reaches 660–680). Off by
    /// default: row-major keeps the prefill goal.
    /// </summary>
    private static readonly bool s_boxedInPlace = Environment.GetEnvironmentVariable("MOE_RAG_INJECT_BOXED") is "1";

    /// <summary>
    /// Whether experts uploaded from now on are boxed in place (where <see cref="CanBoxExperts"/> and the shape suits the
    /// moe_tma kernels): MOE_RAG_INJECT_BOXED=1 at first; a runner sets it from --expert-layout, check-device to check both
    /// layouts against the CPU backend, gemm-bench clears it to compare them itself.
    /// </summary>
    public bool BoxExperts { get; set; } = s_boxedInPlace;

    /// <summary>Whether this card runs the kernels that read the boxed layout (Hopper's sm_90a).</summary>
    public bool CanBoxExperts => WgmmaAvailable;

    /// <summary>Re-lays a freshly uploaded expert stack into the boxed layout in place (through a scratch copy), where asked.</summary>
    private void BoxInPlace(CudaExpertStack stack)
    {
        if (!BoxExperts || !CanBoxExperts || !TmaFits(stack.Hidden, stack.Intermediate)) return;
        using var scratch = Device.Allocate(Math.Max(stack.GateUp.ByteLength, stack.Down.ByteLength));
        stack.GateUp.CopyTo(scratch, stack.GateUp.ByteLength, Stream);
        LaunchBox(stack, scratch, stack.GateUp, gateUp: true);
        stack.Down.CopyTo(scratch, stack.Down.ByteLength, Stream);
        LaunchBox(stack, scratch, stack.Down, gateUp: false);
        Stream.Synchronize();
        stack.BoxedInPlace = true;
    }

    /// <summary>
    /// MOE_RAG_INJECT_PREFILL_MOE=tokens: prefill chunks (more than <see cref="TmaMaxRows"/> rows) take the moe_tma_tokens
    /// kernels instead of cuBLAS per expert on a Hopper card (as they do whenever the weights are boxed).
    /// </summary>
    private static readonly bool s_prefillTokens = Environment.GetEnvironmentVariable("MOE_RAG_INJECT_PREFILL_MOE") is "tokens";

    /// <summary>A persistent moe_tma_tokens launch (TOKENS_STAGES in gemm_wgmma.cu: 4 stages of 128 + 256 rows of 128 bytes).</summary>
    private void LaunchTmaTokens(bool gateUp, int tilesBound, params ReadOnlySpan<KernelArg> args)
    {
        var name = gateUp ? "moe_tma_tokens_gate_up" : "moe_tma_tokens_down";
        const uint Shared = 4 * ((128 + 256) * 128 + 16);
        if (_sharedRaised.Add(name)) _kernels[name].SetMaxDynamicSharedMemory((int)Shared);
        Launch3(name, ((uint)Math.Min(Device.MultiprocessorCount, tilesBound), 1, 1), 384, Shared, args);
    }

    /// <summary>Registers and local bytes a thread of a compiled kernel (gemm-bench's report).</summary>
    internal (int Registers, int LocalBytes) KernelResources(string name) =>
        (_kernels[name].Attribute(CUfunctionAttribute.NumRegs), _kernels[name].Attribute(CUfunctionAttribute.LocalSizeBytes));

    private readonly Dictionary<(ulong, long, long, int), TensorMap> _tensorMaps = [];

    /// <summary>
    /// The L2 promotion of the moe_tma kernels' tensor maps: none, or MOE_RAG_INJECT_TMA_PROMOTION (none, 64, 128 or 256)
    /// to measure against. On an H200 (docs/performance.md, session 32) tools/gpu/read_bandwidth.cu read 128-row boxes of
    /// 128 bytes at 4.59 TB/s with none, 64 or 128 and at 4.39 with 256, and decode steps with none against 256 took 1.5%,
    /// 2.2% and 2.1% less time at batch 8, 64 and 256.
    /// </summary>
    private readonly L2Promotion _tmaPromotion = ParsePromotion(Environment.GetEnvironmentVariable("MOE_RAG_INJECT_TMA_PROMOTION"));

    internal static L2Promotion ParsePromotion(string? value) => value switch
    {
        null or "" or "none" => L2Promotion.None,
        "256" => L2Promotion.Bytes256,
        "128" => L2Promotion.Bytes128,
        "64" => L2Promotion.Bytes64,
        _ => throw new ArgumentException($"MOE_RAG_INJECT_TMA_PROMOTION is '{value}': expected none, 64, 128 or 256."),
    };

    /// <summary>The tensor map of a row-major bf16 [rows, columns] matrix at an address, boxes of boxRows × 64 (made once).</summary>
    private TensorMap MapOf(ulong address, long rows, long columns, int boxRows)
    {
        var key = (address, rows, columns, boxRows);
        if (!_tensorMaps.TryGetValue(key, out var map))
            _tensorMaps[key] = map = new TensorMap(address, rows, columns, boxRows, _tmaPromotion);
        return map;
    }

    /// <summary>Whether this card runs gemm_wgmma.cu's kernels (compiled for sm_90a), and the expert shape suits them.</summary>
    private bool WgmmaFits(int hidden, int intermediate) => WgmmaAvailable && hidden % 64 == 0 && intermediate % 64 == 0;

    private bool WgmmaAvailable => _kernels.Architecture == "sm_90a";

    /// <summary>
    /// Rows a wgmma tile takes for groups of about this many rows: about four times the mean, so that hardly any group spills
    /// into a second tile (which streams the expert again); measured best at 2 to 256 rows of Mixtral-8x7B's routing.
    /// </summary>
    private static int WgmmaRows(int rowsPerGroup) => rowsPerGroup <= 4 ? 16 : rowsPerGroup <= 8 ? 32 : rowsPerGroup <= 32 ? 64 : 128;

    /// <summary>
    /// Shares of k the wgmma down GEMM splits into: 1 by default; under --deterministic with
    /// MOE_RAG_INJECT_DETERMINISTIC_MOE=wgmma, where the experts take the wgmma kernel even for one row, 3 (at most
    /// <see cref="MaxDownSplits"/>). One row's two experts then make 2 · 64 feature tiles · 3 = 384 blocks for Mixtral, one
    /// wave at three 16-row-tile blocks a multiprocessor, where unsplit they leave each multiprocessor one long stream. It
    /// depends on the shape alone, so each row is summed the same way at every batch size.
    /// </summary>
    private int DownSplits(int hidden, int intermediate) => Deterministic ? MaxDownSplits(hidden, intermediate) : 1;

    /// <summary>At most 3 shares, and no more than MoeGateUp holds the partial sums of: splits · hidden ≤ 2 · intermediate.</summary>
    private static int MaxDownSplits(int hidden, int intermediate) => Math.Clamp(2 * intermediate / hidden, 1, 3);

    /// <summary>
    /// Where a wgmma or TMA down product's sums go: MoeOut, or with k split in shares MoeGateUp (unused on those paths,
    /// whose gate-up writes MoeAct directly), a share every slots · hidden floats, for moe_combine_grouped to add in order.
    /// </summary>
    private static (ulong Output, long SplitStride) DownOutput(CudaStepBuffers s, int splits, int slots, int hidden) =>
        (splits > 1 ? s.MoeGateUp.Pointer : s.MoeOut.Pointer, (long)slots * hidden);

    /// <summary>
    /// Shares of k the moe_tma down GEMM splits into: 1 by default; under --deterministic, where one row's two experts would
    /// otherwise give the persistent grid 2 · hidden / 128 tiles (64 for Mixtral: half an H200's multiprocessors idle), as
    /// many as keep those tiles within one wave (2 for Mixtral on an H200: 128 tiles), at most <see cref="MaxDownSplits"/>.
    /// It depends on the shape and the card alone, so each row is summed the same way at every batch size.
    /// </summary>
    private int TmaDownSplits(int hidden, int intermediate) =>
        Deterministic ? Math.Clamp(Device.MultiprocessorCount / (2 * hidden / 128), 1, MaxDownSplits(hidden, intermediate)) : 1;

    /// <summary>
    /// --deterministic's k split for a wgmma projection of <paramref name="n"/> outputs: as many as fill one wave of three
    /// blocks a multiprocessor (the 16-row tile's shared memory allows three) with one row tile, at most 8, never more than
    /// <see cref="SplitsFor"/> (which sizes the workspace). A function of the shape and the card alone.
    /// </summary>
    private int WgmmaSplitsFor(int n) =>
        Deterministic ? Math.Clamp(3 * Device.MultiprocessorCount / ((n + 63) / 64), 1, Math.Min(MaxSplits, SplitsFor(n))) : 1;

    /// <summary>
    /// A gemm_wgmma.cu kernel's tile: <paramref name="N"/> group rows against <paramref name="M"/> weight rows, 64 (one
    /// warpgroup) or 128 (two, the _m128 kernels, for N of 64 and more).
    /// </summary>
    private readonly record struct WgmmaTile(int N, int M)
    {
        public string Name(bool gateUp) => $"moe_wgmma_{(gateUp ? "gate_up" : "down")}_n{N}{(M == 128 ? "_m128" : "")}";

        /// <summary>WgmmaStagesOf in gemm_wgmma.cu.</summary>
        private int Stages => M == 64 ? (N >= 128 ? 4 : 6) : N >= 256 ? 3 : 4;

        public uint SharedBytes => (uint)(Stages * (M + N) * 128);
        public uint Threads => (uint)(2 * M);

        /// <summary>Blocks along the weight's features: a gate-up tile holds M / 2 features (their gate and up rows).</summary>
        public uint FeatureTiles(bool gateUp, int features) => (uint)((features + (gateUp ? M / 2 : M) - 1) / (gateUp ? M / 2 : M));
    }

    private void LaunchWgmma(WgmmaTile tile, bool gateUp, (uint, uint, uint) grid, params ReadOnlySpan<KernelArg> args)
    {
        var name = tile.Name(gateUp);
        if (tile.SharedBytes > 48 * 1024 && _sharedRaised.Add(name)) _kernels[name].SetMaxDynamicSharedMemory((int)tile.SharedBytes);
        Launch3(name, grid, tile.Threads, tile.SharedBytes, args);
    }

    /// <summary>The wgmma tile's rows, forced (gemm-bench).</summary>
    internal int? WgmmaNForced { get; set; }

    /// <summary>
    /// The experts' wgmma tile's weight rows where the tile has 64 group rows or more, forced: 64 (one warpgroup) or 128
    /// (two, the default there: gemm-bench on an H200 at Mixtral-8x7B's shape, ms a layer, 64 against 128 weight rows:
    /// 0.797 against 0.691 at 64 rows, 0.799 against 0.706 at 128; docs/gpu-runs/8-gemm-bench-m128.txt).
    /// MOE_RAG_INJECT_WGMMA_M=64 for the checks and same-run comparisons. Null: the default.
    /// </summary>
    internal int? WgmmaMForced { get; set; } = Environment.GetEnvironmentVariable("MOE_RAG_INJECT_WGMMA_M") switch { "64" => 64, "128" => 128, _ => null };

    /// <summary>
    /// One launch of Kernels/gemm.cu: rows in groups (offsets on the device, or one group of <paramref name="rows"/> when
    /// <paramref name="offsets"/> is 0), optionally gathered through <paramref name="sorted"/>. The tile fits the rows a
    /// group is expected to hold; the grid's row tiles are a bound that holds whatever the routing.
    /// </summary>
    private void GemmGrouped(bool gateUp, ulong a, ulong w, ulong offsets, ulong sorted, int groups, int rows, int topK, int n, int k,
        ulong output, int rowsPerGroup)
    {
        if (k % 8 != 0) throw new NotSupportedException($"tensor-core GEMM: k = {k} is not a multiple of 8");
        if ((long)rows * k >= int.MaxValue) throw new NotSupportedException($"tensor-core GEMM: {rows} rows of {k} exceed 32-bit offsets");
        var tile = GemmTileForced ?? GemmTile.For(rowsPerGroup);
        var bm = tile.Rows;
        var bn = tile.Columns > 0 ? tile.Columns : 128;
        var rowTiles = offsets == 0 ? (rows + bm - 1) / bm : (rows + bm - 1) / bm + Math.Min(groups, rows);
        var name = $"gemm_{(gateUp ? "gate_up" : "grouped")}_{tile.WarpsM}x{tile.Mi}_bn{bn}";
        var stages = bm >= 128 ? 3 : 4;  // GemmStages in gemm.cu
        var shared = (uint)(stages * (bm + bn) * 64 * 2);
        if (shared > 48 * 1024 && _sharedRaised.Add(name)) _kernels[name].SetMaxDynamicSharedMemory((int)shared);
        var splits = gateUp ? 1 : SplitsFor(n);
        var stride = (long)rows * n;
        if (splits > 1) EnsureSplitWorkspace(4L * splits * stride);
        Launch3(name, ((uint)rowTiles, (uint)ColumnTiles(gateUp, n, bn), (uint)splits), (uint)(64 * tile.WarpsM), shared,
            a, w, offsets, sorted, groups, rows, topK, n, k, stride, splits > 1 ? _splitWorkspace!.Pointer : output);
        if (splits > 1)
            Launch3("gemm_split_sum", ((uint)rows, ColumnBlocks(n), 1), 256, 0, _splitWorkspace!.Pointer, output, offsets, groups, rows, n, splits, stride);
    }

    /// <summary>
    /// How many ways --deterministic splits k for an output of <paramref name="n"/> columns: enough blocks of 64 columns for
    /// four per multiprocessor (one row's GEMM then streams its weight from the whole GPU), at most 8; a function of the
    /// weight's shape alone, so every batch sums in the same order. The default mode does not split.
    /// </summary>
    private int SplitsFor(int n) => Deterministic ? Math.Clamp(4 * Device.MultiprocessorCount / ((n + 63) / 64), 1, MaxSplits) : 1;

    private const int MaxSplits = 8;
    private DeviceBuffer? _splitWorkspace;

    /// <summary>Grows the split partial sums' buffer; never while a graph is being captured (the step buffers size it first).</summary>
    private void EnsureSplitWorkspace(long bytes)
    {
        if (bytes <= 0 || _splitWorkspace is not null && _splitWorkspace.ByteLength >= bytes) return;
        // A captured graph holds the buffer's address: growing it then would leave the graph writing to freed memory.
        if (_capturing || _captures > 0)
            throw new InvalidOperationException($"split-k workspace of {bytes} bytes needed after graphs were captured (sized {_splitWorkspace?.ByteLength ?? 0})");
        Stream.Synchronize();
        _splitWorkspace?.Dispose();
        _splitWorkspace = Device.Allocate(bytes);
    }

    /// <summary>Bytes of split partial sums a deterministic runner of these sizes needs: the widest split output over its rows (the LM head over its sequences).</summary>
    private long SplitWorkspaceBytes(ModelConfig config, int maxRows, int maxSequences)
    {
        if (!Deterministic) return 0;
        long worst = 0;
        foreach (var (rows, n) in new[] { ((long)maxRows, config.NumHeads * config.HeadDim + 2 * config.NumKvHeads * config.HeadDim),
                     (maxRows, config.HiddenSize), ((long)maxRows * config.NumExpertsPerToken, config.HiddenSize), (maxSequences, config.VocabSize) })
            worst = Math.Max(worst, 4L * SplitsFor(n) * rows * n);
        return worst;
    }

    /// <summary>A tile of Kernels/gemm.cu: WarpsM × 2 warps, each Mi × 16 rows; <see cref="Columns"/> weight rows (64 or 128).</summary>
    internal readonly record struct GemmTile(int WarpsM, int Mi, int Columns = 0)
    {
        public int Rows => WarpsM * Mi * 16;

        /// <summary>The instantiated tiles, for measurement.</summary>
        public static readonly GemmTile[] All = [new(1, 1), new(1, 2), new(2, 2), new(4, 2), new(1, 4), new(2, 4)];

        /// <summary>
        /// The tile for groups of about this many rows, from gemm-bench on an H200: a tile of at least twice the mean rows, so
        /// that few groups spill into a second tile (which reads the expert again), with 64 weight rows for small tiles
        /// (more blocks in flight) and 128 for large ones.
        /// </summary>
        public static GemmTile For(int rowsPerGroup) =>
            rowsPerGroup <= 8 ? new(1, 1, 64) : rowsPerGroup <= 16 ? new(1, 2, 64) : rowsPerGroup <= 32 ? new(2, 2, 128) : new(2, 4, 128);
    }

    /// <summary>Forces the tensor-core GEMM tile (Columns 0: the backend's choice of columns); for measurement.</summary>
    internal GemmTile? GemmTileForced { get; set; }

    /// <summary>Forces the MoE path where it applies (Dense only up to <see cref="DenseMaxRows"/>); for measurement.</summary>
    internal MoePath? MoePathForced { get => _moePathOverride; set => _moePathOverride = value; }

    /// <summary>How projections run: warp-per-feature kernels, cuBLAS, or a tensor-core kernel (mma.sync, or wgmma on Hopper). Null: by rows and mode.</summary>
    internal LinearPath? LinearPathForced { get; set; }

    internal enum LinearPath { Gemv, Cublas, Tensor, Wgmma }

    /// <summary>Column tiles of a GEMM tile of <paramref name="bn"/> weight rows: gate-up tiles hold bn/2 features (their gate and up rows).</summary>
    private static int ColumnTiles(bool gateUp, int n, int bn) => gateUp ? (n + bn / 2 - 1) / (bn / 2) : (n + bn - 1) / bn;

    /// <summary>The cuBLAS grouped path: slots sorted by expert on the device, their counts read back (a host synchronisation), one GEMM pair per expert.</summary>
    private void GroupedCublas(CudaTensor input, CudaExpertStack stack, int topK, CudaStepBuffers s, CudaTensor delta, int rows)
    {
        int e = stack.Count, h = stack.Hidden, i = stack.Intermediate, slots = rows * topK;
        var offsets = new int[e + 1];
        using (Op("  moe: sort, gather, read counts"))
        {
            // The offsets' copy is enqueued before the gather, so that the host's wait for it overlaps the gather.
            LaunchSort(s, slots, e);
            s.CopyGroupOffsets(e);
            LaunchGather(s, input, slots, e, topK, h);
            s.WaitGroupOffsets(e).CopyTo(offsets);
        }
        int Rows(int x) => offsets[x + 1] - offsets[x];
        if (s_expertGemms == ExpertGemms.Planned) PrepareExpertGemms(stack, s);
        else WarmExpertGemms(stack, s);
        using (Op("  moe: gate_up GEMMs"))
            for (var x = 0; x < e; x++)
                if (Rows(x) > 0)
                    ExpertGemm(ExpertGemmRows(Rows(x)), 2 * i, h, s.MoeInputs.Pointer + 2UL * (ulong)offsets[x] * (ulong)h,
                        stack.GateUp.Pointer + 2UL * (ulong)x * 2 * (ulong)i * (ulong)h, s.MoeGateUp.Pointer + 2UL * (ulong)offsets[x] * 2 * (ulong)i,
                        CudaDataType.R16BF);
        var total = offsets[e];
        using (Op("  moe: silu_mul"))
            if (total > 0) LaunchSiluMul(s, total, i);
        using (Op("  moe: down GEMMs"))
            for (var x = 0; x < e; x++)
                if (Rows(x) > 0)
                    ExpertGemm(ExpertGemmRows(Rows(x)), h, i, s.MoeAct.Pointer + 2UL * (ulong)offsets[x] * (ulong)i,
                        stack.Down.Pointer + 2UL * (ulong)x * (ulong)h * (ulong)i, s.MoeOut.Pointer + 4UL * (ulong)offsets[x] * (ulong)h, CudaDataType.R32F);
        using (Op($"  moe: combine (largest group {100 * offsets.Zip(offsets.Skip(1), (a, b) => b - a).Max() / Math.Max(1, total) / 10 * 10}%+ of slots)"))
            LaunchCombine(s, s.MoeOut.Pointer, delta, rows, topK, h);
    }

    /// <summary>How the cuBLAS grouped path runs its per-expert GEMMs (MOE_RAG_INJECT_EXPERT_GEMMS; the others kept to measure against).</summary>
    private enum ExpertGemms
    {
        /// <summary>Default: exact group sizes through cuBLASLt, each size's algorithm chosen in advance (<see cref="PrepareExpertGemms"/>).</summary>
        Planned,
        /// <summary>"rounded": cublasGemmEx over group sizes rounded up (<see cref="ExpertGemmRows"/>), each rounded size run once in advance.</summary>
        Rounded,
        /// <summary>"exact": cublasGemmEx over exact group sizes, cuBLAS's heuristic asked for each new size during the step.</summary>
        Exact,
    }

    private static readonly ExpertGemms s_expertGemms = Environment.GetEnvironmentVariable("MOE_RAG_INJECT_EXPERT_GEMMS") switch
    {
        "rounded" => ExpertGemms.Rounded,
        "exact" => ExpertGemms.Exact,
        _ => ExpertGemms.Planned,
    };

    private void ExpertGemm(int m, int n, int k, ulong a, ulong b, ulong c, CudaDataType cType)
    {
        if (s_expertGemms == ExpertGemms.Planned) _expertGemms.GemmBf16(m, n, k, a, b, c, cType);
        else _cublas.GemmBf16(m, n, k, a, b, c, cType);
    }

    /// <summary>
    /// The rows an expert GEMM runs over for a group of <paramref name="rows"/>: the group's own, except with
    /// MOE_RAG_INJECT_EXPERT_GEMMS=rounded, where they are rounded up to a multiple of 32 (of 64 past 256 rows), at most
    /// <see cref="CudaStepBuffers.ExpertRowSlack"/> − 1 more. The extra rows read the next group's inputs and write rows
    /// that the next group's GEMM, queued after it on the stream, overwrites (or rows past the last group).
    /// </summary>
    /// <remarks>
    /// Why not cublasGemmEx over exact sizes: cuBLAS chooses an algorithm for every new shape, at a host cost of tens of
    /// microseconds while the GPU waits, and nearly every GEMM of a new prompt is a new shape. Measured on an H200, seven
    /// 2,048-token prefills with fresh prompts, medians of two processes each (docs/performance.md, session 15): exact
    /// sizes 99.6 and 102.6 ms, spread 95.6 to 111.9 (the fast runs late in a process, when most sizes had been seen);
    /// rounded 101.4 and 101.1, spread 99.2 to 102.7 after the first run: no host cost, but the padded rows cost about as
    /// much GPU time as they saved. Choosing each exact size's algorithm in advance has neither cost.
    /// </remarks>
    internal static int ExpertGemmRows(int rows) =>
        s_expertGemms != ExpertGemms.Rounded ? rows : rows <= 256 ? (rows + 31) / 32 * 32 : (rows + 63) / 64 * 64;

    /// <summary>Group sizes up to which the GEMMs are prepared in advance (rounded: run once); past it a GEMM takes milliseconds and the choice is a small part.</summary>
    private const int PreparedExpertRows = 4096;

    private readonly HashSet<(int Hidden, int Intermediate)> _expertShapesPrepared = [];

    /// <summary>
    /// Before a shape's first grouped step: cuBLASLt's algorithm for both expert GEMMs at every group size a step can give up
    /// to <see cref="PreparedExpertRows"/> (larger sizes are chosen when they come), and each distinct kernel among them run once.
    /// </summary>
    private void PrepareExpertGemms(CudaExpertStack stack, CudaStepBuffers s)
    {
        int h = stack.Hidden, i = stack.Intermediate;
        if (!_expertShapesPrepared.Add((h, i))) return;
        var started = Stopwatch.GetTimestamp();
        // A group holds at most one slot of each row (a row's top-k experts are distinct).
        var largest = Math.Min(s.Host.Limits.MaxRows, PreparedExpertRows);
        // Every row count's algorithm chosen (host work only), then each distinct kernel run once, on the first expert's
        // weights into the step's scratch rows (the step's own GEMMs, queued after, overwrite every row it reads): a
        // kernel's first launch loads it, which would otherwise fall inside the first prompts' prefills (without this,
        // 102.0 and 104.6 ms against 98.5 and 98.6 on an H200). MOE_RAG_INJECT_EXPERT_WARM=0 leaves it out, to measure against.
        var gateUpRows = _expertGemms.FirstRowsOfEachAlgorithm(2 * i, h, CudaDataType.R16BF, largest);
        var downRows = _expertGemms.FirstRowsOfEachAlgorithm(h, i, CudaDataType.R32F, largest);
        if (Environment.GetEnvironmentVariable("MOE_RAG_INJECT_EXPERT_WARM") != "0")
        {
            foreach (var m in gateUpRows) _expertGemms.GemmBf16(m, 2 * i, h, s.MoeInputs.Pointer, stack.GateUp.Pointer, s.MoeGateUp.Pointer, CudaDataType.R16BF);
            foreach (var m in downRows) _expertGemms.GemmBf16(m, h, i, s.MoeAct.Pointer, stack.Down.Pointer, s.MoeOut.Pointer, CudaDataType.R32F);
        }
        _progress?.Invoke(string.Create(CultureInfo.InvariantCulture,
            $"cuBLASLt: algorithms of the expert GEMMs ({h}→{2 * i}, {i}→{h}) chosen for 1..{largest} rows in {Stopwatch.GetElapsedTime(started).TotalSeconds:F2} s ({gateUpRows.Count} and {downRows.Count} distinct)"));
    }

    /// <summary>
    /// With MOE_RAG_INJECT_EXPERT_GEMMS=rounded, before a shape's first grouped step: both expert GEMMs once at every rounded
    /// group size a step can give (up to <see cref="PreparedExpertRows"/>), on the first expert's weights into the step's
    /// scratch rows (the step's own GEMMs, queued after, overwrite them), so that cuBLAS has chosen and cached its algorithm
    /// for each. At Mixtral-8x7B's shape about 47 TFLOP (tens of milliseconds on an H200), once per process.
    /// </summary>
    private void WarmExpertGemms(CudaExpertStack stack, CudaStepBuffers s)
    {
        int h = stack.Hidden, i = stack.Intermediate;
        if (s_expertGemms != ExpertGemms.Rounded || !_expertShapesPrepared.Add((h, i))) return;
        var largest = ExpertGemmRows(Math.Min(s.Host.Limits.MaxRows, PreparedExpertRows));
        for (var n = ExpertGemmRows(1); n <= largest; n = ExpertGemmRows(n + 1))
        {
            _cublas.GemmBf16(n, 2 * i, h, s.MoeInputs.Pointer, stack.GateUp.Pointer, s.MoeGateUp.Pointer, CudaDataType.R16BF);
            _cublas.GemmBf16(n, h, i, s.MoeAct.Pointer, stack.Down.Pointer, s.MoeOut.Pointer);
        }
    }
}
