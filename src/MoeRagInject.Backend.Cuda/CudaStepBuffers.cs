using System.Runtime.InteropServices;
using MoeRagInject.Backend.Cuda.Interop;

namespace MoeRagInject.Backend.Cuda;

/// <summary>
/// The device side of the runner's <see cref="StepState"/>, at fixed addresses for the runner's lifetime (what a captured
/// graph reads and writes). A step's inputs travel as one packed region: the per-row and per-sequence arrays, the block-table
/// entries changed since the last step and the accepted tokens (applied by two small kernels), staged in pinned memory and
/// copied in one transfer. The outputs come back the same way. Per-slot state (injection, sampling) is copied only when it
/// changes. Routing and MoE scratch, sized for the largest step, live here too.
/// </summary>
internal sealed class CudaStepBuffers : IStepBuffers
{
    public const int MaxSuppressed = 16;
    public const int SlotParamFloats = 8;

    private readonly CudaBackend _backend;
    private readonly int _rows, _seqs, _layers, _vocab, _hidden, _maxBlocks, _updateCapacity;
    private readonly PinnedBuffer<int> _inPinned, _outPinned;
    private readonly PinnedBuffer<int> _offsetsPinned;
    private readonly CudaEvent _offsetsCopied;
    private readonly DeviceBuffer _in, _out;
    private readonly List<DeviceBuffer> _owned = [];
    private readonly List<(int Slot, int First, int Count)> _blockChanges = [];
    private readonly List<(int Slot, int Token)> _accepted = [];
    private readonly HashSet<int> _dirtySlots = [];
    private readonly HashSet<int> _boundSlots = [];
    private readonly int _offTokens, _offPositions, _offKvSlots, _offRowSequence, _offSeqSlot, _offQueryStart, _offContext, _offFlags,
        _offUniform, _offUpdates, _offAccepted, _inInts;
    private readonly int _outTokens, _outStatus, _outLogprobs, _outEntropy, _outRouter, _outProbe, _outInts;

