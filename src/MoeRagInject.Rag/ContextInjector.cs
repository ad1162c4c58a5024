using System.Buffers;
using MoeRagInject.Model;
using System.Globalization;
using System.Numerics.Tensors;

namespace MoeRagInject.Rag;

/// <summary>Rows of the model's token embedding table, read as fp32 (the injector mean-pools them).</summary>
public interface ITokenEmbeddings
{
    int HiddenSize { get; }
    int VocabSize { get; }
    /// <summary>Adds row <paramref name="tokenId"/> of the embedding table to <paramref name="accumulator"/>.</summary>
    void AccumulateRow(int tokenId, Span<float> accumulator);
}

public enum ProjectionKind { Random, Identity, File }

/// <summary>
/// The original's ContextInjector: c = mean of the embedding rows of the retrieved text's tokens,
/// v = α·P·c with P hidden×hidden (random with a fixed seed, identity, or a safetensors file).
/// </summary>
/// <remarks>With a bias b (file projections only) v = α·(P·c + b). Safe to call from several threads at once.</remarks>
public sealed class ContextInjector
{
    /// <summary>Name of the projection tensor in a safetensors file.</summary>
    public const string ProjectionTensorName = "proj";
    /// <summary>Name of the optional bias tensor in a safetensors file.</summary>
    public const string BiasTensorName = "bias";

    private readonly ITokenEmbeddings _embeddings;
    private readonly int _hidden;
    private readonly float[]? _projection; // row-major [hidden(out), hidden(in)]; null for identity
    private readonly float[]? _bias;

    private ContextInjector(ITokenEmbeddings embeddings, ProjectionKind kind, float[]? projection, float[]? bias, string description)
    {
        _embeddings = embeddings;
        _hidden = embeddings.HiddenSize;
        Kind = kind;
        _projection = projection;
        _bias = bias;
        Description = description;
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

    /// <summary>Reads P from a safetensors file holding one [hidden, hidden] tensor named "proj" (f32/f16/bf16); optional "bias" [hidden].</summary>
    /// <exception cref="FileNotFoundException">The file does not exist.</exception>
    /// <exception cref="InvalidDataException">The file is not safetensors, lacks "proj", or a tensor has the wrong shape, dtype or non-finite values.</exception>
    public static ContextInjector LoadFromFile(ITokenEmbeddings embeddings, string path)
    {
        int hidden = CheckEmbeddings(embeddings);
        ArgumentException.ThrowIfNullOrWhiteSpace(path);
        if (!System.IO.File.Exists(path))
        {
            throw new FileNotFoundException($"Projection file not found: {path}", path);
        }

        using var file = new MoeRagInject.Model.SafeTensorsFile(path);
        if (!file.Tensors.TryGetValue(ProjectionTensorName, out var projInfo))
        {
            string found = file.Tensors.Count == 0 ? "none" : string.Join(", ", file.Tensors.Keys.Order(StringComparer.Ordinal));
            throw Bad(path, $"no tensor named \"{ProjectionTensorName}\" (tensors found: {found})");
        }

        if (projInfo.Shape.Length != 2 || projInfo.Shape[0] != hidden || projInfo.Shape[1] != hidden)
        {
            throw Bad(path, $"tensor \"{ProjectionTensorName}\" has shape [{string.Join(", ", projInfo.Shape)}], expected [{hidden}, {hidden}] (the model's hidden size)");
        }

        float[] projection = projInfo.ToFloatArray();
        CheckFinite(path, ProjectionTensorName, projection);

        float[]? bias = null;
        if (file.Tensors.TryGetValue(BiasTensorName, out var biasInfo))
        {
            if (biasInfo.Shape.Length != 1 || biasInfo.Shape[0] != hidden)
            {
                throw Bad(path, $"tensor \"{BiasTensorName}\" has shape [{string.Join(", ", biasInfo.Shape)}], expected [{hidden}]");
            }

            bias = biasInfo.ToFloatArray();
            CheckFinite(path, BiasTensorName, bias);
        }

        string description = string.Create(CultureInfo.InvariantCulture,
            $"file:{Path.GetFullPath(path)} ({projInfo.DType.SafetensorsName()} [{hidden}, {hidden}]{(bias is null ? "" : ", bias")})");
        return new ContextInjector(embeddings, ProjectionKind.File, projection, bias, description);
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

    public ProjectionKind Kind { get; }

    public string Description { get; }

    public int HiddenSize => _hidden;

    /// <summary>Writes α·P·mean(embed(tokenIds)) into <paramref name="destination"/> (length hidden); returns its L2 norm.</summary>
    /// <remarks>No token ids: the zero vector and norm 0. Token ids outside the vocabulary are an <see cref="ArgumentOutOfRangeException"/>.</remarks>
    public double ComputeInjection(ReadOnlySpan<int> tokenIds, float scale, Span<float> destination)
    {
        if (destination.Length != _hidden)
        {
            throw new ArgumentException($"The destination has {destination.Length} values; the hidden size is {_hidden}.", nameof(destination));
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

            if (_projection is null)
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

        double sumSquares = 0;
        foreach (float v in destination)
        {
            sumSquares += (double)v * v;
        }

        return Math.Sqrt(sumSquares);
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
