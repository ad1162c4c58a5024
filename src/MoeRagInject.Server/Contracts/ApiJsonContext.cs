using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.Json.Serialization;

namespace MoeRagInject.Server.Contracts;

/// <summary>
/// Every type the server writes. Requests are parsed by hand from <see cref="System.Text.Json.JsonDocument"/> (sglang's inputs
/// are unions such as "string or list"), so only response shapes live here; names are snake_case as sglang and OpenAI write them.
/// </summary>
[JsonSourceGenerationOptions(
    PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower,
    GenerationMode = JsonSourceGenerationMode.Default)]
// sglang native surface
[JsonSerializable(typeof(GenerateResponse))]
[JsonSerializable(typeof(FinishReasonJson))]
[JsonSerializable(typeof(IReadOnlyList<GenerateResponse>))]
[JsonSerializable(typeof(ErrorResponse))]
[JsonSerializable(typeof(ModelInfoResponse))]
[JsonSerializable(typeof(ServerInfoResponse))]
[JsonSerializable(typeof(AbortResponse))]
[JsonSerializable(typeof(FlushCacheResponse))]
[JsonSerializable(typeof(HealthResponse))]
[JsonSerializable(typeof(TokenizeResponse))]
[JsonSerializable(typeof(BatchTokenizeResponse))]
[JsonSerializable(typeof(DetokenizeResponse))]
[JsonSerializable(typeof(BatchDetokenizeResponse))]
// Observability
[JsonSerializable(typeof(RagEventsResponse))]
// OpenAI-compatible surface
[JsonSerializable(typeof(ModelList))]
[JsonSerializable(typeof(CompletionResponse))]
[JsonSerializable(typeof(ChatCompletionResponse))]
[JsonSerializable(typeof(ChatCompletionChunk))]
// Values placed inside JsonNode trees (finish_reason.matched, logprob triples, RAG events).
[JsonSerializable(typeof(JsonNode))]
[JsonSerializable(typeof(JsonObject))]
[JsonSerializable(typeof(JsonArray))]
[JsonSerializable(typeof(int))]
[JsonSerializable(typeof(float))]
[JsonSerializable(typeof(double))]
[JsonSerializable(typeof(string))]
public sealed partial class ApiJsonContext : JsonSerializerContext
{
    /// <summary>
    /// The options responses are written with: the attribute's, plus an encoder that writes non-ASCII text and quotes as they
    /// are (as sglang's UTF-8 JSON does) instead of \uXXXX escapes; the bodies are JSON and event streams, never HTML.
    /// </summary>
    public static ApiJsonContext Wire { get; } = new(new JsonSerializerOptions
    {
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
    });
}

public sealed record ErrorBody(string Message, string Type, int Code);

/// <summary>sglang's and OpenAI's error shape: <c>{"error": {"message", "type", "code"}}</c>.</summary>
public sealed record ErrorResponse(ErrorBody Error);