    public CudaStepBuffers(CudaBackend backend, StepState host, int denseMaxRows)
    {
        _backend = backend;
        Host = host;
        var c = host.Config;
        var limits = host.Limits;
        _rows = limits.MaxRows;
        _seqs = limits.MaxSequences;
        _layers = c.NumLayers;
        _vocab = c.VocabSize;
        _hidden = c.HiddenSize;
        _maxBlocks = limits.MaxBlocksPerSequence;
        _updateCapacity = _rows + _seqs;
        var device = backend.Device;

        var at = 0;
        int Take(int count)
        {
            var start = at;
            at += count;
            return start;
        }
        _offTokens = Take(_rows);
        _offPositions = Take(_rows);
        _offKvSlots = Take(_rows);
        _offRowSequence = Take(_rows);
        _offSeqSlot = Take(_seqs);
        _offQueryStart = Take(_seqs + 1);
        _offContext = Take(_seqs);
        _offFlags = Take(_seqs);
        _offUniform = Take(_seqs);
        _offUpdates = Take(2 * _updateCapacity);
        _offAccepted = Take(2 * _seqs);
        _inInts = at;
        at = 0;
        _outTokens = Take(_seqs);
        _outStatus = Take(_seqs);
        _outLogprobs = Take(_seqs);
        _outEntropy = Take(_seqs);
        _outRouter = Take(_seqs * _layers);
        _outProbe = Take(_seqs);
        _outInts = at;

        _inPinned = device.AllocatePinned<int>(_inInts);
        _outPinned = device.AllocatePinned<int>(_outInts);
        _in = Own(4L * _inInts);
        _out = Own(4L * _outInts);

        BlockTables = Own(4L * _seqs * _maxBlocks);
        BlockTables.Memset(0, backend.Stream);
        InjectionVectors = Own(4L * _seqs * _hidden);
        InjectionScales = Own(4L * _seqs * _layers);
        InjectionScales.Memset(0, backend.Stream);
        InjectionStarts = Own(4L * _seqs);
        InjectionEnds = Own(4L * _seqs);
        SlotParams = Own(4L * _seqs * SlotParamFloats);
        SlotParams.Memset(0, backend.Stream);
        Suppressed = Own(4L * _seqs * MaxSuppressed);
        Counts = Own(4L * _seqs * _vocab);
        Counts.Memset(0, backend.Stream);
        PromptMask = Own((long)_seqs * _vocab);
        PromptMask.Memset(0, backend.Stream);
        PromptIds = Own(4L * Math.Max(1, limits.ContextLength));
        // The model's rotations at every position a sequence can reach, made once (rope_table).
        RopeRows = Math.Max(1, limits.ContextLength);
        RopeTable = Own(8L * RopeRows * (c.HeadDim / 2));
        backend.Launch("rope_table", (uint)(((long)RopeRows * (c.HeadDim / 2) + 255) / 256), 256, RopeTable, RopeRows, c.HeadDim, c.RopeTheta);

        var k = c.NumExpertsPerToken;
        var slots = (long)_rows * k;
        var moeRows = Math.Max(slots, (long)c.NumExperts * denseMaxRows);
        RowEntropies = Own(4L * _rows * _layers);
        RouterProbs = Own(4L * _rows * _layers * c.NumExperts);
        ProbeSums = Own(4L * _rows);
        TopIds = Own(4 * slots);
        TopWeights = Own(4 * slots);
        Offsets = Own(4L * (c.NumExperts + 1));
        _offsetsPinned = device.AllocatePinned<int>(c.NumExperts + 1);
        _offsetsCopied = device.CreateEvent();
        Sorted = Own(4 * slots);
        PlaceOf = Own(4 * slots);
        MoeRows = moeRows;
        MoeSlots = slots;
        // Each with ExpertRowSlack rows to spare: the cuBLAS path's GEMMs run over rounded row counts (CudaBackend.ExpertGemmRows).
        MoeGateUp = Own(4 * (moeRows + ExpertRowSlack) * 2 * c.IntermediateSize);
        MoeAct = Own(2 * (moeRows + ExpertRowSlack) * c.IntermediateSize);
        MoeOut = Own(4 * (moeRows + ExpertRowSlack) * _hidden);
        MoeInputs = Own(2 * (slots + ExpertRowSlack) * _hidden);
        SampleWork = Own(4L * _seqs * _vocab);
        backend.Stream.Synchronize();
    }

    /// <summary>Device bytes these buffers take for a runner of these sizes (the memory plan counts them before allocating).</summary>
    public static long Bytes(Model.ModelConfig c, int maxRows, int maxSequences, int contextLength, int denseMaxRows)
    {
        long rows = maxRows, seqs = maxSequences, slots = rows * c.NumExpertsPerToken;
        var moeRows = Math.Max(slots, (long)c.NumExperts * denseMaxRows);
        var io = 4 * (8 * rows + 13 * seqs + seqs * c.NumLayers);
        var perSlot = seqs * (4L * (Math.Max(1, contextLength) / 16 + 1) + 4L * c.HiddenSize + 4L * c.NumLayers + 8 + 32 + 64 + 5L * c.VocabSize)
            + 8L * Math.Max(1, contextLength) * (c.HeadDim / 2);  // the RoPE table
        var scratch = 4 * rows * c.NumLayers * (1L + c.NumExperts) + 4 * rows + 12 * slots
            + (moeRows + ExpertRowSlack) * (8L * c.IntermediateSize + 2L * c.IntermediateSize + 4L * c.HiddenSize)
            + 2 * (slots + ExpertRowSlack) * c.HiddenSize + 4 * seqs * c.VocabSize;
        return 2 * io + perSlot + scratch;
    }

    public StepState Host { get; }

