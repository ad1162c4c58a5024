using MoeRagInject.Model;

namespace MoeRagInject.Engine;

/// <summary>
/// Turns one row of logits into a token, applying sglang's sampling parameters in its order: repetition, frequency
/// and presence penalties, temperature (0 = greedy), then top-k, top-p and min-p filtering, then a draw from the
/// request's own generator (seeded per request, so a seed gives the same tokens whatever the batch).
/// </summary>
public static class Sampler
{
    public static int Sample(ReadOnlySpan<float> logits, SamplingParams p, IReadOnlyList<int> promptIds,
        Dictionary<int, int> outputCounts, SplitMix64 rng, IReadOnlySet<int>? suppressed = null)
    {
        var scores = logits.ToArray();
        ApplyPenalties(scores, p, promptIds, outputCounts);
        if (suppressed is not null)
            foreach (var id in suppressed) scores[id] = float.NegativeInfinity;

        if (p.Temperature == 0 || p.TopK == 1) return ArgMax(scores);

        for (var i = 0; i < scores.Length; i++) scores[i] /= p.Temperature;
        var max = scores.Max();
        var probs = new double[scores.Length];
        double sum = 0;
        for (var i = 0; i < scores.Length; i++)
        {
            probs[i] = Math.Exp(scores[i] - max);
            sum += probs[i];
        }
        for (var i = 0; i < probs.Length; i++) probs[i] /= sum;

        // Candidates sorted by probability (ties by id), cut by top-k, then top-p, then min-p.
        var order = Enumerable.Range(0, probs.Length).Where(i => probs[i] > 0).ToArray();
        Array.Sort(order, (a, b) => probs[b] != probs[a] ? probs[b].CompareTo(probs[a]) : a.CompareTo(b));
        var keep = order.Length;
        if (p.TopK > 0) keep = Math.Min(keep, p.TopK);
        if (p.TopP < 1)
        {
            double cumulative = 0;
            for (var i = 0; i < keep; i++)
            {
                cumulative += probs[order[i]];
                if (cumulative >= p.TopP)
                {
                    keep = i + 1;
                    break;
                }
            }
        }
        if (p.MinP > 0)
        {
            var floor = probs[order[0]] * p.MinP;
            var i = 1;
            while (i < keep && probs[order[i]] >= floor) i++;
            keep = i;
        }

        double total = 0;
        for (var i = 0; i < keep; i++) total += probs[order[i]];
        var draw = rng.NextDouble() * total;
        for (var i = 0; i < keep; i++)
        {
            draw -= probs[order[i]];
            if (draw < 0) return order[i];
        }
        return order[keep - 1];
    }

    /// <summary>
    /// Repetition penalty over prompt and output tokens (positive logits divided, negative multiplied, as HF and sglang do);
    /// frequency (× count) and presence penalties over output tokens, subtracted from the logits.
    /// </summary>
    public static void ApplyPenalties(float[] scores, SamplingParams p, IReadOnlyList<int> promptIds, Dictionary<int, int> outputCounts)
    {
        if (p.RepetitionPenalty != 1f)
        {
            var seen = new HashSet<int>(promptIds);
            seen.UnionWith(outputCounts.Keys);
            foreach (var id in seen)
                scores[id] = scores[id] > 0 ? scores[id] / p.RepetitionPenalty : scores[id] * p.RepetitionPenalty;
        }
        if (p.FrequencyPenalty != 0 || p.PresencePenalty != 0)
            foreach (var (id, count) in outputCounts)
                scores[id] -= p.FrequencyPenalty * count + p.PresencePenalty;
    }

    public static int ArgMax(ReadOnlySpan<float> values)
    {
        var best = 0;
        for (var i = 1; i < values.Length; i++)
            if (values[i] > values[best]) best = i;
        return best;
    }

    /// <summary>−Σ p ln p of softmax(logits), in double precision.</summary>
    public static float Entropy(ReadOnlySpan<float> logits)
    {
        var max = float.NegativeInfinity;
        foreach (var l in logits) max = Math.Max(max, l);
        double sum = 0, weighted = 0;
        foreach (var l in logits)
        {
            var e = Math.Exp(l - max);
            sum += e;
            weighted += e * (l - max);
        }
        // H = log Z − E[z] with z = logits − max.
        return (float)(Math.Log(sum) - weighted / sum);
    }

    /// <summary>log softmax(logits)[token], in double precision.</summary>
    public static float LogProb(ReadOnlySpan<float> logits, int token)
    {
        var max = float.NegativeInfinity;
        foreach (var l in logits) max = Math.Max(max, l);
        double sum = 0;
        foreach (var l in logits) sum += Math.Exp(l - max);
        return (float)(logits[token] - max - Math.Log(sum));
    }
}
