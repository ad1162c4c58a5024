namespace MoeRagInject.Evaluation.Tests;

public sealed class RidgeTests
{
    private static double[] RandomSpd(int n, Random random)
    {
        var m = new double[n * n];
        for (var i = 0; i < m.Length; i++) m[i] = random.NextDouble() * 2 - 1;
        var a = new double[n * n];
        for (var i = 0; i < n; i++)
            for (var j = 0; j < n; j++)
            {
                double s = 0;
                for (var k = 0; k < n; k++) s += m[i * n + k] * m[j * n + k];
                a[i * n + j] = s + (i == j ? n : 0);
            }
        return a;
    }

    /// <summary>Gaussian elimination with partial pivoting: the reference the Cholesky solve is checked against.</summary>
    private static double[] DirectSolve(double[] a, double[] b, int n)
    {
        var m = (double[])a.Clone();
        var x = (double[])b.Clone();
        for (var c = 0; c < n; c++)
        {
            var pivot = Enumerable.Range(c, n - c).MaxBy(r => Math.Abs(m[r * n + c]));
            for (var k = 0; k < n; k++) (m[c * n + k], m[pivot * n + k]) = (m[pivot * n + k], m[c * n + k]);
            (x[c], x[pivot]) = (x[pivot], x[c]);
            for (var r = c + 1; r < n; r++)
            {
                var f = m[r * n + c] / m[c * n + c];
                for (var k = c; k < n; k++) m[r * n + k] -= f * m[c * n + k];
                x[r] -= f * x[c];
            }
        }
        for (var r = n - 1; r >= 0; r--)
        {
            var s = x[r];
            for (var k = r + 1; k < n; k++) s -= m[r * n + k] * x[k];
            x[r] = s / m[r * n + r];
        }
        return x;
    }

    [Fact]
    public void CholeskySolveMatchesADirectSolve()
    {
        var random = new Random(1);
        const int n = 24;
        var a = RandomSpd(n, random);
        var b = Enumerable.Range(0, n).Select(_ => random.NextDouble()).ToArray();
        var l = Cholesky.Factor(a, n);
        // L·Lᵀ reproduces A.
        for (var i = 0; i < n; i++)
            for (var j = 0; j < n; j++)
            {
                double s = 0;
                for (var k = 0; k < n; k++) s += l[i * n + k] * l[j * n + k];
                Assert.Equal(a[i * n + j], s, 9);
            }
        var x = (double[])b.Clone();
        Cholesky.Solve(l, n, x);
        var expected = DirectSolve(a, b, n);
        for (var i = 0; i < n; i++) Assert.Equal(expected[i], x[i], 9);
    }

    [Fact]
    public void CholeskyRejectsAnIndefiniteMatrix() =>
        Assert.Throws<InvalidOperationException>(() => Cholesky.Factor([1, 2, 2, 1], 2));

    [Fact]
    public void RidgeRecoversAKnownLinearMap()
    {
        var random = new Random(7);
        const int inputs = 12, outputs = 8, pairs = 400, rowsPerPair = 3;
        var truth = Enumerable.Range(0, outputs * inputs).Select(_ => random.NextDouble() * 2 - 1).ToArray();
        var bias = Enumerable.Range(0, outputs).Select(_ => random.NextDouble() * 4 - 2).ToArray();
        var plain = new RidgeAccumulator(inputs, outputs);
        var shifted = new RidgeAccumulator(inputs, outputs);
        for (var p = 0; p < pairs; p++)
        {
            var c = Enumerable.Range(0, inputs).Select(_ => random.NextDouble() * 2 - 1).ToArray();
            var y = new double[outputs];
            RidgeAccumulator.Apply(truth, null, c, y);
            var sum = new double[outputs];
            var sumShifted = new double[outputs];
            for (var r = 0; r < rowsPerPair; r++)
                for (var o = 0; o < outputs; o++)
                {
                    var noise = (random.NextDouble() - 0.5) * 0.01;
                    sum[o] += y[o] + noise;
                    sumShifted[o] += y[o] + bias[o] + noise;
                }
            plain.Add(c, sum, rowsPerPair);
            shifted.Add(c, sumShifted, rowsPerPair);
        }
        Assert.Equal(pairs * rowsPerPair, plain.Rows);

        var (p1, b1) = plain.Solve(1e-6);
        Assert.Null(b1);
        for (var i = 0; i < truth.Length; i++) Assert.Equal(truth[i], p1[i], 2);

        var (p2, b2) = shifted.Solve(1e-6, intercept: true);
        for (var i = 0; i < truth.Length; i++) Assert.Equal(truth[i], p2[i], 2);
        for (var o = 0; o < outputs; o++) Assert.Equal(bias[o], b2![o], 2);

        // A large λ shrinks P towards zero.
        var (p3, _) = plain.Solve(1e6 * plain.MeanDiagonal);
        Assert.True(p3.Max(Math.Abs) < 1e-3);
    }
}
