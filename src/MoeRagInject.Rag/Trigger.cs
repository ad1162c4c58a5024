namespace MoeRagInject.Rag;

/// <summary>How the engine puts retrieved knowledge into the model.</summary>
public enum InjectionMode
{
    /// <summary>Entropy measured and reported; nothing retrieved.</summary>
    Off,
    /// <summary>α·f(passages) added to the residual stream: the original's ContextInjector, f = P·mean(embed(passages)), or a trained projector (ContextInjector).</summary>
    Latent,
    /// <summary>Passages placed ahead of the prompt and the KV cache rebuilt (FLARE-style).</summary>
    Prompt,
}

/// <summary>What the trigger watches at every generated token.</summary>
public enum TriggerSignal
{
    /// <summary>The entropy of each MoE layer's router distribution (nats), combined over layers by <see cref="LayerAggregation"/>: the original's signal.</summary>
    RouterEntropy,
    /// <summary>
    /// The entropy of the model's own next-token distribution (nats, at most ln V). It is not a per-layer signal: a fire
    /// counts every MoE layer as fired, so latent injection (without --injection-layers) goes into every layer.
    /// </summary>
    OutputEntropy,
    /// <summary>
    /// The score σ(w·f + b) of a logistic probe over every layer's router probabilities (<see cref="Rag.RouterProbe"/>, trained
    /// by `calibrate`), in [0, 1]. Like the output entropy it belongs to no layer: a fire counts every MoE layer as fired.
    /// </summary>
    RouterProbe,
}

/// <summary>How per-layer entropies of one token combine into the trigger decision.</summary>
public enum LayerAggregation
{
    /// <summary>Fires when any counted layer exceeds the threshold; those layers are the ones that fired.</summary>
    Any,
    /// <summary>Fires when the max over counted layers exceeds the threshold.</summary>
    Max,
    /// <summary>Fires when the mean over counted layers exceeds the threshold.</summary>
    Mean,
}

public sealed record TriggerOptions
{
    public TriggerSignal Signal { get; init; } = TriggerSignal.RouterEntropy;
    public double Threshold { get; init; } = 0.8;
    /// <summary>Counted MoE layers; null means all.</summary>
    public IReadOnlyList<int>? Layers { get; init; }
    public LayerAggregation Aggregation { get; init; } = LayerAggregation.Any;
    /// <summary>Tokens that must pass after a retrieval before the next may fire.</summary>
    public int CooldownTokens { get; init; } = 8;
    /// <summary>Most retrievals one request may make.</summary>
    public int MaxRetrievalsPerRequest { get; init; } = 4;
    /// <summary>
    /// The answer tokens the trigger watches, from the first: it fires at token index &lt; N only (the window over which
    /// `calibrate` scores the signals, 4, is where the output entropy tells on the demo model); null watches every token.
    /// </summary>
    public int? WindowTokens { get; init; }
}

/// <summary>The signals' names on the command line, in requests, events and /get_server_info.</summary>
public static class TriggerSignals
{
    /// <summary>Every signal's name, in the enum's order.</summary>
    public static readonly IReadOnlyList<string> Names = ["router-entropy", "output-entropy", "router-probe"];

    public static string Name(TriggerSignal signal) => signal switch
    {
        TriggerSignal.OutputEntropy => "output-entropy",
        TriggerSignal.RouterProbe => "router-probe",
        _ => "router-entropy",
    };

    public static TriggerSignal? Parse(string text) => text.ToLowerInvariant() switch
    {
        "router-entropy" => TriggerSignal.RouterEntropy,
        "output-entropy" => TriggerSignal.OutputEntropy,
        "router-probe" => TriggerSignal.RouterProbe,
        _ => null,
    };

    /// <summary>Signals that belong to no layer: one value per token, and a fire counts every layer as fired.</summary>
    public static bool IsWholeModel(TriggerSignal signal) => signal != TriggerSignal.RouterEntropy;
}

/// <summary>Why a token whose entropy crossed the threshold did not fire.</summary>
public enum TriggerSuppression
{
    None,
    /// <summary>Within <see cref="TriggerOptions.CooldownTokens"/> of the last retrieval.</summary>
    Cooldown,
    /// <summary><see cref="TriggerOptions.MaxRetrievalsPerRequest"/> already reached.</summary>
    Cap,
    /// <summary>Past the first <see cref="TriggerOptions.WindowTokens"/> answer tokens.</summary>
    Window,
}

/// <summary>Decision for one token. <see cref="FiredLayers"/> are the counted layers above the threshold (for Max/Mean: all counted layers above it, or the argmax layer when none is).</summary>
/// <remarks>
/// <see cref="Entropy"/> is the aggregated value (Any/Max: the max over the counted layers; Mean: their mean), reported
/// whether or not the trigger fired. <see cref="FiredLayers"/> is empty when <see cref="Fired"/> is false.
/// </remarks>
public sealed record TriggerDecision(bool Fired, double Entropy, IReadOnlyList<int> FiredLayers)
{
    /// <summary>Set when the entropy crossed the threshold but cooldown or the per-request cap held the trigger back.</summary>
    public TriggerSuppression Suppression { get; init; }
}

