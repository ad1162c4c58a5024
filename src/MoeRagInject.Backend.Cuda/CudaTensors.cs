using MoeRagInject.Backend.Cuda.Interop;

namespace MoeRagInject.Backend.Cuda;

/// <summary>A [rows, columns] tensor in device memory: bf16 (weights, GEMM inputs) or fp32.</summary>
internal sealed class CudaTensor(DeviceBuffer buffer, int rows, int columns, bool bf16) : DeviceTensor
{
    public DeviceBuffer Buffer { get; } = buffer;
    public override int Rows => rows;
    public override int Columns => columns;
    public bool IsBf16 { get; } = bf16;
    public ulong Pointer => Buffer.Pointer;

    protected override void Dispose(bool disposing)
    {
        if (disposing) Buffer.Dispose();
    }
}

/// <summary>One layer's experts: gate and up stacked as [E, 2I, H] (gate rows first), down as [E, H, I], bf16.</summary>
internal sealed class CudaExpertStack(DeviceBuffer gateUp, DeviceBuffer down, int count, int hidden, int intermediate) : ExpertStack
{
    public DeviceBuffer GateUp { get; } = gateUp;
    public DeviceBuffer Down { get; } = down;

    /// <summary>
    /// Copies of GateUp and Down in the boxed layout (moe_box_weights in gemm_wgmma.cu) that the moe_tma kernels then read
    /// instead, or null: made by CudaBackend.BoxCopy for gemm-bench's comparison.
    /// </summary>
    public (DeviceBuffer GateUp, DeviceBuffer Down)? Boxed { get; set; }

    /// <summary>GateUp and Down themselves hold the boxed layout (<see cref="CudaBackend.BoxExperts"/>): only the small, moe_tma
    /// and moe_tma_tokens kernels may read them.</summary>
    public bool BoxedInPlace { get; set; }

    /// <summary>Where the moe_tma kernels read the boxed weights, or 0: they read GateUp and Down through the tensor map.</summary>
    public (ulong GateUp, ulong Down) BoxedPointers =>
        BoxedInPlace ? (GateUp.Pointer, Down.Pointer) : Boxed is { } b ? (b.GateUp.Pointer, b.Down.Pointer) : (0UL, 0UL);

    public override int Count => count;
    public override int Hidden => hidden;
    public override int Intermediate => intermediate;

    protected override void Dispose(bool disposing)
    {
        if (!disposing) return;
        GateUp.Dispose();
        Down.Dispose();
        Boxed?.GateUp.Dispose();
        Boxed?.Down.Dispose();
    }
}

/// <summary>The paged KV cache: keys and values of every layer as [layer, block × blockSize + offset, kvHeads × headDim] bf16.</summary>
internal sealed class CudaKvCache(DeviceBuffer keys, DeviceBuffer values, int numBlocks, int blockSize, int kvWidth) : IKvCache
{
    public DeviceBuffer Keys { get; } = keys;
    public DeviceBuffer Values { get; } = values;
    public int NumBlocks { get; } = numBlocks;
    public int BlockSize { get; } = blockSize;
    public int KvWidth { get; } = kvWidth;

    /// <summary>Bytes of one layer's keys (or values).</summary>
    public long LayerBytes => (long)NumBlocks * BlockSize * KvWidth * 2;

    public ulong KeysOf(int layer) => Keys.Pointer + (ulong)(layer * LayerBytes);
    public ulong ValuesOf(int layer) => Values.Pointer + (ulong)(layer * LayerBytes);

    public void Dispose()
    {
        Keys.Dispose();
        Values.Dispose();
    }
}
