namespace MoeRagInject.Engine.Scheduling;

/// <summary>
/// Bookkeeping of the paged KV cache: which blocks are free and which belong to each sequence. Knows nothing of tensors.
/// </summary>
public sealed class KvBlockManager
{
    private readonly Stack<int> _free;

    public KvBlockManager(int numBlocks, int blockSize)
    {
        NumBlocks = numBlocks;
        BlockSize = blockSize;
        _free = new Stack<int>(Enumerable.Range(0, numBlocks).Reverse());
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
        for (var i = 0; i < needed; i++) table.Add(_free.Pop());
        return true;
    }

    public void Release(List<int> table)
    {
        foreach (var block in table) _free.Push(block);
        table.Clear();
    }
}
