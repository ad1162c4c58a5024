using System.Buffers;
using System.Globalization;
using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using MoeRagInject.Model;

namespace MoeRagInject.Rag;

/// <summary>
/// The function of an attn projector file (<see cref="ProjectorArchitecture.Attn"/>): tools/projector/train_projector.py's
/// <c>make_reader("attn")</c> over c = embed-seq:T, the embedding rows of the passages' first T tokens in order.
/// </summary>
/// <remarks>
/// A row is present when it is not all zeros (rows past the passages' end are absent). Present rows only:
/// z = (row − μ)/σ; h = W_in·z + b_in + pos[t]; per block (pre-LayerNorm) h += proj(attention(LN1(h))) and
/// h += W_ff2·silu(W_ff1·LN2(h) + b_ff1) + b_ff2, the attention softmax(q·k/√(width/heads)) over the present rows; h = LN(h);
/// each learned query q pools p_q = Σ_t softmax_t(key(h_t)·q/√width)·value(h_t); v = W_out·[p_0, p_1, …] + b_out. An
/// absent row is never a key, so its own values reach nothing and it is skipped; no present row gives v = 0. A file with
/// K &gt; 1 answer positions (metadata "answer_positions", train_projector.py --answer-positions) holds K sets of queries,
/// position by position, and gives K vectors, v_i = W_out·[p_(i,0), p_(i,1), …] + b_out with W_out shared: one for each of
/// the first K answer tokens. Runs in fp32 on the host once per retrieval; allocates nothing that outlives a call, so
/// several threads may use one reader.
/// </remarks>
internal sealed class AttentionReader
{
    public const string Prefix = "attn.";
    public const string InWeightName = Prefix + "in.weight";
    public const string HeadsKey = "heads";
    public const string EncoderLayersKey = "encoder_layers";
    public const string LayerNormEpsKey = "layer_norm_eps";
    public const string WidthKey = "width";
    public const string QueriesKey = "queries";
    public const string AnswerPositionsKey = "answer_positions";

    private sealed record Block(float[] Norm1Weight, float[] Norm1Bias, float[] QkvWeight, float[] QkvBias, float[] ProjWeight,
        float[] ProjBias, float[] Norm2Weight, float[] Norm2Bias, int FeedForward, float[] Ff1Weight, float[] Ff1Bias,
        float[] Ff2Weight, float[] Ff2Bias);

    private readonly int _hidden;
    private readonly float[] _mu;
    private readonly float[] _sigma;
    private readonly float[] _inWeight; // [width, hidden]
    private readonly float[] _inBias;
    private readonly float[] _position; // [T, width]
    private readonly Block[] _blocks;
    private readonly int _feedForwardMax;
    private readonly float[] _normWeight;
    private readonly float[] _normBias;
    private readonly float[] _queries; // [answer positions · queries, width]
    private readonly float[] _keyWeight;
    private readonly float[] _keyBias;
    private readonly float[] _valueWeight;
    private readonly float[] _valueBias;
    private readonly float[] _outWeight; // [hidden, queries * width]
    private readonly float[] _outBias;

    public int Length { get; }
    public int Width { get; }
    public int Heads { get; }
    /// <summary>Pooling queries of one vector.</summary>
    public int Queries { get; }

    /// <summary>Vectors the reader makes, one for each of the first K answer tokens (1: one vector for every position).</summary>
    public int AnswerPositions { get; }

    public int EncoderLayers => _blocks.Length;
    public float LayerNormEps { get; }

