namespace MoeRagInject.Rag.Tests;

public class EntropyTriggerTests
{
    private static readonly float[] Mixed = [0.5f, 1.2f, 0.9f, 1.5f];

    [Fact]
    public void AnyFiresOnLayersAboveThresholdWithTheirMax()
    {
        var trigger = new EntropyTrigger(new TriggerOptions { Threshold = 1.0, Aggregation = LayerAggregation.Any });
        var decision = trigger.Evaluate(Mixed, 0);
        Assert.True(decision.Fired);
        Assert.Equal(new[] { 1, 3 }, decision.FiredLayers);
        Assert.Equal(1.5, decision.Entropy, 6);
        Assert.Equal(TriggerSuppression.None, decision.Suppression);
    }

    [Fact]
    public void AnyCountsOnlyTheConfiguredLayers()
    {
        var trigger = new EntropyTrigger(new TriggerOptions { Threshold = 1.0, Layers = [0, 2] });
        var decision = trigger.Evaluate(Mixed, 0);
        Assert.False(decision.Fired);
        Assert.Empty(decision.FiredLayers);
        Assert.Equal(0.9, decision.Entropy, 6); // max of 0.5 and 0.9

        var withLayer1 = new EntropyTrigger(new TriggerOptions { Threshold = 1.0, Layers = [2, 1] });
        var fired = withLayer1.Evaluate(Mixed, 0);
        Assert.True(fired.Fired);
        Assert.Equal(new[] { 1 }, fired.FiredLayers);
        Assert.Equal(1.2, fired.Entropy, 6);
    }

    [Fact]
    public void ThresholdIsStrict()
    {
        var trigger = new EntropyTrigger(new TriggerOptions { Threshold = 1.5 });
        Assert.False(trigger.Evaluate(Mixed, 0).Fired); // 1.5 is not > 1.5
    }

    [Fact]
    public void MaxReportsTheMaxAndTheLayersAbove()
    {
        var trigger = new EntropyTrigger(new TriggerOptions { Threshold = 1.0, Aggregation = LayerAggregation.Max });
        var decision = trigger.Evaluate(Mixed, 0);
        Assert.True(decision.Fired);
        Assert.Equal(1.5, decision.Entropy, 6);
        Assert.Equal(new[] { 1, 3 }, decision.FiredLayers);

        var high = new EntropyTrigger(new TriggerOptions { Threshold = 1.6, Aggregation = LayerAggregation.Max });
        var none = high.Evaluate(Mixed, 0);
        Assert.False(none.Fired);
        Assert.Equal(1.5, none.Entropy, 6);
    }

    [Fact]
    public void MeanUsesTheMeanOverCountedLayers()
    {
        // (0.5 + 1.2 + 0.9 + 1.5) / 4 = 1.025 > 1.0
        var trigger = new EntropyTrigger(new TriggerOptions { Threshold = 1.0, Aggregation = LayerAggregation.Mean });
        var decision = trigger.Evaluate(Mixed, 0);
        Assert.True(decision.Fired);
        Assert.Equal(1.025, decision.Entropy, 6);
        Assert.Equal(new[] { 1, 3 }, decision.FiredLayers);

        // (0.2 + 1.6 + 0.3 + 1.1) / 4 = 0.8: not above 1.0 although two layers are
        float[] spread = [0.2f, 1.6f, 0.3f, 1.1f];
        var notFired = trigger.Evaluate(spread, 1);
        Assert.False(notFired.Fired);
        Assert.Equal(0.8, notFired.Entropy, 6);
        Assert.Empty(notFired.FiredLayers);

        // layers 1 and 3 only: (1.6 + 1.1) / 2 = 1.35
        var subset = new EntropyTrigger(new TriggerOptions { Threshold = 1.0, Aggregation = LayerAggregation.Mean, Layers = [1, 3] });
        var subsetDecision = subset.Evaluate(spread, 0);
        Assert.True(subsetDecision.Fired);
        Assert.Equal(1.35, subsetDecision.Entropy, 6);
        Assert.Equal(new[] { 1, 3 }, subsetDecision.FiredLayers);
    }

