using System.Buffers;
using MoeRagInject.Model;
using System.Globalization;
using System.Numerics.Tensors;

namespace MoeRagInject.Rag;

/// <summary>Rows of the model's token embedding table, read as fp32 (the injector mean-pools them, or an attn projector reads them in order).</summary>
public interface ITokenEmbeddings
{
    int HiddenSize { get; }
    int VocabSize { get; }
    /// <summary>Adds row <paramref name="tokenId"/> of the embedding table to <paramref name="accumulator"/>.</summary>
    void AccumulateRow(int tokenId, Span<float> accumulator);
}

public enum ProjectionKind { Random, Identity, File }

/// <summary>What a projector file says about itself: its function, the layers it was trained for and its α (null: not said).</summary>
public sealed record ProjectorFileInfo(ProjectorArchitecture Architecture, IReadOnlyList<int>? Layers, float? Alpha);

/// <summary>The function a projector file holds: its metadata "kind".</summary>
public enum ProjectorArchitecture
{
    /// <summary>v = P·c (+ b): tensors "proj" [hidden, hidden] and optional "bias" [hidden]; the original format.</summary>
    Linear,
    /// <summary>v = W_out·act(W_in·c + b_in) + b_out: "mlp.in.weight" [inner, hidden], "mlp.out.weight" [hidden, inner], optional biases.</summary>
    Mlp,
    /// <summary>
    /// An attention reader over the embedding rows of the passages' first T tokens in order (context "embed-seq:T"): each
    /// present row standardised, (row − μ)/σ, mapped to the width and given a learned position embedding; pre-LayerNorm
    /// encoder blocks (multi-head self-attention over the present rows, a SiLU feed-forward); a final LayerNorm; attention
    /// pooling by learned queries; a linear map of the pooled rows side by side to hidden. tools/projector/train_projector.py
    /// --arch attn trains and writes it; tensors "attn.*" (tools/projector/README.md lists them).
    /// </summary>
    Attn,
}

/// <summary>
/// The original's ContextInjector: c = mean of the embedding rows of the retrieved text's tokens,
/// v = α·f(c) with f a hidden×hidden matrix P (random with a fixed seed, identity, or read from a safetensors file)
/// or a small MLP read from a file (a projector trained through the frozen model by tools/projector); or, from an attn
/// file, v = α·f(rows) with f an attention reader over the embedding rows of the text's first T tokens in order.
/// </summary>
/// <remarks>
/// A projector file is safetensors. Its optional "__metadata__" says what it holds (see the *Key constants): "kind"
/// (linear, mlp or attn; without it, attn or mlp when their tensors are present, else linear), "activation" (silu or
/// relu; attn: silu), "context" (how c is computed: embed-mean for linear and mlp, embed-seq:T for attn, which it
/// requires), "layers" (the layers it was trained to be added after, e.g. "0,1,2,3") and "alpha" (the α it was trained
/// with); an attn file also states "heads", "encoder_layers" and "layer_norm_eps" (and may repeat "width" and
/// "queries", which its tensors' shapes give). A linear file with a bias gives v = α·(P·c + b). Safe to call from
/// several threads at once.
/// </remarks>
public sealed class ContextInjector
{
    /// <summary>Name of the projection tensor in a safetensors file.</summary>
    public const string ProjectionTensorName = "proj";
    /// <summary>Name of the optional bias tensor in a safetensors file.</summary>
    public const string BiasTensorName = "bias";
    public const string MlpInWeightName = "mlp.in.weight";
    public const string MlpInBiasName = "mlp.in.bias";
    public const string MlpOutWeightName = "mlp.out.weight";
    public const string MlpOutBiasName = "mlp.out.bias";
    /// <summary>Metadata value of "format" in projector files written by this project.</summary>
    public const string FormatName = "moe-rag-inject.projector";
    public const string FormatKey = "format";
    public const string KindKey = "kind";
    public const string ActivationKey = "activation";
    public const string ContextKey = "context";
    public const string LayersKey = "layers";
    public const string AlphaKey = "alpha";
    /// <summary>The context of linear and mlp projectors: the mean of the embedding rows of the passages' tokens.</summary>
    public const string EmbedMeanContext = "embed-mean";
    /// <summary>The context of attn projectors, "embed-seq:T": the embedding rows of the passages' first T tokens in order, zero rows past the end.</summary>
    public const string EmbedSeqContextPrefix = "embed-seq:";

