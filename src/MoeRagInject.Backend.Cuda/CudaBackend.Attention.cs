using MoeRagInject.Backend.Cuda.Interop;
using MoeRagInject.Model;

namespace MoeRagInject.Backend.Cuda;

/// <summary>The CUDA backend's attention: RoPE and the KV-cache write, prompt and decode attention (Kernels/attention.cu, rotary.cu).</summary>
public sealed partial class CudaBackend
{
    public void RotaryAndCacheWrite(DeviceTensor qkv, IKvCache cache, int layer, AttentionShape shape, IStepBuffers step, int rows)
    {
        var kv = (CudaKvCache)cache;
        using var _ = Op("rope_kv_write");
        // A thread per 4 rotated pairs (per pair where half a head is not a multiple of 4), as many heads of a row a block as
        // make about 256 threads (a 2,048-row prefill chunk in 64-thread blocks, one a head, took 97 µs on an H200 against
        // 6 µs at 64 rows).
        var half = shape.HeadDim / 2;
        var pairs = half % 4 == 0 ? 4 : 1;
        var heads = shape.Heads + shape.KvHeads;
        var perBlock = Math.Clamp(256 / (half / pairs), 1, heads);
        // The step buffers' table of rotations where it was made for this shape's theta and head size (the op checks also
        // run shapes of other models, which compute theirs).
        var s = S(step);
        var table = s.Host.Config.RopeTheta == shape.RopeTheta && s.Host.Config.HeadDim == shape.HeadDim;
        Launch3(pairs == 4 ? "rope_kv_write_x4" : "rope_kv_write", ((uint)rows, (uint)((heads + perBlock - 1) / perBlock), 1),
            (uint)((perBlock * half / pairs + 31) / 32 * 32), 0,
            T(qkv).Pointer, kv.KeysOf(layer), kv.ValuesOf(layer), s.Positions, s.KvSlots,
            shape.Heads, shape.KvHeads, shape.HeadDim, shape.RopeTheta, shape.QkvWidth, perBlock, table ? s.RopeTable.Pointer : 0UL,
            table ? s.RopeRows : 0);
    }

