using MoeRagInject.Model;

namespace MoeRagInject.Backend;

/// <summary>
/// The model runner of any <see cref="IBackend"/>: it sizes the KV pool and the fixed buffers, uploads the weights, keeps the
/// per-slot state (block tables, injections, sampling) in the backend's step buffers, and runs a step as one upload, the
/// forward pass with sampling, and one small download.
/// </summary>
public sealed class ModelRunner : IModelRunner
{
    private readonly IBackend _backend;
    private readonly MixtralModel _model;
    private readonly IKvCache _cache;
    private readonly IStepBuffers _step;
    private readonly ForwardBuffers _buffers;
    private readonly IDisposable? _ownedWeights;
    private readonly IGraphCapable? _graphs;
    private readonly int[] _buckets;
    private readonly Dictionary<int, IDisposable> _captured = [];
    /// <summary>The router probe's weights [layer, expert] on the device (zeros without a probe: eager steps still record probabilities).</summary>
    private readonly DeviceTensor _probe = null!;
    /// <summary>Whether steps run the router probe (the runner was given one).</summary>
    private readonly bool _probeInSteps;
    /// <summary>Logits rows of a step on the host, for top logprobs; allocated when a request first asks.</summary>
    private float[]? _hostLogits;

    /// <param name="ownedWeights">What holds the weights' host memory (a dummy checkpoint), disposed with the runner.</param>
    /// <param name="options">Whether and up to which batch decode steps replay captured graphs (backends that can capture).</param>
    public ModelRunner(IBackend backend, ModelConfig config, MixtralWeights weights, RunnerLimits limits,
        Action<string>? progress = null, IDisposable? ownedWeights = null, RunnerOptions? options = null)
    {
        _backend = backend;
        Config = config;
        Limits = limits;
        _ownedWeights = ownedWeights;
        if (backend is IGraphCapable graphs && options is { DisableCudaGraph: false })
        {
            _graphs = graphs;
            _buckets = GraphBuckets(Math.Min(options.CudaGraphMaxBatchSize, limits.MaxSequences));
        }
        else
        {
            _buckets = [];
        }
        try
        {
            _model = new MixtralModel(backend, config, weights, progress);
            _cache = backend.CreateKvCache(config.NumLayers, limits.NumKvBlocks, limits.BlockSize, config.NumKvHeads, config.HeadDim);
            State = new StepState(limits, config);
            _step = backend.CreateStepBuffers(State);
            _buffers = new ForwardBuffers(backend, config, limits.MaxRows, limits.MaxSequences);
            _probe = backend.Allocate(config.NumLayers, config.NumExperts);
            var probeWeights = new float[config.NumLayers * config.NumExperts];
            if (options?.RouterProbe is { } given)
            {
                if (given.Count != probeWeights.Length)
                    throw new ArgumentException($"the router probe has {given.Count} weights; the model has {config.NumLayers} layers × {config.NumExperts} experts");
                for (var i = 0; i < probeWeights.Length; i++) probeWeights[i] = given[i];
                _probeInSteps = true;
            }
            backend.Upload(probeWeights, _probe);
        }
        catch
        {
            DisposeParts();
            throw;
        }
    }

    public string Device => _backend.Description;
    public ModelConfig Config { get; }
    public RunnerLimits Limits { get; }
    public StepState State { get; } = null!;

