namespace MoeRagInject.Evaluation;

/// <summary>Dense symmetric positive-definite solves in double precision.</summary>
public static class Cholesky
{
    /// <summary>
    /// Factors the n×n row-major SPD matrix <paramref name="a"/> as L·Lᵀ; returns L (row-major, lower triangle, zeros above).
    /// </summary>
    /// <exception cref="InvalidOperationException">The matrix is not positive definite (to working precision).</exception>
    public static double[] Factor(ReadOnlySpan<double> a, int n)
    {
        if (a.Length != n * n) throw new ArgumentException($"expected {n}×{n} values, got {a.Length}");
        var l = new double[n * n];
        for (var j = 0; j < n; j++)
        {
            var rowJ = l.AsSpan(j * n, n);
            double diagonal = a[j * n + j];
            for (var k = 0; k < j; k++) diagonal -= rowJ[k] * rowJ[k];
            if (!(diagonal > 0)) throw new InvalidOperationException($"matrix is not positive definite (pivot {j} = {diagonal})");
            var ljj = Math.Sqrt(diagonal);
            rowJ[j] = ljj;
            for (var i = j + 1; i < n; i++)
            {
                var rowI = l.AsSpan(i * n, n);
                double sum = a[i * n + j];
                for (var k = 0; k < j; k++) sum -= rowI[k] * rowJ[k];
                rowI[j] = sum / ljj;
            }
        }
        return l;
    }

    /// <summary>Solves (L·Lᵀ)·x = b in place for one right-hand side.</summary>
    public static void Solve(ReadOnlySpan<double> l, int n, Span<double> b)
    {
        for (var i = 0; i < n; i++)
        {
            double sum = b[i];
            for (var k = 0; k < i; k++) sum -= l[i * n + k] * b[k];
            b[i] = sum / l[i * n + i];
        }
        for (var i = n - 1; i >= 0; i--)
        {
            double sum = b[i];
            for (var k = i + 1; k < n; k++) sum -= l[k * n + i] * b[k];
            b[i] = sum / l[i * n + i];
        }
    }
}

/// <summary>
/// Ridge regression d ≈ P·c with no intercept (optionally with one), from sufficient statistics so that rows sharing one
/// feature vector (all positions of one pair) cost one outer product.
/// </summary>
public sealed class RidgeAccumulator
{
    private readonly int _in, _out;
    private readonly double[] _ctc; // [in, in]
    private readonly double[] _dtc; // [out, in]
    private readonly double[] _sumC, _sumD;
    private long _rows;

    public RidgeAccumulator(int inputs, int outputs)
    {
        _in = inputs;
        _out = outputs;
        _ctc = new double[inputs * inputs];
        _dtc = new double[outputs * inputs];
        _sumC = new double[inputs];
        _sumD = new double[outputs];
    }

    public long Rows => _rows;

    /// <summary>Adds <paramref name="weight"/> rows with feature c whose targets sum to <paramref name="targetSum"/> (Σ over those rows of d).</summary>
    public void Add(ReadOnlySpan<double> c, ReadOnlySpan<double> targetSum, int weight)
    {
        if (c.Length != _in || targetSum.Length != _out) throw new ArgumentException("dimension mismatch");
        for (var i = 0; i < _in; i++)
        {
            var ci = c[i] * weight;
            if (ci == 0) continue;
            var row = _ctc.AsSpan(i * _in, _in);
            for (var j = 0; j < _in; j++) row[j] += ci * c[j];
        }
        for (var o = 0; o < _out; o++)
        {
            var d = targetSum[o];
            if (d == 0) continue;
            var row = _dtc.AsSpan(o * _in, _in);
            for (var j = 0; j < _in; j++) row[j] += d * c[j];
        }
        for (var i = 0; i < _in; i++) _sumC[i] += c[i] * weight;
        for (var o = 0; o < _out; o++) _sumD[o] += targetSum[o];
        _rows += weight;
    }

    /// <summary>trace(CᵀC) / inputs: the scale λ is chosen relative to.</summary>
    public double MeanDiagonal
    {
        get
        {
            double t = 0;
            for (var i = 0; i < _in; i++) t += _ctc[i * _in + i];
            return t / _in;
        }
    }

    /// <summary>
    /// P = DᵀC (CᵀC + λI)⁻¹ (row-major [out, in]); with <paramref name="intercept"/> the statistics are centred first and the
    /// bias b = mean(d) − P·mean(c) is returned too (else null).
    /// </summary>
    public (double[] P, double[]? Bias) Solve(double lambda, bool intercept = false)
    {
        if (_rows == 0) throw new InvalidOperationException("no rows");
        var a = (double[])_ctc.Clone();
        var rhs = (double[])_dtc.Clone();
        double[]? meanC = null, meanD = null;
        if (intercept)
        {
            meanC = _sumC.Select(v => v / _rows).ToArray();
            meanD = _sumD.Select(v => v / _rows).ToArray();
            for (var i = 0; i < _in; i++)
                for (var j = 0; j < _in; j++) a[i * _in + j] -= _rows * meanC[i] * meanC[j];
            for (var o = 0; o < _out; o++)
                for (var j = 0; j < _in; j++) rhs[o * _in + j] -= _rows * meanD[o] * meanC[j];
        }
        for (var i = 0; i < _in; i++) a[i * _in + i] += lambda;
        var l = Cholesky.Factor(a, _in);
        // (CᵀC + λI) is symmetric, so each row p_o of P solves (CᵀC + λI)·p_o = (DᵀC)_o.
        var p = new double[_out * _in];
        for (var o = 0; o < _out; o++)
        {
            var row = p.AsSpan(o * _in, _in);
            rhs.AsSpan(o * _in, _in).CopyTo(row);
            Cholesky.Solve(l, _in, row);
        }
        double[]? bias = null;
        if (intercept)
        {
            bias = new double[_out];
            for (var o = 0; o < _out; o++)
            {
                double s = 0;
                for (var j = 0; j < _in; j++) s += p[o * _in + j] * meanC![j];
                bias[o] = meanD![o] - s;
            }
        }
        return (p, bias);
    }

    /// <summary>y = P·x (+ b).</summary>
    public static void Apply(ReadOnlySpan<double> p, double[]? bias, ReadOnlySpan<double> x, Span<double> y)
    {
        var inputs = x.Length;
        for (var o = 0; o < y.Length; o++)
        {
            double s = 0;
            var row = p.Slice(o * inputs, inputs);
            for (var j = 0; j < inputs; j++) s += row[j] * x[j];
            y[o] = s + (bias is null ? 0 : bias[o]);
        }
    }
}
