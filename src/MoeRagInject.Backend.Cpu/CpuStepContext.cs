namespace MoeRagInject.Backend.Cpu;

internal sealed class CpuStepContext(StepBatch batch, int layers, int topK) : IStepContext
{
    public StepBatch Batch { get; } = batch;
    public int Layers { get; } = layers;
    public int TopK { get; } = topK;
    /// <summary>[row, k]: expert chosen by the latest Route call, and its renormalised weight.</summary>
    public int[] TopExperts { get; } = new int[batch.RowCount * topK];
    public float[] TopWeights { get; } = new float[batch.RowCount * topK];
    /// <summary>[row, layer].</summary>
    public float[] Entropies { get; } = new float[batch.RowCount * layers];

    public void ReadEntropies(Span<float> destination) => Entropies.CopyTo(destination);

    public void Dispose()
    {
    }
}

internal sealed class CpuKvCache : IKvCache
{
    public CpuKvCache(int layers, int numBlocks, int blockSize, int kvHeads, int headDim)
    {
        NumBlocks = numBlocks;
        BlockSize = blockSize;
        RowWidth = kvHeads * headDim;
        Keys = new float[layers][];
        Values = new float[layers][];
        for (var l = 0; l < layers; l++)
        {
            Keys[l] = new float[(long)numBlocks * blockSize * RowWidth];
            Values[l] = new float[(long)numBlocks * blockSize * RowWidth];
        }
    }

    public int NumBlocks { get; }
    public int BlockSize { get; }
    /// <summary>kvHeads × headDim: one position's keys (or values) of every KV head.</summary>
    public int RowWidth { get; }
    /// <summary>[layer][block, offset, kvHead, headDim].</summary>
    public float[][] Keys { get; }
    public float[][] Values { get; }

    /// <summary>Offset of a sequence's position in a layer's key/value array.</summary>
    public long Offset(IReadOnlyList<int> blockTable, int position) =>
        ((long)blockTable[position / BlockSize] * BlockSize + position % BlockSize) * RowWidth;

    public void Dispose()
    {
    }
}
