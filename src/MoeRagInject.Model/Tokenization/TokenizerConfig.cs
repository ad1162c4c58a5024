using System.Text.Json;

namespace MoeRagInject.Model.Tokenization;

/// <summary>The parts of <c>tokenizer_config.json</c> the tokenizer uses.</summary>
internal sealed class TokenizerConfig
{
    public string? BosToken { get; private init; }
    public string? EosToken { get; private init; }
    public string? UnkToken { get; private init; }
    public string? PadToken { get; private init; }
    public bool? AddBosToken { get; private init; }
    public bool? AddEosToken { get; private init; }
    public bool CleanUpTokenizationSpaces { get; private init; }
    public string? ChatTemplate { get; private init; }
    public List<AddedToken> AddedTokensDecoder { get; } = [];

    public static readonly TokenizerConfig Empty = new();

    public static TokenizerConfig Parse(string text, string fileName)
    {
        var json = new TokenizerJson(fileName);
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(text, new JsonDocumentOptions { AllowTrailingCommas = true });
        }
        catch (JsonException e)
        {
            throw json.Invalid($"malformed JSON: {e.Message}");
        }
        using (doc)
        {
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object) throw json.Invalid("the top level must be a JSON object");
            var config = new TokenizerConfig
            {
                BosToken = TokenContent(root, "bos_token", json),
                EosToken = TokenContent(root, "eos_token", json),
                UnkToken = TokenContent(root, "unk_token", json),
                PadToken = TokenContent(root, "pad_token", json),
                AddBosToken = OptionalBool(root, "add_bos_token", json),
                AddEosToken = OptionalBool(root, "add_eos_token", json),
                CleanUpTokenizationSpaces = OptionalBool(root, "clean_up_tokenization_spaces", json) ?? false,
                ChatTemplate = ReadChatTemplate(root, json),
            };
            if (!TokenizerJson.IsNullOrMissing(root, "added_tokens_decoder", out var decoder))
            {
                if (decoder.ValueKind != JsonValueKind.Object) throw json.Invalid("added_tokens_decoder must be an object");
                foreach (var prop in decoder.EnumerateObject())
                {
                    if (!int.TryParse(prop.Name, out int id)) throw json.Invalid($"added_tokens_decoder key \"{prop.Name}\" is not an integer id");
                    string where = $"added_tokens_decoder[\"{prop.Name}\"]";
                    config.AddedTokensDecoder.Add(new AddedToken(id,
                        json.RequiredString(prop.Value, "content", where),
                        json.OptionalBool(prop.Value, "single_word", false, where),
                        json.OptionalBool(prop.Value, "lstrip", false, where),
                        json.OptionalBool(prop.Value, "rstrip", false, where),
                        json.OptionalBool(prop.Value, "normalized", true, where),
                        json.OptionalBool(prop.Value, "special", false, where)));
                }
            }
            return config;
        }
    }

    /// <summary>A special token given as a string or as an AddedToken object <c>{"content": ...}</c>.</summary>
    private static string? TokenContent(JsonElement root, string name, TokenizerJson json)
    {
        if (TokenizerJson.IsNullOrMissing(root, name, out var v)) return null;
        if (v.ValueKind == JsonValueKind.String) return v.GetString();
        if (v.ValueKind == JsonValueKind.Object) return json.RequiredString(v, "content", name);
        throw json.Invalid($"{name} must be a string or an object with \"content\", found {v.ValueKind}");
    }

    private static bool? OptionalBool(JsonElement root, string name, TokenizerJson json) =>
        TokenizerJson.IsNullOrMissing(root, name, out _) ? null : json.OptionalBool(root, name, false, "tokenizer_config");

    private static string? ReadChatTemplate(JsonElement root, TokenizerJson json)
    {
        if (TokenizerJson.IsNullOrMissing(root, "chat_template", out var t)) return null;
        if (t.ValueKind == JsonValueKind.String) return t.GetString();
        if (t.ValueKind != JsonValueKind.Array) throw json.Invalid($"chat_template must be a string or a list of {{name, template}}, found {t.ValueKind}");
        foreach (var item in t.EnumerateArray())
        {
            string name = json.RequiredString(item, "name", "chat_template[]");
            if (name == "default") return json.RequiredString(item, "template", "chat_template[\"default\"]");
        }
        return null;
    }

    /// <summary>A standalone <c>chat_template.json</c>: <c>{"chat_template": ...}</c>.</summary>
    public static string? ParseChatTemplateJson(string text, string fileName)
    {
        var json = new TokenizerJson(fileName);
        try
        {
            using var doc = JsonDocument.Parse(text);
            if (doc.RootElement.ValueKind != JsonValueKind.Object) throw json.Invalid("the top level must be a JSON object");
            return ReadChatTemplate(doc.RootElement, json);
        }
        catch (JsonException e)
        {
            throw json.Invalid($"malformed JSON: {e.Message}");
        }
    }
}
