namespace MoeRagInject.Engine.Scheduling;

/// <summary>One sequence's share of a step: <see cref="Tokens"/> positions from its <see cref="Sequence.Computed"/> on.</summary>
/// <param name="CountsAsPrefill">Whether its tokens were taken from the step's prefill budget (prompt chunks and recomputes; not decodes).</param>
internal readonly record struct ScheduledChunk(Sequence Sequence, int Tokens, bool CountsAsPrefill);

/// <summary>
/// Pure bookkeeping of who runs in the next step (nothing here knows tensors). A waiting queue and a running set ordered by
/// arrival; KV blocks appended on demand as sequences grow. Each step takes, in order: one token of every decoding request
/// (so that a long prompt never stalls them), prompt chunks of running requests, then new or preempted requests, while
/// slots, the prefill budget (--chunked-prefill-size per request, --max-prefill-tokens in all) and free blocks allow. When a
/// running request needs a block and none is free, the newest request holding blocks is preempted: its blocks are freed and
/// it waits at the front of the queue to be recomputed.
/// </summary>
internal sealed class Scheduler
{
    private readonly KvBlockManager _blocks;
    private readonly LinkedList<Sequence> _waiting = new();
    /// <summary>Running and retrieving sequences, oldest first.</summary>
    private readonly List<Sequence> _running = [];
    /// <summary>Sequences retrieving before admission (--retrieve-first): no slot, no blocks; queued when their retrieval ends.</summary>
    private readonly HashSet<Sequence> _retrievingFirst = [];
    private readonly Stack<int> _freeSlots;
    private readonly List<ScheduledChunk> _batch = [];
    private readonly int _chunkSize;
    private readonly int _prefillBudget;

    public Scheduler(KvBlockManager blocks, int maxSequences, int chunkSize, int prefillBudget)
    {
        _blocks = blocks;
        _chunkSize = chunkSize;
        _prefillBudget = prefillBudget;
        _freeSlots = new Stack<int>(Enumerable.Range(0, maxSequences).Reverse());
        MaxSequences = maxSequences;
    }

    public int MaxSequences { get; }
    public KvBlockManager Blocks => _blocks;
    public long Preemptions { get; private set; }
    /// <summary>Prompt positions that parallel samples took from their leader's blocks instead of computing.</summary>
    public long SharedTokens { get; private set; }
    public int Waiting => _waiting.Count;
    /// <summary>Sequences holding a slot that are not parked by a retrieval.</summary>
    public int Running => _running.Count - ParkedRunning;
    /// <summary>Sequences waiting for a retrieval: parked with their slot, or not yet admitted (--retrieve-first).</summary>
    public int Retrieving => ParkedRunning + _retrievingFirst.Count;

    private int ParkedRunning
    {
        get
        {
            var n = 0;
            foreach (var s in _running)
                if (s.State == SequenceState.Retrieving) n++;
            return n;
        }
    }

    public void Add(Sequence sequence)
    {
        sequence.State = SequenceState.Waiting;
        _waiting.AddLast(sequence);
    }

    /// <summary>A new sequence that retrieves before it is admitted: it waits outside the queue until <see cref="Resume"/>.</summary>
    public void HoldForRetrieval(Sequence sequence)
    {
        sequence.State = SequenceState.Retrieving;
        _retrievingFirst.Add(sequence);
    }

    /// <summary>Every sequence not finished (for shutdown).</summary>
    public List<Sequence> All() => [.. _running, .. _waiting, .. _retrievingFirst];

    /// <summary>Takes a finished sequence out: its blocks and slot go back to the pools.</summary>
    public void Remove(Sequence sequence)
    {
        if (!_running.Remove(sequence) && !_retrievingFirst.Remove(sequence)) _waiting.Remove(sequence);
        ReleaseBlocks(sequence);
        if (sequence.Slot >= 0)
        {
            _freeSlots.Push(sequence.Slot);
            sequence.Slot = -1;
        }
    }

    /// <summary>
    /// A parked sequence may run again; one that lost its blocks while parked goes to the front of the queue to be recomputed,
    /// and one that retrieved before admission joins the queue in arrival order (behind any request that came before it, so a
    /// parallel sample never queues ahead of the first sample whose prompt blocks it waits to share).
    /// </summary>
    public void Resume(Sequence sequence)
    {
        if (_retrievingFirst.Remove(sequence))
        {
            sequence.State = SequenceState.Waiting;
            var after = _waiting.Last;
            while (after is not null && after.Value.Arrival > sequence.Arrival) after = after.Previous;
            if (after is null) _waiting.AddFirst(sequence);
            else _waiting.AddAfter(after, sequence);
            return;
        }
        if (sequence.BlockTable.Count == 0 && _running.Remove(sequence))
        {
            sequence.State = SequenceState.Waiting;
            _waiting.AddFirst(sequence);
            return;
        }
        sequence.State = SequenceState.Running;
    }

