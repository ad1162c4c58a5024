using MoeRagInject.Model;
namespace MoeRagInject.Model.Tests;

public class SplitMix64Tests
{
    [Fact]
    public void SplitMix64MatchesTheReferenceSequence()
    {
        // Reference outputs of SplitMix64 (Steele, Lea & Flood; Vigna's splitmix64.c) seeded with 0.
        var generator = new SplitMix64(0);
        Assert.Equal(0xE220A8397B1DCDAFUL, generator.NextUInt64());
        Assert.Equal(0x6E789E6AA1B965F4UL, generator.NextUInt64());
        Assert.Equal(0x06C45D188009454FUL, generator.NextUInt64());
    }

    [Fact]
    public void OwnLogSinCosAgreeWithTheRuntime()
    {
        var rng = new Random(1);
        for (int i = 0; i < 20000; i++)
        {
            double x = Math.Exp((rng.NextDouble() * 80) - 40);
            Assert.Equal(Math.Log(x), SplitMix64.Log(x), Math.Max(1e-15, Math.Abs(Math.Log(x)) * 4e-16) * 4);
            double t = rng.NextDouble();
            SplitMix64.SinCosTurn(t, out double sin, out double cos);
            Assert.Equal(Math.Sin(2 * Math.PI * t), sin, 1e-14);
            Assert.Equal(Math.Cos(2 * Math.PI * t), cos, 1e-14);
        }

        Assert.Equal(0.0, SplitMix64.Log(1.0));
        Assert.Equal(Math.Log(2.0), SplitMix64.Log(2.0), 1e-16);
    }

    [Fact]
    public void GaussianSamplesHaveUnitVarianceAndAreReproducible()
    {
        var a = new SplitMix64(12345);
        var b = new SplitMix64(12345);
        const int N = 200_000;
        double sum = 0;
        double sumSquares = 0;
        int beyondTwoSigma = 0;
        for (int i = 0; i < N; i++)
        {
            double x = a.NextGaussian();
            Assert.Equal(x, b.NextGaussian());
            sum += x;
            sumSquares += x * x;
            if (Math.Abs(x) > 2)
            {
                beyondTwoSigma++;
            }
        }

        Assert.InRange(sum / N, -0.01, 0.01);
        Assert.InRange(sumSquares / N, 0.98, 1.02);
        Assert.InRange(beyondTwoSigma / (double)N, 0.0435, 0.0475); // P(|Z| > 2) = 0.0455
    }
}
