using System.Numerics;
using System.Runtime.CompilerServices;

namespace MoeRagInject.Backend.Cpu.Ops;

/// <summary>
/// SIMD kernels with a fixed summation order: a row's result never depends on which other rows share the batch,
/// or where in memory the row sits, which is what makes batched and single-request outputs bit-identical.
/// </summary>
public static class Kernels
{
    /// <summary>Σ a[i]·b[i] with four vector accumulators combined in a fixed order, then a scalar tail.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Dot(ReadOnlySpan<float> a, ReadOnlySpan<float> b)
    {
        var n = a.Length;
        var width = Vector<float>.Count;
        var i = 0;
        float sum;
        if (Vector.IsHardwareAccelerated && n >= 4 * width)
        {
            Vector<float> s0 = default, s1 = default, s2 = default, s3 = default;
            for (; i + 4 * width <= n; i += 4 * width)
            {
                s0 += new Vector<float>(a.Slice(i)) * new Vector<float>(b.Slice(i));
                s1 += new Vector<float>(a.Slice(i + width)) * new Vector<float>(b.Slice(i + width));
                s2 += new Vector<float>(a.Slice(i + 2 * width)) * new Vector<float>(b.Slice(i + 2 * width));
                s3 += new Vector<float>(a.Slice(i + 3 * width)) * new Vector<float>(b.Slice(i + 3 * width));
            }
            for (; i + width <= n; i += width) s0 += new Vector<float>(a.Slice(i)) * new Vector<float>(b.Slice(i));
            sum = Vector.Sum((s0 + s1) + (s2 + s3));
        }
        else
        {
            sum = 0;
        }
        for (; i < n; i++) sum += a[i] * b[i];
        return sum;
    }

    /// <summary>Scalar reference of <see cref="Dot"/> in double precision, for tests.</summary>
    public static double DotReference(ReadOnlySpan<float> a, ReadOnlySpan<float> b)
    {
        double sum = 0;
        for (var i = 0; i < a.Length; i++) sum += (double)a[i] * b[i];
        return sum;
    }

    /// <summary>y += alpha · x.</summary>
    public static void AddScaled(Span<float> y, ReadOnlySpan<float> x, float alpha)
    {
        var width = Vector<float>.Count;
        var i = 0;
        if (Vector.IsHardwareAccelerated)
        {
            var va = new Vector<float>(alpha);
            for (; i + width <= y.Length; i += width)
                (new Vector<float>(y.Slice(i)) + va * new Vector<float>(x.Slice(i))).CopyTo(y.Slice(i));
        }
        for (; i < y.Length; i++) y[i] += alpha * x[i];
    }

    public static float Silu(float x) => x / (1f + MathF.Exp(-x));
}
