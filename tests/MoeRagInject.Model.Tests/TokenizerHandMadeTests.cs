using System.Text.Json.Nodes;
using MoeRagInject.Model.Tokenization;
using static MoeRagInject.Model.Tests.TinyTokenizers;

namespace MoeRagInject.Model.Tests;

/// <summary>Tiny hand-written tokenizers whose expected ids were derived by hand from the BPE rules.</summary>
public class TokenizerHandMadeTests
{
    private static Tokenizer Make(JsonObject json, string? config = null) => Tokenizer.FromJson(json.ToJsonString(), config);

    [Fact]
    public void MergesAreAppliedByRankNotLeftToRight()
    {
        var tok = Make(Legacy());
        // "▁abc": b+c (rank 0) first, then a+bc (rank 2); ▁+a (rank 3) no longer applies.
        Assert.Equal([Bos, Meta, ABC], tok.Encode("abc"));
        // "▁ab": a+b (rank 1), then ▁+ab (rank 4); the stale ▁+a entry is skipped.
        Assert.Equal([Bos, MetaAB], tok.Encode("ab"));
        // "▁abcab": bc, stale ab skipped, ab at the end, a+bc, ▁+abc has no merge.
        Assert.Equal([Bos, Meta, ABC, AB], tok.Encode("abcab"));
        // "▁aaa": ▁+a (rank 3) wins over a+a (rank 5) at the start; then the remaining a+a.
        Assert.Equal([Bos, MetaA, AA], tok.Encode("aaa"));
    }

    [Fact]
    public void EqualRanksMergeLeftmostFirst()
    {
        var tok = Make(WithMetaspace("never", true));
        Assert.Equal([Bos, AA, A], tok.Encode("aaa"));
        Assert.Equal([Bos, AA, AA], tok.Encode("aaaa"));
    }

    [Fact]
    public void StringAndArrayMergeFormsAreEquivalent()
    {
        var a = Make(Legacy(BpeModel(stringMerges: false)));
        var b = Make(Legacy(BpeModel(stringMerges: true)));
        foreach (var text in new[] { "abc", "ab", "abcab", "aaa", "a b c", "cab" })
            Assert.Equal(a.Encode(text), b.Encode(text));
    }

    [Fact]
    public void LegacyNormalizerPrependsAndReplacesSpaces()
    {
        var tok = Make(Legacy());
        Assert.Equal([Bos, MetaAB, MetaAB], tok.Encode("ab ab"));
        Assert.Equal([Bos, Meta, MetaAB], tok.Encode(" ab"));
        Assert.Equal([Bos], tok.Encode(""));
        Assert.Empty(tok.Encode("", addSpecialTokens: false));
        Assert.Equal([MetaAB], tok.Encode("ab", addSpecialTokens: false));
    }

    [Fact]
    public void ByteFallbackEncodesUtf8BytesOfUnknownCharacters()
    {
        var tok = Make(Legacy());
        Assert.Equal([Bos, Meta, Byte(0xC3), Byte(0xA9)], tok.Encode("é"));
        Assert.Equal([Bos, Meta, Byte(0xF0), Byte(0x9F), Byte(0x98), Byte(0x80)], tok.Encode("😀"));
        Assert.Equal([Bos, MetaA, Byte(0xC3), Byte(0xA9), B], tok.Encode("aéb"));
    }

    [Fact]
    public void UnknownCharactersUseTheUnkTokenFusedOrNot()
    {
        var fused = Make(Legacy(BpeModel(byteFallback: false, fuseUnk: true)));
        Assert.Equal([Bos, MetaA, Unk], fused.Encode("ax"));
        Assert.Equal([Bos, Meta, Unk], fused.Encode("xyz"));
        Assert.Equal([Bos, Meta, Unk, A], fused.Encode("xa"));
        var separate = Make(Legacy(BpeModel(byteFallback: false, fuseUnk: false)));
        Assert.Equal([Bos, Meta, Unk, Unk, Unk], separate.Encode("xyz"));
    }

    [Fact]
    public void AddedTokensAreSplitBeforeNormalization()
    {
        var tok = Make(Legacy());
        // Each piece around <s> is normalized on its own, so each gets its own ▁ prefix.
        Assert.Equal([Bos, MetaAB, Bos, MetaAB], tok.Encode("ab<s>ab"));
        Assert.Equal([Bos, MetaA, Tool], tok.Encode("a<tool>"));
        Assert.Equal([Bos, Bos], tok.Encode("<s>"));
        Assert.Equal([Bos, Eos, Bos], tok.Encode("</s><s>"));
    }