    /// <summary>(cos, sin) of every position below <see cref="RopeRows"/> and rotated pair, for the config's RoPE theta and head size.</summary>
    public DeviceBuffer RopeTable { get; }
    public int RopeRows { get; }

    // The packed inputs, by device address.
    public ulong TokenIds => _in.Pointer + 4UL * (ulong)_offTokens;
    public ulong Positions => _in.Pointer + 4UL * (ulong)_offPositions;
    public ulong KvSlots => _in.Pointer + 4UL * (ulong)_offKvSlots;
    public ulong RowSequence => _in.Pointer + 4UL * (ulong)_offRowSequence;
    public ulong SeqSlot => _in.Pointer + 4UL * (ulong)_offSeqSlot;
    public ulong QueryStart => _in.Pointer + 4UL * (ulong)_offQueryStart;
    public ulong SeqFlags => _in.Pointer + 4UL * (ulong)_offFlags;
    public ulong Uniforms => _in.Pointer + 4UL * (ulong)_offUniform;

    // The packed outputs.
    public ulong OutTokens => _out.Pointer + 4UL * (ulong)_outTokens;
    public ulong OutStatus => _out.Pointer + 4UL * (ulong)_outStatus;
    public ulong OutLogprobs => _out.Pointer + 4UL * (ulong)_outLogprobs;
    public ulong OutEntropy => _out.Pointer + 4UL * (ulong)_outEntropy;
    public ulong OutRouter => _out.Pointer + 4UL * (ulong)_outRouter;
    public ulong OutProbe => _out.Pointer + 4UL * (ulong)_outProbe;

    public DeviceBuffer BlockTables { get; }
    public DeviceBuffer InjectionVectors { get; }
    public DeviceBuffer InjectionScales { get; }
    public DeviceBuffer InjectionStarts { get; }
    public DeviceBuffer InjectionEnds { get; }
    public DeviceBuffer SlotParams { get; }
    public DeviceBuffer Suppressed { get; }
    public DeviceBuffer Counts { get; }
    public DeviceBuffer PromptMask { get; }
    private DeviceBuffer PromptIds { get; }

    public DeviceBuffer RowEntropies { get; }
    /// <summary>The router probe's view of every row: softmax probabilities [rows, layers, experts] and the weighted sum [rows].</summary>
    public DeviceBuffer RouterProbs { get; }
    public DeviceBuffer ProbeSums { get; }
    public DeviceBuffer TopIds { get; }
    public DeviceBuffer TopWeights { get; }
    public DeviceBuffer Offsets { get; }
    public DeviceBuffer Sorted { get; }
    public DeviceBuffer PlaceOf { get; }
    /// <summary>
    /// The cuBLAS paths' gate/up products, bf16 [rows, 2I] (dense: [E, rows, 2I]); the wgmma path's fp32 down partials under
    /// --deterministic (sized for fp32 gate/up products, which both fit).
    /// </summary>
    public DeviceBuffer MoeGateUp { get; }
    /// <summary>silu(gate)·up, bf16 [rows, I].</summary>
    public DeviceBuffer MoeAct { get; }
    /// <summary>Expert outputs, fp32 [rows, H].</summary>
    public DeviceBuffer MoeOut { get; }
    /// <summary>The grouped path's inputs sorted by expert, bf16 [slots, H].</summary>
    public DeviceBuffer MoeInputs { get; }
    /// <summary>Rows of <see cref="MoeAct"/> and <see cref="MoeOut"/> a step may fill, and slots of <see cref="MoeInputs"/> (each buffer has <see cref="ExpertRowSlack"/> more).</summary>
    public long MoeRows { get; }
    public long MoeSlots { get; }

    /// <summary>Rows past <see cref="MoeRows"/> and <see cref="MoeSlots"/> in the MoE buffers: at least what <see cref="CudaBackend.ExpertGemmRows"/> adds to a group.</summary>
    public const int ExpertRowSlack = 64;
    public DeviceBuffer SampleWork { get; }