    private readonly ITokenEmbeddings _embeddings;
    private readonly int _hidden;
    private readonly float[]? _projection; // row-major [hidden(out), hidden(in)]; null for identity and MLP
    private readonly float[]? _bias;
    private readonly MlpWeights? _mlp;
    private readonly AttentionReader? _reader;

    /// <summary>Row-major weights of an MLP projector; biases may be null (zero).</summary>
    private sealed record MlpWeights(int Inner, float[] In, float[]? InBias, float[] Out, float[]? OutBias, bool Relu);

    private ContextInjector(ITokenEmbeddings embeddings, ProjectionKind kind, float[]? projection, float[]? bias, string description,
        MlpWeights? mlp = null, IReadOnlyList<int>? layers = null, float? alpha = null, AttentionReader? reader = null)
    {
        _embeddings = embeddings;
        _hidden = embeddings.HiddenSize;
        Kind = kind;
        _projection = projection;
        _bias = bias;
        _mlp = mlp;
        _reader = reader;
        Architecture = reader is not null ? ProjectorArchitecture.Attn : mlp is not null ? ProjectorArchitecture.Mlp : ProjectorArchitecture.Linear;
        Description = description;
        Layers = layers;
        Alpha = alpha;
    }

    /// <summary>Random P: entries N(0, 1/hidden) from a fixed seed, so ‖P·c‖ ≈ ‖c‖.</summary>
    /// <remarks>Entries come from SplitMix64 + Box–Muller with self-contained math, so a seed gives the same P on every runtime.</remarks>
    public static ContextInjector CreateRandom(ITokenEmbeddings embeddings, int seed = 0)
    {
        int hidden = CheckEmbeddings(embeddings);
        var projection = new float[checked(hidden * hidden)];
        var generator = new SplitMix64(unchecked((ulong)(long)seed));
        double std = 1.0 / Math.Sqrt(hidden);
        for (int i = 0; i < projection.Length; i++)
        {
            projection[i] = (float)(generator.NextGaussian() * std);
        }

        return new ContextInjector(embeddings, ProjectionKind.Random, projection, null,
            string.Create(CultureInfo.InvariantCulture, $"random(seed={seed}, hidden={hidden})"));
    }

    public static ContextInjector CreateIdentity(ITokenEmbeddings embeddings)
    {
        int hidden = CheckEmbeddings(embeddings);
        return new ContextInjector(embeddings, ProjectionKind.Identity, null, null,
            string.Create(CultureInfo.InvariantCulture, $"identity(hidden={hidden})"));
    }

