namespace MoeRagInject.Backend.Cpu.Ops;

internal static class Moe
{
    /// <summary>
    /// p = softmax(W·x) over all experts (fp32), H = −Σ p ln p, then the top-k by probability with weights
    /// renormalised to sum to one over the k (Mixtral's router).
    /// </summary>
    public static void Route(CpuActivation x, CpuWeight router, int layer, CpuStepContext step)
    {
        var experts = router.Rows;
        var topK = step.TopK;
        Span<float> probs = stackalloc float[experts];
        Span<float> scratch = stackalloc float[router.Columns];
        for (var r = 0; r < step.Batch.RowCount; r++)
        {
            var xr = x.Row(r);
            var max = float.NegativeInfinity;
            for (var e = 0; e < experts; e++)
            {
                probs[e] = Kernels.Dot(xr, router.Row(e, scratch));
                if (probs[e] > max) max = probs[e];
            }
            float sum = 0;
            for (var e = 0; e < experts; e++)
            {
                probs[e] = MathF.Exp(probs[e] - max);
                sum += probs[e];
            }
            double entropy = 0;
            for (var e = 0; e < experts; e++)
            {
                probs[e] /= sum;
                if (probs[e] > 0) entropy -= probs[e] * Math.Log(probs[e]);
            }
            step.Entropies[r * step.Layers + layer] = (float)entropy;

            var chosen = step.TopExperts.AsSpan(r * topK, topK);
            var weights = step.TopWeights.AsSpan(r * topK, topK);
            float chosenSum = 0;
            for (var k = 0; k < topK; k++)
            {
                var best = -1;
                for (var e = 0; e < experts; e++)
                {
                    if (chosen[..k].Contains(e)) continue;
                    if (best < 0 || probs[e] > probs[best]) best = e;
                }
                chosen[k] = best;
                weights[k] = probs[best];
                chosenSum += probs[best];
            }
            for (var k = 0; k < topK; k++) weights[k] /= chosenSum;
        }
    }

    /// <summary>
    /// Runs each expert over the rows routed to it (threads split the experts), keeping each (row, k) result apart,
    /// then sums a row's k results in k order: the same order whatever else is in the batch.
    /// </summary>
    public static void Experts(CpuActivation x, IReadOnlyList<ExpertTensors> experts, CpuStepContext step, CpuActivation output,
        ParallelOptions parallel)
    {
        var rows = step.Batch.RowCount;
        var topK = step.TopK;
        var hidden = x.Columns;
        var partial = new float[rows * topK * hidden];
        var assignments = new List<int>[experts.Count];
        for (var e = 0; e < experts.Count; e++) assignments[e] = [];
        for (var slot = 0; slot < rows * topK; slot++) assignments[step.TopExperts[slot]].Add(slot);

        Parallel.For(0, experts.Count, parallel, e =>
        {
            var slots = assignments[e];
            if (slots.Count == 0) return;
            var gate = experts[e].Gate.Weight();
            var up = experts[e].Up.Weight();
            var down = experts[e].Down.Weight();
            var inter = gate.Rows;
            var input = new CpuActivation(slots.Count, hidden);
            for (var i = 0; i < slots.Count; i++) x.Row(slots[i] / topK).CopyTo(input.Row(i));
            var g = new CpuActivation(slots.Count, inter);
            var u = new CpuActivation(slots.Count, inter);
            MatMul.LinearRange(input, gate, g, slots.Count, 0, inter);
            MatMul.LinearRange(input, up, u, slots.Count, 0, inter);
            for (var i = 0; i < g.Data.Length; i++) g.Data[i] = Kernels.Silu(g.Data[i]) * u.Data[i];
            var result = new CpuActivation(slots.Count, hidden);
            MatMul.LinearRange(g, down, result, slots.Count, 0, hidden);
            for (var i = 0; i < slots.Count; i++)
            {
                var slot = slots[i];
                var weight = step.TopWeights[slot];
                var destination = partial.AsSpan(slot * hidden, hidden);
                var source = result.Row(i);
                for (var j = 0; j < hidden; j++) destination[j] = source[j] * weight;
            }
        });

        for (var r = 0; r < rows; r++)
        {
            var destination = output.Row(r);
            partial.AsSpan(r * topK * hidden, hidden).CopyTo(destination);
            for (var k = 1; k < topK; k++) Kernels.AddScaled(destination, partial.AsSpan((r * topK + k) * hidden, hidden), 1f);
        }
    }
}
