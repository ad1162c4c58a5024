namespace MoeRagInject.Backend;

/// <summary>
/// The host reference sampler: turns one row of logits into a token, applying sglang's sampling parameters in its order:
/// repetition, frequency and presence penalties, temperature (0 = greedy), then top-k, top-p and min-p filtering, then
/// the request's own uniform draw (from its seeded generator, so a seed gives the same tokens whatever the batch).
/// </summary>
public static class Sampler
{
    [ThreadStatic] private static float[]? t_scores;
    [ThreadStatic] private static double[]? t_probs;
    [ThreadStatic] private static int[]? t_order;

    /// <param name="uniform">The draw in [0, 1); unused when greedy.</param>
    /// <param name="suppressed">Token ids masked out (min_new_tokens), or empty.</param>
    public static int Sample(ReadOnlySpan<float> logits, SlotSampling p, SlotPenalties penalties, float uniform, IReadOnlyList<int> suppressed)
    {
        if (p.IsGreedy && !p.HasPenalties && suppressed.Count == 0) return ArgMax(logits);

        var scores = Scratch(ref t_scores, logits.Length);
        logits.CopyTo(scores);
        ApplyPenalties(scores, p, penalties);
        foreach (var id in suppressed) scores[id] = float.NegativeInfinity;
        if (p.IsGreedy) return ArgMax(scores);

        var max = float.NegativeInfinity;
        for (var i = 0; i < scores.Length; i++)
        {
            scores[i] /= p.Temperature;
            if (scores[i] > max) max = scores[i];
        }
        var probs = Scratch(ref t_probs, scores.Length);
        double sum = 0;
        for (var i = 0; i < scores.Length; i++)
        {
            probs[i] = Math.Exp(scores[i] - max);
            sum += probs[i];
        }

        // Candidates sorted by probability (ties by id), cut by top-k, then top-p, then min-p.
        var orderBuffer = Scratch(ref t_order, scores.Length);
        var candidates = 0;
        for (var i = 0; i < probs.Length; i++)
        {
            probs[i] /= sum;
            if (probs[i] > 0) orderBuffer[candidates++] = i;
        }
        var order = orderBuffer.AsSpan(0, candidates);
        var byProbability = probs;
        order.Sort((a, b) => byProbability[b] != byProbability[a] ? byProbability[b].CompareTo(byProbability[a]) : a.CompareTo(b));
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
        var draw = uniform * total;
        for (var i = 0; i < keep; i++)
        {
            draw -= probs[order[i]];
            if (draw < 0) return order[i];
        }
        return order[keep - 1];
    }

    private static T[] Scratch<T>(ref T[]? buffer, int length)
    {
        if (buffer is null || buffer.Length != length) buffer = new T[length];
        return buffer;
    }

    /// <summary>
    /// Repetition penalty over prompt and output tokens (positive logits divided, negative multiplied, as HF and sglang do);
    /// frequency (× count) and presence penalties over output tokens, subtracted from the logits.
    /// </summary>
    public static void ApplyPenalties(Span<float> scores, SlotSampling p, SlotPenalties penalties)
    {
        if (p.RepetitionPenalty != 1f)
        {
            foreach (var id in penalties.PromptTokens) Penalise(scores, id, p.RepetitionPenalty);
            foreach (var id in penalties.OutputCounts.Keys)
                if (!penalties.PromptTokens.Contains(id)) Penalise(scores, id, p.RepetitionPenalty);
        }
        if (p.FrequencyPenalty != 0 || p.PresencePenalty != 0)
            foreach (var (id, count) in penalties.OutputCounts)
                scores[id] -= p.FrequencyPenalty * count + p.PresencePenalty;
    }

    private static void Penalise(Span<float> scores, int id, float penalty) =>
        scores[id] = scores[id] > 0 ? scores[id] / penalty : scores[id] * penalty;

    public static int ArgMax(ReadOnlySpan<float> values)
    {
        var best = 0;
        for (var i = 1; i < values.Length; i++)
            if (values[i] > values[best]) best = i;
        return best;
    }

    /// <summary>True when the row holds a NaN or +∞ (−∞ is a masked token, which is fine).</summary>
    public static bool HasNonFinite(ReadOnlySpan<float> values)
    {
        foreach (var v in values)
            if (float.IsNaN(v) || float.IsPositiveInfinity(v)) return true;
        return false;
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
    public static float LogProb(ReadOnlySpan<float> logits, int token) => (float)(logits[token] - LogSumExp(logits));

    /// <summary>
    /// The <paramref name="ids"/>.Length most likely tokens of softmax(logits), most likely first (ties by lower id), with their
    /// log-probabilities (double precision, as <see cref="LogProb"/>). Entries past the vocabulary get id −1. One pass keeps a
    /// small sorted list: k ≤ 20 against a vocabulary of tens of thousands.
    /// </summary>
    public static void TopLogprobs(ReadOnlySpan<float> logits, Span<int> ids, Span<float> logprobs)
    {
        var k = Math.Min(ids.Length, logits.Length);
        ids.Fill(-1);
        logprobs.Fill(float.NegativeInfinity);
        var count = 0;
        for (var v = 0; v < logits.Length; v++)
        {
            var x = logits[v];
            if (float.IsNaN(x)) continue;
            // Strictly greater than the last kept value: an equal logit with a higher id ranks after it.
            if (count == k && !(x > logits[ids[k - 1]])) continue;
            var i = count < k ? count++ : k - 1;
            while (i > 0 && x > logits[ids[i - 1]])
            {
                ids[i] = ids[i - 1];
                i--;
            }
            ids[i] = v;
        }
        var logZ = LogSumExp(logits);
        for (var i = 0; i < count; i++) logprobs[i] = (float)(logits[ids[i]] - logZ);
    }

    /// <summary>log softmax(logits) over the whole row, in double precision.</summary>
    public static double[] LogSoftmax(ReadOnlySpan<float> logits)
    {
        var logZ = LogSumExp(logits);
        var result = new double[logits.Length];
        for (var i = 0; i < logits.Length; i++) result[i] = logits[i] - logZ;
        return result;
    }

    private static double LogSumExp(ReadOnlySpan<float> logits)
    {
        var max = float.NegativeInfinity;
        foreach (var l in logits) max = Math.Max(max, l);
        double sum = 0;
        foreach (var l in logits) sum += Math.Exp(l - max);
        return max + Math.Log(sum);
    }
}