    public void Attention(DeviceTensor qkv, IKvCache cache, int layer, AttentionShape shape, IStepBuffers step, DeviceTensor output, int rows)
    {
        var kv = (CudaKvCache)cache;
        var s = S(step);
        using var _ = Op("attention");
        var group = shape.Heads / shape.KvHeads;
        var window = shape.SlidingWindow ?? 0;
        var scale = 1f / MathF.Sqrt(shape.HeadDim);
        var tensorCores = !_scalarAttentionForced && TensorAttentionFits(shape);
        if (tensorCores && !Deterministic && rows > s.Host.Sequences)
        {
            // Prompt rows in the step: the flash-style kernel for every sequence of it. Not under --deterministic, where
            // every row takes the decode kernel below: a row then sums its keys the same way whether it is a prompt row, a
            // decode row beside a prompt's chunk, or one recomputed after preemption.
            // Sequences with WgmmaAttentionMinRows rows or more take the warpgroup kernel where it fits; the rest (decode
            // rows beside a prompt chunk, short chunks) the mma.sync kernel.
            var wgmma = WgmmaAttentionFits(shape);
            var (longer, shorter) = SequenceRowCounts(s.Host, wgmma ? WgmmaAttentionMinRows : int.MaxValue);
            void LaunchPrompt(string name, int rowsPerBlock, int threads, uint bytes, int rowFilter)
            {
                if (bytes > 48 * 1024 && _sharedRaised.Add(name)) _kernels[name].SetMaxDynamicSharedMemory((int)bytes);
                Launch3(name, ((uint)((rows + rowsPerBlock - 1) / rowsPerBlock + s.Host.Sequences), (uint)shape.KvHeads, 1), (uint)threads, bytes,
                    T(qkv).Pointer, kv.KeysOf(layer), kv.ValuesOf(layer), T(output).Pointer, s.Positions, s.SeqSlot, s.QueryStart, s.Host.Sequences,
                    s.BlockTables, s.Host.Limits.MaxBlocksPerSequence, kv.BlockSize, shape.Heads, shape.KvHeads, window, scale, shape.QkvWidth,
                    _attentionGridOrder ? 0 : 1, rowFilter);
            }
            if (longer > 0)
                LaunchPrompt($"attention_wg_d128_g{group}", 64, 128 * group, (uint)(group * 2 * 64 * 128 * 2 + 4 * 64 * 128 * 2), WgmmaAttentionMinRows);
            if (shorter > 0)
            {
                var rowTiles = Math.Max(1, 4 / group);
                LaunchPrompt($"attention_tc_d{shape.HeadDim}", 16 * rowTiles, 32 * group * rowTiles, (uint)(4 * 64 * shape.HeadDim * 2),
                    longer > 0 ? WgmmaAttentionMinRows : 0);
            }
            return;
        }
        var splits = AttentionSplits(rows, shape.KvHeads);
        if (splits > 1) EnsureAttentionPartial(AttentionPartialBytes(rows, shape, splits));
        var partial = splits > 1 ? _attentionPartial!.Pointer : 0UL;
        if (tensorCores)
        {
            // Decode rows (every row under --deterministic): one warp per (row, KV head, split), the keys as its mma rows and
            // the group's query heads as columns (K and V tiles of 16 keys, and Pᵀ); or, MOE_RAG_INJECT_DECODE_ATTENTION=legacy,
            // the query heads as its mma rows (K and V tiles of 32 keys).
            var name = _legacyDecodeAttention ? $"attention_decode_tc_d{shape.HeadDim}" : $"attention_decode_d{shape.HeadDim}";
            var bytes = _legacyDecodeAttention ? (uint)(2 * 32 * shape.HeadDim * 2) : (uint)(2 * 16 * shape.HeadDim * 2 + 512);
            Launch3(name, ((uint)rows, (uint)shape.KvHeads, (uint)splits), 32, bytes,
                T(qkv).Pointer, kv.KeysOf(layer), kv.ValuesOf(layer), T(output).Pointer, s.Positions, s.RowSequence, s.SeqSlot,
                s.BlockTables, s.Host.Limits.MaxBlocksPerSequence, kv.BlockSize, shape.Heads, shape.KvHeads, window, scale, shape.QkvWidth, partial);
        }
        else
            ScalarAttention(qkv, kv, layer, shape, s, output, rows, splits, partial);
        if (splits > 1)
            Launch3(s_serialCombine ? "attention_combine_serial" : "attention_combine", ((uint)rows, (uint)shape.KvHeads, 1),
                s_serialCombine ? 128u : (uint)Math.Clamp((shape.Heads / shape.KvHeads * shape.HeadDim + 31) / 32 * 32, 128, 1024), 0,
                _attentionPartial!.Pointer, T(output).Pointer, shape.Heads, shape.KvHeads, shape.HeadDim, splits);
    }

    /// <summary>attention_g*_d*: one 16-warp block per (row, KV head, split), fp32 throughout; for shapes the tensor-core kernels do not take.</summary>
    private void ScalarAttention(DeviceTensor qkv, CudaKvCache kv, int layer, AttentionShape shape, CudaStepBuffers s, DeviceTensor output,
        int rows, int splits, ulong partial)
    {
        var group = shape.Heads / shape.KvHeads;
        var perLane = (shape.HeadDim + 31) / 32;
        var groupBound = Bound(group);
        var laneBound = Bound(perLane);
        if (groupBound > 8 || laneBound > 8) throw new NotSupportedException($"attention: {group} query heads per KV head or head_dim {shape.HeadDim} is beyond this kernel (at most 8 and 256)");
        var kernel = $"attention_g{groupBound}_d{laneBound}";
        var shared = (uint)(AttentionWarps * group * shape.HeadDim * 4);
        if (shared > 48 * 1024 && _sharedRaised.Add(kernel)) _kernels[kernel].SetMaxDynamicSharedMemory((int)shared);
        Launch3(kernel, ((uint)rows, (uint)shape.KvHeads, (uint)splits), 32 * AttentionWarps, shared,
            T(qkv).Pointer, kv.KeysOf(layer), kv.ValuesOf(layer), T(output).Pointer, s.Positions, s.RowSequence, s.SeqSlot,
            s.BlockTables, s.Host.Limits.MaxBlocksPerSequence, kv.BlockSize, shape.Heads, shape.KvHeads, shape.HeadDim,
            shape.SlidingWindow ?? 0, 1f / MathF.Sqrt(shape.HeadDim), shape.QkvWidth, partial);
    }