    [Fact]
    public void MetaspacePrependSchemes()
    {
        var first = Make(WithMetaspace("first", true));
        Assert.Equal([Bos, MetaAB, MetaAB], first.Encode("ab ab"));
        Assert.Equal([Bos, Bos, AB], first.Encode("<s>ab"));
        Assert.Equal([Bos, MetaAB], first.Encode(" ab"));
        var always = Make(WithMetaspace("always", true));
        Assert.Equal([Bos, Bos, MetaAB], always.Encode("<s>ab"));
        var never = Make(WithMetaspace("never", true));
        Assert.Equal([Bos, AB], never.Encode("ab"));
        Assert.Equal([Bos, AB, MetaAB], never.Encode("ab ab"));
        var noSplit = Make(WithMetaspace("first", false));
        Assert.Equal([Bos, MetaAB, MetaAB], noSplit.Encode("ab ab"));
    }

    [Fact]
    public void IgnoreMergesTakesWholeWordsFromTheVocab()
    {
        Assert.Equal([Bos, CA], Make(WithMetaspace("never", true, BpeModel(ignoreMerges: true))).Encode("ca"));
        Assert.Equal([Bos, C, A], Make(WithMetaspace("never", true, BpeModel(ignoreMerges: false))).Encode("ca"));
    }

    [Fact]
    public void LegacyDecoderHandlesSpacesBytesAndSpecialTokens()
    {
        var tok = Make(Legacy());
        int[] ids = [Bos, MetaAB, Bos, MetaAB];
        Assert.Equal("<s> ab<s> ab", tok.Decode(ids, skipSpecialTokens: false));
        Assert.Equal("ab ab", tok.Decode(ids, skipSpecialTokens: true));
        Assert.Equal("abé", tok.Decode([Bos, MetaAB, Byte(0xC3), Byte(0xA9)]));
        Assert.Equal("a<tool>", tok.Decode([Bos, MetaA, Tool]));
        Assert.Equal("a", tok.Decode([A, 99_999, -1]));
        Assert.Equal("", tok.Decode([]));
    }

    [Fact]
    public void ByteFallbackDecoderReplacesEachByteOfAnInvalidRun()
    {
        var tok = Make(Legacy());
        Assert.Equal("€", tok.Decode([Byte(0xE2), Byte(0x82), Byte(0xAC)]));
        // An incomplete sequence gives one U+FFFD per byte (not one per sequence as lossy UTF-8 decoding would).
        Assert.Equal("\uFFFD\uFFFDa", tok.Decode([Byte(0xE2), Byte(0x82), A]));
        Assert.Equal("a\uFFFD", tok.Decode([A, Byte(0xFF)]));
    }

    [Fact]
    public void MetaspaceDecoderDropsTheFirstMetaSymbolOnlyInTheFirstToken()
    {
        var tok = Make(WithMetaspace("first", true));
        Assert.Equal("<s> ab ab", tok.Decode([Bos, MetaAB, MetaAB], skipSpecialTokens: false));
        Assert.Equal("ab ab", tok.Decode([Bos, MetaAB, MetaAB]));
        var never = Make(WithMetaspace("never", true));
        Assert.Equal(" ab", never.Decode([MetaAB]));
    }

    [Fact]
    public void RoundTripsThroughEncodeAndDecode()
    {
        var tok = Make(Legacy());
        foreach (var text in new[] { "abc ab", "héllo wörld 😀", "  two  spaces ", "line\nbreak" })
            Assert.Equal(text, tok.Decode(tok.Encode(text)));
        // The piece after an added token is normalized separately and gets its own ▁, as in Hugging Face.
        Assert.Equal("x y", tok.Decode(tok.Encode("x<s>y")));
    }

    [Fact]
    public void ConfigAddsBosAndEosWhenThereIsNoPostProcessor()
    {
        var json = Legacy();
        json["post_processor"] = null;
        const string config = """{"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>", "add_bos_token": true, "add_eos_token": true}""";
        var tok = Make(json, config);
        Assert.Equal([Bos, MetaAB, Eos], tok.Encode("ab"));
        Assert.Equal([MetaAB], tok.Encode("ab", addSpecialTokens: false));
        Assert.Equal(Bos, tok.BosTokenId);
        Assert.Equal(Eos, tok.EosTokenId);
        Assert.Equal("<s>", tok.BosToken);
        Assert.Equal([MetaAB], Make(json).Encode("ab"));
    }