    private DeviceBuffer Own(long bytes)
    {
        var buffer = _backend.Device.Allocate(Math.Max(16, bytes));
        _owned.Add(buffer);
        return buffer;
    }

    public void SlotChanged(int slot) => _dirtySlots.Add(slot);

    public void BlocksChanged(int slot, int first, int count) => _blockChanges.Add((slot, first, count));

    public void TokenAccepted(int slot, int token) => _accepted.Add((slot, token));

    public void SlotBound(int slot)
    {
        _boundSlots.Add(slot);
        _dirtySlots.Add(slot);
    }

    public void Upload()
    {
        _backend.EnsureCurrent();
        var stream = _backend.Stream;
        var s = Host;
        int rows = s.Rows, seqs = s.Sequences;
        var p = _inPinned.Span;
        s.TokenIds.AsSpan(0, rows).CopyTo(p[_offTokens..]);
        s.Positions.AsSpan(0, rows).CopyTo(p[_offPositions..]);
        s.KvSlots.AsSpan(0, rows).CopyTo(p[_offKvSlots..]);
        s.RowSequence.AsSpan(0, rows).CopyTo(p[_offRowSequence..]);
        s.SeqSlot.AsSpan(0, seqs).CopyTo(p[_offSeqSlot..]);
        s.QueryStart.AsSpan(0, seqs + 1).CopyTo(p[_offQueryStart..]);
        s.ContextLength.AsSpan(0, seqs).CopyTo(p[_offContext..]);
        for (var i = 0; i < seqs; i++) p[_offFlags + i] = s.SeqFlags[i];
        MemoryMarshal.Cast<float, int>(s.Uniform.AsSpan(0, seqs)).CopyTo(p[_offUniform..]);

        var updates = 0;
        var whole = false;
        foreach (var (slot, first, count) in _blockChanges)
        {
            if (updates + count > _updateCapacity)
            {
                whole = true;
                break;
            }
            for (var j = first; j < first + count; j++)
            {
                var index = slot * _maxBlocks + j;
                p[_offUpdates + 2 * updates] = index;
                p[_offUpdates + 2 * updates + 1] = s.BlockTables[index];
                updates++;
            }
        }
        _blockChanges.Clear();
        // One accepted token per sequence per step at most, so the list always fits.
        if (_accepted.Count > _seqs) throw new InvalidOperationException($"{_accepted.Count} accepted tokens in one step, more than the {_seqs} slots");
        var accepted = _accepted.Count;
        for (var i = 0; i < accepted; i++)
        {
            p[_offAccepted + 2 * i] = _accepted[i].Slot;
            p[_offAccepted + 2 * i + 1] = _accepted[i].Token;
        }
        _in.UploadPinned(_inPinned, _inInts, stream);

        if (whole) BlockTables.Upload<int>(s.BlockTables, stream);
        else if (updates > 0) _backend.Launch("set_entries", Grid(updates), 256, BlockTables, _in.Pointer + 4UL * (ulong)_offUpdates, updates);
        foreach (var slot in _dirtySlots) UploadSlot(slot);
        _dirtySlots.Clear();
        _boundSlots.Clear();
        if (accepted > 0) _backend.Launch("count_accepted", Grid(accepted), 256, Counts, _in.Pointer + 4UL * (ulong)_offAccepted, accepted, _vocab);
        _accepted.Clear();
    }

