using System.Text;

namespace MoeRagInject.Evaluation;

/// <summary>SQuAD-style answer metrics: normalisation, token F1 and containment.</summary>
public static class AnswerMetrics
{
    private static readonly HashSet<string> s_articles = new(StringComparer.Ordinal) { "a", "an", "the" };

    /// <summary>
    /// SQuAD's normalize_answer: lowercase, drop punctuation (ASCII punctuation and Unicode punctuation/symbols),
    /// drop the articles a/an/the, collapse whitespace.
    /// </summary>
    public static string Normalize(string? text)
    {
        if (string.IsNullOrEmpty(text)) return "";
        var builder = new StringBuilder(text.Length);
        foreach (var ch in text.ToLowerInvariant())
        {
            if (char.IsPunctuation(ch) || char.IsSymbol(ch)) continue;
            builder.Append(char.IsWhiteSpace(ch) ? ' ' : ch);
        }
        var words = builder.ToString().Split(' ', StringSplitOptions.RemoveEmptyEntries).Where(w => !s_articles.Contains(w));
        return string.Join(' ', words);
    }

    public static string[] Tokens(string? text)
    {
        var normalized = Normalize(text);
        return normalized.Length == 0 ? [] : normalized.Split(' ');
    }

    /// <summary>Token-level F1 of the normalised prediction against the normalised gold (bag of words); 1 when both are empty, 0 when one is.</summary>
    public static double TokenF1(string? prediction, string? gold)
    {
        var p = Tokens(prediction);
        var g = Tokens(gold);
        if (p.Length == 0 || g.Length == 0) return p.Length == g.Length ? 1.0 : 0.0;
        var counts = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var t in g) counts[t] = counts.GetValueOrDefault(t) + 1;
        var common = 0;
        foreach (var t in p)
        {
            if (counts.TryGetValue(t, out var c) && c > 0)
            {
                common++;
                counts[t] = c - 1;
            }
        }
        if (common == 0) return 0.0;
        var precision = (double)common / p.Length;
        var recall = (double)common / g.Length;
        return 2 * precision * recall / (precision + recall);
    }

    /// <summary>
    /// True when some three-word sequence occurs three or more times in the answer (words split at whitespace, as written,
    /// overlapping occurrences counted): the loop a latent injection falls into when it pushes the same words at every
    /// position ("sour sour sour sour sour", "or resembling or resembling or resembling or resembling").
    /// </summary>
    public static bool RepeatsAPhrase(string? answer)
    {
        var words = (answer ?? "").Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries);
        var counts = new Dictionary<(string, string, string), int>();
        for (var i = 0; i + 2 < words.Length; i++)
        {
            var key = (words[i], words[i + 1], words[i + 2]);
            if ((counts[key] = counts.GetValueOrDefault(key) + 1) >= 3) return true;
        }
        return false;
    }

    /// <summary>True when the normalised gold occurs in the normalised prediction as a whole-word run; an empty gold is contained only in an empty prediction.</summary>
    public static bool Contains(string? prediction, string? gold)
    {
        var p = Normalize(prediction);
        var g = Normalize(gold);
        if (g.Length == 0) return p.Length == 0;
        return (" " + p + " ").Contains(" " + g + " ", StringComparison.Ordinal);
    }
}

/// <summary>Small statistics helpers: quantiles, means, AUROC.</summary>
public static class Stats
{
    /// <summary>The q-quantile (0..1) with linear interpolation between order statistics (numpy's default); NaN for no values.</summary>
    public static double Quantile(IEnumerable<double> values, double q)
    {
        var sorted = values.Where(v => !double.IsNaN(v)).Order().ToArray();
        return QuantileSorted(sorted, q);
    }

    public static double QuantileSorted(IReadOnlyList<double> sorted, double q)
    {
        if (sorted.Count == 0) return double.NaN;
        q = Math.Clamp(q, 0, 1);
        var h = (sorted.Count - 1) * q;
        var lo = (int)Math.Floor(h);
        var hi = Math.Min(lo + 1, sorted.Count - 1);
        return sorted[lo] + (h - lo) * (sorted[hi] - sorted[lo]);
    }

    public static double Mean(IEnumerable<double> values)
    {
        double sum = 0;
        var n = 0;
        foreach (var v in values)
        {
            if (double.IsNaN(v)) continue;
            sum += v;
            n++;
        }
        return n == 0 ? double.NaN : sum / n;
    }

    /// <summary>
    /// Area under the ROC curve of <paramref name="scores"/> for the positive class <paramref name="labels"/> = true, by the
    /// Mann–Whitney statistic: P(score of a positive &gt; score of a negative), ties counted half. NaN when either class is
    /// empty; NaN scores are left out.
    /// </summary>
    public static double Auroc(IReadOnlyList<double> scores, IReadOnlyList<bool> labels)
    {
        if (scores.Count != labels.Count) throw new ArgumentException("scores and labels differ in length");
        var items = new List<(double Score, bool Label)>(scores.Count);
        for (var i = 0; i < scores.Count; i++)
            if (!double.IsNaN(scores[i])) items.Add((scores[i], labels[i]));
        long positives = items.Count(x => x.Label);
        long negatives = items.Count - positives;
        if (positives == 0 || negatives == 0) return double.NaN;
        items.Sort((a, b) => a.Score.CompareTo(b.Score));
        // Sum of the (mid)ranks of the positives.
        double rankSum = 0;
        var i0 = 0;
        while (i0 < items.Count)
        {
            var i1 = i0;
            while (i1 + 1 < items.Count && items[i1 + 1].Score == items[i0].Score) i1++;
            var midRank = (i0 + i1) / 2.0 + 1; // ranks start at 1
            for (var k = i0; k <= i1; k++)
                if (items[k].Label) rankSum += midRank;
            i0 = i1 + 1;
        }
        var u = rankSum - positives * (positives + 1) / 2.0;
        return u / ((double)positives * negatives);
    }

    /// <summary>
    /// Standard error of an AUROC by Hanley &amp; McNeil (1982): with Q1 = A/(2−A), Q2 = 2A²/(1+A),
    /// SE² = [A(1−A) + (n₊−1)(Q1−A²) + (n₋−1)(Q2−A²)] / (n₊·n₋). NaN when either class is empty.
    /// </summary>
    public static double AurocStandardError(double auroc, long positives, long negatives)
    {
        if (positives == 0 || negatives == 0 || double.IsNaN(auroc)) return double.NaN;
        var q1 = auroc / (2 - auroc);
        var q2 = 2 * auroc * auroc / (1 + auroc);
        var variance = (auroc * (1 - auroc) + (positives - 1) * (q1 - auroc * auroc) + (negatives - 1) * (q2 - auroc * auroc))
            / ((double)positives * negatives);
        return Math.Sqrt(Math.Max(0, variance));
    }

    /// <summary>Half-width of the normal-approximation 95% confidence interval of a mean: 1.96·sd/√n (NaN below two values).</summary>
    public static double MeanCi95(IReadOnlyList<double> values)
    {
        if (values.Count < 2) return double.NaN;
        var mean = values.Average();
        var variance = values.Sum(v => (v - mean) * (v - mean)) / (values.Count - 1);
        return 1.96 * Math.Sqrt(variance / values.Count);
    }

    /// <summary>The percentiles reported everywhere (p5 … p95).</summary>
    public static readonly int[] ReportedPercentiles = [5, 10, 25, 50, 75, 90, 95];
}