    [Fact]
    public void CooldownHoldsBackUntilEnoughTokensPassed()
    {
        var trigger = new EntropyTrigger(new TriggerOptions { Threshold = 1.0, CooldownTokens = 4, MaxRetrievalsPerRequest = 10 });
        Assert.True(trigger.Evaluate(Mixed, 10).Fired);
        trigger.RecordRetrieval(10);
        Assert.Equal(1, trigger.RetrievalCount);
        for (int t = 11; t <= 13; t++)
        {
            var held = trigger.Evaluate(Mixed, t); // t - 10 < 4
            Assert.False(held.Fired);
            Assert.Equal(TriggerSuppression.Cooldown, held.Suppression);
            Assert.Empty(held.FiredLayers);
        }

        Assert.True(trigger.Evaluate(Mixed, 14).Fired); // 14 - 10 = 4, not < 4
    }

    [Fact]
    public void CapStopsFurtherRetrievals()
    {
        var trigger = new EntropyTrigger(new TriggerOptions { Threshold = 1.0, CooldownTokens = 0, MaxRetrievalsPerRequest = 2 });
        Assert.True(trigger.Evaluate(Mixed, 0).Fired);
        trigger.RecordRetrieval(0);
        Assert.True(trigger.Evaluate(Mixed, 1).Fired);
        trigger.RecordRetrieval(1);
        var capped = trigger.Evaluate(Mixed, 100);
        Assert.False(capped.Fired);
        Assert.Equal(TriggerSuppression.Cap, capped.Suppression);
        Assert.Equal(2, trigger.RetrievalCount);

        var never = new EntropyTrigger(new TriggerOptions { Threshold = 1.0, MaxRetrievalsPerRequest = 0 });
        Assert.False(never.Evaluate(Mixed, 0).Fired);
    }

    [Fact]
    public void AWindowFiresWithinItsFirstTokensOnly()
    {
        var trigger = new EntropyTrigger(new TriggerOptions { Threshold = 1.0, CooldownTokens = 0, WindowTokens = 4 });
        Assert.True(trigger.Evaluate(Mixed, 3).Fired);
        var late = trigger.Evaluate(Mixed, 4);
        Assert.False(late.Fired);
        Assert.Equal(TriggerSuppression.Window, late.Suppression);
        Assert.Equal(0, trigger.RetrievalCount);
        // Below the threshold nothing is suppressed, inside the window or past it.
        Assert.Equal(TriggerSuppression.None, trigger.Evaluate([0.1f, 0.2f], 9).Suppression);

        var bad = Assert.Throws<ArgumentException>(() => new EntropyTrigger(new TriggerOptions { WindowTokens = 0 }));
        Assert.Contains("WindowTokens", bad.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void LowEntropyIsNeitherFiredNorSuppressed()
    {
        var trigger = new EntropyTrigger(new TriggerOptions { Threshold = 1.0, CooldownTokens = 100 });
        trigger.RecordRetrieval(0);
        var decision = trigger.Evaluate([0.1f, 0.2f], 1);
        Assert.False(decision.Fired);
        Assert.Equal(TriggerSuppression.None, decision.Suppression);
    }

    [Fact]
    public void OutOfRangeLayersAreRejectedNamingTheLayer()
    {
        var trigger = new EntropyTrigger(new TriggerOptions { Layers = [1, 5] });
        var ex = Assert.Throws<ArgumentException>(() => trigger.Evaluate(Mixed, 0));
        Assert.Contains("5", ex.Message, StringComparison.Ordinal);

        var negative = Assert.Throws<ArgumentException>(() => new EntropyTrigger(new TriggerOptions { Layers = [-3] }));
        Assert.Contains("-3", negative.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void NoLayersNeverFires()
    {
        var trigger = new EntropyTrigger(new TriggerOptions { Threshold = 0 });
        Assert.False(trigger.Evaluate(ReadOnlySpan<float>.Empty, 0).Fired);
    }
}
