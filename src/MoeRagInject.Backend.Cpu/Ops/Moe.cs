namespace MoeRagInject.Backend.Cpu.Ops;

internal static class Moe
{
    /// <summary>
    /// p = softmax(W·x) over all experts (fp32), H = −Σ p ln p, then the top-k by probability with weights renormalised to
    /// sum to one over the k (Mixtral's router). p is kept at (row, layer) for the router probe.
    /// </summary>
    public static void Route(CpuActivation x, CpuWeight router, int layer, int topK, CpuStepBuffers step, int rows)
    {
        var experts = router.Rows;
        var state = step.Host;
        Span<float> probs = stackalloc float[experts];
        Span<float> scratch = stackalloc float[router.Columns];
        for (var r = 0; r < rows; r++)
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
            state.RowEntropies[r * state.Layers + layer] = (float)entropy;
            probs.CopyTo(state.RowRouterProbs.AsSpan((r * state.Layers + layer) * experts, experts));

            var chosen = step.TopExperts.AsSpan(r * topK, topK);
            var weights = step.TopWeights.AsSpan(r * topK, topK);
            float chosenSum = 0;
            for (var k = 0; k < topK; k++)
            {
                var best = -1;
                for (var e = 0; e < experts; e++)
                {
                    if (chosen[..k].Contains(e)) continue;
                    // A NaN probability is never "greater": fall back to the first expert not yet chosen.
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
    /// The router probe after <see cref="Route"/> of the same layer: z[r] (+)= Σ_e probe[layer, e]·p_e in expert order from the
    /// probabilities Route kept; at the last layer each sequence's last row hands z to the sequence's output.
    /// </summary>
    public static void Probe(CpuActivation probe, int layer, StepState state, int rows)
    {
        var experts = state.Experts;
        var layers = state.Layers;
        var weights = probe.Row(layer);
        for (var r = 0; r < rows; r++)
        {
            var sequence = state.RowSequence[r];
            float z = 0;
            if (state.SeqSlot[sequence] >= 0)
            {
                var p = state.RowRouterProbs.AsSpan((r * layers + layer) * experts, experts);
                for (var e = 0; e < experts; e++) z += weights[e] * p[e];
            }
            var total = layer == 0 ? z : state.RowProbeLogits[r] + z;
            state.RowProbeLogits[r] = total;
            if (layer == layers - 1 && state.QueryStart[sequence + 1] - 1 == r) state.OutProbeLogit[sequence] = total;
        }
    }

    /// <summary>
    /// Runs each expert over the rows routed to it (threads split the experts; each works in its own segment of the step's
    /// scratch), keeping each (row, k) result apart, then sums a row's k results in k order: the same order whatever else
    /// is in the batch.
    /// </summary>
    public static void Experts(CpuActivation x, CpuExpertStack stack, int topK, CpuStepBuffers step, CpuActivation output, int rows,
        ParallelOptions parallel)
    {
        var hidden = x.Columns;
        var experts = stack.Count;
        var inter = stack.Intermediate;
        var slots = rows * topK;

        // Group the (row, k) slots by expert: counts, then segment starts, then the slots in slot order within each segment.
        var start = step.ExpertCounts;
        Array.Clear(start);
        for (var slot = 0; slot < slots; slot++) start[step.TopExperts[slot] + 1]++;
        for (var e = 0; e < experts; e++) start[e + 1] += start[e];
        Span<int> fill = stackalloc int[experts];
        for (var slot = 0; slot < slots; slot++)
        {
            var e = step.TopExperts[slot];
            step.SlotOrder[start[e] + fill[e]++] = slot;
        }

        Parallel.For(0, experts, parallel, e =>
        {
            int first = start[e], count = start[e + 1] - first;
            if (count == 0) return;
            var (gate, up, down) = stack.Experts[e];
            var input = step.ExpertInput.AsSpan(first * hidden, count * hidden);
            for (var i = 0; i < count; i++) x.Row(step.SlotOrder[first + i] / topK).CopyTo(input.Slice(i * hidden, hidden));
            var g = step.Gate.AsSpan(first * inter, count * inter);
            var u = step.Up.AsSpan(first * inter, count * inter);
            MatMul.Rows(input, count, gate, g, 0, inter);
            MatMul.Rows(input, count, up, u, 0, inter);
            for (var i = 0; i < g.Length; i++) g[i] = Kernels.Silu(g[i]) * u[i];
            var result = step.ExpertOutput.AsSpan(first * hidden, count * hidden);
            MatMul.Rows(g, count, down, result, 0, hidden);
            for (var i = 0; i < count; i++)
            {
                var slot = step.SlotOrder[first + i];
                var weight = step.TopWeights[slot];
                var destination = step.Partial.AsSpan(slot * hidden, hidden);
                var source = result.Slice(i * hidden, hidden);
                for (var j = 0; j < hidden; j++) destination[j] = source[j] * weight;
            }
        });

        for (var r = 0; r < rows; r++)
        {
            var destination = output.Row(r);
            step.Partial.AsSpan(r * topK * hidden, hidden).CopyTo(destination);
            for (var k = 1; k < topK; k++) Kernels.AddScaled(destination, step.Partial.AsSpan((r * topK + k) * hidden, hidden), 1f);
        }
    }
}
