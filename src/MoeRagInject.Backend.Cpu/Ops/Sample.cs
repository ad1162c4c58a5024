namespace MoeRagInject.Backend.Cpu.Ops;

internal static class Sample
{
    /// <summary>
    /// One token per sampling sequence (threads split the sequences); a failure of one sequence's sampling, or non-finite
    /// logits or router entropies, is that sequence's status alone.
    /// </summary>
    public static void Run(CpuActivation logits, StepState state, int count, ParallelOptions parallel)
    {
        var layers = state.Layers;
        Parallel.For(0, count, parallel, i =>
        {
            var flags = state.SeqFlags[i];
            var lastRow = state.QueryStart[i + 1] - 1;
            var entropies = state.RowEntropies.AsSpan(lastRow * layers, layers);
            entropies.CopyTo(state.OutRouterEntropy.AsSpan(i * layers, layers));
            state.OutTokens[i] = -1;
            if ((flags & StepState.FlagSample) == 0)
            {
                state.OutStatus[i] = SampleStatus.NoToken;
                return;
            }
            var row = logits.Row(i);
            if (Sampler.HasNonFinite(row) || !AllFinite(entropies))
            {
                state.OutStatus[i] = SampleStatus.NonFinite;
                return;
            }
            try
            {
                if ((flags & StepState.FlagFailSampling) != 0) throw new InvalidOperationException("sampler failure injected for a test");
                var slot = state.SeqSlot[i];
                var sampling = state.Sampling[slot];
                var suppressed = (flags & StepState.FlagSuppressStops) != 0 ? sampling.SuppressedIds : [];
                var token = Sampler.Sample(row, sampling, state.Penalties[slot], state.Uniform[i], suppressed);
                state.OutTokens[i] = token;
                state.OutLogprobs[i] = (flags & StepState.FlagLogprob) != 0 ? Sampler.LogProb(row, token) : 0f;
                state.OutOutputEntropy[i] = (flags & StepState.FlagOutputEntropy) != 0 ? Sampler.Entropy(row) : 0f;
                state.OutStatus[i] = SampleStatus.Ok;
            }
            catch (Exception e) when (e is InvalidOperationException or ArgumentException or IndexOutOfRangeException)
            {
                state.OutTokens[i] = -1;
                state.OutStatus[i] = SampleStatus.SamplerFailed;
            }
        });
    }

    private static bool AllFinite(ReadOnlySpan<float> values)
    {
        foreach (var v in values)
            if (!float.IsFinite(v)) return false;
        return true;
    }
}
