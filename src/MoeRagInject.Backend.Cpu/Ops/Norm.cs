using System.Numerics.Tensors;

namespace MoeRagInject.Backend.Cpu.Ops;

internal static class Norm
{
    /// <summary>y = w ⊙ x / sqrt(mean(x²) + eps), the mean taken in fp32 as transformers' MixtralRMSNorm does.</summary>
    public static void RmsNorm(CpuActivation x, CpuWeight weight, float eps, CpuActivation output, int rows)
    {
        var columns = x.Columns;
        Span<float> w = columns <= 8192 ? stackalloc float[columns] : new float[columns];
        weight.ReadRow(0, w);
        for (var r = 0; r < rows; r++) Row(x.Row(r), w, eps, output.Row(r));
    }

    /// <summary>residual += delta, then y = rmsnorm(residual), row by row.</summary>
    public static void AddRmsNorm(CpuActivation residual, CpuActivation delta, CpuWeight weight, float eps, CpuActivation output, int rows)
    {
        var columns = residual.Columns;
        Span<float> w = columns <= 8192 ? stackalloc float[columns] : new float[columns];
        weight.ReadRow(0, w);
        for (var r = 0; r < rows; r++)
        {
            var h = residual.Row(r);
            TensorPrimitives.Add(h, delta.Row(r), h);
            Row(h, w, eps, output.Row(r));
        }
    }

    private static void Row(ReadOnlySpan<float> x, ReadOnlySpan<float> w, float eps, Span<float> y)
    {
        var meanSquare = Kernels.Dot(x, x) / x.Length;
        var inv = 1f / MathF.Sqrt(meanSquare + eps);
        for (var i = 0; i < x.Length; i++) y[i] = w[i] * (x[i] * inv);
    }
}
