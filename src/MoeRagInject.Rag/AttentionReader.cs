using System.Buffers;
using System.Globalization;
using System.Numerics.Tensors;
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
        int size = (rowsMax * _hidden) + (6 * rowsMax * w) + (rowsMax * ffMax) + rowsMax + (AnswerPositions * Queries * w);
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
            var scores = Take(ref buffer, rowsMax);
            var pooled = Take(ref buffer, AnswerPositions * Queries * w);

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
                SelfAttention(qkv, n, attended, scores[..n]);
                LinearRows(block.ProjWeight, block.ProjBias, attended, n, x);
                TensorPrimitives.Add(h, x, h);
                for (int i = 0; i < n; i++)
                {
                    LayerNorm(h.Slice(i * w, w), block.Norm2Weight, block.Norm2Bias, LayerNormEps, x.Slice(i * w, w));
                }

                var f = ff[..(n * block.FeedForward)];
                LinearRows(block.Ff1Weight, block.Ff1Bias, x, n, f);
                SiLU(f);
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

            float invSqrtWidth = 1f / MathF.Sqrt(w);
            for (int position = 0; position < AnswerPositions; position++)
            {
                for (int q = 0; q < Queries; q++)
                {
                    var query = _queries.AsSpan(((position * Queries) + q) * w, w);
                    var s = scores[..n];
                    for (int j = 0; j < n; j++)
                    {
                        s[j] = TensorPrimitives.Dot(x.Slice(j * w, w), query) * invSqrtWidth;
                    }

                    Softmax(s);
                    var p = pooled.Slice(((position * Queries) + q) * w, w);
                    p.Clear();
                    for (int j = 0; j < n; j++)
                    {
                        TensorPrimitives.MultiplyAdd(attended.Slice(j * w, w), s[j], p, p);
                    }
                }
            }

            LinearRows(_outWeight, _outBias, pooled, AnswerPositions, destination);
            TensorPrimitives.Multiply(destination, scale, destination);
        }
        finally
        {
            ArrayPool<float>.Shared.Return(rented);
        }
    }

    /// <summary>Multi-head attention of n rows over one another: out_i = Σ_j softmax_j(q_i·k_j/√d)·v_j per head (d = width/heads).</summary>
    private void SelfAttention(ReadOnlySpan<float> qkv, int n, Span<float> output, Span<float> scores)
    {
        int w = Width;
        int d = w / Heads;
        float invSqrtD = 1f / MathF.Sqrt(d);
        output[..(n * w)].Clear();
        for (int head = 0; head < Heads; head++)
        {
            for (int i = 0; i < n; i++)
            {
                var q = qkv.Slice((i * 3 * w) + (head * d), d);
                for (int j = 0; j < n; j++)
                {
                    scores[j] = TensorPrimitives.Dot(q, qkv.Slice((j * 3 * w) + w + (head * d), d)) * invSqrtD;
                }

                Softmax(scores);
                var o = output.Slice((i * w) + (head * d), d);
                for (int j = 0; j < n; j++)
                {
                    TensorPrimitives.MultiplyAdd(qkv.Slice((j * 3 * w) + (2 * w) + (head * d), d), scores[j], o, o);
                }
            }
        }
    }

    /// <summary>
    /// y_i = W·x_i + b for the n rows of <paramref name="x"/> ([n, inputs] into [n, outputs]; W row-major [outputs, inputs]),
    /// a weight row at a time against every x_i, so that the weights (6 MB for the shipped reader, more than a core's cache)
    /// are read once a call instead of once a row.
    /// </summary>
    private static void LinearRows(ReadOnlySpan<float> weight, ReadOnlySpan<float> bias, ReadOnlySpan<float> x, int n, Span<float> y)
    {
        int outputs = bias.Length;
        int inputs = x.Length / n;
        for (int o = 0; o < outputs; o++)
        {
            var wo = weight.Slice(o * inputs, inputs);
            for (int i = 0; i < n; i++)
            {
                y[(i * outputs) + o] = TensorPrimitives.Dot(wo, x.Slice(i * inputs, inputs)) + bias[o];
            }
        }
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

    private static void SiLU(Span<float> z)
    {
        for (int i = 0; i < z.Length; i++)
        {
            z[i] /= 1f + MathF.Exp(-z[i]);
        }
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
