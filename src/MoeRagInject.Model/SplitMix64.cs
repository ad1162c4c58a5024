namespace MoeRagInject.Model;

/// <summary>
/// A deterministic generator: SplitMix64, with standard-normal samples via Box–Muller, using only IEEE-754 basic operations and square root
/// (own log/sin/cos), so the same seed gives bit-identical samples on every runtime and platform.
/// </summary>
public sealed class SplitMix64(ulong seed)
{
    private const double Ln2 = 0.6931471805599453094;
    private const double HalfPi = 1.5707963267948966192;
    private const double TwoPow53Inv = 1.0 / 9007199254740992.0;

    private ulong _state = seed;
    private double _spare;
    private bool _hasSpare;

    /// <summary>The next SplitMix64 output.</summary>
    public ulong NextUInt64()
    {
        unchecked
        {
            ulong z = _state += 0x9E3779B97F4A7C15UL;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
            return z ^ (z >> 31);
        }
    }

    /// <summary>Uniform in [0, 1) with 53 random bits.</summary>
    public double NextDouble() => (NextUInt64() >> 11) * TwoPow53Inv;

    /// <summary>
    /// What the next <see cref="NextSingle"/> will return, without advancing: uniform in [0, 1) with 24 random bits, exact in
    /// fp32 on any device.
    /// </summary>
    public float PeekSingle()
    {
        var state = _state;
        var value = NextSingle();
        _state = state;
        return value;
    }

    /// <summary>Uniform in [0, 1) with 24 random bits.</summary>
    public float NextSingle() => (NextUInt64() >> 40) * (1f / 16777216f);

    /// <summary>The next standard-normal sample.</summary>
    public double NextGaussian()
    {
        if (_hasSpare)
        {
            _hasSpare = false;
            return _spare;
        }

        double u1 = ((NextUInt64() >> 11) + 1) * TwoPow53Inv; // (0, 1]
        double u2 = (NextUInt64() >> 11) * TwoPow53Inv;       // [0, 1)
        double r = Math.Sqrt(-2.0 * Log(u1));
        SinCosTurn(u2, out double sin, out double cos);
        _spare = r * sin;
        _hasSpare = true;
        return r * cos;
    }

    /// <summary>Natural log for positive finite normal doubles: exponent split plus 2·atanh series (error below 1e-16 relative).</summary>
    public static double Log(double x)
    {
        if (!(x > 0) || !double.IsFinite(x) || !double.IsNormal(x))
        {
            throw new ArgumentOutOfRangeException(nameof(x), x, "Log needs a positive normal number.");
        }

        long bits = BitConverter.DoubleToInt64Bits(x);
        int exponent = (int)((bits >> 52) & 0x7FF) - 1023;
        double m = BitConverter.Int64BitsToDouble((bits & 0x000FFFFFFFFFFFFFL) | 0x3FF0000000000000L); // [1, 2)
        if (m > 1.4142135623730951)
        {
            m *= 0.5;
            exponent++;
        }

        double s = (m - 1.0) / (m + 1.0); // |s| <= 0.1716
        double s2 = s * s;
        double series = 1.0 / 25;
        for (int k = 23; k >= 1; k -= 2)
        {
            series = (1.0 / k) + (s2 * series);
        }

        return (exponent * Ln2) + (2.0 * s * series);
    }

    /// <summary>sin and cos of 2π·t for t in [0, 1), by quadrant reduction and Taylor series on [0, π/2).</summary>
    public static void SinCosTurn(double t, out double sin, out double cos)
    {
        double quarter = t * 4.0;
        int quadrant = (int)Math.Floor(quarter);
        double a = (quarter - quadrant) * HalfPi;
        double a2 = a * a;

        // Horner form of the Taylor series up to a^23 (sin) and a^22 (cos): error < 1e-17 on [0, π/2).
        double s = 1.0;
        double c = 1.0;
        for (int k = 11; k >= 1; k--)
        {
            s = 1.0 - (a2 * s / ((2 * k) * ((2 * k) + 1)));
            c = 1.0 - (a2 * c / (((2 * k) - 1) * (2 * k)));
        }

        s *= a;
        (sin, cos) = (quadrant & 3) switch
        {
            0 => (s, c),
            1 => (c, -s),
            2 => (-s, -c),
            _ => (-c, s),
        };
    }
}
