namespace MoeRagInject.Backend.Cpu.Ops;

internal static class Rotary
{
    /// <summary>
    /// Rotate-half RoPE on the q and k heads of each qkv row: for i &lt; d/2, with θ_i = pos · base^(−2i/d) (inverse
    /// frequencies in fp32 as transformers computes them), (x_i, x_{i+d/2}) ← (x_i cos θ_i − x_{i+d/2} sin θ_i,
    /// x_{i+d/2} cos θ_i + x_i sin θ_i). Then k and v go into the cache at the row's KV slot.
    /// </summary>
    public static void ApplyAndWrite(CpuActivation qkv, CpuKvCache cache, int layer, AttentionShape shape, StepState state, int rows)
    {
        var headDim = shape.HeadDim;
        var half = headDim / 2;
        Span<float> invFreq = stackalloc float[half];
        for (var i = 0; i < half; i++) invFreq[i] = 1f / MathF.Pow(shape.RopeTheta, 2f * i / headDim);
        Span<float> cos = stackalloc float[half];
        Span<float> sin = stackalloc float[half];
        var width = cache.RowWidth;
        for (var r = 0; r < rows; r++)
        {
            for (var i = 0; i < half; i++)
            {
                var angle = state.Positions[r] * invFreq[i];
                cos[i] = MathF.Cos(angle);
                sin[i] = MathF.Sin(angle);
            }
            var row = qkv.Row(r);
            // q heads then k heads are adjacent at the start of the row.
            for (var h = 0; h < shape.Heads + shape.KvHeads; h++)
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
            var slot = state.KvSlots[r];
            if (slot < 0) continue;
            row.Slice(shape.QWidth, width).CopyTo(cache.Keys[layer].AsSpan((int)((long)slot * width), width));
            row.Slice(shape.QWidth + width, width).CopyTo(cache.Values[layer].AsSpan((int)((long)slot * width), width));
        }
    }
}
