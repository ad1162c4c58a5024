using System.Buffers;

namespace MoeRagInject.Backend.Cpu.Ops;

internal static class Attention
{
    public static void Run(CpuActivation q, CpuActivation k, CpuActivation v, CpuKvCache cache, int layer, int heads, int kvHeads,
        int headDim, int? slidingWindow, StepBatch batch, CpuActivation output, ParallelOptions parallel)
    {
        var keys = cache.Keys[layer];
        var values = cache.Values[layer];
        var width = cache.RowWidth;
        for (var r = 0; r < batch.RowCount; r++)
        {
            var table = batch.Sequences[batch.RowSequence[r]].BlockTable;
            var offset = cache.Offset(table, batch.Positions[r]);
            k.Row(r).CopyTo(keys.AsSpan((int)offset, width));
            v.Row(r).CopyTo(values.AsSpan((int)offset, width));
        }

        var sequences = batch.Sequences.Count;
        var work = sequences * heads;
        var scale = 1f / MathF.Sqrt(headDim);
        var group = heads / kvHeads;
        Parallel.For(0, work, parallel, item =>
        {
            var s = item / heads;
            var h = item % heads;
            var kvHead = h / group;
            var seq = batch.Sequences[s];
            var first = batch.FirstRow[s];
            var lastPosition = seq.StartPosition + seq.TokenIds.Count - 1;
            var scores = ArrayPool<float>.Shared.Rent(lastPosition + 1);
            try
            {
                for (var i = 0; i < seq.TokenIds.Count; i++)
                {
                    var row = first + i;
                    var position = seq.StartPosition + i;
                    var lo = slidingWindow is { } window ? Math.Max(0, position - window + 1) : 0;
                    var query = q.Row(row).Slice(h * headDim, headDim);
                    var max = float.NegativeInfinity;
                    for (var j = lo; j <= position; j++)
                    {
                        var key = keys.AsSpan((int)cache.Offset(seq.BlockTable, j) + kvHead * headDim, headDim);
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
                        var value = values.AsSpan((int)cache.Offset(seq.BlockTable, j) + kvHead * headDim, headDim);
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
