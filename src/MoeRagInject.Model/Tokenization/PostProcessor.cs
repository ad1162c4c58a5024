using System.Text.Json;

namespace MoeRagInject.Model.Tokenization;

/// <summary>
/// The single-sequence template of a <c>TemplateProcessing</c> post-processor (or of <c>add_bos_token</c> /
/// <c>add_eos_token</c>): the ids to put before and after the encoded text.
/// </summary>
internal sealed class SpecialTokenTemplate
{
    public SpecialTokenTemplate(int[] prefix, int[] suffix)
    {
        Prefix = prefix;
        Suffix = suffix;
    }

    public int[] Prefix { get; }
    public int[] Suffix { get; }

    public static SpecialTokenTemplate? FromJson(JsonElement element, TokenizerJson json)
    {
        if (element.ValueKind == JsonValueKind.Null) return null;
        string type = json.ComponentType(element, "post_processor");
        switch (type)
        {
            case "TemplateProcessing":
                return FromTemplateProcessing(element, json);
            case "ByteLevel":
                return null; // only adjusts offsets
            case "Sequence":
            {
                SpecialTokenTemplate? result = null;
                foreach (var child in json.RequiredArray(element, "processors", "post_processor Sequence").EnumerateArray())
                {
                    var t = FromJson(child, json);
                    if (t == null) continue;
                    if (result != null) throw json.Invalid("post_processor Sequence has more than one TemplateProcessing");
                    result = t;
                }
                return result;
            }
            default:
                throw json.Unsupported("post_processor", type);
        }
    }

    private static SpecialTokenTemplate FromTemplateProcessing(JsonElement element, TokenizerJson json)
    {
        const string where = "post_processor TemplateProcessing";
        var specials = new Dictionary<string, int[]>(StringComparer.Ordinal);
        if (!TokenizerJson.IsNullOrMissing(element, "special_tokens", out var sp))
        {
            if (sp.ValueKind != JsonValueKind.Object) throw json.Invalid($"{where}.special_tokens must be an object");
            foreach (var prop in sp.EnumerateObject())
            {
                var idsEl = json.RequiredArray(prop.Value, "ids", $"{where}.special_tokens[\"{prop.Name}\"]");
                var ids = new List<int>();
                foreach (var id in idsEl.EnumerateArray()) ids.Add(json.ToInt(id, $"{where}.special_tokens[\"{prop.Name}\"].ids"));
                string key = json.OptionalString(prop.Value, "id", where) ?? prop.Name;
                specials[key] = ids.ToArray();
            }
        }

        if (TokenizerJson.IsNullOrMissing(element, "single", out var single)) throw json.Invalid($"{where} has no \"single\" template");
        var prefix = new List<int>();
        var suffix = new List<int>();
        bool seenSequence = false;

        void AddSpecial(string name)
        {
            if (!specials.TryGetValue(name, out var ids))
                throw json.Invalid($"{where}: special token \"{name}\" of the template is not in special_tokens");
            (seenSequence ? suffix : prefix).AddRange(ids);
        }

        void AddSequence(string name)
        {
            if (name != "A") throw json.Invalid($"{where}: the single template uses sequence \"{name}\" (only A is allowed)");
            if (seenSequence) throw json.Invalid($"{where}: the single template uses sequence A twice");
            seenSequence = true;
        }

        if (single.ValueKind == JsonValueKind.String)
        {
            // Shorthand: "<s> $A </s>" (a ":type_id" suffix is allowed and ignored).
            foreach (var part in single.GetString()!.Split(' ', StringSplitOptions.RemoveEmptyEntries))
            {
                string piece = part;
                int colon = piece.LastIndexOf(':');
                if (colon > 0 && int.TryParse(piece.AsSpan(colon + 1), out _)) piece = piece[..colon];
                if (piece.StartsWith('$')) AddSequence(piece.Length == 1 ? "A" : piece[1..]);
                else AddSpecial(piece);
            }
        }
        else if (single.ValueKind == JsonValueKind.Array)
        {
            foreach (var item in single.EnumerateArray())
            {
                if (item.ValueKind == JsonValueKind.Object && item.TryGetProperty("SpecialToken", out var st))
                    AddSpecial(json.RequiredString(st, "id", $"{where}.single SpecialToken"));
                else if (item.ValueKind == JsonValueKind.Object && item.TryGetProperty("Sequence", out var seq))
                    AddSequence(json.RequiredString(seq, "id", $"{where}.single Sequence"));
                else
                    throw json.Invalid($"{where}.single item {item.GetRawText()} is neither SpecialToken nor Sequence");
            }
        }
        else
        {
            throw json.Invalid($"{where}.single must be an array or a string");
        }
        if (!seenSequence) throw json.Invalid($"{where}: the single template has no sequence $A");
        return new SpecialTokenTemplate(prefix.ToArray(), suffix.ToArray());
    }
}
