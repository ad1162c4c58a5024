namespace MoeRagInject.Backend.Cpu.Ops;

internal static class Norm
{
    /// <summary>y = w ⊙ x / sqrt(mean(x²) + eps), the mean taken in fp32 as transformers' MixtralRMSNorm does.</summary>
    public static void RmsNorm(CpuActivation x, CpuWeight weight, float eps, CpuActivation output, int rows)
    {
        var columns = x.Columns;
        Span<float> w = columns <= 8192 ? stackalloc float[columns] : new float[columns];
        weight.View.ReadFloats(0, w);
        for (var r = 0; r < rows; r++)
        {
            var xr = x.Row(r);
            var yr = output.Row(r);
            var meanSquare = Kernels.Dot(xr, xr) / columns;
            var inv = 1f / MathF.Sqrt(meanSquare + eps);
            for (var i = 0; i < columns; i++) yr[i] = w[i] * (xr[i] * inv);
        }
    }
}
