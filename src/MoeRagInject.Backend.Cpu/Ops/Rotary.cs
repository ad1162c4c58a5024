namespace MoeRagInject.Backend.Cpu.Ops;

internal static class Rotary
{
    /// <summary>
    /// Rotate-half RoPE: for i &lt; d/2, with θ_i = pos · base^(−2i/d) (inverse frequencies in fp32 as transformers computes them),
    /// (x_i, x_{i+d/2}) ← (x_i cos θ_i − x_{i+d/2} sin θ_i, x_{i+d/2} cos θ_i + x_i sin θ_i).
    /// </summary>
    public static void Apply(CpuActivation x, int heads, int headDim, float theta, int[] positions, int rows)
    {
        var half = headDim / 2;
        Span<float> invFreq = stackalloc float[half];
        for (var i = 0; i < half; i++) invFreq[i] = 1f / MathF.Pow(theta, 2f * i / headDim);
        Span<float> cos = stackalloc float[half];
        Span<float> sin = stackalloc float[half];
        for (var r = 0; r < rows; r++)
        {
            for (var i = 0; i < half; i++)
            {
                var angle = positions[r] * invFreq[i];
                cos[i] = MathF.Cos(angle);
                sin[i] = MathF.Sin(angle);
            }
            var row = x.Row(r);
            for (var h = 0; h < heads; h++)
            {
                var v = row.Slice(h * headDim, headDim);
                for (var i = 0; i < half; i++)
                {
                    var a = v[i];
                    var b = v[i + half];
                    v[i] = a * cos[i] - b * sin[i];
                    v[i + half] = b * cos[i] + a * sin[i];
                }
            }
        }
    }
}