    private AttentionReader(Func<string, int[], float[]> read, float[] sigma, Block[] blocks, int hidden, int length, int width, int heads,
        int queries, int answerPositions, float eps)
    {
        _mu = read(Prefix + "mu", [hidden]);
        _sigma = sigma;
        _inWeight = read(InWeightName, [width, hidden]);
        _inBias = read(Prefix + "in.bias", [width]);
        _position = read(Prefix + "pos", [length, width]);
        _normWeight = read(Prefix + "norm.weight", [width]);
        _normBias = read(Prefix + "norm.bias", [width]);
        _queries = read(Prefix + "queries", [answerPositions * queries, width]);
        _keyWeight = read(Prefix + "key.weight", [width, width]);
        _keyBias = read(Prefix + "key.bias", [width]);
        _valueWeight = read(Prefix + "value.weight", [width, width]);
        _valueBias = read(Prefix + "value.bias", [width]);
        _outWeight = read(Prefix + "out.weight", [hidden, queries * width]);
        _outBias = read(Prefix + "out.bias", [hidden]);
        _blocks = blocks;
        _feedForwardMax = blocks.Length == 0 ? 0 : blocks.Max(b => b.FeedForward);
        _hidden = hidden;
        Length = length;
        Width = width;
        Heads = heads;
        Queries = queries;
        AnswerPositions = answerPositions;
        LayerNormEps = eps;
    }

