using System.Globalization;
using System.Text.Json;

namespace MoeRagInject.Server.Requests;

/// <summary>
/// Typed, path-aware reads of one JSON object's fields. A JSON null counts as absent (as pydantic's Optional does); a value of
/// the wrong type is an <see cref="ApiException"/> whose message names the field by its dotted path.
/// </summary>
public readonly struct JsonFields
{
    private readonly JsonElement _object;
    private readonly string _prefix;

    private JsonFields(JsonElement obj, string prefix)
    {
        _object = obj;
        _prefix = prefix;
    }

    public static async Task<JsonDocument> ReadBodyAsync(Stream body, CancellationToken cancellationToken)
    {
        try
        {
            return await JsonDocument.ParseAsync(body, default, cancellationToken).ConfigureAwait(false);
        }
        catch (JsonException e)
        {
            throw ApiException.BadRequest($"malformed JSON body: {e.Message}");
        }
    }

    /// <summary>The root of a request body, which must be an object.</summary>
    public static JsonFields Root(JsonDocument document)
    {
        if (document.RootElement.ValueKind != JsonValueKind.Object)
            throw ApiException.BadRequest($"the request body must be a JSON object, not {Describe(document.RootElement)}");
        return new JsonFields(document.RootElement, "");
    }

    /// <summary>An element of a list that must be an object, named by <paramref name="path"/> in errors.</summary>
    public static JsonFields Element(JsonElement value, string path)
    {
        if (value.ValueKind != JsonValueKind.Object)
            throw ApiException.BadRequest($"{path} must be an object, not {Describe(value)}");
        return new JsonFields(value, path);
    }

    public string PathOf(string name) => _prefix.Length == 0 ? name : $"{_prefix}.{name}";

    public bool Has(string name) => TryGet(name, out _);

    public bool TryGet(string name, out JsonElement value)
        => _object.TryGetProperty(name, out value) && value.ValueKind != JsonValueKind.Null;

    /// <summary>Rejects fields outside <paramref name="known"/>, so that a misspelt parameter is not silently ignored.</summary>
    public void RejectUnknown(IReadOnlySet<string> known)
    {
        foreach (var property in _object.EnumerateObject())
            if (!known.Contains(property.Name))
                throw ApiException.BadRequest($"unknown field {PathOf(property.Name)}");
    }

    public JsonFields? Object(string name)
    {
        if (!TryGet(name, out var value)) return null;
        if (value.ValueKind != JsonValueKind.Object)
            throw ApiException.BadRequest($"{PathOf(name)} must be an object, not {Describe(value)}");
        return new JsonFields(value, PathOf(name));
    }

    public bool? Bool(string name)
    {
        if (!TryGet(name, out var value)) return null;
        return value.ValueKind switch
        {
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            _ => throw ApiException.BadRequest($"{PathOf(name)} must be a boolean, not {Describe(value)}"),
        };
    }

    public string? String(string name)
    {
        if (!TryGet(name, out var value)) return null;
        if (value.ValueKind != JsonValueKind.String)
            throw ApiException.BadRequest($"{PathOf(name)} must be a string, not {Describe(value)}");
        return value.GetString()!;
    }

    public double? Number(string name)
    {
        if (!TryGet(name, out var value)) return null;
        if (value.ValueKind != JsonValueKind.Number || !value.TryGetDouble(out var number) || !double.IsFinite(number))
            throw ApiException.BadRequest($"{PathOf(name)} must be a number, not {Describe(value)}");
        return number;
    }

    public float? Float(string name) => Number(name) is { } number ? (float)number : null;

    public int? Int(string name) => TryGet(name, out var value) ? ToInt(value, PathOf(name)) : null;

    /// <summary>A non-negative integer of 64 bits (seeds).</summary>
    public ulong? UInt64(string name)
    {
        if (!TryGet(name, out var value)) return null;
        if (value.ValueKind == JsonValueKind.Number && value.TryGetUInt64(out var exact)) return exact;
        if (value.ValueKind == JsonValueKind.Number && value.TryGetDouble(out var d) && d >= 0 && d < 1.8e19 && Math.Floor(d) == d)
            return (ulong)d;
        throw ApiException.BadRequest($"{PathOf(name)} must be a non-negative integer, not {Describe(value)}");
    }

    /// <summary>A string or a list of strings (sglang's <c>stop</c>).</summary>
    public IReadOnlyList<string>? StringOrStrings(string name)
    {
        if (!TryGet(name, out var value)) return null;
        if (value.ValueKind == JsonValueKind.String) return [value.GetString()!];
        if (value.ValueKind != JsonValueKind.Array)
            throw ApiException.BadRequest($"{PathOf(name)} must be a string or a list of strings, not {Describe(value)}");
        var list = new List<string>(value.GetArrayLength());
        var i = 0;
        foreach (var item in value.EnumerateArray())
        {
            if (item.ValueKind != JsonValueKind.String)
                throw ApiException.BadRequest($"{PathOf(name)}[{i}] must be a string, not {Describe(item)}");
            list.Add(item.GetString()!);
            i++;
        }
        return list;
    }

    public IReadOnlyList<int>? Ints(string name) => TryGet(name, out var value) ? ToInts(value, PathOf(name)) : null;

    public static int ToInt(JsonElement value, string path)
    {
        if (value.ValueKind == JsonValueKind.Number)
        {
            if (value.TryGetInt32(out var exact)) return exact;
            // pydantic's lax mode takes 12.0 for an int; so do we.
            if (value.TryGetDouble(out var d) && Math.Floor(d) == d && d >= int.MinValue && d <= int.MaxValue) return (int)d;
        }
        throw ApiException.BadRequest($"{path} must be an integer, not {Describe(value)}");
    }

    public static IReadOnlyList<int> ToInts(JsonElement value, string path)
    {
        if (value.ValueKind != JsonValueKind.Array)
            throw ApiException.BadRequest($"{path} must be a list of integers, not {Describe(value)}");
        var ids = new int[value.GetArrayLength()];
        var i = 0;
        foreach (var item in value.EnumerateArray())
        {
            ids[i] = ToInt(item, $"{path}[{i}]");
            i++;
        }
        return ids;
    }

    /// <summary>How a value reads in an error message: its JSON type and, when short, the value itself.</summary>
    public static string Describe(JsonElement value)
    {
        var kind = value.ValueKind switch
        {
            JsonValueKind.Object => "an object",
            JsonValueKind.Array => "a list",
            JsonValueKind.String => "a string",
            JsonValueKind.Number => "a number",
            JsonValueKind.True or JsonValueKind.False => "a boolean",
            JsonValueKind.Null => "null",
            _ => "nothing",
        };
        if (value.ValueKind is JsonValueKind.Object or JsonValueKind.Array or JsonValueKind.Null or JsonValueKind.Undefined) return kind;
        var raw = value.GetRawText();
        return raw.Length <= 40 ? string.Create(CultureInfo.InvariantCulture, $"{kind} ({raw})") : kind;
    }
}
