using MoeRagInject.Model;

namespace MoeRagInject.Engine.Tests;

/// <summary>
/// The bench's memory-bandwidth limit against the figures the CUDA issue gives for Mixtral-8x7B at 4.27 TB/s (25.5 GB and
/// 167 tok/s at batch 1, 84 GB with 7.2 experts touched a layer at batch 8, 93.4 GB of weights from batch 64), and the
/// share at the mean decode batch against the arithmetic it stands for.
/// </summary>
public sealed class RooflineTests
{
    private static readonly ModelConfig s_mixtral = ModelConfig.Load(Path.Combine(TestPaths.RepoRoot, "assets", "configs", "mixtral-8x7b"));
    private const double CopyRate = 4.27e12;

    [Theory]
    [InlineData(1, 25.5e9)]
    [InlineData(8, 84e9)]
    [InlineData(64, 93.4e9)]
    public void WeightBytesAStepMatchTheIssuesTable(int batch, double bytes)
    {
        var weightsOnly = Roofline.For(s_mixtral, batch, meanContext: 0, CopyRate);
        Assert.InRange(weightsOnly.BytesPerStep, 0.99 * bytes, 1.01 * bytes);
    }

    [Fact]
    public void BatchOneDecodesAt167TokensASecond() =>
        Assert.InRange(Roofline.For(s_mixtral, 1, meanContext: 0, CopyRate).TokensPerSecond(1), 166, 169);

    [Fact]
    public void TheKvCacheAddsItsBytesPerSequence()
    {
        // bf16 keys and values of 8 KV heads of 128 over 32 layers: 128 KiB a position.
        var without = Roofline.For(s_mixtral, 256, meanContext: 0, CopyRate).BytesPerStep;
        var with = Roofline.For(s_mixtral, 256, meanContext: 192, CopyRate).BytesPerStep;
        Assert.Equal(256L * 192 * 128 * 1024, with - without);
    }

    [Fact]
    public void TheShareAtTheMeanBatchIsTheStepsBytesOverTheirTime()
    {
        const double stepSeconds = 0.032, meanBatch = 240;
        var row = new BenchmarkRow("off", 256, 128, 128, PrefillSeconds: 2, MeanFirstTokenSeconds: 1.1, DecodeTokensPerSecond: meanBatch / stepSeconds, Retrievals: 0,
            StepMilliseconds: 1e3 * stepSeconds, HostMicrosecondsPerStep: 100, MeanDecodeBatch: meanBatch)
        {
            Roofline = Roofline.For(s_mixtral, 256, 192, CopyRate),
            MeanBatchRoofline = Roofline.For(s_mixtral, 240, 192, CopyRate),
        };
        var (atBatch, atMean) = row.RooflineShares!.Value;
        Assert.Equal(row.MeanBatchRoofline.BytesPerStep / CopyRate / stepSeconds, atMean, 1e-9);
        // The nominal share also counts the tail's missing tokens: 240 of 256 a step, and the full batch's bytes.
        Assert.Equal(meanBatch / 256 * row.Roofline.BytesPerStep / CopyRate / stepSeconds, atBatch, 1e-9);
        Assert.True(atMean > atBatch);
        var json = row.ToJson();
        Assert.Equal(Math.Round(atMean, 3), (double)json["mean_batch_roofline_share"]!);
        Assert.Equal(Math.Round(atBatch, 3), (double)json["roofline_share"]!);
    }
}