    /// <summary>Copies the slot's injection and sampling state; for a newly bound slot with penalties, rebuilds its counts and prompt mask.</summary>
    private void UploadSlot(int slot)
    {
        var s = Host;
        var stream = _backend.Stream;
        InjectionVectors.Upload<float>(s.InjectionVector(slot), stream, 4L * slot * _hidden);
        InjectionScales.Upload<float>(s.InjectionScale(slot), stream, 4L * slot * _layers);
        InjectionStarts.Upload<int>([s.InjectionStart[slot]], stream, 4L * slot);
        InjectionEnds.Upload<int>([s.InjectionEnd[slot]], stream, 4L * slot);
        var sampling = s.Sampling[slot];
        var suppressed = sampling.SuppressedIds.Take(MaxSuppressed).ToArray();
        SlotParams.Upload<float>([sampling.Temperature, sampling.TopP, sampling.TopK, sampling.MinP, sampling.RepetitionPenalty,
            sampling.FrequencyPenalty, sampling.PresencePenalty, suppressed.Length], stream, 4L * slot * SlotParamFloats);
        if (suppressed.Length > 0) Suppressed.Upload<int>(suppressed, stream, 4L * slot * MaxSuppressed);
        if (!_boundSlots.Contains(slot) || !sampling.HasPenalties) return;
        _backend.Launch("reset_penalties", Grid(_vocab), 256, Counts, PromptMask, slot, _vocab);
        var prompt = s.Penalties[slot].PromptTokens.ToArray();
        if (prompt.Length == 0) return;
        var n = Math.Min(prompt.Length, (int)(PromptIds.ByteLength / 4));
        PromptIds.Upload<int>(prompt.AsSpan(0, n), stream);
        _backend.Launch("mark_prompt", Grid(n), 256, PromptMask, slot, _vocab, PromptIds, n);
    }

    private static uint Grid(int items) => (uint)Math.Clamp((items + 255) / 256, 1, 4096);

    public void Download()
    {
        var stream = _backend.Stream;
        var seqs = Host.Sequences;
        _out.DownloadPinned(_outPinned, _outInts, stream);
        stream.Synchronize();
        var o = _outPinned.Span;
        var s = Host;
        o.Slice(_outTokens, seqs).CopyTo(s.OutTokens);
        for (var i = 0; i < seqs; i++) s.OutStatus[i] = (SampleStatus)o[_outStatus + i];
        MemoryMarshal.Cast<int, float>(o.Slice(_outLogprobs, seqs)).CopyTo(s.OutLogprobs);
        MemoryMarshal.Cast<int, float>(o.Slice(_outEntropy, seqs)).CopyTo(s.OutOutputEntropy);
        MemoryMarshal.Cast<int, float>(o.Slice(_outRouter, seqs * _layers)).CopyTo(s.OutRouterEntropy);
        MemoryMarshal.Cast<int, float>(o.Slice(_outProbe, seqs)).CopyTo(s.OutProbeLogit);
    }

    /// <summary>
    /// Enqueues the copy of the group offsets (moe_align's) to page-locked host memory; <see cref="WaitGroupOffsets"/> then
    /// waits for it alone, so that the work enqueued between the two (the gather of the rows) runs while the host waits.
    /// </summary>
    public void CopyGroupOffsets(int experts)
    {
        Offsets.DownloadPinned(_offsetsPinned, experts + 1, _backend.Stream);
        _offsetsCopied.Record(_backend.Stream);
    }

    /// <summary>Waits for the copy <see cref="CopyGroupOffsets"/> enqueued and returns the offsets (valid until the next copy).</summary>
    public ReadOnlySpan<int> WaitGroupOffsets(int experts)
    {
        _offsetsCopied.Synchronize();
        return _offsetsPinned.Span[..(experts + 1)];
    }

    public void DownloadRowEntropies()
    {
        var s = Host;
        RowEntropies.Download<float>(s.RowEntropies.AsSpan(0, s.Rows * _layers), _backend.Stream);
        RouterProbs.Download<float>(s.RowRouterProbs.AsSpan(0, s.Rows * _layers * s.Experts), _backend.Stream);
        ProbeSums.Download<float>(s.RowProbeLogits.AsSpan(0, s.Rows), _backend.Stream);
    }

    public void Dispose()
    {
        foreach (var buffer in _owned) buffer.Dispose();
        _inPinned.Dispose();
        _outPinned.Dispose();
        _offsetsPinned.Dispose();
        _offsetsCopied.Dispose();
    }
}
