using System.Text.Json.Nodes;
using MoeRagInject.Model.Tokenization;
using static MoeRagInject.Model.Tests.TinyTokenizers;

namespace MoeRagInject.Model.Tests;

/// <summary>Missing, malformed and unsupported tokenizer files fail with messages that name the file and the problem.</summary>
public sealed class TokenizerErrorTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "moe-tok-" + Guid.NewGuid().ToString("N"));

    public TokenizerErrorTests() => Directory.CreateDirectory(_dir);

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string Write(string name, string text)
    {
        string path = Path.Combine(_dir, name);
        File.WriteAllText(path, text);
        return path;
    }

    [Fact]
    public void MissingTokenizerJsonIsFileNotFound()
    {
        var ex = Assert.Throws<FileNotFoundException>(() => Tokenizer.Load(_dir));
        Assert.Contains(Path.Combine(_dir, "tokenizer.json"), ex.Message, StringComparison.Ordinal);
        Assert.Throws<FileNotFoundException>(() => Tokenizer.Load(Path.Combine(_dir, "no-such-folder")));
    }

    [Fact]
    public void MissingExplicitConfigIsFileNotFound()
    {
        string tok = Write("tokenizer.json", Legacy().ToJsonString());
        var ex = Assert.Throws<FileNotFoundException>(() => Tokenizer.LoadFiles(tok, Path.Combine(_dir, "nope.json")));
        Assert.Contains("nope.json", ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void MalformedJsonIsInvalidDataNamingTheFile()
    {
        string path = Write("tokenizer.json", "{\"model\": {\"type\": \"BPE\", ");
        var ex = Assert.Throws<InvalidDataException>(() => Tokenizer.Load(_dir));
        Assert.Contains(path, ex.Message, StringComparison.Ordinal);
        Assert.Contains("malformed JSON", ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void MalformedConfigIsInvalidDataNamingTheConfig()
    {
        Write("tokenizer.json", Legacy().ToJsonString());
        string config = Write("tokenizer_config.json", "{\"bos_token\": ");
        var ex = Assert.Throws<InvalidDataException>(() => Tokenizer.Load(_dir));
        Assert.Contains(config, ex.Message, StringComparison.Ordinal);
        Write("tokenizer_config.json", "{\"bos_token\": 5}");
        ex = Assert.Throws<InvalidDataException>(() => Tokenizer.Load(_dir));
        Assert.Contains("bos_token", ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void LoadReadsTheConfigAndChatTemplateFromTheFolder()
    {
        Write("tokenizer.json", Legacy().ToJsonString());
        Write("tokenizer_config.json", """{"bos_token": "<s>", "eos_token": "</s>"}""");
        Write("chat_template.jinja", "{{ bos_token }}{{ messages[0].content }}\n");
        var tok = Tokenizer.Load(_dir);
        Assert.Equal(Bos, tok.BosTokenId);
        Assert.Equal(Eos, tok.EosTokenId);
        Assert.Equal("<s>x", tok.ApplyChatTemplate([new ChatMessage("user", "x")], false));
    }

    public static TheoryData<string, string, string> UnsupportedComponents() => new()
    {
        { "normalizer", """{"type": "Precompiled", "precompiled_charsmap": ""}""", "Precompiled" },
        { "pre_tokenizer", """{"type": "ByteLevel", "add_prefix_space": false}""", "ByteLevel" },
        { "decoder", """{"type": "WordPiece", "prefix": "##"}""", "WordPiece" },
        { "post_processor", """{"type": "BertProcessing", "sep": ["[SEP]", 1], "cls": ["[CLS]", 0]}""", "BertProcessing" },
        { "model", """{"type": "Unigram", "vocab": []}""", "Unigram" },
        { "normalizer", """{"type": "Sequence", "normalizers": [{"type": "BertNormalizer"}]}""", "BertNormalizer" },
    };

    [Theory]
    [MemberData(nameof(UnsupportedComponents))]
    public void UnsupportedComponentTypesNameTheFileAndTheType(string component, string json, string type)
    {
        var doc = Legacy();
        doc[component] = JsonNode.Parse(json);
        string path = Write("tokenizer.json", doc.ToJsonString());
        var ex = Assert.Throws<NotSupportedException>(() => Tokenizer.Load(_dir));
        Assert.Contains(path, ex.Message, StringComparison.Ordinal);
        Assert.Contains($"'{type}'", ex.Message, StringComparison.Ordinal);
        Assert.Contains(component, ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void StructuralProblemsAreInvalidData()
    {
        void Expect(JsonObject doc, string fragment)
        {
            var ex = Assert.Throws<InvalidDataException>(() => Tokenizer.FromJson(doc.ToJsonString(), null, "my/tokenizer.json"));
            Assert.StartsWith("my/tokenizer.json: ", ex.Message, StringComparison.Ordinal);
            Assert.Contains(fragment, ex.Message, StringComparison.Ordinal);
        }

        var noModel = Legacy();
        noModel.Remove("model");
        Expect(noModel, "no \"model\"");

        var badMerge = Legacy();
        badMerge["model"]!["merges"]!.AsArray().Add(new JsonArray("a", "zz"));
        Expect(badMerge, "\"zz\" is not in the vocab");

        var badMergedToken = Legacy();
        badMergedToken["model"]!["merges"]!.AsArray().Add(new JsonArray("c", "c"));
        Expect(badMergedToken, "merged token \"cc\" is not in the vocab");

        var badLegacyMerge = Legacy(BpeModel(stringMerges: true));
        badLegacyMerge["model"]!["merges"]!.AsArray().Add("a b c");
        Expect(badLegacyMerge, "is not two tokens separated by one space");

        var noType = Legacy();
        noType["decoder"] = new JsonObject { ["content"] = " " };
        Expect(noType, "decoder has no string \"type\"");

        var badId = Legacy();
        badId["model"]!["vocab"]!["a"] = "x";
        Expect(badId, "model.vocab[\"a\"]");

        var badTemplate = Legacy();
        badTemplate["post_processor"]!["single"]!.AsArray().Add(new JsonObject { ["SpecialToken"] = new JsonObject { ["id"] = "<x>" } });
        Expect(badTemplate, "\"<x>\"");

        var badScheme = WithMetaspace("sometimes", true);
        Expect(badScheme, "prepend_scheme 'sometimes'");

        Assert.Throws<InvalidDataException>(() => Tokenizer.FromJson("[1, 2]"));
        Assert.Throws<InvalidDataException>(() => Tokenizer.FromJson("not json"));
    }
}
