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

/// <summary>
/// A weight left where the checkpoint put it (memory-mapped), in its own element type. Several parts of one width act as one
/// matrix whose rows are theirs one after another (the fused q/k/v projection).
/// </summary>
internal sealed class CpuWeight : DeviceTensor
{
    private readonly TensorView[] _parts;
    private readonly int[] _firstRow;

    public CpuWeight(TensorView[] parts)
    {
        if (parts.Length == 0) throw new ArgumentException("a weight needs at least one tensor");
        _parts = parts;
        _firstRow = new int[parts.Length + 1];
        var columns = parts[0].RowLength;
        for (var p = 0; p < parts.Length; p++)
        {
            if (parts[p].RowLength != columns)
                throw new ArgumentException($"fused weight parts differ in width: {parts[0].Name} has {columns} columns, {parts[p].Name} {parts[p].RowLength}");
            _firstRow[p + 1] = _firstRow[p] + parts[p].Rows;
        }
        Columns = columns;
        Rows = _firstRow[^1];
    }

    public override int Rows { get; }
    public override int Columns { get; }
    public string Name => _parts[0].Name;

    /// <summary>Row r as fp32: the mapped memory itself for F32 weights, else converted into <paramref name="scratch"/>.</summary>
    public unsafe ReadOnlySpan<float> Row(int r, Span<float> scratch)
    {
        var p = 0;
        while (r >= _firstRow[p + 1]) p++;
        var view = _parts[p];
        var local = (long)(r - _firstRow[p]) * Columns;
        if (view.DType == DType.F32) return new ReadOnlySpan<float>((float*)view.Pointer + local, Columns);
        var destination = scratch[..Columns];
        view.ReadFloats(local, destination);
        return destination;
    }

    /// <summary>Converts row r into <paramref name="destination"/>.</summary>
    public void ReadRow(int r, Span<float> destination) => Row(r, destination).CopyTo(destination);
}

/// <summary>One layer's experts: their gate, up and down projections, still memory-mapped.</summary>
internal sealed class CpuExpertStack(IReadOnlyList<ExpertWeights> experts) : ExpertStack
{
    public (CpuWeight Gate, CpuWeight Up, CpuWeight Down)[] Experts { get; } =
        experts.Select(e => (new CpuWeight([e.Gate]), new CpuWeight([e.Up]), new CpuWeight([e.Down]))).ToArray();

    public override int Count => Experts.Length;
    public override int Hidden => Experts[0].Gate.Columns;
    public override int Intermediate => Experts[0].Gate.Rows;
}

internal static class TensorCasts
{
    public static CpuActivation Act(this DeviceTensor t) =>
        t as CpuActivation ?? throw new ArgumentException($"expected a CPU activation tensor, got {t.GetType().Name}");

    public static CpuWeight Weight(this DeviceTensor t) =>
        t as CpuWeight ?? throw new ArgumentException($"expected a CPU weight tensor, got {t.GetType().Name}");
}