    /// <summary>
    /// Reads a projector from a safetensors file (f32/f16/bf16): a linear one ("proj" [hidden, hidden], optional "bias"
    /// [hidden]), an MLP ("mlp.in.weight" [inner, hidden], "mlp.out.weight" [hidden, inner], optional "mlp.in.bias"
    /// [inner] and "mlp.out.bias" [hidden]) or an attention reader (<see cref="ProjectorArchitecture.Attn"/>: every
    /// "attn.*" tensor of tools/projector/README.md, no other), with the metadata the class remarks describe.
    /// </summary>
    /// <exception cref="FileNotFoundException">The file does not exist.</exception>
    /// <exception cref="InvalidDataException">
    /// The file is not safetensors, lacks the tensors of its kind, a tensor has the wrong shape, dtype or non-finite values,
    /// or its metadata names a kind, activation or context this class does not compute.
    /// </exception>
    public static ContextInjector LoadFromFile(ITokenEmbeddings embeddings, string path)
    {
        int hidden = CheckEmbeddings(embeddings);
        ArgumentException.ThrowIfNullOrWhiteSpace(path);
        if (!System.IO.File.Exists(path))
        {
            throw new FileNotFoundException($"Projection file not found: {path}", path);
        }

        using var file = new MoeRagInject.Model.SafeTensorsFile(path);
        var metadata = file.Metadata;
        var ((architecture, layers, alpha), sequenceLength) = ReadMetadataAndLength(path, file);
        string extras = (layers is null ? "" : $", layers {string.Join(",", layers)}")
            + (alpha is { } al ? string.Create(CultureInfo.InvariantCulture, $", α {al:G6}") : "");
        if (architecture == ProjectorArchitecture.Attn)
        {
            var reader = AttentionReader.Load(file, hidden, sequenceLength!.Value,
                (name, shape) => ReadTensor(path, file, name, shape, null), problem => Bad(path, problem));
            string attnDescription = string.Create(CultureInfo.InvariantCulture,
                $"file:{Path.GetFullPath(path)} (attn {file.Tensors[AttentionReader.InWeightName].DType.SafetensorsName()} [{reader.Length} rows, width {reader.Width}, {reader.Heads} heads, {reader.Queries} queries, {reader.EncoderLayers} layers{(reader.AnswerPositions > 1 ? $", {reader.AnswerPositions} answer positions" : "")}], {EmbedSeqContextPrefix}{reader.Length}{extras})");
            return new ContextInjector(embeddings, ProjectionKind.File, null, null, attnDescription, null, layers, alpha, reader);
        }

        if (architecture == ProjectorArchitecture.Mlp)
        {
            var mlp = ReadMlp(path, file, hidden, metadata);
            string mlpDescription = string.Create(CultureInfo.InvariantCulture,
                $"file:{Path.GetFullPath(path)} (mlp {file.Tensors[MlpInWeightName].DType.SafetensorsName()} [{hidden}→{mlp.Inner}→{hidden}], {(mlp.Relu ? "relu" : "silu")}{extras})");
            return new ContextInjector(embeddings, ProjectionKind.File, null, null, mlpDescription, mlp, layers, alpha);
        }

        if (!file.Tensors.TryGetValue(ProjectionTensorName, out var projInfo))
        {
            string found = file.Tensors.Count == 0 ? "none" : string.Join(", ", file.Tensors.Keys.Order(StringComparer.Ordinal));
            throw Bad(path, $"no tensor named \"{ProjectionTensorName}\" (tensors found: {found})");
        }

        float[] projection = ReadTensor(path, file, ProjectionTensorName, [hidden, hidden], "the model's hidden size");
        float[]? bias = file.Tensors.ContainsKey(BiasTensorName) ? ReadTensor(path, file, BiasTensorName, [hidden], null) : null;
        string description = string.Create(CultureInfo.InvariantCulture,
            $"file:{Path.GetFullPath(path)} ({projInfo.DType.SafetensorsName()} [{hidden}, {hidden}]{(bias is null ? "" : ", bias")}{extras})");
        return new ContextInjector(embeddings, ProjectionKind.File, projection, bias, description, null, layers, alpha);
    }

    /// <summary>What a projector file says about itself (its metadata, or its tensors where the metadata is silent), without reading its weights.</summary>
    /// <exception cref="InvalidDataException">As <see cref="LoadFromFile"/> for the metadata.</exception>
    public static ProjectorFileInfo ReadFileInfo(string path)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(path);
        if (!System.IO.File.Exists(path))
        {
            throw new FileNotFoundException($"Projection file not found: {path}", path);
        }

