using System.Text;
using System.Text.Json.Nodes;
using MoeRagInject.Engine;
using MoeRagInject.Model.Tokenization;
using MoeRagInject.Server.Contracts;

namespace MoeRagInject.Server.Generation;

/// <summary>What one request has produced so far, folded from its <see cref="GenerationUpdate"/>s.</summary>
/// <param name="returnTextInLogprobs">sglang's return_text_in_logprobs: logprob triples carry the token's text, else null.</param>
/// <param name="promptIds">The prompt, whose last tokens are the context the first output tokens' texts are decoded in (OpenAI's logprobs).</param>
public sealed class RequestOutput(Tokenizer tokenizer, bool returnLogprob, bool returnRouterEntropy, int topLogprobs = 0, bool returnTextInLogprobs = true,
    IReadOnlyList<int>? promptIds = null, bool skipSpecialTokens = true)
{
    /// <summary>Tokens before a position that its text is decoded after: enough for a sentencepiece space or a merge to show.</summary>
    private const int ContextTokens = 4;

    private readonly List<int> _outputIds = [];
    private readonly List<float> _logprobs = [];
    private readonly List<TokenLogprob[]> _topLogprobs = [];
    private readonly List<string> _tokenTexts = [];
    private readonly List<float[]> _routerEntropy = [];
    private readonly List<float> _outputEntropy = [];
    private readonly List<float> _routerProbe = [];
    private readonly List<JsonObject> _ragEvents = [];
    private readonly StringBuilder _text = new();

    public string Rid { get; private set; } = "";
    public string Text => _text.ToString();
    public int TextLength => _text.Length;
    public int PromptTokens { get; private set; }
    public int CachedTokens { get; private set; }
    public int CompletionTokens { get; private set; }
    public FinishReason? Finish { get; private set; }
    public bool ReturnLogprob => returnLogprob;
    public bool ReturnRouterEntropy => returnRouterEntropy;
    /// <summary>How many alternatives each token reports (0: none).</summary>
    public int TopLogprobCount => returnLogprob ? topLogprobs : 0;
    /// <summary>For each output token, its most likely alternatives; filled when asked for.</summary>
    public IReadOnlyList<TokenLogprob[]> TopLogprobs => _topLogprobs;

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
        CachedTokens = update.CachedTokens;
        CompletionTokens = update.CompletionTokens;
        Finish = update.Finish ?? Finish;
        _outputIds.AddRange(update.NewTokenIds);
        if (returnLogprob)
        {
            _logprobs.AddRange(update.NewLogprobs);
            if (TopLogprobCount > 0) _topLogprobs.AddRange(update.NewTopLogprobs);
            foreach (var id in update.NewTokenIds)
                _tokenTexts.Add(tokenizer.Decode([id], skipSpecialTokens: false));
        }
        if (returnRouterEntropy)
        {
            _routerEntropy.AddRange(update.NewRouterEntropy);
            _outputEntropy.AddRange(update.NewOutputEntropy);
            _routerProbe.AddRange(update.NewRouterProbe);
        }
        foreach (var ragEvent in update.NewEvents) _ragEvents.Add(ragEvent.ToJson());
        return marks;
    }

    /// <summary>Where an update's tokens, events and text start in the accumulated output.</summary>
    public readonly record struct Marks(int Token, int Event, int Text);

    /// <summary>A token's text on its own (special tokens kept), as sglang's logprob triples show it.</summary>
    public string TokenText(int id) => tokenizer.Decode([id], skipSpecialTokens: false);

    /// <summary>
    /// The text token <paramref name="id"/> adds at output position <paramref name="position"/>, decoded after the tokens
    /// before it (so a sentencepiece word keeps its leading space, and the chosen tokens' texts join into the output text),
    /// as OpenAI's logprobs show tokens. A byte-fallback token, or one whose context decodes differently once it is added,
    /// gets its text alone.
    /// </summary>
    public string ContextText(int position, int id)
    {
        Span<int> ids = stackalloc int[ContextTokens + 1];
        var count = 0;
        for (var back = Math.Min(ContextTokens, position + (promptIds?.Count ?? 0)); back > 0; back--)
        {
            var p = position - back;
            ids[count++] = p >= 0 ? _outputIds[p] : promptIds![promptIds.Count + p];
        }
        ids[count] = id;
        var before = tokenizer.Decode(ids[..count], skipSpecialTokens);
        var with = tokenizer.Decode(ids[..(count + 1)], skipSpecialTokens);
        return with.StartsWith(before, StringComparison.Ordinal) ? with[before.Length..] : tokenizer.Decode([id], skipSpecialTokens);
    }

    /// <summary>OpenAI's bytes of a token: the raw byte of a byte-fallback token (whose text alone is U+FFFD), else its text's UTF-8.</summary>
    public int[] ContextBytes(int position, int id) => tokenizer.TryGetFallbackByte(id, out var b)
        ? [b]
        : System.Text.Encoding.UTF8.GetBytes(ContextText(position, id)).Select(x => (int)x).ToArray();

    /// <summary>sglang's <c>[[logprob, token_id, token_text or null], ...]</c> for tokens [start, end).</summary>
    public JsonArray LogprobTriples(int start, int end)
    {
        var triples = new JsonArray();
        end = Math.Min(end, Math.Min(_logprobs.Count, _outputIds.Count));
        for (var i = start; i < end; i++)
            triples.Add(Triple(_logprobs[i], _outputIds[i], returnTextInLogprobs ? _tokenTexts[i] : null));
        return triples;
    }

    /// <summary>sglang's output_top_logprobs for tokens [start, end): per token, a list of triples, most likely first.</summary>
    public JsonArray TopLogprobTriples(int start, int end)
    {
        var rows = new JsonArray();
        end = Math.Min(end, _topLogprobs.Count);
        for (var i = start; i < end; i++)
        {
            var row = new JsonArray();
            foreach (var (id, logprob) in _topLogprobs[i]) row.Add(Triple(logprob, id, returnTextInLogprobs ? TokenText(id) : null));
            rows.Add((JsonNode)row);
        }
        return rows;
    }

    // JsonNode, not JsonArray: JsonArray.Add(JsonNode) is the overload that trimming keeps (the generic Add<T> is not trim-safe).
    private static JsonNode Triple(float logprob, int id, string? text)
        => new JsonArray(JsonValue.Create(logprob), JsonValue.Create(id), text is null ? null : JsonValue.Create(text));

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
                CachedTokens,
                e2eLatencySeconds,
                _ragEvents.GetRange(from.Event, _ragEvents.Count - from.Event),
                returnLogprob ? LogprobTriples(from.Token, _outputIds.Count) : null,
                TopLogprobCount > 0 ? TopLogprobTriples(from.Token, _outputIds.Count) : null,
                returnRouterEntropy ? _routerEntropy.GetRange(from.Token, Math.Max(0, _routerEntropy.Count - from.Token)) : null,
                returnRouterEntropy ? _outputEntropy.GetRange(from.Token, Math.Max(0, _outputEntropy.Count - from.Token)) : null,
                returnRouterEntropy && _routerProbe.Count > 0 ? _routerProbe.GetRange(from.Token, Math.Max(0, _routerProbe.Count - from.Token)) : null),
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