    /// <summary>MOE_RAG_INJECT_COMBINE=serial: the split records merged by attention_combine_serial (before session 33), to measure against.</summary>
    private static readonly bool s_serialCombine = Environment.GetEnvironmentVariable("MOE_RAG_INJECT_COMBINE") is "serial";

    /// <summary>MOE_RAG_INJECT_ATTENTION_ORDER=grid: prompt attention blocks in grid order instead of heaviest first, to measure against.</summary>
    private readonly bool _attentionGridOrder = Environment.GetEnvironmentVariable("MOE_RAG_INJECT_ATTENTION_ORDER") is "grid";

    /// <summary>MOE_RAG_INJECT_ATTENTION=scalar: the fp32 kernel for every row, to measure the tensor-core kernels against.</summary>
    private readonly bool _scalarAttentionForced = Environment.GetEnvironmentVariable("MOE_RAG_INJECT_ATTENTION") is "scalar";

    /// <summary>
    /// MOE_RAG_INJECT_DECODE_ATTENTION=legacy: decode rows through attention_decode_tc_d* (the group's query heads as the
    /// mma rows, 225 registers a thread at head_dim 128) instead of attention_decode_d*, to measure against.
    /// </summary>
    private readonly bool _legacyDecodeAttention = Environment.GetEnvironmentVariable("MOE_RAG_INJECT_DECODE_ATTENTION") is "legacy";

    /// <summary>
    /// Rows a sequence needs in a step for its prompt attention to take the warpgroup kernel (attention_wg_*, 64-row tiles);
    /// fewer go to the mma.sync kernel (16-row tiles), so that a decode row beside a prompt chunk does not multiply 63 rows
    /// of padding; at 32 rows its tile is half padding. Where it falls hardly matters: on an H200, a lockstep batch-64 prefill
    /// of 24-row prompts took 91.6 and 90.1 ms to the first token with it at 32 (24-row prompts on mma.sync) against 95.7
    /// and 99.6 at 8 (on wgmma), and the op profile of a batch-64 step of 16-row prompts had attention at under 0.5 ms of
    /// the 32 layers (docs/performance.md, session 25). MOE_RAG_INJECT_WGMMA_ATTENTION_MIN_ROWS sets it, to measure against.
    /// </summary>
    public static readonly int WgmmaAttentionMinRows =
        int.TryParse(Environment.GetEnvironmentVariable("MOE_RAG_INJECT_WGMMA_ATTENTION_MIN_ROWS"), out var rows) && rows > 0 ? rows : 32;

    /// <summary>
    /// The warpgroup prompt-attention kernel's instantiations (Hopper): head_dim 128, 1, 2 or 4 query heads per KV head;
    /// MOE_RAG_INJECT_PREFILL_ATTENTION=mma keeps every prompt row on the mma.sync kernel, to measure against.
    /// </summary>
    private bool WgmmaAttentionFits(AttentionShape shape) =>
        WgmmaAvailable && !s_mmaPrefillAttention && shape.HeadDim == 128 && shape.Heads / shape.KvHeads is 1 or 2 or 4;

    private static readonly bool s_mmaPrefillAttention = Environment.GetEnvironmentVariable("MOE_RAG_INJECT_PREFILL_ATTENTION") is "mma";

    /// <summary>The step's sequences with at least <paramref name="threshold"/> rows, and those with fewer.</summary>
    private static (int Longer, int Shorter) SequenceRowCounts(StepState step, int threshold)
    {
        var longer = 0;
        for (var i = 0; i < step.Sequences; i++)
            if (step.QueryStart[i + 1] - step.QueryStart[i] >= threshold) longer++;
        return (longer, step.Sequences - longer);
    }

