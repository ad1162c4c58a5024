namespace MoeRagInject.Backend.Cpu;

/// <summary>
/// The CPU's step buffers: the host state itself, plus the routing of the latest <c>Route</c> and the MoE scratch, sized for
/// the largest step so that no step allocates.
/// </summary>
internal sealed class CpuStepBuffers : IStepBuffers
{
    public CpuStepBuffers(StepState host)
    {
        Host = host;
        var hidden = host.HiddenSize;
        var intermediate = host.Config.IntermediateSize;
        var slots = host.Limits.MaxRows * host.ExpertsPerToken;
        TopExperts = new int[slots];
        TopWeights = new float[slots];
        ExpertCounts = new int[host.Config.NumExperts + 1];
        SlotOrder = new int[slots];
        Partial = new float[(long)slots * hidden];
        ExpertInput = new float[(long)slots * hidden];
        Gate = new float[(long)slots * intermediate];
        Up = new float[(long)slots * intermediate];
        ExpertOutput = new float[(long)slots * hidden];
    }

    public StepState Host { get; }
    /// <summary>[row, k]: expert chosen by the latest Route, and its renormalised weight.</summary>
    public int[] TopExperts { get; }
    public float[] TopWeights { get; }
    /// <summary>Rows routed to each expert, then (after a prefix sum) where its segment of <see cref="SlotOrder"/> starts.</summary>
    public int[] ExpertCounts { get; }
    /// <summary>(row, k) slots grouped by expert, each group in slot order.</summary>
    public int[] SlotOrder { get; }
    /// <summary>[slot, hidden]: one expert's weighted output for one (row, k).</summary>
    public float[] Partial { get; }
    public float[] ExpertInput { get; }
    public float[] Gate { get; }
    public float[] Up { get; }
    public float[] ExpertOutput { get; }

    public void Upload()
    {
    }

    public void Download()
    {
    }

    public void DownloadRowEntropies()
    {
    }

    public void SlotChanged(int slot)
    {
    }

    public void BlocksChanged(int slot, int first, int count)
    {
    }

    public void SlotBound(int slot)
    {
    }

    public void TokenAccepted(int slot, int token)
    {
    }

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
    /// <summary>[layer][kv slot, kvHead, headDim], a KV slot being block × blockSize + offset.</summary>
    public float[][] Keys { get; }
    public float[][] Values { get; }

    public void Dispose()
    {
    }
}
