using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace MoeRagInject.Model.Tokenization;

/// <summary>A <c>tokenizer.json</c> decoder: turns the token strings of ids back into text pieces (joined at the end).</summary>
internal abstract class TokenDecoder
{
    public abstract List<string> DecodeChain(List<string> tokens);

    public static TokenDecoder? FromJson(JsonElement element, TokenizerJson json)
    {
        if (element.ValueKind == JsonValueKind.Null) return null;
        string type = json.ComponentType(element, "decoder");
        switch (type)
        {
            case "Sequence":
            {
                var items = new List<TokenDecoder>();
                foreach (var child in json.RequiredArray(element, "decoders", "decoder Sequence").EnumerateArray())
                {
                    var d = FromJson(child, json);
                    if (d != null) items.Add(d);
                }
                return new SequenceDecoder(items.ToArray());
            }
            case "Replace":
            {
                var (literal, regex) = json.Pattern(element, "decoder Replace");
                string content = json.RequiredString(element, "content", "decoder Replace");
                return new ReplaceDecoder(literal, regex is null ? null : new Regex(regex, RegexOptions.CultureInvariant), content);
            }
            case "ByteFallback": return new ByteFallbackDecoder();
            case "Fuse": return new FuseDecoder();
            case "Strip":
            {
                string content = json.SingleCharacter(element, "content", "decoder Strip");
                int start = JsonNonNegative(element, "start", json);
                int stop = JsonNonNegative(element, "stop", json);
                return new StripDecoder(content, start, stop);
            }
            case "Metaspace":
            {
                var (replacement, scheme, _) = MetaspaceSettings.Read(element, json, "decoder Metaspace");
                return new MetaspaceDecoder(replacement, scheme);
            }
            default:
                throw json.Unsupported("decoder", type);
        }
    }

    private static int JsonNonNegative(JsonElement element, string name, TokenizerJson json)
    {
        if (TokenizerJson.IsNullOrMissing(element, name, out _)) return 0;
        int v = json.RequiredInt(element, name, "decoder Strip");
        if (v < 0) throw json.Invalid($"decoder Strip.{name} must not be negative");
        return v;
    }
}

internal sealed class SequenceDecoder(TokenDecoder[] items) : TokenDecoder
{
    public override List<string> DecodeChain(List<string> tokens)
    {
        foreach (var d in items) tokens = d.DecodeChain(tokens);
        return tokens;
    }
}

internal sealed class ReplaceDecoder(string? literal, Regex? regex, string content) : TokenDecoder
{
    public override List<string> DecodeChain(List<string> tokens)
    {
        for (int i = 0; i < tokens.Count; i++)
        {
            tokens[i] = literal != null
                ? literal.Length == 0 ? tokens[i] : tokens[i].Replace(literal, content, StringComparison.Ordinal)
                : regex!.Replace(tokens[i], _ => content);
        }
        return tokens;
    }
}

/// <summary>
/// Runs of <c>&lt;0xNN&gt;</c> tokens become the UTF-8 text of their bytes; a run that is not valid UTF-8 becomes one
/// U+FFFD per byte (Hugging Face's behaviour, not lossy decoding).
/// </summary>
internal sealed class ByteFallbackDecoder : TokenDecoder
{
    private static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    public override List<string> DecodeChain(List<string> tokens)
    {
        var result = new List<string>(tokens.Count);
        var bytes = new List<byte>();
        foreach (var token in tokens)
        {
            if (TryParseByte(token, out byte b))
            {
                bytes.Add(b);
                continue;
            }
            Flush(bytes, result);
            result.Add(token);
        }
        Flush(bytes, result);
        return result;
    }

    private static void Flush(List<byte> bytes, List<string> result)
    {
        if (bytes.Count == 0) return;
        try
        {
            result.Add(StrictUtf8.GetString(bytes.ToArray()));
        }
        catch (DecoderFallbackException)
        {
            for (int i = 0; i < bytes.Count; i++) result.Add("\uFFFD");
        }
        bytes.Clear();
    }

    internal static bool TryParseByte(string token, out byte value)
    {
        value = 0;
        return token.Length == 6 && token.StartsWith("<0x", StringComparison.Ordinal) && token[5] == '>' &&
               byte.TryParse(token.AsSpan(3, 2), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out value);
    }
}

internal sealed class FuseDecoder : TokenDecoder
{
    public override List<string> DecodeChain(List<string> tokens) => tokens.Count <= 1 ? tokens : [string.Concat(tokens)];
}

/// <summary>Removes up to <c>start</c> leading and <c>stop</c> trailing occurrences of a character from every token.</summary>
internal sealed class StripDecoder(string content, int start, int stop) : TokenDecoder
{
    public override List<string> DecodeChain(List<string> tokens)
    {
        for (int i = 0; i < tokens.Count; i++) tokens[i] = Strip(tokens[i]);
        return tokens;
    }

    private string Strip(string token)
    {
        // Work on code points (HF uses Rust chars).
        var runes = new List<Rune>();
        foreach (var r in token.EnumerateRunes()) runes.Add(r);
        var c = Rune.GetRuneAt(content, 0);
        int startCut = 0;
        for (int i = 0; i < Math.Min(start, runes.Count); i++)
        {
            if (runes[i] == c) startCut = i + 1;
            else break;
        }
        int stopCut = runes.Count;
        for (int i = 0; i < Math.Min(stop, runes.Count); i++)
        {
            int index = runes.Count - i - 1;
            if (runes[index] == c) stopCut = index;
            else break;
        }
        if (startCut == 0 && stopCut == runes.Count) return token;
        if (stopCut <= startCut) return "";
        var sb = new StringBuilder(token.Length);
        for (int i = startCut; i < stopCut; i++) sb.Append(runes[i].ToString());
        return sb.ToString();
    }
}

/// <summary>The meta symbol becomes a space, except in the first token when a prefix space was prepended (then it is dropped).</summary>
internal sealed class MetaspaceDecoder(string replacement, PrependScheme scheme) : TokenDecoder
{
    public override List<string> DecodeChain(List<string> tokens)
    {
        for (int i = 0; i < tokens.Count; i++)
        {
            string replaceWith = i == 0 && scheme != PrependScheme.Never ? "" : " ";
            tokens[i] = tokens[i].Replace(replacement, replaceWith, StringComparison.Ordinal);
        }
        return tokens;
    }
}