        using var file = new MoeRagInject.Model.SafeTensorsFile(path);
        return ReadMetadataAndLength(path, file).Info;
    }

    /// <summary>The file's metadata, and T of its context embed-seq:T (attn files only; null for embed-mean).</summary>
    private static (ProjectorFileInfo Info, int? SequenceLength) ReadMetadataAndLength(string path, MoeRagInject.Model.SafeTensorsFile file)
    {
        var metadata = file.Metadata;
        if (metadata.TryGetValue(FormatKey, out var format) && format != FormatName)
        {
            throw Bad(path, $"metadata \"{FormatKey}\" is \"{format}\", expected \"{FormatName}\"");
        }

        int? sequenceLength = null;
        if (metadata.TryGetValue(ContextKey, out var context) && context != EmbedMeanContext)
        {
            sequenceLength = context.StartsWith(EmbedSeqContextPrefix, StringComparison.Ordinal)
                && int.TryParse(context.AsSpan(EmbedSeqContextPrefix.Length), NumberStyles.None, CultureInfo.InvariantCulture, out var t) && t > 0
                ? t
                : throw Bad(path, $"metadata \"{ContextKey}\" is \"{context}\"; this engine computes \"{EmbedMeanContext}\" (the mean of the passages' embedding rows: linear and mlp) and \"{EmbedSeqContextPrefix}T\" (their first T rows in order: attn)");
        }

        ProjectorArchitecture architecture;
        if (metadata.TryGetValue(KindKey, out var kind))
        {
            architecture = kind switch
            {
                "linear" => ProjectorArchitecture.Linear,
                "mlp" => ProjectorArchitecture.Mlp,
                "attn" => ProjectorArchitecture.Attn,
                _ => throw Bad(path, $"metadata \"{KindKey}\" is \"{kind}\"; expected \"linear\", \"mlp\" or \"attn\""),
            };
        }
        else
        {
            architecture = file.Tensors.ContainsKey(AttentionReader.InWeightName) ? ProjectorArchitecture.Attn
                : file.Tensors.ContainsKey(MlpInWeightName) ? ProjectorArchitecture.Mlp
                : ProjectorArchitecture.Linear;
        }

        if (architecture == ProjectorArchitecture.Attn && sequenceLength is null)
        {
            throw Bad(path, $"metadata \"{ContextKey}\" is {(context is null ? "missing" : $"\"{context}\"")}; an attn projector reads \"{EmbedSeqContextPrefix}T\" (the passages' first T embedding rows in order)");
        }

        if (architecture != ProjectorArchitecture.Attn && sequenceLength is not null)
        {
            throw Bad(path, $"metadata \"{ContextKey}\" is \"{context}\"; this is {(architecture == ProjectorArchitecture.Linear ? "a linear" : "an mlp")} projector, which reads only \"{EmbedMeanContext}\" (\"{EmbedSeqContextPrefix}T\" is for attn projectors)");
        }

        IReadOnlyList<int>? layers = metadata.TryGetValue(LayersKey, out var layerList) ? ParseLayers(path, layerList) : null;
        float? alpha = null;
        if (metadata.TryGetValue(AlphaKey, out var alphaText))
        {
            alpha = float.TryParse(alphaText, NumberStyles.Float, CultureInfo.InvariantCulture, out var a) && float.IsFinite(a)
                ? a
                : throw Bad(path, $"metadata \"{AlphaKey}\" is \"{alphaText}\", not a finite number");
        }

        return (new ProjectorFileInfo(architecture, layers, alpha), sequenceLength);
    }

    private static MlpWeights ReadMlp(string path, MoeRagInject.Model.SafeTensorsFile file, int hidden, IReadOnlyDictionary<string, string> metadata)
    {
        bool relu = false;
        if (metadata.TryGetValue(ActivationKey, out var activation))
        {
            relu = activation switch
            {
                "silu" => false,
                "relu" => true,
                _ => throw Bad(path, $"metadata \"{ActivationKey}\" is \"{activation}\"; expected \"silu\" or \"relu\""),
            };
        }

        if (!file.Tensors.TryGetValue(MlpInWeightName, out var inInfo) || !file.Tensors.ContainsKey(MlpOutWeightName))
        {
            string found = file.Tensors.Count == 0 ? "none" : string.Join(", ", file.Tensors.Keys.Order(StringComparer.Ordinal));
            throw Bad(path, $"an mlp projector needs tensors \"{MlpInWeightName}\" and \"{MlpOutWeightName}\" (tensors found: {found})");
        }

        if (inInfo.Shape.Length != 2 || inInfo.Shape[0] < 1)
        {
            throw Bad(path, $"tensor \"{MlpInWeightName}\" has shape [{string.Join(", ", inInfo.Shape)}], expected [inner, {hidden}]");
        }

        int inner = inInfo.Shape[0];
        return new MlpWeights(
            inner,
            ReadTensor(path, file, MlpInWeightName, [inner, hidden], "[inner, the model's hidden size]"),
            file.Tensors.ContainsKey(MlpInBiasName) ? ReadTensor(path, file, MlpInBiasName, [inner], null) : null,
            ReadTensor(path, file, MlpOutWeightName, [hidden, inner], "[the model's hidden size, inner]"),
            file.Tensors.ContainsKey(MlpOutBiasName) ? ReadTensor(path, file, MlpOutBiasName, [hidden], null) : null,
            relu);
    }

    private static float[] ReadTensor(string path, MoeRagInject.Model.SafeTensorsFile file, string name, int[] shape, string? what)
    {
        var info = file.Tensors[name];
        if (!info.Shape.AsSpan().SequenceEqual(shape))
        {
            throw Bad(path, $"tensor \"{name}\" has shape [{string.Join(", ", info.Shape)}], expected [{string.Join(", ", shape)}]{(what is null ? "" : $" ({what})")}");
        }

        float[] values = info.ToFloatArray();
        CheckFinite(path, name, values);
        return values;
    }

    private static List<int> ParseLayers(string path, string text)
    {
        var layers = new List<int>();
        foreach (var part in text.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries))
        {
            if (!int.TryParse(part, NumberStyles.None, CultureInfo.InvariantCulture, out var layer) || layers.Contains(layer))
            {
                throw Bad(path, $"metadata \"{LayersKey}\" is \"{text}\"; expected distinct layer indices such as \"0,1,2,3\"");
            }

            layers.Add(layer);
        }

        return layers.Count > 0 ? layers : throw Bad(path, $"metadata \"{LayersKey}\" names no layer");
    }

    /// <summary>Writes <paramref name="proj"/> (row-major [hidden, hidden]: output index major) as an F32 safetensors file with tensor "proj".</summary>
    public static void SaveProjection(string path, float[] proj, int hidden) => SaveProjection(path, proj, hidden, bias: null);

    /// <summary>As <see cref="SaveProjection(string, float[], int)"/>, plus an optional "bias" [hidden] tensor.</summary>
    public static void SaveProjection(string path, float[] proj, int hidden, float[]? bias)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(path);
        ArgumentNullException.ThrowIfNull(proj);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(hidden);
        if ((long)hidden * hidden != proj.Length)
        {
            throw new ArgumentException($"The projection has {proj.Length} values; a [{hidden}, {hidden}] matrix needs {(long)hidden * hidden}.", nameof(proj));
        }

        if (bias is not null && bias.Length != hidden)
        {
            throw new ArgumentException($"The bias has {bias.Length} values; expected {hidden}.", nameof(bias));
        }

        var tensors = new List<(string, int[], float[])> { (ProjectionTensorName, [hidden, hidden], proj) };
        if (bias is not null)
        {
            tensors.Add((BiasTensorName, [hidden], bias));
        }

        MoeRagInject.Model.SafeTensorsFile.Write(path, tensors);
    }

    /// <summary>
    /// Writes an MLP projector v = W_out·act(W_in·c + b_in) + b_out (row-major weights: W_in [inner, hidden], W_out
    /// [hidden, inner]) as an F32 safetensors file with its metadata.
    /// </summary>
    public static void SaveMlp(string path, int hidden, int inner, float[] inWeight, float[]? inBias, float[] outWeight, float[]? outBias,
        string activation = "silu", IReadOnlyList<int>? layers = null, float? alpha = null)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(path);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(hidden);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(inner);
        static void Check(float[]? values, long expected, string name)
        {
            if (values is not null && values.Length != expected)
            {
                throw new ArgumentException($"{name} has {values.Length} values; expected {expected}.", name);
            }
        }

        ArgumentNullException.ThrowIfNull(inWeight);
        ArgumentNullException.ThrowIfNull(outWeight);
        Check(inWeight, (long)inner * hidden, nameof(inWeight));
        Check(inBias, inner, nameof(inBias));
        Check(outWeight, (long)hidden * inner, nameof(outWeight));
        Check(outBias, hidden, nameof(outBias));
        if (activation is not ("silu" or "relu"))
        {
            throw new ArgumentException($"Unsupported activation \"{activation}\" (silu or relu).", nameof(activation));
        }

        var tensors = new List<(string, int[], float[])> { (MlpInWeightName, [inner, hidden], inWeight) };
        if (inBias is not null) tensors.Add((MlpInBiasName, [inner], inBias));
        tensors.Add((MlpOutWeightName, [hidden, inner], outWeight));
        if (outBias is not null) tensors.Add((MlpOutBiasName, [hidden], outBias));
        var metadata = new Dictionary<string, string>(StringComparer.Ordinal)
        {
            [FormatKey] = FormatName,
            [KindKey] = "mlp",
            [ActivationKey] = activation,
            [ContextKey] = EmbedMeanContext,
        };
        if (layers is not null) metadata[LayersKey] = string.Join(",", layers);
        if (alpha is { } a) metadata[AlphaKey] = a.ToString("R", CultureInfo.InvariantCulture);
        MoeRagInject.Model.SafeTensorsFile.Write(path, tensors, metadata: metadata);
    }

    public ProjectionKind Kind { get; }

    public string Description { get; }

    public int HiddenSize => _hidden;

    /// <summary>The function of a file projector (linear for random and identity).</summary>
    public ProjectorArchitecture Architecture { get; }

    /// <summary>T of an attn projector's context embed-seq:T (it reads the first T token ids); null for the others, which read all.</summary>
    public int? SequenceLength => _reader?.Length;

    /// <summary>
    /// Vectors the projector makes: 1 (added at every position from the trigger on), or K for an attn reader with one
    /// vector for each of the first K answer tokens (metadata "answer_positions"), which <see cref="ComputeInjection"/>
    /// writes one after the other.
    /// </summary>
    public int AnswerPositions => _reader?.AnswerPositions ?? 1;

    /// <summary>The layers a projector file was trained to be added after (its "layers" metadata); null when it names none.</summary>
    public IReadOnlyList<int>? Layers { get; }

    /// <summary>The α a projector file was trained with (its "alpha" metadata); null when it names none.</summary>
    public float? Alpha { get; }

    /// <summary>
    /// Writes α·f(mean(embed(tokenIds))) (f = P, or the MLP), or for an attn projector α·f(embed(tokenIds[..T])) (the first
    /// T rows in order), into <paramref name="destination"/> (length <see cref="AnswerPositions"/> × hidden); returns its
    /// L2 norm (of all its vectors together).
    /// </summary>
    /// <remarks>
    /// No token ids: the zero vector and norm 0 (also an attn projector's when every row it reads is all zeros). Token ids
    /// outside the vocabulary are an <see cref="ArgumentOutOfRangeException"/>, past T too.
    /// </remarks>
    public double ComputeInjection(ReadOnlySpan<int> tokenIds, float scale, Span<float> destination)
    {
        if (destination.Length != AnswerPositions * _hidden)
        {
            throw new ArgumentException(AnswerPositions == 1
                ? $"The destination has {destination.Length} values; the hidden size is {_hidden}."
                : $"The destination has {destination.Length} values; the projector makes {AnswerPositions} vectors of the hidden size {_hidden}.",
                nameof(destination));
        }

        int vocab = _embeddings.VocabSize;
        foreach (int id in tokenIds)
        {
            if ((uint)id >= (uint)vocab)
            {
                throw new ArgumentOutOfRangeException(nameof(tokenIds), id, $"Token id {id} is outside the vocabulary (0..{vocab - 1}).");
            }
        }

        if (tokenIds.IsEmpty)
        {
            destination.Clear();
            return 0;
        }

        if (_reader is not null)
        {
            _reader.Apply(_embeddings, tokenIds, scale, destination);
            return Norm(destination);
        }

        float[] rented = ArrayPool<float>.Shared.Rent(_hidden);
        try
        {
            var mean = rented.AsSpan(0, _hidden);
            mean.Clear();
            foreach (int id in tokenIds)
            {
                _embeddings.AccumulateRow(id, mean);
            }

            TensorPrimitives.Divide(mean, (float)tokenIds.Length, mean);

            if (_mlp is { } mlp)
            {
                ApplyMlp(mlp, mean, scale, destination);
            }
            else if (_projection is null)
            {
                TensorPrimitives.Multiply(mean, scale, destination);
            }
            else
            {
                ReadOnlySpan<float> p = _projection;
                for (int row = 0; row < _hidden; row++)
                {
                    float value = TensorPrimitives.Dot(p.Slice(row * _hidden, _hidden), mean);
                    if (_bias is not null)
                    {
                        value += _bias[row];
                    }

                    destination[row] = scale * value;
                }
            }
        }
        finally
        {
            ArrayPool<float>.Shared.Return(rented);
        }

        return Norm(destination);
    }

    private static double Norm(ReadOnlySpan<float> vector)
    {
        double sumSquares = 0;
        foreach (float v in vector)
        {
            sumSquares += (double)v * v;
        }

        return Math.Sqrt(sumSquares);
    }

    private void ApplyMlp(MlpWeights mlp, ReadOnlySpan<float> c, float scale, Span<float> destination)
    {
        float[] rented = ArrayPool<float>.Shared.Rent(mlp.Inner);
        try
        {
            var inner = rented.AsSpan(0, mlp.Inner);
            ReadOnlySpan<float> w = mlp.In;
            for (int row = 0; row < mlp.Inner; row++)
            {
                float z = TensorPrimitives.Dot(w.Slice(row * _hidden, _hidden), c) + (mlp.InBias?[row] ?? 0f);
                inner[row] = mlp.Relu ? MathF.Max(z, 0f) : z / (1f + MathF.Exp(-z));
            }

            ReadOnlySpan<float> o = mlp.Out;
            for (int row = 0; row < _hidden; row++)
            {
                destination[row] = scale * (TensorPrimitives.Dot(o.Slice(row * mlp.Inner, mlp.Inner), inner) + (mlp.OutBias?[row] ?? 0f));
            }
        }
        finally
        {
            ArrayPool<float>.Shared.Return(rented);
        }
    }

    private static int CheckEmbeddings(ITokenEmbeddings embeddings)
    {
        ArgumentNullException.ThrowIfNull(embeddings);
        int hidden = embeddings.HiddenSize;
        if (hidden <= 0 || hidden > 46340)
        {
            throw new ArgumentException($"Unsupported hidden size {hidden}.", nameof(embeddings));
        }

        if (embeddings.VocabSize <= 0)
        {
            throw new ArgumentException($"Unsupported vocabulary size {embeddings.VocabSize}.", nameof(embeddings));
        }

        return hidden;
    }

    private static InvalidDataException Bad(string path, string problem) => new($"{path}: {problem}");

    private static void CheckFinite(string path, string name, float[] values)
    {
        for (int i = 0; i < values.Length; i++)
        {
            if (!float.IsFinite(values[i]))
            {
                throw Bad(path, $"tensor \"{name}\" holds a non-finite value at index {i}");
            }
        }
    }
}
