namespace MoeRagInject.Backend.Cpu.Ops;

internal static class MatMul
{
    /// <summary>
    /// y[r, n] = Σ_k x[r, k]·W[n, k]. Threads split the output features; each weight row is read (and converted
    /// from bf16/fp16) once and dotted with every input row.
    /// </summary>
    public static void Linear(CpuActivation x, CpuWeight weight, CpuActivation y, int rows, ParallelOptions parallel)
    {
        int n = weight.Rows, k = weight.Columns;
        if (x.Columns != k) throw new ArgumentException($"linear: input has {x.Columns} columns, weight {weight.View.Name} expects {k}");
        if (y.Columns != n) throw new ArgumentException($"linear: output has {y.Columns} columns, weight {weight.View.Name} gives {n}");
        var chunks = Math.Min(n, parallel.MaxDegreeOfParallelism * 4);
        if (chunks <= 1 || (long)n * k * rows < 32_768)
        {
            LinearRange(x, weight, y, rows, 0, n);
            return;
        }
        Parallel.For(0, chunks, parallel, c =>
        {
            var begin = (int)((long)n * c / chunks);
            var end = (int)((long)n * (c + 1) / chunks);
            LinearRange(x, weight, y, rows, begin, end);
        });
    }

    public static void LinearRange(CpuActivation x, CpuWeight weight, CpuActivation y, int rows, int begin, int end)
    {
        var k = weight.Columns;
        var n = y.Columns;
        var scratch = k <= 16384 ? stackalloc float[k] : new float[k];
        var xd = x.Data;
        var yd = y.Data;
        for (var j = begin; j < end; j++)
        {
            var w = weight.Row(j, scratch);
            for (var r = 0; r < rows; r++) yd[r * n + j] = Kernels.Dot(xd.AsSpan(r * k, k), w);
        }
    }
}