    /// <summary>The next step's chunks (reused between calls); empty when nothing can run.</summary>
    public IReadOnlyList<ScheduledChunk> Schedule()
    {
        _batch.Clear();
        var prefill = _prefillBudget;
        // Decodes first: one token of every running request, and the one position a retrieval left to recompute.
        for (var i = 0; i < _running.Count; i++)
        {
            var s = _running[i];
            if (s.State == SequenceState.Running && s.TotalTokens - s.Computed == 1 && Reserve(s, s.Computed + 1, ref prefill))
                _batch.Add(new ScheduledChunk(s, 1, CountsAsPrefill: false));
        }
        // Then the next chunk of each running request still prefilling (a long prompt, or a context rebuilt by prompt RAG).
        for (var i = 0; i < _running.Count && prefill > 0; i++)
        {
            var s = _running[i];
            var need = s.TotalTokens - s.Computed;
            if (s.State != SequenceState.Running || need <= 1) continue;
            var chunk = Math.Min(need, Math.Min(_chunkSize, prefill));
            if (!Reserve(s, s.Computed + chunk, ref prefill)) continue;
            _batch.Add(new ScheduledChunk(s, chunk, CountsAsPrefill: true));
            prefill -= chunk;
        }
        // Then admit from the queue (preempted requests are at its front) while a slot, the budget and free blocks allow.
        while (_waiting.First is { } node && prefill > 0)
        {
            var s = node.Value;
            if (s.Slot < 0 && _freeSlots.Count == 0) break;
            var shared = 0;
            if (s.PrefixLeader is { } leader)
            {
                shared = SharablePrefix(s, leader);
                // The leader has not computed the prefix yet: the follower waits at the head of the queue (FIFO, as any request).
                if (shared < 0) break;
            }
            var start = Math.Max(s.Computed, shared);
            var chunk = Math.Min(s.TotalTokens - start, Math.Min(_chunkSize, prefill));
            if (shared > 0)
            {
                if (_blocks.FreeBlocks < _blocks.BlocksFor(start + chunk) - shared / _blocks.BlockSize) break;
                _blocks.Share(s.PrefixLeader!.BlockTable, shared / _blocks.BlockSize, s.BlockTable);
                s.Computed = shared;
                s.CachedTokens = shared;
                SharedTokens += shared;
            }
            s.PrefixLeader = null;
            if (!_blocks.EnsureCapacity(s.BlockTable, s.Computed + chunk)) break;
            _waiting.RemoveFirst();
            if (s.Slot < 0)
            {
                s.Slot = _freeSlots.Pop();
                s.SlotBound = false;
            }
            s.State = SequenceState.Running;
            InsertByArrival(s);
            _batch.Add(new ScheduledChunk(s, chunk, CountsAsPrefill: true));
            prefill -= chunk;
        }
        return _batch;
    }

    /// <summary>
    /// What a parallel sample may take from its group's first sample: its shared prefix once the leader holds it with the
    /// original prompt (positions), 0 when it never will (the leader finished, or prompt-mode RAG rebuilt its context), −1
    /// while the leader is still computing it (or recomputing it after a preemption).
    /// </summary>
    private int SharablePrefix(Sequence s, Sequence leader)
    {
        if (s.BlockTable.Count > 0 || s.SharedPrefix == 0 || leader.State == SequenceState.Finished || leader.ContextRebuilt) return 0;
        return leader.Computed >= s.SharedPrefix && leader.BlockTable.Count * _blocks.BlockSize >= s.SharedPrefix ? s.SharedPrefix : -1;
    }

    /// <summary>A sequence about to rewrite its cache from position 0 (prompt-mode RAG) gives up blocks it shares: it is requeued to compute its new context in blocks of its own.</summary>
    public void DropSharedBlocks(Sequence s)
    {
        foreach (var block in s.BlockTable)
        {
            if (!_blocks.IsShared(block)) continue;
            ReleaseBlocks(s);
            s.CachedTokens = 0;  // it computes its whole context itself now
            return;
        }
    }

    /// <summary>Blocks for positions below <paramref name="upTo"/>, preempting the newest other holders of blocks until they fit.</summary>
    private bool Reserve(Sequence s, int upTo, ref int prefill)
    {
        while (!_blocks.EnsureCapacity(s.BlockTable, upTo))
        {
            Sequence? victim = null;
            for (var i = _running.Count - 1; i >= 0; i--)
            {
                var candidate = _running[i];
                if (candidate != s && candidate.BlockTable.Count > 0)
                {
                    victim = candidate;
                    break;
                }
            }
            if (victim is null) return false;
            Preempt(victim, ref prefill);
        }
        return true;
    }

    private void Preempt(Sequence victim, ref int prefill)
    {
        for (var i = 0; i < _batch.Count; i++)
        {
            if (_batch[i].Sequence != victim) continue;
            if (_batch[i].CountsAsPrefill) prefill += _batch[i].Tokens;
            _batch.RemoveAt(i);
            break;
        }
        ReleaseBlocks(victim);
        victim.CachedTokens = 0;  // recomputed from scratch, in blocks of its own
        victim.Preemptions++;
        Preemptions++;
        if (victim.State == SequenceState.Running)
        {
            // A parked victim stays parked (Resume requeues it); a running one waits at the front to be recomputed.
            _running.Remove(victim);
            victim.State = SequenceState.Waiting;
            _waiting.AddFirst(victim);
        }
    }

    private void ReleaseBlocks(Sequence s)
    {
        _blocks.Release(s.BlockTable);
        s.SyncedBlocks = 0;
        s.Computed = 0;
    }

    private void InsertByArrival(Sequence s)
    {
        var i = _running.Count;
        while (i > 0 && _running[i - 1].Arrival > s.Arrival) i--;
        _running.Insert(i, s);
    }
}
