using System.Globalization;
using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace MoeRagInject.Rag;

/// <summary>
/// The router probe of <c>--trigger-signal router-probe</c>: a logistic probe over every MoE layer's router probabilities at
/// the current token. With p_t the [layer, expert] softmax probabilities of the forward pass that produced answer token t,
/// the feature of token j is their mean over the last <see cref="Window"/> answer tokens (t = max(0, j − W + 1) … j; the
/// answer's first token, j = 0, is the forward pass of the last prompt position), and the score is σ(w·f + b).
/// <para>
/// Pooling is linear, so w·f is the window's mean of the per-token sums z_t = w·p_t. The device computes z_t inside the step,
/// right after each layer's router (<c>IBackend.RouterProbe</c>, from weights kept on the device); the engine keeps a
/// request's z_t and turns the window's mean plus b into the score here. `calibrate` trains it and saves it beside the model
/// as <see cref="FileName"/>.
/// </para>
/// </summary>
public sealed record RouterProbe
{
    public const string FileName = "router-probe.json";
    /// <summary>Longest pooling window accepted.</summary>
    public const int MaxWindow = 64;

    public required int Layers { get; init; }
    public required int Experts { get; init; }
    /// <summary>Answer tokens whose features are averaged (1: the current token alone).</summary>
    public required int Window { get; init; }
    /// <summary>[layer, expert], row-major: the weight of expert e's probability at layer l.</summary>
    public required float[] Weights { get; init; }
    public required double Bias { get; init; }
    /// <summary>The score above which the trigger fires unless a threshold is given (calibrate's, for its target rate).</summary>
    public required double Threshold { get; init; }
    /// <summary>How it was trained (data, label, regularisation, held-out AUROC), as calibrate wrote it; kept, not interpreted.</summary>
    public JsonObject? Training { get; init; }

    public static double Sigmoid(double x) => x >= 0 ? 1 / (1 + Math.Exp(-x)) : Math.Exp(x) / (1 + Math.Exp(x));

    /// <summary>z = Σ_l Σ_e w[l, e]·p[l, e] of one token's router probabilities [layer, expert] (the device's sum, in double).</summary>
    public double TokenLogit(ReadOnlySpan<float> probabilities)
    {
        if (probabilities.Length != Weights.Length)
            throw new ArgumentException($"the probe takes {Layers}×{Experts} router probabilities, not {probabilities.Length}", nameof(probabilities));
        double z = 0;
        for (var i = 0; i < Weights.Length; i++) z += (double)Weights[i] * probabilities[i];
        return z;
    }

    /// <summary>
    /// The score of answer token <paramref name="tokenIndex"/> from the per-token sums z_t of the answer so far
    /// (<paramref name="tokenLogits"/>[t] for t ≤ tokenIndex): σ(mean of the window's z + b).
    /// </summary>
    public double Score(ReadOnlySpan<float> tokenLogits, int tokenIndex)
    {
        if ((uint)tokenIndex >= (uint)tokenLogits.Length)
            throw new ArgumentOutOfRangeException(nameof(tokenIndex), tokenIndex, $"only {tokenLogits.Length} answer tokens have a probe value");
        var first = Math.Max(0, tokenIndex - Window + 1);
        double sum = 0;
        for (var t = first; t <= tokenIndex; t++) sum += tokenLogits[t];
        return Sigmoid(sum / (tokenIndex - first + 1) + Bias);
    }

    /// <summary>Null when the probe is usable, else what is wrong with it.</summary>
    public string? Validate()
    {
        if (Layers < 1 || Experts < 1) return $"layers ({Layers}) and experts ({Experts}) must be at least 1";
        if (Window < 1 || Window > MaxWindow) return $"window must be in [1, {MaxWindow}] (got {Window})";
        if (Weights.Length != Layers * Experts) return $"weights has {Weights.Length} values; layers × experts is {Layers * Experts}";
        foreach (var w in Weights)
            if (!float.IsFinite(w)) return "weights holds a non-finite value";
        if (!double.IsFinite(Bias)) return "bias is not finite";
        if (!double.IsFinite(Threshold) || Threshold < 0 || Threshold > 1) return $"threshold must be a probability in [0, 1] (got {Threshold})";
        return null;
    }

    /// <summary>Throws when the probe was trained for another shape of model.</summary>
    public void EnsureFits(int layers, int experts)
    {
        if (Layers != layers || Experts != experts)
            throw new InvalidDataException($"the router probe is for {Layers} MoE layers of {Experts} experts; this model has {layers} of {experts}");
    }

    /// <summary>Reads a probe file; a missing field or a shape that does not add up is an error naming the file.</summary>
    public static RouterProbe Load(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"router probe not found: {path}", path);
        try
        {
            var json = JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new InvalidDataException("not a JSON object");
            var probe = new RouterProbe
            {
                Layers = Required(json, "layers").GetValue<int>(),
                Experts = Required(json, "experts").GetValue<int>(),
                Window = Required(json, "window").GetValue<int>(),
                Weights = [.. (Required(json, "weights") as JsonArray ?? throw new InvalidDataException("\"weights\" is not an array"))
                    .Select(v => (float)(v ?? throw new InvalidDataException("\"weights\" holds null")).GetValue<double>())],
                Bias = Required(json, "bias").GetValue<double>(),
                Threshold = Required(json, "threshold").GetValue<double>(),
                Training = json["training"]?.DeepClone() as JsonObject,
            };
            if (probe.Validate() is { } error) throw new InvalidDataException(error);
            return probe;
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException or InvalidDataException)
        {
            throw new InvalidDataException($"{path} is not a router probe: {e.Message}", e);
        }
    }

    /// <summary>Writes the probe as JSON (weights with their full float precision).</summary>
    public void Save(string path)
    {
        if (Validate() is { } error) throw new InvalidOperationException($"refusing to save an invalid router probe: {error}");
        var json = new JsonObject
        {
            ["kind"] = "router-probe",
            ["description"] = "logistic probe over the routers' softmax probabilities [layer, expert] at each answer token, mean-pooled over the last `window` answer tokens: score = sigmoid(weights . features + bias)",
            ["layers"] = Layers,
            ["experts"] = Experts,
            ["window"] = Window,
            ["weights"] = new JsonArray([.. Weights.Select(w => (JsonNode?)JsonValue.Create(w))]),
            ["bias"] = Bias,
            ["threshold"] = Threshold,
            ["training"] = Training?.DeepClone(),
        };
        var directory = Path.GetDirectoryName(Path.GetFullPath(path));
        if (!string.IsNullOrEmpty(directory)) Directory.CreateDirectory(directory);
        File.WriteAllText(path, json.ToJsonString(s_indented) + "\n");
    }

    private static readonly JsonSerializerOptions s_indented = new() { WriteIndented = true, Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    private static JsonNode Required(JsonObject json, string name) =>
        json[name] ?? throw new InvalidDataException(string.Create(CultureInfo.InvariantCulture, $"missing \"{name}\""));
}
