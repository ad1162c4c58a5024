namespace MoeRagInject.Backend.Cpu.Ops;

internal static class MatMul
{
    /// <summary>
    /// y[r, n] = Σ_k x[r, k]·W[n, k] for the first <paramref name="rows"/> rows. Threads split the output features; each
    /// weight row is read (and converted from bf16/fp16) once and dotted with every input row.
    /// </summary>
    public static void Linear(CpuActivation x, CpuWeight weight, CpuActivation y, int rows, ParallelOptions parallel)
    {
        int n = weight.Rows, k = weight.Columns;
        if (x.Columns != k) throw new ArgumentException($"linear: input has {x.Columns} columns, weight {weight.Name} expects {k}");
        if (y.Columns != n) throw new ArgumentException($"linear: output has {y.Columns} columns, weight {weight.Name} gives {n}");
        var chunks = Math.Min(n, parallel.MaxDegreeOfParallelism * 4);
        if (chunks <= 1 || (long)n * k * rows < 32_768)
        {
            Rows(x.Data, rows, weight, y.Data, 0, n);
            return;
        }
        Parallel.For(0, chunks, parallel, c =>
        {
            var begin = (int)((long)n * c / chunks);
            var end = (int)((long)n * (c + 1) / chunks);
            Rows(x.Data, rows, weight, y.Data, begin, end);
        });
    }

    /// <summary>
    /// Output features [begin, end) of y = x·Wᵀ for <paramref name="rows"/> rows of x (row stride = W's columns) into y
    /// (row stride = W's rows).
    /// </summary>
    public static void Rows(ReadOnlySpan<float> x, int rows, CpuWeight weight, Span<float> y, int begin, int end)
    {
        var k = weight.Columns;
        var n = weight.Rows;
        var scratch = k <= 16384 ? stackalloc float[k] : new float[k];
        for (var j = begin; j < end; j++)
        {
            var w = weight.Row(j, scratch);
            for (var r = 0; r < rows; r++) y[r * n + j] = Kernels.Dot(x.Slice(r * k, k), w);
        }
    }
}
