using System.Text.Json.Nodes;
using System.Text.Json.Serialization;

namespace MoeRagInject.Server.Contracts;

/// <summary>sglang's finish_reason: <c>{"type":"stop","matched":..}</c>, <c>{"type":"length","length":n}</c> or <c>{"type":"abort","message":..}</c>.</summary>
public sealed record FinishReasonJson(
    string Type,
    [property: JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] JsonNode? Matched = null,
    [property: JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] int? Length = null,
    [property: JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] string? Message = null);

public sealed record GenerateMetaInfo(
    string Id,
    FinishReasonJson? FinishReason,
    int PromptTokens,
    int CompletionTokens,
    int CachedTokens,
    // Seconds from the request's arrival to this update.
    double E2eLatency,
    // RAG events of the request so far (RagEvent.ToJson()).
    IReadOnlyList<JsonObject> Rag,
    // [[logprob, token_id, token_text or null], ...] over output tokens; present when return_logprob (text with return_text_in_logprobs).
    [property: JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] JsonArray? OutputTokenLogprobs = null,
    // For each output token, its top_logprobs_num most likely tokens as such triples, most likely first; present when asked.
    [property: JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] JsonArray? OutputTopLogprobs = null,
    // Rows over output tokens, columns over MoE layers (nats); present when return_router_entropy.
    [property: JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] IReadOnlyList<float[]>? OutputRouterEntropy = null,
    // Entropy of the output distribution for each output token (nats, the FLARE-style signal); present when return_router_entropy.
    [property: JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] IReadOnlyList<float>? OutputTokenEntropy = null,
    // The router probe's score for each output token; present when return_router_entropy and the server has a probe.
    [property: JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] IReadOnlyList<float>? OutputRouterProbe = null);

/// <summary>One /generate result, or one streamed event (what is new, and the text so far or only its new part).</summary>
public sealed record GenerateResponse(
    string Text,
    IReadOnlyList<int> OutputIds,
    GenerateMetaInfo MetaInfo,
    // Position in a batch request; only set on streamed events of a list input, where items interleave.
    [property: JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] int? Index = null);

public sealed record HealthResponse(string Status, [property: JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] string? Message = null);

public sealed record ModelInfoResponse(
    string ModelPath,
    string TokenizerPath,
    bool IsGeneration,
    string ServedModelName,
    int VocabSize,
    int ContextLength,
    int NumMoeLayers,
    int NumExperts,
    string Device,
    string DefaultRagMode);

/// <summary>The flags the server runs with (sglang's /get_server_info is its ServerArgs).</summary>
public sealed record ServerInfoResponse(
    string Version,
    string Host,
    int Port,
    string? ModelPath,
    // The --device value, and what the runner reports it computes on (once loaded).
    string? Device,
    string? DeviceDescription,
    string? LoadFormat,
    int? ContextLength,
    int? MaxRunningRequests,
    int? KvCacheTokens,
    int? ChunkedPrefillSize,
    int? MaxPrefillTokens,
    double? MemFractionStatic,
    int? CudaGraphMaxBs,
    bool? DisableCudaGraph,
    bool? Deterministic,
    string? ExpertLayout,
    string? RagMode,
    string? PromptRagRestart,
    string? LatentRagRestart,
    string? TriggerSignal,
    double? EntropyThreshold,
    IReadOnlyList<int>? TriggerLayers,
    string? TriggerAggregation,
    int? CooldownTokens,
    int? MaxRetrievals,
    int? TriggerWindow,
    float? InjectionScale,
    IReadOnlyList<int>? InjectionLayers,
    int? InjectionTokens,
    string? InjectorProj,
    int? ProjectionSeed,
    string? Retriever,
    double? RetrievalTimeoutMs,
    int? RetrievalTopK,
    int? QueryWindow,
    string? LogDir,
    bool? LogFsync,
    bool IncrementalStreamingOutput,
    // The engine's load now (null while the model loads).
    EngineStatusJson? Status,
    // Fields of sglang's ServerArgs and scheduler info that sglang clients and benchmarks read (null while the model loads).
    string? TokenizerPath = null,
    string? ServedModelName = null,
    int? MaxTotalNumTokens = null,
    int? MaxReqInputLen = null,
    int? PageSize = null,
    int TpSize = 1,
    int DpSize = 1,
    bool DisableRadixCache = true,
    bool SkipTokenizerInit = false,
    IReadOnlyList<InternalStateJson>? InternalStates = null,
    // The router probe the engine loaded (path), null when it has none.
    string? RouterProbe = null,
    // --retrieve-first (null while the model loads).
    bool? RetrieveFirst = null);

/// <summary>sglang's per-scheduler state in /get_server_info (benchmarks read last_gen_throughput and avg_spec_accept_length).</summary>
public sealed record InternalStateJson(double LastGenThroughput, double AvgSpecAcceptLength, int MaxTotalNumTokens, int MaxRunningRequests);

public sealed record EngineStatusJson(int NumRunning, int NumWaiting, int NumRetrieving, int FreeKvBlocks, int TotalKvBlocks, int KvBlockSize,
    long Preemptions, long Steps, long PromptTokensComputed, long PromptTokensShared);

public sealed record AbortResponse(string Rid, bool Success);

public sealed record FlushCacheResponse(bool Success, string Message);

public sealed record TokenizeResponse(IReadOnlyList<int> Tokens, int Count, int MaxModelLen);

public sealed record BatchTokenizeResponse(IReadOnlyList<IReadOnlyList<int>> Tokens, IReadOnlyList<int> Count, int MaxModelLen);

public sealed record DetokenizeResponse(string Prompt);

public sealed record BatchDetokenizeResponse(IReadOnlyList<string> Prompt);
