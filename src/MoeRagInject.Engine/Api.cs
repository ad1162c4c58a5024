// The engine's public surface: what the server and the CLI build against.
using MoeRagInject.Model.Tokenization;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine;

/// <summary>sglang's sampling parameters (defaults as sglang's).</summary>
public sealed record SamplingParams
{
    public int MaxNewTokens { get; init; } = 128;
    public int MinNewTokens { get; init; }
    /// <summary>0 means greedy.</summary>
    public float Temperature { get; init; } = 1.0f;
    public float TopP { get; init; } = 1.0f;
    /// <summary>-1 (or 0) means all tokens.</summary>
    public int TopK { get; init; } = -1;
    public float MinP { get; init; }
    public float FrequencyPenalty { get; init; }
    public float PresencePenalty { get; init; }
    public float RepetitionPenalty { get; init; } = 1.0f;
    public IReadOnlyList<string> Stop { get; init; } = [];
    public IReadOnlyList<int> StopTokenIds { get; init; } = [];
    public bool IgnoreEos { get; init; }
    public bool SkipSpecialTokens { get; init; } = true;
    public bool NoStopTrim { get; init; }
    public ulong? Seed { get; init; }

    /// <summary>Greedy decoding draws nothing from the request's generator.</summary>
    public bool IsGreedy => Temperature == 0 || TopK == 1;

    /// <summary>Null when valid, else a message naming the field and the allowed range.</summary>
    public string? Validate()
    {
        if (MaxNewTokens < 0) return "sampling_params.max_new_tokens must be >= 0";
        if (MinNewTokens < 0 || MinNewTokens > MaxNewTokens) return "sampling_params.min_new_tokens must be in [0, max_new_tokens]";
        if (!(Temperature >= 0) || float.IsInfinity(Temperature)) return "sampling_params.temperature must be a finite number >= 0";
        if (!(TopP > 0 && TopP <= 1)) return "sampling_params.top_p must be in (0, 1]";
        if (TopK < -1) return "sampling_params.top_k must be -1 (all) or a positive integer";
        if (!(MinP >= 0 && MinP <= 1)) return "sampling_params.min_p must be in [0, 1]";
        if (!(FrequencyPenalty >= -2 && FrequencyPenalty <= 2)) return "sampling_params.frequency_penalty must be in [-2, 2]";
        if (!(PresencePenalty >= -2 && PresencePenalty <= 2)) return "sampling_params.presence_penalty must be in [-2, 2]";
        if (!(RepetitionPenalty > 0 && RepetitionPenalty <= 2)) return "sampling_params.repetition_penalty must be in (0, 2]";
        foreach (var s in Stop)
            if (string.IsNullOrEmpty(s)) return "sampling_params.stop must not contain empty strings";
        return null;
    }
}

/// <summary>Per-request overrides of the server's RAG settings (the "rag" object of a request).</summary>
public sealed record RagOverrides
{
    /// <summary>Largest |α| a request may ask for: far past any useful strength, well short of overflowing fp32 activations.</summary>
    public const float MaxScale = 1e4f;

    public InjectionMode? Mode { get; init; }
    public TriggerSignal? Signal { get; init; }
    public double? Threshold { get; init; }
    public float? Scale { get; init; }
    /// <summary>Retrieve once with the prompt before computing it (<see cref="EngineOptions.RetrieveFirst"/>); null: the server's setting.</summary>
    public bool? RetrieveFirst { get; init; }

    /// <summary>Null when valid, else a message naming the field and the allowed range.</summary>
    public string? Validate()
    {
        if (Threshold is { } t && !(t >= 0 && double.IsFinite(t))) return "rag.threshold must be a finite number >= 0 (entropy in nats, or the router probe's probability)";
        if (Signal == TriggerSignal.RouterProbe && Threshold is > 1) return "rag.threshold must be in [0, 1] for rag.trigger_signal router-probe (a probability)";
        if (Scale is { } s && !(float.IsFinite(s) && Math.Abs(s) <= MaxScale))
            return FormattableString.Invariant($"rag.scale must be a finite number in [-{MaxScale}, {MaxScale}]");
        return null;
    }
}

public sealed record GenerationRequest
{
    /// <summary>Most alternatives a token may report (<see cref="TopLogprobs"/>).</summary>
    public const int MaxTopLogprobs = Backend.StepState.MaxTopLogprobs;

    /// <summary>Request id; the engine makes one when null.</summary>
    public string? Rid { get; init; }
    public required IReadOnlyList<int> PromptIds { get; init; }
    public SamplingParams Sampling { get; init; } = new();
    public RagOverrides? Rag { get; init; }
    public bool ReturnLogprob { get; init; }
    /// <summary>How many most likely alternatives each output token reports with its logprob (0..20); needs <see cref="ReturnLogprob"/>.</summary>
    public int TopLogprobs { get; init; }
    public bool ReturnRouterEntropy { get; init; }
}

/// <summary>A token and its log-probability under the model's distribution at that step (log-softmax of the raw logits).</summary>
public readonly record struct TokenLogprob(int TokenId, float Logprob);

public enum FinishKind { Stop, Length, Abort }

/// <summary>sglang's finish_reason: stop (Matched = token id or stop string), length (Length), abort (Message).</summary>
public sealed record FinishReason(FinishKind Kind, object? Matched = null, int? Length = null, string? Message = null);