    /// <summary>Reads an attn projector's tensors and its shape metadata (context embed-seq:<paramref name="length"/>).</summary>
    /// <param name="read">Reads a tensor of the given name and shape, or throws the file's <see cref="InvalidDataException"/>.</param>
    /// <param name="bad">Makes the file's <see cref="InvalidDataException"/> for a problem.</param>
    public static AttentionReader Load(SafeTensorsFile file, int hidden, int length, Func<string, int[], float[]> read, Func<string, InvalidDataException> bad)
    {
        var metadata = file.Metadata;
        if (metadata.TryGetValue(ContextInjector.ActivationKey, out var activation) && activation != "silu")
        {
            throw bad($"metadata \"{ContextInjector.ActivationKey}\" is \"{activation}\"; an attn projector's feed-forward is silu");
        }

        string[] required =
        [
            Prefix + "mu", Prefix + "sigma", InWeightName, Prefix + "in.bias", Prefix + "pos", Prefix + "norm.weight", Prefix + "norm.bias",
            Prefix + "queries", Prefix + "key.weight", Prefix + "key.bias", Prefix + "value.weight", Prefix + "value.bias",
            Prefix + "out.weight", Prefix + "out.bias",
        ];
        var missing = required.Where(name => !file.Tensors.ContainsKey(name)).ToList();
        if (missing.Count > 0)
        {
            throw bad($"an attn projector needs tensor{(missing.Count == 1 ? "" : "s")} {string.Join(", ", missing.Select(m => $"\"{m}\""))} (tensors found: {Found(file)})");
        }

        int width = Leading(file, InWeightName, bad, $"[width, {hidden}]");
        int answerPositions = metadata.ContainsKey(AnswerPositionsKey) ? PositiveInt(metadata, AnswerPositionsKey, bad) : 1;
        int queryRows = Leading(file, Prefix + "queries", bad, "[answer positions · queries, width]");
        if (queryRows % answerPositions != 0)
        {
            throw bad($"tensor \"{Prefix}queries\" has {queryRows} rows, which metadata \"{AnswerPositionsKey}\" {answerPositions} does not divide (a set of queries for each answer position)");
        }

        int queries = queryRows / answerPositions;
        int heads = PositiveInt(metadata, HeadsKey, bad);
        if (width % heads != 0)
        {
            throw bad($"metadata \"{HeadsKey}\" is {heads}, which does not divide the width {width} (tensor \"{InWeightName}\")");
        }

        int layers = PositiveInt(metadata, EncoderLayersKey, bad, allowZero: true);
        CheckStated(metadata, WidthKey, width, InWeightName, bad);
        CheckStated(metadata, QueriesKey, queries, Prefix + "queries", bad);
        if (!metadata.TryGetValue(LayerNormEpsKey, out var epsText)
            || !float.TryParse(epsText, NumberStyles.Float, CultureInfo.InvariantCulture, out var eps) || !float.IsFinite(eps) || eps <= 0)
        {
            throw bad($"metadata \"{LayerNormEpsKey}\" is {(epsText is null ? "missing" : $"\"{epsText}\"")}; an attn projector needs its LayerNorm ε, a positive number");
        }

        var expected = new HashSet<string>(required, StringComparer.Ordinal);
        var blocks = new Block[layers];
        for (int b = 0; b < layers; b++)
        {
            string p = $"{Prefix}blocks.{b}.";
            string[] names = [p + "norm1.weight", p + "norm1.bias", p + "qkv.weight", p + "qkv.bias", p + "proj.weight", p + "proj.bias",
                p + "norm2.weight", p + "norm2.bias", p + "ff1.weight", p + "ff1.bias", p + "ff2.weight", p + "ff2.bias"];
            var absent = names.Where(name => !file.Tensors.ContainsKey(name)).ToList();
            if (absent.Count > 0)
            {
                throw bad($"metadata \"{EncoderLayersKey}\" is {layers}, but block {b} lacks {string.Join(", ", absent.Select(m => $"\"{m}\""))}");
            }

            expected.UnionWith(names);
            int ff = Leading(file, p + "ff1.weight", bad, "[feed-forward, width]");
            blocks[b] = new Block(
                read(p + "norm1.weight", [width]), read(p + "norm1.bias", [width]),
                read(p + "qkv.weight", [3 * width, width]), read(p + "qkv.bias", [3 * width]),
                read(p + "proj.weight", [width, width]), read(p + "proj.bias", [width]),
                read(p + "norm2.weight", [width]), read(p + "norm2.bias", [width]),
                ff, read(p + "ff1.weight", [ff, width]), read(p + "ff1.bias", [ff]),
                read(p + "ff2.weight", [width, ff]), read(p + "ff2.bias", [width]));
        }

        var unexpected = file.Tensors.Keys.Where(name => !expected.Contains(name)).Order(StringComparer.Ordinal).ToList();
        if (unexpected.Count > 0)
        {
            throw bad($"tensor{(unexpected.Count == 1 ? "" : "s")} {string.Join(", ", unexpected.Select(m => $"\"{m}\""))} not part of an attn projector with {layers} encoder layer{(layers == 1 ? "" : "s")} (metadata \"{EncoderLayersKey}\")");
        }

        float[] sigma = read(Prefix + "sigma", [hidden]);
        int notPositive = Array.FindIndex(sigma, s => !(s > 0));
        if (notPositive >= 0)
        {
            throw bad($"tensor \"{Prefix}sigma\" holds {sigma[notPositive]} at index {notPositive}; a deviation must be positive");
        }

        return new AttentionReader(read, sigma, blocks, hidden, length, width, heads, queries, answerPositions, eps);
    }

    /// <summary>
    /// Writes scale·v for the first <see cref="Length"/> of <paramref name="tokenIds"/> (ids already checked against the
    /// vocabulary): <see cref="AnswerPositions"/> vectors of the hidden size one after the other.
    /// </summary>
    public void Apply(ITokenEmbeddings embeddings, ReadOnlySpan<int> tokenIds, float scale, Span<float> destination)
    {
        if (destination.Length != AnswerPositions * _hidden)
        {
            throw new ArgumentException($"The destination has {destination.Length} values; the reader makes {AnswerPositions} vector(s) of {_hidden}.", nameof(destination));
        }

        int w = Width;
        int rowsMax = Math.Min(tokenIds.Length, Length);
        int ffMax = _feedForwardMax;
        // Each product runs over all present rows at once (LinearRows), so that a weight row is read once for them all.
        // z: [rows, hidden]; h, x, attention output: [rows, width]; qkv [rows, 3·width]; ff [rows, ff]; pooled [K, queries·width].
        int pooling = AnswerPositions * Queries;
        // Also: a head's q, k and v side by side [3, rows, width / heads]; attention scores [rows, rows]; pooling scores
        // [K·queries, rows]; the feed-forward's sigmoids [rows, ff].
        int size = (rowsMax * _hidden) + (6 * rowsMax * w) + (2 * rowsMax * ffMax) + (pooling * w) + (3 * rowsMax * w) + (rowsMax * rowsMax)
            + (pooling * rowsMax);
        float[] rented = ArrayPool<float>.Shared.Rent(Math.Max(size, 1));
        try
        {
            var buffer = rented.AsSpan(0, size);
            var z = Take(ref buffer, rowsMax * _hidden);
            var h = Take(ref buffer, rowsMax * w);
            var x = Take(ref buffer, rowsMax * w);
            var qkv = Take(ref buffer, rowsMax * 3 * w);
            var attended = Take(ref buffer, rowsMax * w);
            var ff = Take(ref buffer, rowsMax * ffMax);
            var pooled = Take(ref buffer, pooling * w);
            var head = Take(ref buffer, 3 * rowsMax * w);
            var scores = Take(ref buffer, rowsMax * rowsMax);
            var poolScores = Take(ref buffer, pooling * rowsMax);
            var sigmoids = Take(ref buffer, rowsMax * ffMax);

            Span<int> positions = rowsMax <= 256 ? stackalloc int[rowsMax] : new int[rowsMax];
            int n = 0;
            for (int t = 0; t < rowsMax; t++)
            {
                var row = z.Slice(n * _hidden, _hidden);
                row.Clear();
                embeddings.AccumulateRow(tokenIds[t], row);
                if (TensorPrimitives.MaxMagnitude(row) == 0)
                {
                    continue; // an all-zero row is absent, as train_projector's row mask reads it
                }

                TensorPrimitives.Subtract(row, _mu, row);
                TensorPrimitives.Divide(row, _sigma, row);
                positions[n++] = t;
            }

            if (n == 0)
            {
                destination.Clear();
                return;
            }

            h = h[..(n * w)];
            x = x[..(n * w)];
            attended = attended[..(n * w)];
            LinearRows(_inWeight, _inBias, z[..(n * _hidden)], n, h);
            for (int i = 0; i < n; i++)
            {
                TensorPrimitives.Add(h.Slice(i * w, w), _position.AsSpan(positions[i] * w, w), h.Slice(i * w, w));
            }

            foreach (var block in _blocks)
            {
                for (int i = 0; i < n; i++)
                {
                    LayerNorm(h.Slice(i * w, w), block.Norm1Weight, block.Norm1Bias, LayerNormEps, x.Slice(i * w, w));
                }

                LinearRows(block.QkvWeight, block.QkvBias, x, n, qkv[..(n * 3 * w)]);
                SelfAttention(qkv, n, attended, head, scores[..(n * n)]);
                LinearRows(block.ProjWeight, block.ProjBias, attended, n, x);
                TensorPrimitives.Add(h, x, h);
                for (int i = 0; i < n; i++)
                {
                    LayerNorm(h.Slice(i * w, w), block.Norm2Weight, block.Norm2Bias, LayerNormEps, x.Slice(i * w, w));
                }

                var f = ff[..(n * block.FeedForward)];
                LinearRows(block.Ff1Weight, block.Ff1Bias, x, n, f);
                SiLU(f, sigmoids[..f.Length]);
                LinearRows(block.Ff2Weight, block.Ff2Bias, f, n, x);
                TensorPrimitives.Add(h, x, h);
            }

            // Final LayerNorm, then the keys (into x) and values (into attended) of the pooling.
            for (int i = 0; i < n; i++)
            {
                LayerNorm(h.Slice(i * w, w), _normWeight, _normBias, LayerNormEps, h.Slice(i * w, w));
            }

            LinearRows(_keyWeight, _keyBias, h, n, x);
            LinearRows(_valueWeight, _valueBias, h, n, attended);

            // Each learned query (K answer positions · queries of them) pools the rows: scores q·key/√width, softmax over the
            // rows, then the values so weighted.
            var ps = poolScores[..(pooling * n)];
            LinearRows(x[..(n * w)], [], _queries, pooling, ps);
            TensorPrimitives.Multiply(ps, 1f / MathF.Sqrt(w), ps);
            for (int r = 0; r < pooling; r++)
            {
                Softmax(ps.Slice(r * n, n));
            }

            MixRows(ps, pooling, attended[..(n * w)], n, pooled);
            LinearRows(_outWeight, _outBias, pooled, AnswerPositions, destination);
            TensorPrimitives.Multiply(destination, scale, destination);
        }
        finally
        {
            ArrayPool<float>.Shared.Return(rented);
        }
    }

    /// <summary>
    /// Multi-head attention of n rows over one another: out_i = Σ_j softmax_j(q_i·k_j/√d)·v_j per head (d = width/heads),
    /// each head's q, k and v first copied side by side into <paramref name="head"/>.
    /// </summary>
    private void SelfAttention(ReadOnlySpan<float> qkv, int n, Span<float> output, Span<float> head, Span<float> scores)
    {
        int w = Width;
        int d = w / Heads;
        var q = head[..(n * d)];
        var k = head.Slice(n * d, n * d);
        var v = head.Slice(2 * n * d, n * d);
        var o = head.Slice(0, n * d); // q is done with once the scores are taken
        for (int h = 0; h < Heads; h++)
        {
            for (int i = 0; i < n; i++)
            {
                var row = qkv.Slice(i * 3 * w, 3 * w);
                row.Slice(h * d, d).CopyTo(q.Slice(i * d, d));
                row.Slice(w + (h * d), d).CopyTo(k.Slice(i * d, d));
                row.Slice((2 * w) + (h * d), d).CopyTo(v.Slice(i * d, d));
            }

            LinearRows(k, [], q, n, scores);
            TensorPrimitives.Multiply(scores, 1f / MathF.Sqrt(d), scores);
            for (int i = 0; i < n; i++)
            {
                Softmax(scores.Slice(i * n, n));
            }

            MixRows(scores, n, v, n, o);
            for (int i = 0; i < n; i++)
            {
                o.Slice(i * d, d).CopyTo(output.Slice((i * w) + (h * d), d));
            }
        }
    }

    /// <summary>
    /// output[r] = Σ_j a[r, j]·v[j] for the m rows of <paramref name="a"/> ([m, n]) over the n rows of <paramref name="v"/>
    /// ([n, d]) into [m, d]: with 256-bit vectors four output rows at a time, eight columns at a time in registers (the rows
    /// left over summed in the same order, so that no row's result depends on m).
    /// </summary>
    private static void MixRows(ReadOnlySpan<float> a, int m, ReadOnlySpan<float> v, int n, Span<float> output)
    {
        int d = v.Length / n;
        if (a.Length < m * n || output.Length < m * d)
        {
            throw new ArgumentException($"MixRows: {a.Length} weights for [{m}, {n}] and {output.Length} outputs for [{m}, {d}]");
        }

        int r = 0;
        if (Vector256.IsHardwareAccelerated && d % Vector256<float>.Count == 0)
        {
            ref float a0 = ref MemoryMarshal.GetReference(a);
            ref float v0 = ref MemoryMarshal.GetReference(v);
            ref float out0 = ref MemoryMarshal.GetReference(output);
            for (; r + 4 <= m; r += 4)
            {
                ref float ar = ref Unsafe.Add(ref a0, r * n);
                for (int c = 0; c < d; c += Vector256<float>.Count)
                {
                    Vector256<float> s0 = default, s1 = default, s2 = default, s3 = default;
                    for (int j = 0; j < n; j++)
                    {
                        var vj = Vector256.LoadUnsafe(ref v0, (nuint)((j * d) + c));
                        s0 = Vector256.FusedMultiplyAdd(Vector256.Create(Unsafe.Add(ref ar, j)), vj, s0);
                        s1 = Vector256.FusedMultiplyAdd(Vector256.Create(Unsafe.Add(ref ar, n + j)), vj, s1);
                        s2 = Vector256.FusedMultiplyAdd(Vector256.Create(Unsafe.Add(ref ar, (2 * n) + j)), vj, s2);
                        s3 = Vector256.FusedMultiplyAdd(Vector256.Create(Unsafe.Add(ref ar, (3 * n) + j)), vj, s3);
                    }

                    s0.StoreUnsafe(ref out0, (nuint)((r * d) + c));
                    s1.StoreUnsafe(ref out0, (nuint)(((r + 1) * d) + c));
                    s2.StoreUnsafe(ref out0, (nuint)(((r + 2) * d) + c));
                    s3.StoreUnsafe(ref out0, (nuint)(((r + 3) * d) + c));
                }
            }

            for (; r < m; r++)
            {
                ref float ar = ref Unsafe.Add(ref a0, r * n);
                for (int c = 0; c < d; c += Vector256<float>.Count)
                {
                    Vector256<float> sum = default;
                    for (int j = 0; j < n; j++)
                    {
                        sum = Vector256.FusedMultiplyAdd(Vector256.Create(Unsafe.Add(ref ar, j)), Vector256.LoadUnsafe(ref v0, (nuint)((j * d) + c)), sum);
                    }

                    sum.StoreUnsafe(ref out0, (nuint)((r * d) + c));
                }
            }

            return;
        }

        for (; r < m; r++)
        {
            var row = output.Slice(r * d, d);
            row.Clear();
            for (int j = 0; j < n; j++)
            {
                TensorPrimitives.MultiplyAdd(v.Slice(j * d, d), a[(r * n) + j], row, row);
            }
        }
    }

    /// <summary>
    /// y_i = W·x_i + b for the n rows of <paramref name="x"/> ([n, inputs] into [n, outputs]; W row-major [outputs, inputs];
    /// an empty <paramref name="bias"/> is none).
    /// The weights (6 MB for the shipped reader, more than a core's cache) are read once a call instead of once a row:
    /// with 256-bit vectors, four weight rows at a time against four x rows at a time, 16 dot products in registers
    /// (each a vector of partial sums over the inputs, added up at the end; the rows and weight rows left over sum theirs
    /// the same way, so no result depends on n); otherwise a weight row at a time.
    /// </summary>
    private static void LinearRows(ReadOnlySpan<float> weight, ReadOnlySpan<float> bias, ReadOnlySpan<float> x, int n, Span<float> y)
    {
        int outputs = y.Length / n;
        int inputs = x.Length / n;
        bool biased = !bias.IsEmpty;
        if (!Vector256.IsHardwareAccelerated || inputs % Vector256<float>.Count != 0)
        {
            for (int o = 0; o < outputs; o++)
            {
                var wo = weight.Slice(o * inputs, inputs);
                for (int i = 0; i < n; i++)
                {
                    y[(i * outputs) + o] = TensorPrimitives.Dot(wo, x.Slice(i * inputs, inputs)) + (biased ? bias[o] : 0f);
                }
            }

            return;
        }

        int fullOutputs = outputs - (outputs % 4);
        int fullRows = n - (n % 4);
        for (int o = 0; o < fullOutputs; o += 4)
        {
            var w4 = weight.Slice(o * inputs, 4 * inputs);
            for (int i = 0; i < fullRows; i += 4)
            {
                Dot4x4(w4, x.Slice(i * inputs, 4 * inputs), inputs, out var d);
                for (int r = 0; r < 4; r++)
                {
                    var yr = y.Slice(((i + r) * outputs) + o, 4);
                    for (int c = 0; c < 4; c++)
                    {
                        yr[c] = d[(4 * c) + r] + (biased ? bias[o + c] : 0f);
                    }
                }
            }
        }

        // What the blocks left: the last rows against every weight row, and every row against the last weight rows.
        for (int i = 0; i < n; i++)
        {
            var xi = x.Slice(i * inputs, inputs);
            for (int o = i < fullRows ? fullOutputs : 0; o < outputs; o++)
            {
                y[(i * outputs) + o] = Dot1(weight.Slice(o * inputs, inputs), xi) + (biased ? bias[o] : 0f);
            }
        }
    }

    /// <summary>
    /// The dot products of the four weight rows of <paramref name="w4"/> with the four rows of <paramref name="x4"/>:
    /// d[4c + r] = w_c·x_r, each a vector of partial sums over the inputs (16 in registers), then its lanes added.
    /// </summary>
    private static void Dot4x4(ReadOnlySpan<float> w4, ReadOnlySpan<float> x4, int inputs, out Products16 d)
    {
        ref float w0 = ref MemoryMarshal.GetReference(w4);
        ref float w1 = ref Unsafe.Add(ref w0, inputs);
        ref float w2 = ref Unsafe.Add(ref w0, 2 * inputs);
        ref float w3 = ref Unsafe.Add(ref w0, 3 * inputs);
        ref float x0 = ref MemoryMarshal.GetReference(x4);
        ref float x1 = ref Unsafe.Add(ref x0, inputs);
        ref float x2 = ref Unsafe.Add(ref x0, 2 * inputs);
        ref float x3 = ref Unsafe.Add(ref x0, 3 * inputs);
        Vector256<float> s00 = default, s01 = default, s02 = default, s03 = default;
        Vector256<float> s10 = default, s11 = default, s12 = default, s13 = default;
        Vector256<float> s20 = default, s21 = default, s22 = default, s23 = default;
        Vector256<float> s30 = default, s31 = default, s32 = default, s33 = default;
        for (int k = 0; k < inputs; k += Vector256<float>.Count)
        {
            var a0 = Vector256.LoadUnsafe(ref w0, (nuint)k);
            var a1 = Vector256.LoadUnsafe(ref w1, (nuint)k);
            var a2 = Vector256.LoadUnsafe(ref w2, (nuint)k);
            var a3 = Vector256.LoadUnsafe(ref w3, (nuint)k);
            var v = Vector256.LoadUnsafe(ref x0, (nuint)k);
            s00 = Vector256.FusedMultiplyAdd(a0, v, s00);
            s10 = Vector256.FusedMultiplyAdd(a1, v, s10);
            s20 = Vector256.FusedMultiplyAdd(a2, v, s20);
            s30 = Vector256.FusedMultiplyAdd(a3, v, s30);
            v = Vector256.LoadUnsafe(ref x1, (nuint)k);
            s01 = Vector256.FusedMultiplyAdd(a0, v, s01);
            s11 = Vector256.FusedMultiplyAdd(a1, v, s11);
            s21 = Vector256.FusedMultiplyAdd(a2, v, s21);
            s31 = Vector256.FusedMultiplyAdd(a3, v, s31);
            v = Vector256.LoadUnsafe(ref x2, (nuint)k);
            s02 = Vector256.FusedMultiplyAdd(a0, v, s02);
            s12 = Vector256.FusedMultiplyAdd(a1, v, s12);
            s22 = Vector256.FusedMultiplyAdd(a2, v, s22);
            s32 = Vector256.FusedMultiplyAdd(a3, v, s32);
            v = Vector256.LoadUnsafe(ref x3, (nuint)k);
            s03 = Vector256.FusedMultiplyAdd(a0, v, s03);
            s13 = Vector256.FusedMultiplyAdd(a1, v, s13);
            s23 = Vector256.FusedMultiplyAdd(a2, v, s23);
            s33 = Vector256.FusedMultiplyAdd(a3, v, s33);
        }

        d = default;
        d[0] = Vector256.Sum(s00);
        d[1] = Vector256.Sum(s01);
        d[2] = Vector256.Sum(s02);
        d[3] = Vector256.Sum(s03);
        d[4] = Vector256.Sum(s10);
        d[5] = Vector256.Sum(s11);
        d[6] = Vector256.Sum(s12);
        d[7] = Vector256.Sum(s13);
        d[8] = Vector256.Sum(s20);
        d[9] = Vector256.Sum(s21);
        d[10] = Vector256.Sum(s22);
        d[11] = Vector256.Sum(s23);
        d[12] = Vector256.Sum(s30);
        d[13] = Vector256.Sum(s31);
        d[14] = Vector256.Sum(s32);
        d[15] = Vector256.Sum(s33);
    }

    /// <summary>w·x summed as <see cref="Dot4x4"/> sums each of its products (one vector of partial sums, then its lanes), so that a row's result does not depend on whether it fell in a block.</summary>
    private static float Dot1(ReadOnlySpan<float> w, ReadOnlySpan<float> x)
    {
        ref float a = ref MemoryMarshal.GetReference(w);
        ref float b = ref MemoryMarshal.GetReference(x);
        Vector256<float> sum = default;
        for (int k = 0; k < w.Length; k += Vector256<float>.Count)
        {
            sum = Vector256.FusedMultiplyAdd(Vector256.LoadUnsafe(ref a, (nuint)k), Vector256.LoadUnsafe(ref b, (nuint)k), sum);
        }

        return Vector256.Sum(sum);
    }

    [InlineArray(16)]
    private struct Products16
    {
        private float _element;
    }

    /// <summary>PyTorch's LayerNorm: (x − mean)/√(biased variance + ε)·weight + bias; <paramref name="x"/> and <paramref name="y"/> may be the same.</summary>
    private static void LayerNorm(ReadOnlySpan<float> x, ReadOnlySpan<float> weight, ReadOnlySpan<float> bias, float eps, Span<float> y)
    {
        double sum = 0;
        foreach (float v in x) sum += v;
        double mean = sum / x.Length;
        double squares = 0;
        foreach (float v in x) squares += (v - mean) * (v - mean);
        float inv = (float)(1.0 / Math.Sqrt((squares / x.Length) + eps));
        for (int i = 0; i < x.Length; i++)
        {
            y[i] = ((float)(x[i] - mean) * inv * weight[i]) + bias[i];
        }
    }

    /// <summary>In place: exp(s − max s) normalised to sum 1.</summary>
    private static void Softmax(Span<float> s)
    {
        float max = TensorPrimitives.Max(s);
        TensorPrimitives.Subtract(s, max, s);
        TensorPrimitives.Exp(s, s);
        TensorPrimitives.Divide(s, TensorPrimitives.Sum(s), s);
    }

    /// <summary>In place: z·sigmoid(z), vectorised.</summary>
    private static void SiLU(Span<float> z, Span<float> scratch)
    {
        TensorPrimitives.Sigmoid(z, scratch);
        TensorPrimitives.Multiply(z, scratch, z);
    }

    private static Span<float> Take(ref Span<float> buffer, int length)
    {
        var part = buffer[..length];
        buffer = buffer[length..];
        return part;
    }

    private static string Found(SafeTensorsFile file) =>
        file.Tensors.Count == 0 ? "none" : string.Join(", ", file.Tensors.Keys.Order(StringComparer.Ordinal));

    /// <summary>The first dimension of a 2-d tensor (a size the file states by its shape), checked positive.</summary>
    private static int Leading(SafeTensorsFile file, string name, Func<string, InvalidDataException> bad, string expected)
    {
        var shape = file.Tensors[name].Shape;
        return shape.Length == 2 && shape[0] >= 1
            ? shape[0]
            : throw bad($"tensor \"{name}\" has shape [{string.Join(", ", shape)}], expected {expected}");
    }

    private static int PositiveInt(IReadOnlyDictionary<string, string> metadata, string key, Func<string, InvalidDataException> bad, bool allowZero = false)
    {
        metadata.TryGetValue(key, out var text);
        return int.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out var value) && (value > 0 || (allowZero && value == 0))
            ? value
            : throw bad($"metadata \"{key}\" is {(text is null ? "missing" : $"\"{text}\"")}; an attn projector needs it, a {(allowZero ? "non-negative" : "positive")} integer");
    }

    /// <summary>A size the metadata repeats for the reader (width, queries) must be the one the tensors have.</summary>
    private static void CheckStated(IReadOnlyDictionary<string, string> metadata, string key, int actual, string tensor, Func<string, InvalidDataException> bad)
    {
        if (metadata.TryGetValue(key, out var text)
            && !(int.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out var stated) && stated == actual))
        {
            throw bad($"metadata \"{key}\" is \"{text}\", but tensor \"{tensor}\" gives {actual}");
        }
    }
}
