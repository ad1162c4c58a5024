using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace MoeRagInject.Model.Tokenization;

/// <summary>A <c>tokenizer.json</c> normalizer: rewrites a piece of input text before pre-tokenization.</summary>
internal abstract class TextNormalizer
{
    public abstract string Normalize(string text);

    /// <summary>Builds the normalizer described by <paramref name="element"/>; null for a JSON null.</summary>
    public static TextNormalizer? FromJson(JsonElement element, TokenizerJson json)
    {
        if (element.ValueKind == JsonValueKind.Null) return null;
        string type = json.ComponentType(element, "normalizer");
        switch (type)
        {
            case "Sequence":
            {
                var items = new List<TextNormalizer>();
                foreach (var child in json.RequiredArray(element, "normalizers", "normalizer Sequence").EnumerateArray())
                {
                    var n = FromJson(child, json);
                    if (n != null) items.Add(n);
                }
                return new SequenceNormalizer(items.ToArray());
            }
            case "Prepend":
                return new PrependNormalizer(json.RequiredString(element, "prepend", "normalizer Prepend"));
            case "Replace":
            {
                var (literal, regex) = json.Pattern(element, "normalizer Replace");
                string content = json.RequiredString(element, "content", "normalizer Replace");
                return new ReplaceNormalizer(literal, regex is null ? null : new Regex(regex, RegexOptions.CultureInvariant), content);
            }
            case "NFC" or "NFD" or "NFKC" or "NFKD":
                if (!UnicodeNormalizer.Available)
                    throw new NotSupportedException(
                        $"{json.FileName}: normalizer type '{type}' needs Unicode normalization data, which this process lacks " +
                        "(globalization-invariant mode makes string.Normalize a no-op)");
                return new UnicodeNormalizer(type switch
                {
                    "NFC" => NormalizationForm.FormC,
                    "NFD" => NormalizationForm.FormD,
                    "NFKC" => NormalizationForm.FormKC,
                    _ => NormalizationForm.FormKD,
                });
            case "Lowercase": return new LowercaseNormalizer();
            case "Strip":
                return new StripNormalizer(
                    json.OptionalBool(element, "strip_left", true, "normalizer Strip"),
                    json.OptionalBool(element, "strip_right", true, "normalizer Strip"));
            default:
                throw json.Unsupported("normalizer", type);
        }
    }
}

internal sealed class SequenceNormalizer(TextNormalizer[] items) : TextNormalizer
{
    public override string Normalize(string text)
    {
        foreach (var n in items) text = n.Normalize(text);
        return text;
    }
}

/// <summary>Prepends a fixed string to non-empty text (Llama's legacy <c>▁</c> prefix).</summary>
internal sealed class PrependNormalizer(string prepend) : TextNormalizer
{
    public override string Normalize(string text) => text.Length == 0 ? text : string.Concat(prepend, text);
}

internal sealed class ReplaceNormalizer(string? literal, Regex? regex, string content) : TextNormalizer
{
    public override string Normalize(string text)
    {
        if (literal != null)
            return literal.Length == 0 ? text : text.Replace(literal, content, StringComparison.Ordinal);
        return regex!.Replace(text, _ => content);
    }
}

internal sealed class UnicodeNormalizer(NormalizationForm form) : TextNormalizer
{
    /// <summary>Whether string.Normalize really normalizes here (it does nothing in globalization-invariant mode).</summary>
    public static bool Available { get; } = Probe();

    private static bool Probe()
    {
        try
        {
            return "e\u0301".Normalize(NormalizationForm.FormC) == "\u00E9" && "\uFF41".Normalize(NormalizationForm.FormKC) == "a";
        }
        catch (PlatformNotSupportedException)
        {
            return false;
        }
    }

    public override string Normalize(string text)
    {
        if (Ascii.IsValid(text)) return text;
        return text.Normalize(form);
    }
}

internal sealed class LowercaseNormalizer : TextNormalizer
{
    public override string Normalize(string text) => text.ToLowerInvariant();
}

internal sealed class StripNormalizer(bool left, bool right) : TextNormalizer
{
    public override string Normalize(string text)
    {
        if (left) text = text.TrimStart();
        if (right) text = text.TrimEnd();
        return text;
    }
}