/// <summary>
/// One streamed update of a request: everything in it is new since the previous update (tokens, text, events). The text is
/// released only once it can no longer be part of a stop string or of an incomplete UTF-8 character, so the updates' texts
/// joined are exactly the final text. The last update has <see cref="Finish"/> set.
/// </summary>
public sealed record GenerationUpdate
{
    public required string Rid { get; init; }
    public required IReadOnlyList<int> NewTokenIds { get; init; }
    /// <summary>log p of each new token under the model's distribution (log-softmax of raw logits); empty unless requested.</summary>
    public IReadOnlyList<float> NewLogprobs { get; init; } = [];
    /// <summary>For each new token, the request's <see cref="GenerationRequest.TopLogprobs"/> most likely tokens, most likely first; empty unless requested.</summary>
    public IReadOnlyList<TokenLogprob[]> NewTopLogprobs { get; init; } = [];
    /// <summary>Router entropy per MoE layer of the forward pass that produced each new token; empty unless requested.</summary>
    public IReadOnlyList<float[]> NewRouterEntropy { get; init; } = [];
    /// <summary>Entropy (nats) of the output distribution softmax(logits) for each new token, the FLARE-style signal; empty unless router entropy is requested.</summary>
    public IReadOnlyList<float> NewOutputEntropy { get; init; } = [];
    /// <summary>The router probe's score (in [0, 1]) of each new token; empty unless router entropy is requested and the engine has a probe.</summary>
    public IReadOnlyList<float> NewRouterProbe { get; init; } = [];
    public IReadOnlyList<RagEvent> NewEvents { get; init; } = [];
    public required string NewText { get; init; }
    public required int PromptTokens { get; init; }
    /// <summary>Prompt tokens whose KV cache came from another sequence rather than being computed (parallel samples share the prompt's full blocks).</summary>
    public int CachedTokens { get; init; }
    public required int CompletionTokens { get; init; }
    public FinishReason? Finish { get; init; }
}

/// <param name="Device">What the runner computes on, as it reports it.</param>
public sealed record ModelInfo(string ModelPath, string TokenizerPath, int VocabSize, int ContextLength, int NumMoeLayers, int NumExperts, string Device);

/// <summary>The engine's load at one moment (what /get_server_info reports).</summary>
/// <param name="PromptTokensComputed">Prompt positions whose keys and values the engine has computed since it started (recomputes included).</param>
/// <param name="PromptTokensShared">Prompt positions that parallel samples took from their first sample's KV blocks instead of computing.</param>
public sealed record EngineStatus(int Running, int Waiting, int Retrieving, int FreeKvBlocks, int TotalKvBlocks, int KvBlockSize,
    long Preemptions, long Steps, long PromptTokensComputed = 0, long PromptTokensShared = 0);

public interface IGenerationEngine : IAsyncDisposable
{
    ModelInfo Info { get; }
    Tokenizer Tokenizer { get; }
    /// <summary>Server-wide default RAG mode (the --rag-mode flag).</summary>
    InjectionMode DefaultMode { get; }

    /// <summary>
    /// Validates the request and queues it, at once: an invalid request (ids outside the vocabulary, prompt plus
    /// max_new_tokens over the context length, a parameter out of range, a rid in use) throws <see cref="ArgumentException"/>
    /// here, before anything is queued. The returned stream yields the request's updates; disposing it before the end aborts
    /// the request and frees its slot.
    /// </summary>
    GenerationStream Submit(GenerationRequest request);

    /// <summary>
    /// Parallel sampling (OpenAI's and sglang's <c>n</c>): <paramref name="n"/> samples of one request, validated and queued as
    /// <see cref="Submit"/> does. The first sample prefills the prompt; the others take its full KV blocks (shared, counted by
    /// reference) and compute only the prompt's last, partial block themselves. Sample j draws from seed + j when the request
    /// has a seed, and is named rid-j when it has a rid, so each equals the single request with that seed (greedy: all equal).
    /// </summary>
    IReadOnlyList<GenerationStream> SubmitParallel(GenerationRequest request, int n);

    /// <summary>Aborts a running or queued request by id (its stream ends with an abort update); false when no such request.</summary>
    bool Abort(string rid);

    EngineStatus GetStatus();

    /// <summary>The engine's metrics instruments (its own meter, for an exporter to subscribe to).</summary>
    Telemetry.EngineMetrics Metrics { get; }

    /// <summary>The last RAG events, for a live view.</summary>
    Telemetry.RagEventHistory RagEvents { get; }
}

public static class GenerationEngineExtensions
{
    /// <summary>
    /// Submits the request and streams its updates. Cancelling <paramref name="cancellationToken"/> (a client that left)
    /// aborts the request; the stream then ends with its abort update.
    /// </summary>
    public static async IAsyncEnumerable<GenerationUpdate> GenerateAsync(this IGenerationEngine engine, GenerationRequest request,
        [System.Runtime.CompilerServices.EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        await using var stream = engine.Submit(request);
        using var registration = cancellationToken.Register(stream.Abort);
        await foreach (var update in ((IAsyncEnumerable<GenerationUpdate>)stream).ConfigureAwait(false)) yield return update;
    }
}
