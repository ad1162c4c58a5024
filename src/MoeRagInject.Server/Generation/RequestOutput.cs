using System.Text;
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
    private readonly StringBuilder _text = new();

    public string Rid { get; private set; } = "";
    public string Text => _text.ToString();
    public int TextLength => _text.Length;
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

    /// <summary>Folds the update in; returns where its items start in the accumulated lists (to answer with what is new).</summary>
    public Marks Add(GenerationUpdate update)
    {
        var marks = new Marks(_outputIds.Count, _ragEvents.Count, _text.Length);
        Rid = update.Rid;
        _text.Append(update.NewText);
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
        return marks;
    }

    /// <summary>Where an update's tokens, events and text start in the accumulated output.</summary>
    public readonly record struct Marks(int Token, int Event, int Text);

    /// <summary>sglang's <c>[[logprob, token_id, token_text], ...]</c> for tokens [start, end).</summary>
    public JsonArray LogprobTriples(int start, int end)
    {
        var triples = new JsonArray();
        end = Math.Min(end, Math.Min(_logprobs.Count, _outputIds.Count));
        for (var i = start; i < end; i++)
            triples.Add((JsonNode)new JsonArray(JsonValue.Create(_logprobs[i]), JsonValue.Create(_outputIds[i]), JsonValue.Create(_tokenTexts[i])));
        return triples;
    }

    /// <summary>The whole result.</summary>
    public GenerateResponse ToGenerateResponse(double e2eLatencySeconds) => Response(Text, new Marks(0, 0, 0), e2eLatencySeconds, null);

    /// <summary>
    /// A streamed event: the tokens, logprobs, entropies and RAG events new since <paramref name="from"/>, and the text so far
    /// (sglang's default) or only its new part (<paramref name="incrementalText"/>, sglang's --incremental-streaming-output).
    /// </summary>
    public GenerateResponse ToGenerateEvent(Marks from, bool incrementalText, double e2eLatencySeconds, int? index) =>
        Response(incrementalText ? _text.ToString(from.Text, _text.Length - from.Text) : Text, from, e2eLatencySeconds, index);

    private GenerateResponse Response(string text, Marks from, double e2eLatencySeconds, int? index)
        => new(
            text,
            _outputIds.GetRange(from.Token, _outputIds.Count - from.Token),
            new GenerateMetaInfo(
                Rid,
                Finish is null ? null : ToJson(Finish),
                PromptTokens,
                CompletionTokens,
                CachedTokens: 0,
                e2eLatencySeconds,
                _ragEvents.GetRange(from.Event, _ragEvents.Count - from.Event),
                returnLogprob ? LogprobTriples(from.Token, _outputIds.Count) : null,
                returnRouterEntropy ? _routerEntropy.GetRange(from.Token, Math.Max(0, _routerEntropy.Count - from.Token)) : null,
                returnRouterEntropy ? _outputEntropy.GetRange(from.Token, Math.Max(0, _outputEntropy.Count - from.Token)) : null),
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
