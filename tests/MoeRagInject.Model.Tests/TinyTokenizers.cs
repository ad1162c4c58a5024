using System.Text.Json.Nodes;

namespace MoeRagInject.Model.Tests;

/// <summary>
/// Hand-written tokenizer.json documents with a tiny vocabulary:
/// 0 &lt;unk&gt;, 1 &lt;s&gt;, 2 &lt;/s&gt;, 3..258 the byte tokens &lt;0x00&gt;..&lt;0xFF&gt; (id = 3 + byte),
/// 259 ▁, 260 a, 261 b, 262 c, 263 ab, 264 bc, 265 abc, 266 ▁a, 267 ▁ab, 268 aa, 269 ca, 270 &lt;tool&gt;.
/// Merges by rank: b c, a b, a bc, ▁ a, ▁ ab, a a.
/// </summary>
internal static class TinyTokenizers
{
    public const int Unk = 0, Bos = 1, Eos = 2, Meta = 259, A = 260, B = 261, C = 262, AB = 263, BC = 264, ABC = 265,
        MetaA = 266, MetaAB = 267, AA = 268, CA = 269, Tool = 270;

    public static int Byte(int b) => 3 + b;

    public static JsonObject BpeModel(bool byteFallback = true, bool fuseUnk = true, bool ignoreMerges = false, bool stringMerges = false)
    {
        var vocab = new JsonObject { ["<unk>"] = 0, ["<s>"] = 1, ["</s>"] = 2 };
        for (int b = 0; b < 256; b++) vocab[$"<0x{b:X2}>"] = 3 + b;
        string[] rest = ["\u2581", "a", "b", "c", "ab", "bc", "abc", "\u2581a", "\u2581ab", "aa", "ca"];
        for (int i = 0; i < rest.Length; i++) vocab[rest[i]] = 259 + i;
        string[][] merges = [["b", "c"], ["a", "b"], ["a", "bc"], ["\u2581", "a"], ["\u2581", "ab"], ["a", "a"]];
        var mergesJson = new JsonArray();
        foreach (var m in merges)
            mergesJson.Add(stringMerges ? JsonValue.Create($"{m[0]} {m[1]}") : new JsonArray(m[0], m[1]));
        return new JsonObject
        {
            ["type"] = "BPE",
            ["dropout"] = null,
            ["unk_token"] = "<unk>",
            ["continuing_subword_prefix"] = null,
            ["end_of_word_suffix"] = null,
            ["fuse_unk"] = fuseUnk,
            ["byte_fallback"] = byteFallback,
            ["ignore_merges"] = ignoreMerges,
            ["vocab"] = vocab,
            ["merges"] = mergesJson,
        };
    }

    private static JsonObject Added(int id, string content, bool special, bool normalized = false) => new()
    {
        ["id"] = id, ["content"] = content, ["single_word"] = false, ["lstrip"] = false, ["rstrip"] = false,
        ["normalized"] = normalized, ["special"] = special,
    };

    public static JsonArray AddedTokens() =>
        [Added(0, "<unk>", true), Added(1, "<s>", true), Added(2, "</s>", true), Added(Tool, "<tool>", false)];

    public static JsonObject BosTemplate() => JsonNode.Parse("""
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [],
         "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
        """)!.AsObject();

    public static JsonObject LegacyNormalizer() => JsonNode.Parse("""
        {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
        """)!.AsObject();

    public static JsonObject LegacyDecoder() => JsonNode.Parse("""
        {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
         {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
        """)!.AsObject();

    public static JsonObject Metaspace(string scheme, bool split) => new()
    {
        ["type"] = "Metaspace", ["replacement"] = "\u2581", ["prepend_scheme"] = scheme, ["split"] = split,
    };

    /// <summary>Llama-2 style: Prepend/Replace normalizer, no pre-tokenizer, BOS template, Replace/ByteFallback/Fuse/Strip decoder.</summary>
    public static JsonObject Legacy(JsonObject? model = null) => new()
    {
        ["version"] = "1.0",
        ["added_tokens"] = AddedTokens(),
        ["normalizer"] = LegacyNormalizer(),
        ["pre_tokenizer"] = null,
        ["post_processor"] = BosTemplate(),
        ["decoder"] = LegacyDecoder(),
        ["model"] = model ?? BpeModel(),
    };

    /// <summary>Mistral style: no normalizer, Metaspace pre-tokenizer and decoder.</summary>
    public static JsonObject WithMetaspace(string scheme, bool split, JsonObject? model = null) => new()
    {
        ["version"] = "1.0",
        ["added_tokens"] = AddedTokens(),
        ["normalizer"] = null,
        ["pre_tokenizer"] = Metaspace(scheme, split),
        ["post_processor"] = BosTemplate(),
        ["decoder"] = new JsonObject { ["type"] = "Sequence", ["decoders"] = new JsonArray(
            Metaspace(scheme, split), new JsonObject { ["type"] = "ByteFallback" }, new JsonObject { ["type"] = "Fuse" }) },
        ["model"] = model ?? BpeModel(),
    };
}