    /// <summary>
    /// The limits a runner of <paramref name="config"/> gets on <paramref name="backend"/>, after checking that the weights and
    /// one context of KV cache fit: the KV pool takes what <see cref="RunnerOptions.MemFractionStatic"/> leaves after the
    /// weights, up to every slot holding a full context, unless <see cref="RunnerOptions.KvCacheTokens"/> sets it.
    /// </summary>
    public static RunnerLimits Plan(IBackend backend, ModelConfig config, long weightBytes, RunnerOptions options)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(options.MaxSequences, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(options.BlockSize, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(options.ContextLength, 1);
        var bs = options.BlockSize;
        var blocksPerSequence = (options.ContextLength + bs - 1) / bs;
        var context = blocksPerSequence * bs;
        var perToken = backend.KvBytesPerTokenPerLayer(config.NumKvHeads, config.HeadDim) * config.NumLayers;
        var maxRows = Math.Max(options.MaxRows, options.MaxSequences);
        // Activations and scratch come out of the same memory; the weights' share below includes them.
        weightBytes += backend.WorkspaceBytes(config, maxRows, options.MaxSequences);
        var available = backend.AvailableMemoryBytes;
        MemoryPlan.EnsureFits(backend.Description, weightBytes, perToken, context, available);
        long tokens;
        if (options.KvCacheTokens is { } asked)
        {
            tokens = Math.Max(asked, context);
            MemoryPlan.EnsureFits(backend.Description, weightBytes, perToken, (int)Math.Min(tokens, int.MaxValue), available);
        }
        else
        {
            var budget = (long)(available * options.MemFractionStatic) - weightBytes;
            tokens = Math.Clamp(budget / perToken, context, (long)options.MaxSequences * context);
        }
        var blocks = (int)Math.Min((tokens + bs - 1) / bs, int.MaxValue / bs);
        return new RunnerLimits(options.MaxSequences, maxRows, blocksPerSequence, bs, blocks, perToken, weightBytes);
    }

    public void BindSlot(int slot, SlotSampling sampling, ReadOnlySpan<int> promptIds)
    {
        CheckSlot(slot);
        State.Sampling[slot] = sampling;
        State.Penalties[slot].Reset(promptIds);
        ClearInjectionState(slot);
        _step.SlotBound(slot);
    }

    public void SetBlocks(int slot, int firstIndex, ReadOnlySpan<int> blocks)
    {
        CheckSlot(slot);
        if (firstIndex < 0 || firstIndex + blocks.Length > Limits.MaxBlocksPerSequence)
            throw new ArgumentOutOfRangeException(nameof(firstIndex), $"block entries {firstIndex}..{firstIndex + blocks.Length} exceed the table's {Limits.MaxBlocksPerSequence}");
        foreach (var block in blocks)
            if ((uint)block >= (uint)Limits.NumKvBlocks)
                throw new ArgumentOutOfRangeException(nameof(blocks), $"KV block {block} is outside the pool of {Limits.NumKvBlocks}");
        blocks.CopyTo(State.BlockTable(slot)[firstIndex..]);
        _step.BlocksChanged(slot, firstIndex, blocks.Length);
    }

    public void SetInjection(int slot, ReadOnlySpan<float> vector, IReadOnlyList<int> layers, int start, int end, int answerBase = -1)
    {
        CheckSlot(slot);
        var hidden = Config.HiddenSize;
        if (vector.Length == 0 || vector.Length % hidden != 0)
            throw new ArgumentException($"the injection has {vector.Length} values; it must be one or more vectors of the hidden size {hidden}");
        _positionVectors.Remove(slot);
        if (vector.Length > hidden)
        {
            var count = vector.Length / hidden;
            if (answerBase < 0 || start < answerBase)
                throw new ArgumentException($"{count} injection vectors (one an answer position) need the answer's base position at or before the start {start}, not {answerBase}");
            end = Math.Min(end, answerBase + count);
            var first = Math.Min(start - answerBase, count - 1);
            _positionVectors[slot] = new PositionVectors(vector.ToArray(), answerBase) { Current = first };
            vector = vector.Slice(first * hidden, hidden);
        }
        vector.CopyTo(State.InjectionVector(slot));
        var scales = State.InjectionScale(slot);
        scales.Clear();
        foreach (var layer in layers)
        {
            if ((uint)layer >= (uint)Config.NumLayers) throw new ArgumentOutOfRangeException(nameof(layers), $"layer {layer} does not exist");
            scales[layer] = 1f;
        }
        State.InjectionStart[slot] = start;
        State.InjectionEnd[slot] = end;
        _step.SlotChanged(slot);
    }

    public void ClearInjection(int slot)
    {
        CheckSlot(slot);
        ClearInjectionState(slot);
        _step.SlotChanged(slot);
    }

    /// <summary>A slot's injection with one vector an answer position: all K vectors, and the position of vector 0.</summary>
    private sealed record PositionVectors(float[] Vectors, int AnswerBase)
    {
        public int Current { get; set; } = -1;
    }

    private readonly Dictionary<int, PositionVectors> _positionVectors = [];

    /// <summary>
    /// For slots injecting one vector an answer position: the vector of the step's row of the slot (by its position) goes
    /// into the slot's injection, uploaded with the step. A step may hold only one such row a slot.
    /// </summary>
    private void SelectPositionVectors()
    {
        if (_positionVectors.Count == 0) return;
        var s = State;
        var hidden = Config.HiddenSize;
        for (var i = 0; i < s.Sequences; i++)
        {
            var slot = s.SeqSlot[i];
            if (slot < 0 || !_positionVectors.TryGetValue(slot, out var vectors)) continue;
            int start = s.InjectionStart[slot], end = s.InjectionEnd[slot], chosen = -1;
            for (var r = s.QueryStart[i]; r < s.QueryStart[i + 1]; r++)
            {
                var position = s.Positions[r];
                if (position < start || position >= end) continue;
                if (chosen >= 0)
                    throw new InvalidOperationException($"slot {slot} injects one vector an answer position, but the step holds several of its rows at positions {start}..{end - 1}");
                chosen = position - vectors.AnswerBase;
            }
            if (chosen < 0 || chosen == vectors.Current) continue;
            vectors.Vectors.AsSpan(chosen * hidden, hidden).CopyTo(s.InjectionVector(slot));
            vectors.Current = chosen;
            _step.SlotChanged(slot);
        }
    }

    private void ClearInjectionState(int slot)
    {
        _positionVectors.Remove(slot);
        State.InjectionScale(slot).Clear();
        State.InjectionStart[slot] = int.MaxValue;
        State.InjectionEnd[slot] = int.MaxValue;
    }

    public void AcceptToken(int slot, int token)
    {
        var counts = State.Penalties[slot].OutputCounts;
        counts[token] = counts.GetValueOrDefault(token) + 1;
        _step.TokenAccepted(slot, token);
    }

    /// <summary>Decode batch sizes that get a graph: 1, 2, 4, 8, then steps of 8 to 64, of 16 to 128, of 32 beyond (as sglang and nano-vllm pad).</summary>
    public static int[] GraphBuckets(int max)
    {
        var buckets = new List<int>();
        for (var b = 1; b <= max;)
        {
            buckets.Add(b);
            b = b < 8 ? b * 2 : b < 64 ? b + 8 : b < 128 ? b + 16 : b + 32;
        }
        if (max > 0 && buckets[^1] != max) buckets.Add(max);
        return [.. buckets];
    }

    /// <summary>Decode steps whose batch has a captured graph (or gets one now), by bucket; the rest run op by op.</summary>
    public IReadOnlyCollection<int> CapturedBuckets => _captured.Keys;

    public void Execute()
    {
        var s = State;
        if (_graphs is not null && s.Rows == s.Sequences && FindBucket(s.Sequences) is { } bucket && _graphs.CanCapture(bucket))
        {
            var real = s.Sequences;
            Pad(bucket);
            PrepareRows();
            SelectPositionVectors();
            _step.Upload();
            if (!_captured.TryGetValue(bucket, out var graph))
            {
                graph = _graphs.Capture(() => _model.Step(_buffers, _cache, _step, bucket, bucket, StepProbe));
                _captured[bucket] = graph;
            }
            _graphs.Replay(graph);
            _step.Download();
            s.Rows = s.Sequences = real;
            TopLogprobsOnHost();
            return;
        }
        PrepareRows();
        SelectPositionVectors();
        _step.Upload();
        _model.Step(_buffers, _cache, _step, s.Rows, s.Sequences, StepProbe);
        _step.Download();
        TopLogprobsOnHost();
    }

    private DeviceTensor? StepProbe => _probeInSteps ? _probe : null;

    /// <summary>Whether the runner was given a router probe (its steps report <see cref="StepState.OutProbeLogit"/>).</summary>
    public bool HasRouterProbe => _probeInSteps;

    /// <summary>
    /// The most likely tokens of the sequences that asked (<see cref="StepState.FlagTopLogprobs"/>), from their logits rows,
    /// on the host for every backend: the rows are downloaded only in steps where a sequence asks, so the sampling kernels
    /// and the captured graphs stay as they are, and CPU and GPU give the same alternatives by construction.
    /// </summary>
    private void TopLogprobsOnHost()
    {
        var s = State;
        var last = -1;
        for (var i = 0; i < s.Sequences; i++)
            if ((s.SeqFlags[i] & StepState.FlagTopLogprobs) != 0 && s.OutStatus[i] == SampleStatus.Ok) last = i;
        if (last < 0) return;
        var vocab = Config.VocabSize;
        _hostLogits ??= new float[(long)Limits.MaxSequences * vocab];
        _backend.Download(_buffers.Logits, last + 1, _hostLogits);
        for (var i = 0; i <= last; i++)
            if ((s.SeqFlags[i] & StepState.FlagTopLogprobs) != 0 && s.OutStatus[i] == SampleStatus.Ok)
                Sampler.TopLogprobs(_hostLogits.AsSpan(i * vocab, vocab), s.TopIdsOf(i), s.TopLogprobsOf(i));
    }

    private int? FindBucket(int sequences)
    {
        foreach (var b in _buckets)
            if (b >= sequences) return b;
        return null;
    }

    /// <summary>Fills a decode step up to <paramref name="bucket"/> with padding sequences: slot −1, one row each, nothing sampled or written.</summary>
    private void Pad(int bucket)
    {
        var s = State;
        for (var i = s.Sequences; i < bucket; i++)
        {
            s.SeqSlot[i] = -1;
            s.QueryStart[i + 1] = i + 1;
            s.TokenIds[i] = 0;
            s.Positions[i] = 0;
            s.SeqFlags[i] = 0;
            s.Uniform[i] = 0;
        }
        s.Rows = s.Sequences = bucket;
    }

    public EagerResult ForwardEager(IReadOnlyList<EagerSequence> sequences, IReadOnlyList<int>? captureLayers = null)
    {
        var s = State;
        var row = 0;
        var logitRows = new List<int>();
        for (var i = 0; i < sequences.Count; i++)
        {
            var seq = sequences[i];
            CheckSlot(seq.Slot);
            if (seq.TokenIds.Count == 0) throw new ArgumentException($"sequence {i} has no tokens");
            if (row + seq.TokenIds.Count > Limits.MaxRows) throw new ArgumentException($"the step has more than {Limits.MaxRows} rows");
            s.SeqSlot[i] = seq.Slot;
            s.QueryStart[i] = row;
            s.SeqFlags[i] = 0;
            for (var j = 0; j < seq.TokenIds.Count; j++)
            {
                s.TokenIds[row] = seq.TokenIds[j];
                s.Positions[row] = seq.StartPosition + j;
                if (seq.AllLogits || j == seq.TokenIds.Count - 1) logitRows.Add(row);
                row++;
            }
        }
        s.Sequences = sequences.Count;
        s.Rows = row;
        s.QueryStart[sequences.Count] = row;
        PrepareRows();
        SelectPositionVectors();
        _step.Upload();

        var hidden = Config.HiddenSize;
        float[]? captured = captureLayers is { Count: > 0 } ? new float[logitRows.Count * captureLayers.Count * hidden] : null;
        var rowScratch = captured is null ? null : new float[row * hidden];
        _model.Layers(_buffers, _cache, _step, row, _probe, captured is null ? null : (layer, stream) =>
        {
            var index = IndexOf(captureLayers!, layer);
            if (index < 0) return;
            _backend.Download(stream, row, rowScratch);
            for (var i = 0; i < logitRows.Count; i++)
                rowScratch.AsSpan(logitRows[i] * hidden, hidden).CopyTo(captured.AsSpan((i * captureLayers!.Count + index) * hidden, hidden));
        });

        var vocab = Config.VocabSize;
        using var logits = _backend.Allocate(row, vocab);
        _backend.Linear(_buffers.Normed, _model.LmHead, logits, row);
        var all = new float[(long)row * vocab];
        _backend.Download(logits, row, all);
        var picked = new float[logitRows.Count * vocab];
        for (var i = 0; i < logitRows.Count; i++) all.AsSpan(logitRows[i] * vocab, vocab).CopyTo(picked.AsSpan(i * vocab, vocab));
        _step.DownloadRowEntropies();
        return new EagerResult(picked, vocab, s.RowEntropies.AsSpan(0, row * Config.NumLayers).ToArray(), Config.NumLayers, captured)
        {
            Experts = Config.NumExperts,
            RouterProbs = s.RowRouterProbs.AsSpan(0, row * Config.NumLayers * Config.NumExperts).ToArray(),
            ProbeLogits = s.RowProbeLogits.AsSpan(0, row).ToArray(),
        };
    }

    private static int IndexOf(IReadOnlyList<int> list, int value)
    {
        for (var i = 0; i < list.Count; i++)
            if (list[i] == value) return i;
        return -1;
    }

    /// <summary>Derives each row's sequence and KV slot, and each sequence's context length, from the engine's inputs.</summary>
    private void PrepareRows()
    {
        var s = State;
        if (s.Sequences < 1 || s.Sequences > Limits.MaxSequences) throw new InvalidOperationException($"a step has 1..{Limits.MaxSequences} sequences, not {s.Sequences}");
        if (s.Rows < s.Sequences || s.Rows > Limits.MaxRows) throw new InvalidOperationException($"a step of {s.Sequences} sequences has {s.Sequences}..{Limits.MaxRows} rows, not {s.Rows}");
        if (s.QueryStart[0] != 0 || s.QueryStart[s.Sequences] != s.Rows) throw new InvalidOperationException("QueryStart does not cover the step's rows");
        var context = Limits.ContextLength;
        for (var i = 0; i < s.Sequences; i++)
        {
            var slot = s.SeqSlot[i];
            int first = s.QueryStart[i], end = s.QueryStart[i + 1];
            if (slot < 0)
            {
                // Padding: one row that reads and writes no cache.
                s.RowSequence[first] = i;
                s.KvSlots[first] = -1;
                s.ContextLength[i] = 1;
                continue;
            }
            CheckSlot(slot);
            if (end <= first) throw new InvalidOperationException($"sequence {i} of the step has no rows");
            for (var r = first; r < end; r++)
            {
                var position = s.Positions[r];
                if ((uint)position >= (uint)context) throw new InvalidOperationException($"position {position} is outside the context of {context}");
                s.RowSequence[r] = i;
                s.KvSlots[r] = s.KvSlotOf(slot, position);
            }
            s.ContextLength[i] = s.Positions[end - 1] + 1;
        }
    }

    private void CheckSlot(int slot)
    {
        if ((uint)slot >= (uint)Limits.MaxSequences) throw new ArgumentOutOfRangeException(nameof(slot), slot, $"slots are 0..{Limits.MaxSequences - 1}");
    }

    public void Dispose() => DisposeParts();

    private void DisposeParts()
    {
        foreach (var graph in _captured.Values) graph.Dispose();
        _captured.Clear();
        _buffers?.Dispose();
        _probe?.Dispose();
        _step?.Dispose();
        _cache?.Dispose();
        _model?.Dispose();
        _backend.Dispose();
        _ownedWeights?.Dispose();
    }
}
