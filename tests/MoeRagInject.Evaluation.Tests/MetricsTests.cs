namespace MoeRagInject.Evaluation.Tests;

public sealed class MetricsTests
{
    [Theory]
    [InlineData("The Cat sat.", "cat sat")]
    [InlineData("  an   apple, a pear & the plum!  ", "apple pear plum")]
    [InlineData("Theory of an atom", "theory of atom")]
    [InlineData("re-entry (noun): a return", "reentry noun return")]
    [InlineData("", "")]
    [InlineData("A the AN", "")]
    public void NormalizeFollowsSquad(string input, string expected) => Assert.Equal(expected, AnswerMetrics.Normalize(input));

    [Theory]
    [InlineData("the cat sat on the mat", "a cat sat on a mat", 1.0)]
    [InlineData("cat sat", "cat sat on mat", 2 * (1.0 * 0.5) / 1.5)] // precision 1, recall 1/2
    [InlineData("dog", "cat", 0.0)]
    [InlineData("", "", 1.0)]
    [InlineData("", "cat", 0.0)]
    [InlineData("cat cat cat", "cat", 0.5)] // common 1: precision 1/3, recall 1 -> 2/3/(4/3)
    public void TokenF1(string prediction, string gold, double expected) =>
        Assert.Equal(expected, AnswerMetrics.TokenF1(prediction, gold), 10);

    [Theory]
    [InlineData("It is: a small Cat, sleeping.", "small cat", true)]
    [InlineData("smallcat", "small cat", false)]
    [InlineData("the scatter", "cat", false)]
    [InlineData("anything", "", false)]
    [InlineData("", "", true)]
    public void Containment(string prediction, string gold, bool expected) =>
        Assert.Equal(expected, AnswerMetrics.Contains(prediction, gold));

    [Theory]
    [InlineData("sour sour sour sour sour", true)]
    [InlineData("sour sour sour sour", false)]
    [InlineData("having or resembling or resembling or resembling or resembling", true)]
    [InlineData("having or resembling or resembling or resembling", false)]
    [InlineData("a b c x a b c y a b c", true)]
    [InlineData("a b a b a b", false)]
    [InlineData("A b c a b c a b c", false)]
    [InlineData("striped hyena of southeast Africa that feeds chiefly on insects", false)]
    [InlineData("", false)]
    public void RepeatsAPhraseCountsAThreeWordSequenceSeenThreeTimes(string answer, bool expected) =>
        Assert.Equal(expected, AnswerMetrics.RepeatsAPhrase(answer));

    [Fact]
    public void AurocMatchesHandComputedCases()
    {
        // Perfect separation.
        Assert.Equal(1.0, Stats.Auroc([0.1, 0.2, 0.8, 0.9], [false, false, true, true]));
        Assert.Equal(0.0, Stats.Auroc([0.1, 0.2, 0.8, 0.9], [true, true, false, false]));
        // Positives {0.4, 0.8}, negatives {0.2, 0.6}: pairs (0.4>0.2), (0.4<0.6), (0.8>0.2), (0.8>0.6) -> 3/4.
        Assert.Equal(0.75, Stats.Auroc([0.2, 0.4, 0.6, 0.8], [false, true, false, true]));
        // Ties count half: positives {1, 2}, negatives {1, 0}: (1=1) 0.5, (1>0) 1, (2>1) 1, (2>0) 1 -> 3.5/4.
        Assert.Equal(0.875, Stats.Auroc([1, 2, 1, 0], [true, true, false, false]));
        // All equal: 0.5.
        Assert.Equal(0.5, Stats.Auroc([3, 3, 3, 3, 3], [true, false, true, false, false]));
        // One class only: undefined.
        Assert.True(double.IsNaN(Stats.Auroc([1, 2, 3], [true, true, true])));
        Assert.True(double.IsNaN(Stats.Auroc([1, 2, 3], [false, false, false])));
        Assert.True(double.IsNaN(Stats.Auroc([], [])));
        // NaN scores are left out.
        Assert.Equal(1.0, Stats.Auroc([double.NaN, 0.1, 0.9], [false, false, true]));
    }

    [Fact]
    public void AurocEqualsBruteForceOnRandomData()
    {
        var random = new Random(3);
        for (var trial = 0; trial < 20; trial++)
        {
            var n = random.Next(2, 60);
            var scores = Enumerable.Range(0, n).Select(_ => (double)random.Next(0, 6)).ToArray(); // many ties
            var labels = Enumerable.Range(0, n).Select(_ => random.Next(2) == 0).ToArray();
            double wins = 0, pairs = 0;
            for (var i = 0; i < n; i++)
                for (var j = 0; j < n; j++)
                    if (labels[i] && !labels[j])
                    {
                        pairs++;
                        wins += scores[i] > scores[j] ? 1 : scores[i] == scores[j] ? 0.5 : 0;
                    }
            var expected = pairs == 0 ? double.NaN : wins / pairs;
            Assert.Equal(expected, Stats.Auroc(scores, labels), 12);
        }
    }

    [Fact]
    public void QuantileInterpolatesLinearly()
    {
        double[] values = [4, 1, 3, 2];
        Assert.Equal(1, Stats.Quantile(values, 0));
        Assert.Equal(4, Stats.Quantile(values, 1));
        Assert.Equal(2.5, Stats.Quantile(values, 0.5));
        Assert.Equal(3.7, Stats.Quantile(values, 0.9), 12); // h = 2.7 -> 3 + 0.7
        Assert.True(double.IsNaN(Stats.Quantile([], 0.5)));
    }

    [Fact]
    public void AurocStandardErrorFollowsHanleyMcNeil()
    {
        // A = 0.5, 10 + 10: Q1 = Q2 = 1/3, SE² = [0.25 + 18·(1/3 − 1/4)] / 100 = 0.0175.
        Assert.Equal(Math.Sqrt(0.0175), Stats.AurocStandardError(0.5, 10, 10), 12);
        Assert.True(double.IsNaN(Stats.AurocStandardError(0.7, 0, 10)));
    }

    [Fact]
    public void MeanCi95IsTheNormalApproximation()
    {
        // mean 2.5, sample variance 5/3 over n = 4: 1.96·sqrt(5/3/4).
        Assert.Equal(1.96 * Math.Sqrt(5.0 / 3 / 4), Stats.MeanCi95([1, 2, 3, 4]), 12);
        Assert.True(double.IsNaN(Stats.MeanCi95([1])));
    }
}
