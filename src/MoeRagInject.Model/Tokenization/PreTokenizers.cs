using System.Text.Json;

namespace MoeRagInject.Model.Tokenization;

/// <summary>A piece of normalized text on its way to the model; <see cref="AtStart"/> is true when it begins at offset 0 of the input.</summary>
internal readonly record struct TextPiece(string Text, bool AtStart);

/// <summary>A <c>tokenizer.json</c> pre-tokenizer: splits (and rewrites) a piece into the words the model sees.</summary>
internal abstract class PreTokenizer
{
    /// <summary>Appends the words of <paramref name="piece"/> to <paramref name="output"/> (empty words are dropped).</summary>
    public abstract void PreTokenize(TextPiece piece, List<TextPiece> output);

    public static PreTokenizer? FromJson(JsonElement element, TokenizerJson json)
    {
        if (element.ValueKind == JsonValueKind.Null) return null;
        string type = json.ComponentType(element, "pre_tokenizer");
        switch (type)
        {
            case "Sequence":
            {
                var items = new List<PreTokenizer>();
                foreach (var child in json.RequiredArray(element, "pretokenizers", "pre_tokenizer Sequence").EnumerateArray())
                {
                    var p = FromJson(child, json);
                    if (p != null) items.Add(p);
                }
                return new SequencePreTokenizer(items.ToArray());
            }
            case "Metaspace":
            {
                var (replacement, scheme, split) = MetaspaceSettings.Read(element, json, "pre_tokenizer Metaspace");
                return new MetaspacePreTokenizer(replacement, scheme, split);
            }
            default:
                throw json.Unsupported("pre_tokenizer", type);
        }
    }
}

internal enum PrependScheme { First, Always, Never }

internal static class MetaspaceSettings
{
    /// <summary>Reads replacement / prepend_scheme (or the older add_prefix_space) / split, with the HF defaults.</summary>
    public static (string Replacement, PrependScheme Scheme, bool Split) Read(JsonElement element, TokenizerJson json, string where)
    {
        string replacement = json.SingleCharacter(element, "replacement", where, "\u2581");
        string? schemeText = json.OptionalString(element, "prepend_scheme", where);
        var scheme = schemeText switch
        {
            null => PrependScheme.Always,
            "first" => PrependScheme.First,
            "always" => PrependScheme.Always,
            "never" => PrependScheme.Never,
            _ => throw json.Invalid($"{where}.prepend_scheme '{schemeText}' is not first, always or never"),
        };
        if (!TokenizerJson.IsNullOrMissing(element, "add_prefix_space", out _) &&
            !json.OptionalBool(element, "add_prefix_space", true, where))
        {
            if (schemeText != null && scheme != PrependScheme.Never)
                throw json.Invalid($"{where}: add_prefix_space=false does not match prepend_scheme '{schemeText}'");
            scheme = PrependScheme.Never;
        }
        bool split = json.OptionalBool(element, "split", true, where);
        return (replacement, scheme, split);
    }
}

internal sealed class SequencePreTokenizer(PreTokenizer[] items) : PreTokenizer
{
    public override void PreTokenize(TextPiece piece, List<TextPiece> output)
    {
        if (items.Length == 0)
        {
            if (piece.Text.Length > 0) output.Add(piece);
            return;
        }
        var current = new List<TextPiece> { piece };
        var next = new List<TextPiece>();
        for (int i = 0; i < items.Length; i++)
        {
            var target = i == items.Length - 1 ? output : next;
            foreach (var p in current) items[i].PreTokenize(p, target);
            (current, next) = (next, current);
            next.Clear();
        }
    }
}

/// <summary>Replaces spaces with the meta symbol (<c>▁</c>), optionally prepends one, and optionally splits before each meta symbol.</summary>
internal sealed class MetaspacePreTokenizer(string replacement, PrependScheme scheme, bool split) : PreTokenizer
{
    public override void PreTokenize(TextPiece piece, List<TextPiece> output)
    {
        string text = piece.Text.Replace(" ", replacement, StringComparison.Ordinal);
        bool prepend = text.Length > 0 && !text.StartsWith(replacement, StringComparison.Ordinal) && scheme switch
        {
            PrependScheme.Always => true,
            PrependScheme.First => piece.AtStart,
            _ => false,
        };
        if (prepend) text = replacement + text;
        if (text.Length == 0) return;
        if (!split)
        {
            output.Add(piece with { Text = text });
            return;
        }
        // Split with the meta symbol merged into the following word: "▁a▁▁b" -> "▁a", "▁", "▁b".
        int start = 0;
        int pos = text.IndexOf(replacement, 1, StringComparison.Ordinal);
        while (pos >= 0)
        {
            if (pos > start) output.Add(new TextPiece(text[start..pos], piece.AtStart && start == 0));
            start = pos;
            pos = pos + replacement.Length < text.Length ? text.IndexOf(replacement, pos + replacement.Length, StringComparison.Ordinal) : -1;
        }
        output.Add(new TextPiece(text[start..], piece.AtStart && start == 0));
    }
}
