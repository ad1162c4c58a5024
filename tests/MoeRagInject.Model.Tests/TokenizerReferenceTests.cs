using System.Text.Json;
using MoeRagInject.Model.Tokenization;

namespace MoeRagInject.Model.Tests;

/// <summary>
/// Compares every case of the reference data produced with Hugging Face tokenizers/transformers
/// (tests/data/tokenizers/*/cases.json and chat_cases.json) exactly.
/// </summary>
public class TokenizerReferenceTests
{
    private static readonly Dictionary<string, Tokenizer> Loaded = new();

    private static Tokenizer Get(string folder)
    {
        lock (Loaded)
        {
            if (!Loaded.TryGetValue(folder, out var t)) Loaded[folder] = t = Tokenizer.Load(TestPaths.TestData("tokenizers", folder));
            return t;
        }
    }

    private static JsonElement LoadJson(params string[] parts) =>
        JsonDocument.Parse(File.ReadAllText(TestPaths.TestData(parts))).RootElement.Clone();

    private static int[] Ints(JsonElement e) => e.EnumerateArray().Select(x => x.GetInt32()).ToArray();

    public static TheoryData<string, int, string> EncodeCases()
    {
        var data = new TheoryData<string, int, string>();
        foreach (var folder in new[] { "legacy", "metaspace" })
        {
            var cases = LoadJson("tokenizers", folder, "cases.json");
            int i = 0;
            foreach (var c in cases.EnumerateArray()) data.Add(folder, i++, Shorten(c.GetProperty("text").GetString()!));
        }
        return data;
    }

    private static string Shorten(string s) => s.Length <= 40 ? s : s[..40] + "…";

    [Theory]
    [MemberData(nameof(EncodeCases))]
    public void EncodeAndDecodeMatchHuggingFace(string folder, int index, string label)
    {
        _ = label;
        var c = LoadJson("tokenizers", folder, "cases.json")[index];
        var tok = Get(folder);
        string text = c.GetProperty("text").GetString()!;
        int[] ids = Ints(c.GetProperty("ids"));
        int[] idsNoSpecial = Ints(c.GetProperty("ids_no_special"));

        Assert.Equal(ids, tok.Encode(text));
        Assert.Equal(idsNoSpecial, tok.Encode(text, addSpecialTokens: false));
        Assert.Equal(c.GetProperty("decoded").GetString(), tok.Decode(ids, skipSpecialTokens: false));
        Assert.Equal(c.GetProperty("decoded_skip_special").GetString(), tok.Decode(ids, skipSpecialTokens: true));
    }

    public static TheoryData<int> ChatCases()
    {
        var data = new TheoryData<int>();
        int n = LoadJson("tokenizers", "legacy", "chat_cases.json").GetArrayLength();
        for (int i = 0; i < n; i++) data.Add(i);
        return data;
    }

    private static List<ChatMessage> Messages(JsonElement c) =>
        c.GetProperty("messages").EnumerateArray()
            .Select(m => new ChatMessage(m.GetProperty("role").GetString()!, m.GetProperty("content").GetString()!)).ToList();

    [Theory]
    [MemberData(nameof(ChatCases))]
    public void ChatTemplateMatchesTransformers(int index)
    {
        var c = LoadJson("tokenizers", "legacy", "chat_cases.json")[index];
        var tok = Get("legacy");
        var messages = Messages(c);
        bool addGenerationPrompt = c.GetProperty("add_generation_prompt").GetBoolean();

        if (c.TryGetProperty("error", out var err) && err.GetBoolean())
        {
            var ex = Assert.Throws<JinjaException>(() => tok.ApplyChatTemplate(messages, addGenerationPrompt));
            Assert.True(ex.RaisedByTemplate);
            if (c.TryGetProperty("message", out var msg))
            {
                string expected = msg.GetString()!;
                const string prefix = "TemplateError: ";
                if (expected.StartsWith(prefix, StringComparison.Ordinal)) expected = expected[prefix.Length..];
                Assert.Equal(expected, ex.Message);
            }
            return;
        }

        string rendered = tok.ApplyChatTemplate(messages, addGenerationPrompt);
        Assert.Equal(c.GetProperty("rendered").GetString(), rendered);
        if (c.TryGetProperty("rendered_ids_no_special", out var ids))
            Assert.Equal(Ints(ids), tok.Encode(rendered, addSpecialTokens: false));
    }

    [Fact]
    public void ReferenceCheckpointFoldersLoadTheSameTokenizer()
    {
        var cases = LoadJson("tokenizers", "legacy", "cases.json");
        var folders = Directory.GetDirectories(TestPaths.TestData("reference"))
            .Where(d => File.Exists(Path.Combine(d, "tokenizer.json"))).ToList();
        Assert.NotEmpty(folders);
        foreach (var folder in folders)
        {
            var tok = Tokenizer.Load(folder);
            Assert.Equal(1, tok.BosTokenId);
            Assert.Equal(2, tok.EosTokenId);
            Assert.NotNull(tok.ChatTemplate);
            foreach (var c in cases.EnumerateArray())
                Assert.Equal(Ints(c.GetProperty("ids")), tok.Encode(c.GetProperty("text").GetString()!));
        }
    }

    [Fact]
    public void SpecialTokenPropertiesMatchTheConfig()
    {
        foreach (var folder in new[] { "legacy", "metaspace" })
        {
            var tok = Get(folder);
            Assert.Equal(1000, tok.VocabSize);
            Assert.Equal(1, tok.BosTokenId);
            Assert.Equal(2, tok.EosTokenId);
            Assert.True(tok.IsSpecial(0));
            Assert.True(tok.IsSpecial(1));
            Assert.True(tok.IsSpecial(2));
            Assert.False(tok.IsSpecial(3));
            Assert.Equal("<s>", tok.IdToToken(1));
            Assert.Equal(1, tok.TokenToId("<s>"));
        }
    }
}
