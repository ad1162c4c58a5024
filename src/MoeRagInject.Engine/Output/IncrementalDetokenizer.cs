using System.Runtime.InteropServices;
using MoeRagInject.Model.Tokenization;

namespace MoeRagInject.Engine.Output;

/// <summary>
/// Decodes output tokens as they arrive with O(1) work per token, as vLLM's and Hugging Face's streaming decoders do: it
/// keeps a prefix offset and a read offset, decodes only the tokens from the prefix offset on, and emits the text past
/// what those prefix tokens alone decode to. What is emitted is never revised, and all of it joined is exactly the whole
/// sequence's decode: a run of byte-fallback tokens is held until a token that is not a byte ends it (Hugging Face decodes
/// each run as a unit, so a later byte can turn a character already complete into U+FFFD), and text that still ends in
/// U+FFFD is held until more arrives.
/// </summary>
internal sealed class IncrementalDetokenizer(Tokenizer tokenizer, bool skipSpecialTokens)
{
    private readonly List<int> _ids = [];
    private int _prefix;
    private int _read;
    private string _prefixText = "";

    /// <summary>Adds a token; returns the text it completes, or "" while it completes none.</summary>
    public string Push(int token)
    {
        _ids.Add(token);
        if (tokenizer.IsByteFallbackToken(token)) return "";
        var text = Decode(_prefix, _ids.Count);
        if (text.Length <= _prefixText.Length || text[^1] == '\uFFFD') return "";
        var delta = text[_prefixText.Length..];
        _prefix = _read;
        _read = _ids.Count;
        _prefixText = Decode(_prefix, _read);
        return delta;
    }

    /// <summary>Whatever is still held at the end (an incomplete character decodes as U+FFFD per byte, as a full decode gives it).</summary>
    public string Flush()
    {
        var text = Decode(_prefix, _ids.Count);
        _prefix = _read = _ids.Count;
        var delta = text.Length > _prefixText.Length ? text[_prefixText.Length..] : "";
        _prefixText = "";
        return delta;
    }

    private string Decode(int from, int to) =>
        from == to ? "" : tokenizer.Decode(CollectionsMarshal.AsSpan(_ids)[from..to], skipSpecialTokens);
}