    /// <summary>The tensor-core kernels' instantiations: head dimensions 16, 32, 64 and 128, at most 8 query heads per KV head.</summary>
    private static bool TensorAttentionFits(AttentionShape shape) =>
        shape.HeadDim is 16 or 32 or 64 or 128 && shape.Heads / shape.KvHeads <= 8;

    /// <summary>
    /// Shares each row's keys are cut into (decode kernels): enough blocks for <see cref="AttentionBlocksPerSm"/> per
    /// multiprocessor when the rows and KV heads alone are too few, at most 16; under --deterministic always
    /// <see cref="DeterministicAttentionSplits"/>, so that a row's keys are shared out, and its splits merged, the same way
    /// at every batch size (the shares depend on the row's own key count alone).
    /// </summary>
    private int AttentionSplits(int rows, int kvHeads) =>
        Deterministic ? DeterministicAttentionSplits : Math.Clamp((AttentionBlocksPerSm * Device.MultiprocessorCount + rows * kvHeads - 1) / (rows * kvHeads), 1, MaxAttentionSplits);

    /// <summary>
    /// Decode attention blocks (one warp each) aimed at per multiprocessor: 4, or MOE_RAG_INJECT_ATTENTION_BLOCKS_PER_SM
    /// (1 to 64) to measure others against it.
    /// </summary>
    private static readonly int AttentionBlocksPerSm =
        int.TryParse(Environment.GetEnvironmentVariable("MOE_RAG_INJECT_ATTENTION_BLOCKS_PER_SM"), out var blocks) ? Math.Clamp(blocks, 1, 64) : 4;

    private const int MaxAttentionSplits = 16;

    /// <summary>
    /// --deterministic's split count, whatever the batch: at batch 1 four warps share a KV head's keys, and at batch 64
    /// 2,048 warps run (the default takes 2 splits there); the split records cost 66 KB a row of Mixtral's shape.
    /// MOE_RAG_INJECT_DETERMINISTIC_SPLITS (1 to 16) sets another, to measure against.
    /// </summary>
    private static readonly int DeterministicAttentionSplits =
        int.TryParse(Environment.GetEnvironmentVariable("MOE_RAG_INJECT_DETERMINISTIC_SPLITS"), out var splits) ? Math.Clamp(splits, 1, MaxAttentionSplits) : 4;
    private DeviceBuffer? _attentionPartial;

    private static long AttentionPartialBytes(int rows, AttentionShape shape, int splits) =>
        4L * rows * shape.KvHeads * splits * (shape.Heads / shape.KvHeads) * (shape.HeadDim + 2);

    /// <summary>The split records' buffer for the largest rows · splits a runner of this model can take (before any capture).</summary>
    private static long AttentionPartialBound(ModelConfig config, int maxRows, Func<int, int, int> splitsFor)
    {
        var shape = MixtralModel.ShapeOf(config);
        long bytes = 0;
        for (var rows = 1; rows <= maxRows; rows++)
        {
            var splits = splitsFor(rows, shape.KvHeads);
            if (splits == 1) break;  // fewer splits as rows grow
            bytes = Math.Max(bytes, AttentionPartialBytes(rows, shape, splits));
        }
        return bytes;
    }

    /// <summary>Grows the split records' buffer; never once a graph holds its address.</summary>
    private void EnsureAttentionPartial(long bytes)
    {
        if (bytes == 0 || _attentionPartial is not null && _attentionPartial.ByteLength >= bytes) return;
        if (_capturing || _captures > 0)
            throw new InvalidOperationException($"attention split records of {bytes} bytes needed after graphs were captured (sized {_attentionPartial?.ByteLength ?? 0})");
        Stream.Synchronize();
        _attentionPartial?.Dispose();
        _attentionPartial = Device.Allocate(bytes);
    }

    /// <summary>Warps of an attention block (ATT_WARPS in attention.cu).</summary>
    private const int AttentionWarps = 16;
}
