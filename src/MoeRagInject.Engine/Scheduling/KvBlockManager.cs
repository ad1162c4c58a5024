namespace MoeRagInject.Engine.Scheduling;

/// <summary>
/// Bookkeeping of the paged KV cache: which blocks are free and which belong to each sequence. Knows nothing of tensors.
/// A block may be held by several sequences at once (parallel samples share their prompt's full blocks); it counts its
/// holders and goes back to the free pool when the last one releases it. Shared blocks are only ever read: a sequence
/// writes keys and values only at positions past the blocks it shares.
/// </summary>
public sealed class KvBlockManager
{
    private readonly Stack<int> _free;
    private readonly int[] _holders;

    public KvBlockManager(int numBlocks, int blockSize)
    {
        NumBlocks = numBlocks;
        BlockSize = blockSize;
        _free = new Stack<int>(Enumerable.Range(0, numBlocks).Reverse());
        _holders = new int[numBlocks];
    }

    public int NumBlocks { get; }
    public int BlockSize { get; }
    public int FreeBlocks => _free.Count;

    public int BlocksFor(int tokens) => (tokens + BlockSize - 1) / BlockSize;

    /// <summary>Grows <paramref name="table"/> to hold <paramref name="tokens"/> positions; false (and no change) when too few blocks are free.</summary>
    public bool EnsureCapacity(List<int> table, int tokens)
    {
        var needed = BlocksFor(tokens) - table.Count;
        if (needed <= 0) return true;
        if (needed > _free.Count) return false;
        for (var i = 0; i < needed; i++)
        {
            var block = _free.Pop();
            _holders[block] = 1;
            table.Add(block);
        }
        return true;
    }

    /// <summary>Appends the first <paramref name="count"/> blocks of <paramref name="source"/> to <paramref name="table"/>, which now holds them too.</summary>
    public void Share(List<int> source, int count, List<int> table)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan(count, source.Count);
        for (var i = 0; i < count; i++)
        {
            var block = source[i];
            _holders[block]++;
            table.Add(block);
        }
    }

    /// <summary>Whether more than one sequence holds <paramref name="block"/>.</summary>
    public bool IsShared(int block) => _holders[block] > 1;

    public void Release(List<int> table)
    {
        foreach (var block in table)
            if (--_holders[block] == 0) _free.Push(block);
        table.Clear();
    }
}