/// <summary>Per-request trigger state: call <see cref="Evaluate"/> once per generated token's forward pass.</summary>
public sealed class EntropyTrigger
{
    private readonly int[]? _layers;
    private int _retrievalCount;
    private int? _lastRetrievalToken;

    public EntropyTrigger(TriggerOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        if (double.IsNaN(options.Threshold))
        {
            throw new ArgumentException("The entropy threshold is NaN.", nameof(options));
        }

        if (options.CooldownTokens < 0)
        {
            throw new ArgumentException($"CooldownTokens must not be negative (got {options.CooldownTokens}).", nameof(options));
        }

        if (options.WindowTokens is < 1)
        {
            throw new ArgumentException($"WindowTokens must be at least 1 (got {options.WindowTokens}).", nameof(options));
        }

        if (options.Layers is { } layers)
        {
            foreach (int layer in layers)
            {
                if (layer < 0)
                {
                    throw new ArgumentException($"Trigger layer {layer} is out of range: layer indices start at 0.", nameof(options));
                }
            }

            _layers = [.. layers.Distinct().Order()];
        }

        Options = options;
    }

    public TriggerOptions Options { get; }

    public int RetrievalCount => _retrievalCount;

    /// <summary>entropies[l] = router entropy (nats) of this token at MoE layer l; tokenIndex counts output tokens of the request.</summary>
    public TriggerDecision Evaluate(ReadOnlySpan<float> entropies, int tokenIndex)
    {
        if (_layers is not null)
        {
            foreach (int layer in _layers)
            {
                if (layer >= entropies.Length)
                {
                    throw new ArgumentException(
                        $"Trigger layer {layer} is out of range: the model reports {entropies.Length} MoE layers (0..{entropies.Length - 1}).",
                        nameof(entropies));
                }
            }
        }

        int count = _layers?.Length ?? entropies.Length;
        if (count == 0)
        {
            return new TriggerDecision(false, 0, []);
        }

        // One pass without allocating (this runs for every token of every request); the fired layers are listed only on a fire.
        double threshold = Options.Threshold;
        double max = double.NegativeInfinity;
        int argmax = -1;
        double sum = 0;
        int finite = 0;
        int aboveCount = 0;
        for (int i = 0; i < count; i++)
        {
            int layer = _layers is null ? i : _layers[i];
            double e = entropies[layer];
            if (double.IsNaN(e))
            {
                continue; // a NaN entropy is no evidence either way
            }

            finite++;
            sum += e;
            if (e > max)
            {
                max = e;
                argmax = layer;
            }

            if (e > threshold)
            {
                aboveCount++;
            }
        }

        if (finite == 0)
        {
            return new TriggerDecision(false, double.NaN, []);
        }

        double entropy;
        bool crossed;
        switch (Options.Aggregation)
        {
            case LayerAggregation.Any:
            case LayerAggregation.Max:
                entropy = max;
                crossed = aboveCount > 0;
                break;
            case LayerAggregation.Mean:
                entropy = sum / finite;
                crossed = entropy > threshold;
                break;
            default:
                throw new InvalidOperationException($"Unknown layer aggregation {Options.Aggregation}.");
        }

        if (!crossed)
        {
            return new TriggerDecision(false, entropy, []);
        }

        if (_retrievalCount >= Options.MaxRetrievalsPerRequest)
        {
            return new TriggerDecision(false, entropy, []) { Suppression = TriggerSuppression.Cap };
        }

        if (Options.WindowTokens is int window && tokenIndex >= window)
        {
            return new TriggerDecision(false, entropy, []) { Suppression = TriggerSuppression.Window };
        }

        if (_lastRetrievalToken is int last && (long)tokenIndex - last < Options.CooldownTokens)
        {
            return new TriggerDecision(false, entropy, []) { Suppression = TriggerSuppression.Cooldown };
        }

        var above = new List<int>(Math.Max(1, aboveCount));
        for (int i = 0; i < count; i++)
        {
            int layer = _layers is null ? i : _layers[i];
            if (entropies[layer] > threshold)
            {
                above.Add(layer);
            }
        }

        if (above.Count == 0)
        {
            above.Add(argmax); // Mean above the threshold with no layer above it: only through rounding, but keep FiredLayers non-empty
        }

        return new TriggerDecision(true, entropy, above);
    }

    /// <summary>Records that a retrieval was started at tokenIndex (starts the cooldown, counts against the cap).</summary>
    public void RecordRetrieval(int tokenIndex)
    {
        _retrievalCount++;
        _lastRetrievalToken = tokenIndex;
    }

    /// <summary>The answer was dropped and starts again (prompt-mode restart): token indices count from 0 again, and the cooldown runs from there.</summary>
    public void RestartAnswer() => _lastRetrievalToken = 0;

    /// <summary>
    /// No retrieval after this one (later crossings report <see cref="TriggerSuppression.Cap"/>): a latent answer restarted
    /// with one vector an answer position has its injection at every position the projector covers, and on the demo model
    /// further retrievals lowered held-out F1 and added latency (docs/eval/answer-positions.md).
    /// </summary>
    public void EndRetrievals() => _retrievalCount = Math.Max(_retrievalCount, Options.MaxRetrievalsPerRequest);
}
