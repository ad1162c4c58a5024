using System.Text.Json;

namespace MoeRagInject.Model.Tokenization;

/// <summary>Small helpers for reading <c>tokenizer.json</c> / <c>tokenizer_config.json</c> with precise error messages.</summary>
internal sealed class TokenizerJson
{
    public TokenizerJson(string fileName) => FileName = fileName;

    /// <summary>The file the JSON came from, used in every error message.</summary>
    public string FileName { get; }

    public InvalidDataException Invalid(string what) => new($"{FileName}: {what}");

    public NotSupportedException Unsupported(string kind, string type) =>
        new($"{FileName}: unsupported {kind} type '{type}'");

    /// <summary>Reads the "type" of a component object (normalizer, decoder, ...).</summary>
    public string ComponentType(JsonElement element, string kind)
    {
        if (element.ValueKind != JsonValueKind.Object)
            throw Invalid($"{kind} must be a JSON object or null, found {element.ValueKind}");
        if (!element.TryGetProperty("type", out var type) || type.ValueKind != JsonValueKind.String)
            throw Invalid($"{kind} has no string \"type\" property");
        return type.GetString()!;
    }

    public static bool IsNullOrMissing(JsonElement parent, string name, out JsonElement value)
    {
        if (!parent.TryGetProperty(name, out value)) return true;
        return value.ValueKind == JsonValueKind.Null;
    }

    public string? OptionalString(JsonElement obj, string name, string where)
    {
        if (IsNullOrMissing(obj, name, out var v)) return null;
        if (v.ValueKind != JsonValueKind.String) throw Invalid($"{where}.{name} must be a string, found {v.ValueKind}");
        return v.GetString();
    }

    public string RequiredString(JsonElement obj, string name, string where) =>
        OptionalString(obj, name, where) ?? throw Invalid($"{where} has no string \"{name}\"");

    public bool OptionalBool(JsonElement obj, string name, bool defaultValue, string where)
    {
        if (IsNullOrMissing(obj, name, out var v)) return defaultValue;
        return v.ValueKind switch
        {
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            _ => throw Invalid($"{where}.{name} must be a boolean, found {v.ValueKind}"),
        };
    }

    public int RequiredInt(JsonElement obj, string name, string where)
    {
        if (IsNullOrMissing(obj, name, out var v)) throw Invalid($"{where} has no integer \"{name}\"");
        return ToInt(v, $"{where}.{name}");
    }

    public int ToInt(JsonElement v, string where)
    {
        if (v.ValueKind != JsonValueKind.Number || !v.TryGetInt32(out int i))
            throw Invalid($"{where} must be a 32-bit integer, found {DescribeValue(v)}");
        return i;
    }

    public JsonElement RequiredArray(JsonElement obj, string name, string where)
    {
        if (IsNullOrMissing(obj, name, out var v)) throw Invalid($"{where} has no array \"{name}\"");
        if (v.ValueKind != JsonValueKind.Array) throw Invalid($"{where}.{name} must be an array, found {v.ValueKind}");
        return v;
    }

    /// <summary>A single character property such as Metaspace's <c>replacement</c>.</summary>
    public string SingleCharacter(JsonElement obj, string name, string where, string? defaultValue = null)
    {
        string? s = OptionalString(obj, name, where) ?? defaultValue ?? throw Invalid($"{where} has no string \"{name}\"");
        var runes = s.EnumerateRunes();
        int count = 0;
        foreach (var _ in runes) count++;
        if (count != 1) throw Invalid($"{where}.{name} must be exactly one character, found \"{s}\"");
        return s;
    }

    /// <summary>A <c>{"String": "..."}</c> or <c>{"Regex": "..."}</c> pattern.</summary>
    public (string? Literal, string? Regex) Pattern(JsonElement obj, string where)
    {
        if (IsNullOrMissing(obj, "pattern", out var p) || p.ValueKind != JsonValueKind.Object)
            throw Invalid($"{where} has no \"pattern\" object");
        if (p.TryGetProperty("String", out var s) && s.ValueKind == JsonValueKind.String) return (s.GetString()!, null);
        if (p.TryGetProperty("Regex", out var r) && r.ValueKind == JsonValueKind.String) return (null, r.GetString()!);
        throw Invalid($"{where}.pattern must be {{\"String\": ...}} or {{\"Regex\": ...}}");
    }

    private static string DescribeValue(JsonElement v) =>
        v.ValueKind is JsonValueKind.Number or JsonValueKind.String ? v.GetRawText() : v.ValueKind.ToString();
}
