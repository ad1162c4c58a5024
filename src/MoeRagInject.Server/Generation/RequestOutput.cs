using System.Text.Json.Nodes;
using MoeRagInject.Engine;
using MoeRagInject.Model.Tokenization;
using MoeRagInject.Server.Contracts;

namespace MoeRagInject.Server.Generation;

/// <summary>What one request has produced so far, folded from its <see cref="GenerationUpdate"/>s.</summary>
public sealed class RequestOutput(Tokenizer tokenizer, bool returnLogprob, bool returnRouterEntropy)
{
    private readonly List<int> _outputIds = [];
    private readonly List<float> _logprobs = [];
    private readonly List<string> _tokenTexts = [];
    private readonly List<float[]> _routerEntropy = [];
    private readonly List<float> _outputEntropy = [];
    private readonly List<JsonObject> _ragEvents = [];

    public string Rid { get; private set; } = "";
    public string Text { get; private set; } = "";
    public int PromptTokens { get; private set; }
    public int CompletionTokens { get; private set; }
    public FinishReason? Finish { get; private set; }
    public bool ReturnLogprob => returnLogprob;
    public bool ReturnRouterEntropy => returnRouterEntropy;

    public IReadOnlyList<int> OutputIds => _outputIds;
    public IReadOnlyList<float> Logprobs => _logprobs;
    /// <summary>Each output token decoded on its own (special tokens kept); filled when logprobs were asked for.</summary>
    public IReadOnlyList<string> TokenTexts => _tokenTexts;
    public IReadOnlyList<float[]> RouterEntropy => _routerEntropy;
    public IReadOnlyList<JsonObject> RagEvents => _ragEvents;

    public void Add(GenerationUpdate update)
    {
        Rid = update.Rid;
        Text = update.Text;
        PromptTokens = update.PromptTokens;
        CompletionTokens = update.CompletionTokens;
        Finish = update.Finish ?? Finish;
        _outputIds.AddRange(update.NewTokenIds);
        if (returnLogprob)
        {
            _logprobs.AddRange(update.NewLogprobs);
            foreach (var id in update.NewTokenIds)
                _tokenTexts.Add(tokenizer.Decode([id], skipSpecialTokens: false));
        }
        if (returnRouterEntropy)
        {
            _routerEntropy.AddRange(update.NewRouterEntropy);
            _outputEntropy.AddRange(update.NewOutputEntropy);
        }
        foreach (var ragEvent in update.NewEvents) _ragEvents.Add(ragEvent.ToJson());
    }

    /// <summary>sglang's <c>[[logprob, token_id, token_text], ...]</c>.</summary>
    public JsonArray LogprobTriples()
    {
        var triples = new JsonArray();
        var count = Math.Min(_logprobs.Count, _outputIds.Count);
        for (var i = 0; i < count; i++)
            triples.Add(new JsonArray(JsonValue.Create(_logprobs[i]), JsonValue.Create(_outputIds[i]), JsonValue.Create(_tokenTexts[i])));
        return triples;
    }

    public GenerateResponse ToGenerateResponse(double e2eLatencySeconds, int? index = null)
        => new(
            Text,
            _outputIds.ToArray(),
            new GenerateMetaInfo(
                Rid,
                Finish is null ? null : ToJson(Finish),
                PromptTokens,
                CompletionTokens,
                CachedTokens: 0,
                e2eLatencySeconds,
                _ragEvents.ToArray(),
                returnLogprob ? LogprobTriples() : null,
                returnRouterEntropy ? _routerEntropy.ToArray() : null,
                returnRouterEntropy ? _outputEntropy.ToArray() : null),
            index);

    public static FinishReasonJson ToJson(FinishReason finish) => finish.Kind switch
    {
        FinishKind.Stop => new FinishReasonJson("stop", Matched: MatchedToJson(finish.Matched)),
        FinishKind.Length => new FinishReasonJson("length", Length: finish.Length),
        _ => new FinishReasonJson("abort", Message: finish.Message ?? "aborted"),
    };

    /// <summary>OpenAI's finish_reason string ("abort" is sglang's addition).</summary>
    public static string ToOpenAiFinish(FinishReason finish) => finish.Kind switch
    {
        FinishKind.Stop => "stop",
        FinishKind.Length => "length",
        _ => "abort",
    };

    public static JsonNode? MatchedToJson(object? matched) => matched switch
    {
        null => null,
        int id => JsonValue.Create(id),
        long id => JsonValue.Create(id),
        string text => JsonValue.Create(text),
        IFormattable other => JsonValue.Create(other.ToString(null, System.Globalization.CultureInfo.InvariantCulture)),
        _ => JsonValue.Create(matched.ToString()),
    };
}
