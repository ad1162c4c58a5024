using System.Buffers;

namespace MoeRagInject.Backend.Cpu.Ops;

internal static class Attention
{
    /// <summary>Causal grouped-query attention of every row over its sequence's cached keys and values (written beforehand).</summary>
    public static void Run(CpuActivation qkv, CpuKvCache cache, int layer, AttentionShape shape, StepState state, CpuActivation output,
        ParallelOptions parallel)
    {
        var keys = cache.Keys[layer];
        var values = cache.Values[layer];
        int heads = shape.Heads, headDim = shape.HeadDim, width = cache.RowWidth;
        var scale = 1f / MathF.Sqrt(headDim);
        var group = heads / shape.KvHeads;
        Parallel.For(0, state.Sequences * heads, parallel, item =>
        {
            var s = item / heads;
            var h = item % heads;
            var kvHead = h / group;
            var slot = state.SeqSlot[s];
            int first = state.QueryStart[s], end = state.QueryStart[s + 1];
            var scores = ArrayPool<float>.Shared.Rent(state.Positions[end - 1] + 1);
            try
            {
                for (var row = first; row < end; row++)
                {
                    var position = state.Positions[row];
                    var lo = shape.SlidingWindow is { } window ? Math.Max(0, position - window + 1) : 0;
                    var query = qkv.Row(row).Slice(h * headDim, headDim);
                    var max = float.NegativeInfinity;
                    for (var j = lo; j <= position; j++)
                    {
                        var key = keys.AsSpan(state.KvSlotOf(slot, j) * width + kvHead * headDim, headDim);
                        var score = Kernels.Dot(query, key) * scale;
                        scores[j] = score;
                        if (score > max) max = score;
                    }
                    float sum = 0;
                    for (var j = lo; j <= position; j++)
                    {
                        var e = MathF.Exp(scores[j] - max);
                        scores[j] = e;
                        sum += e;
                    }
                    var result = output.Row(row).Slice(h * headDim, headDim);
                    result.Clear();
                    var inv = 1f / sum;
                    for (var j = lo; j <= position; j++)
                    {
                        var value = values.AsSpan(state.KvSlotOf(slot, j) * width + kvHead * headDim, headDim);
                        Kernels.AddScaled(result, value, scores[j] * inv);
                    }
                }
            }
            finally
            {
                ArrayPool<float>.Shared.Return(scores);
            }
        });
    }
}
