using MoeRagInject.Model;

namespace MoeRagInject.Backend.Cpu;

/// <summary>An fp32 activation buffer in managed memory.</summary>
internal sealed class CpuActivation(int rows, int columns) : DeviceTensor
{
    public float[] Data { get; } = new float[(long)rows * columns];
    public override int Rows => rows;
    public override int Columns => columns;
    public Span<float> Row(int r) => Data.AsSpan(r * columns, columns);
}

/// <summary>A weight left where the checkpoint put it (memory-mapped), in its own element type.</summary>
internal sealed class CpuWeight(TensorView view) : DeviceTensor
{
    public TensorView View { get; } = view;
    public override int Rows => View.Rows;
    public override int Columns => View.RowLength;

    /// <summary>Row r as fp32: the mapped memory itself for F32 weights, else converted into <paramref name="scratch"/>.</summary>
    public unsafe ReadOnlySpan<float> Row(int r, Span<float> scratch)
    {
        var columns = Columns;
        if (View.DType == DType.F32) return new ReadOnlySpan<float>((float*)View.Pointer + (long)r * columns, columns);
        var destination = scratch[..columns];
        View.ReadFloats((long)r * columns, destination);
        return destination;
    }
}

internal static class TensorCasts
{
    public static CpuActivation Act(this DeviceTensor t) =>
        t as CpuActivation ?? throw new ArgumentException($"expected a CPU activation tensor, got {t.GetType().Name}");

    public static CpuWeight Weight(this DeviceTensor t) =>
        t as CpuWeight ?? throw new ArgumentException($"expected a CPU weight tensor, got {t.GetType().Name}");
}