    [Fact]
    public void VocabSizeAndSpecialFlags()
    {
        var tok = Make(Legacy());
        Assert.Equal(271, tok.VocabSize);
        Assert.True(tok.IsSpecial(Bos));
        Assert.True(tok.IsSpecial(Unk));
        Assert.False(tok.IsSpecial(Tool));
        Assert.False(tok.IsSpecial(A));
        Assert.False(tok.IsSpecial(-5));
        Assert.Equal("<0x41>", tok.IdToToken(Byte(0x41)));
        Assert.Equal(MetaAB, tok.TokenToId("\u2581ab"));
        Assert.Null(tok.TokenToId("zzz"));
    }

    [Fact]
    public void ChatTemplateListUsesTheDefaultEntry()
    {
        const string config = """
            {"bos_token": "<s>", "eos_token": "</s>",
             "chat_template": [{"name": "tool_use", "template": "tools"},
                               {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.role }}={{ m['content'] }};{% endfor %}{{ eos_token }}"}]}
            """;
        var tok = Make(Legacy(), config);
        Assert.Equal("<s>user=hi;assistant=yo;</s>",
            tok.ApplyChatTemplate([new ChatMessage("user", "hi"), new ChatMessage("assistant", "yo")], false));
    }

    [Fact]
    public void NoChatTemplateIsAnInvalidOperation()
    {
        var tok = Make(Legacy());
        Assert.Null(tok.ChatTemplate);
        Assert.Throws<InvalidOperationException>(() => tok.ApplyChatTemplate([new ChatMessage("user", "x")], true));
    }

    [Fact]
    public void ConcurrentEncodingGivesTheSameIds()
    {
        var tok = Tokenizer.Load(TestPaths.TestData("tokenizers", "metaspace"));
        string text = string.Concat(Enumerable.Repeat("The quick brown fox jumps over the lazy dog, café 日本語. ", 20));
        var expected = tok.Encode(text);
        Parallel.For(0, 16, _ => Assert.Equal(expected, tok.Encode(text)));
    }
}

public class TokenizerNormalizerTests
{
    private static bool NormalizationAvailable()
    {
        try
        {
            return "e\u0301".Normalize(System.Text.NormalizationForm.FormC) == "\u00E9";
        }
        catch (PlatformNotSupportedException)
        {
            return false;
        }
    }

    [Fact]
    public void UnicodeNormalizersComposeOrRefuseToLoad()
    {
        var json = TinyTokenizers.Legacy();
        json["normalizer"] = JsonNode.Parse("""
            {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
            """);
        if (!NormalizationAvailable())
        {
            // Globalization-invariant mode (this repository's setting): string.Normalize does nothing, so loading must fail loudly.
            var ex = Assert.Throws<NotSupportedException>(() => Tokenizer.FromJson(json.ToJsonString()));
            Assert.Contains("tokenizer.json", ex.Message, StringComparison.Ordinal);
            Assert.Contains("'NFC'", ex.Message, StringComparison.Ordinal);
            return;
        }
        var tok = Tokenizer.FromJson(json.ToJsonString());
        // e + combining acute accent becomes é (C3 A9) before byte fallback.
        Assert.Equal([Bos, Meta, Byte(0xC3), Byte(0xA9)], tok.Encode("e\u0301"));
        json["normalizer"] = JsonNode.Parse("""{"type": "NFKC"}""");
        // NFKC folds the full-width ａ into a.
        Assert.Equal([Bos, A], Tokenizer.FromJson(json.ToJsonString()).Encode("\uFF41"));
    }

    [Fact]
    public void RegexReplaceAndLowercase()
    {
        var json = TinyTokenizers.WithMetaspace("never", true);
        json["normalizer"] = JsonNode.Parse("""
            {"type": "Sequence", "normalizers": [{"type": "Lowercase"}, {"type": "Replace", "pattern": {"Regex": "x+"}, "content": "$c"}]}
            """);
        var tok = Tokenizer.FromJson(json.ToJsonString());
        // "ABxxx" -> "abxxx" -> "ab$c": the replacement is literal; $ falls back to its byte.
        Assert.Equal([Bos, AB, Byte((byte)'$'), C], tok.Encode("ABxxx"));
    }
}
