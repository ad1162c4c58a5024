using System.Text.Json;

namespace MoeRagInject.Model;

/// <summary>The fields of a Hugging Face MixtralConfig that the engine needs, read from config.json.</summary>
public sealed record ModelConfig
{
    public required string ModelType { get; init; }
    public required int VocabSize { get; init; }
    public required int HiddenSize { get; init; }
    public required int IntermediateSize { get; init; }
    public required int NumLayers { get; init; }
    public required int NumHeads { get; init; }
    public required int NumKvHeads { get; init; }
    /// <summary>Given as head_dim, else hidden_size / num_attention_heads.</summary>
    public required int HeadDim { get; init; }
    public required int NumExperts { get; init; }
    public required int NumExpertsPerToken { get; init; }
    public required int MaxPositionEmbeddings { get; init; }
    public required float RmsNormEps { get; init; }
    public required float RopeTheta { get; init; }
    /// <summary>Keys visible to a query at position i: those at j with i - j &lt; window; null = all.</summary>
    public int? SlidingWindow { get; init; }
    public bool TieWordEmbeddings { get; init; }
    public int? BosTokenId { get; init; }
    public IReadOnlyList<int> EosTokenIds { get; init; } = [];
    /// <summary>"dtype" (newer files) or "torch_dtype" (older), e.g. "bfloat16"; null when absent.</summary>
    public string? Dtype { get; init; }

    public static ModelConfig Load(string directory)
    {
        var path = System.IO.Path.Combine(directory, "config.json");
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: config.json not found in the model folder", path);
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(File.ReadAllText(path));
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{path}: not valid JSON: {e.Message}");
        }
        using (document)
            return Parse(document.RootElement, path);
    }

    public static ModelConfig Parse(JsonElement root, string source)
    {
        if (root.ValueKind != JsonValueKind.Object) throw new InvalidDataException($"{source}: expected a JSON object");

        int Int(string name, int? fallback = null)
        {
            if (root.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Number && v.TryGetInt32(out var i)) return i;
            if (root.TryGetProperty(name, out v) && v.ValueKind != JsonValueKind.Null)
                throw new InvalidDataException($"{source}: \"{name}\" must be an integer, found {v.ValueKind}");
            return fallback ?? throw new InvalidDataException($"{source}: missing required field \"{name}\"");
        }

        int? OptionalInt(string name) =>
            root.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetInt32() : null;

        double Double(string name, double fallback) =>
            root.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetDouble() : fallback;

        var modelType = root.TryGetProperty("model_type", out var mt) ? mt.GetString() ?? "" : "";
        if (modelType != "mixtral")
            throw new InvalidDataException($"{source}: model_type \"{modelType}\" is not supported (supported: mixtral)");

        var hidden = Int("hidden_size");
        var heads = Int("num_attention_heads");
        var headDim = OptionalInt("head_dim") ?? (hidden % heads == 0 ? hidden / heads
            : throw new InvalidDataException($"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads} and no head_dim is given"));
        var kvHeads = Int("num_key_value_heads", heads);
        if (heads % kvHeads != 0)
            throw new InvalidDataException($"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kvHeads}");
        var experts = Int("num_local_experts");
        var topK = Int("num_experts_per_tok");
        if (topK < 1 || topK > experts)
            throw new InvalidDataException($"{source}: num_experts_per_tok {topK} must be in [1, num_local_experts = {experts}]");

        // transformers 5 nests rope_theta in rope_parameters; older files have it at the top level.
        var ropeTheta = Double("rope_theta", 1e6);
        if (root.TryGetProperty("rope_parameters", out var rope) && rope.ValueKind == JsonValueKind.Object)
        {
            if (rope.TryGetProperty("rope_theta", out var theta) && theta.ValueKind == JsonValueKind.Number) ropeTheta = theta.GetDouble();
            if (rope.TryGetProperty("rope_type", out var type) && type.GetString() is { } t && t != "default")
                throw new InvalidDataException($"{source}: rope_type \"{t}\" is not supported (supported: default)");
        }

        var eos = new List<int>();
        if (root.TryGetProperty("eos_token_id", out var e))
        {
            if (e.ValueKind == JsonValueKind.Number) eos.Add(e.GetInt32());
            else if (e.ValueKind == JsonValueKind.Array) eos.AddRange(e.EnumerateArray().Select(x => x.GetInt32()));
        }

        string? dtype = null;
        foreach (var key in new[] { "dtype", "torch_dtype" })
            if (root.TryGetProperty(key, out var d) && d.ValueKind == JsonValueKind.String) { dtype = d.GetString(); break; }

        var window = OptionalInt("sliding_window");
        return new ModelConfig
        {
            ModelType = modelType,
            VocabSize = Int("vocab_size"),
            HiddenSize = hidden,
            IntermediateSize = Int("intermediate_size"),
            NumLayers = Int("num_hidden_layers"),
            NumHeads = heads,
            NumKvHeads = kvHeads,
            HeadDim = headDim,
            NumExperts = experts,
            NumExpertsPerToken = topK,
            MaxPositionEmbeddings = Int("max_position_embeddings", 4096),
            RmsNormEps = (float)Double("rms_norm_eps", 1e-5),
            RopeTheta = (float)ropeTheta,
            SlidingWindow = window is > 0 ? window : null,
            TieWordEmbeddings = root.TryGetProperty("tie_word_embeddings", out var tie) && tie.ValueKind == JsonValueKind.True,
            BosTokenId = OptionalInt("bos_token_id"),
            EosTokenIds = eos,
            Dtype = dtype,
        };
    }
}
