using System.Text;
using MoeRagInject.Engine.Output;
using MoeRagInject.Model;
using MoeRagInject.Model.Tokenization;

namespace MoeRagInject.Engine.Tests;

/// <summary>Output processing against independent truth: the tokenizer's whole-sequence decode, and a plain search for the first stop string.</summary>
public sealed class OutputTests
{
    public static TheoryData<string> Tokenizers => new() { "legacy", "metaspace", "demo" };

    private static Tokenizer Load(string name) => name == "demo"
        ? Tokenizer.Load(TestPaths.DemoModel)
        : Tokenizer.Load(Path.Combine(TestPaths.RepoRoot, "tests", "data", "tokenizers", name));

    private static readonly string[] Texts =
    [
        "The quick brown fox jumps over the lazy dog.",
        "naïve café — déjà vu, 東京タワー and 🦊🐕 emoji ‘quotes’ …",
        "  leading spaces, trailing spaces  ",
        "x = 3 . y ? z ! don't stop 'em ,now",
        "Ωmega ∑ ∫ ≤ ≥ → ⇒ ∀ ∃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    ];

    /// <summary>
    /// Random token sequences (encoded texts cut at random points, byte-fallback tokens of multi-byte characters included,
    /// random ids mixed in): the pieces the incremental decoder emits, plus its flush, are exactly the whole decode.
    /// </summary>
    [Theory]
    [MemberData(nameof(Tokenizers))]
    public void IncrementalDecodingJoinsToTheWholeDecode(string name)
    {
        var tokenizer = Load(name);
        var rng = new SplitMix64(17);
        var vocab = tokenizer.VocabSize;
        for (var trial = 0; trial < 200; trial++)
        {
            var ids = new List<int>();
            var text = Texts[trial % Texts.Length];
            var encoded = tokenizer.Encode(text, addSpecialTokens: false);
            var start = (int)(rng.NextUInt64() % (ulong)encoded.Length);
            ids.AddRange(encoded[start..]);
            for (var extra = (int)(rng.NextUInt64() % 6); extra > 0; extra--)
                ids.Insert((int)(rng.NextUInt64() % (ulong)(ids.Count + 1)), (int)(rng.NextUInt64() % (ulong)vocab));
            foreach (var skipSpecial in new[] { true, false })
            {
                var decoder = new IncrementalDetokenizer(tokenizer, skipSpecial);
                var streamed = new StringBuilder();
                foreach (var id in ids) streamed.Append(decoder.Push(id));
                streamed.Append(decoder.Flush());
                Assert.Equal(tokenizer.Decode(ids.ToArray(), skipSpecial), streamed.ToString());
            }
        }
    }

    [Theory]
    [MemberData(nameof(Tokenizers))]
    public void IncompleteCharactersAreHeldUntilTheyComplete(string name)
    {
        var tokenizer = Load(name);
        var ids = tokenizer.Encode("🦊", addSpecialTokens: false);
        var decoder = new IncrementalDetokenizer(tokenizer, skipSpecialTokens: true);
        var pieces = ids.Select(decoder.Push).ToList();
        Assert.All(pieces, p => Assert.DoesNotContain('\uFFFD', p));
        Assert.Equal(tokenizer.Decode(ids), string.Concat(pieces) + decoder.Flush());
        // Once a token that is not a byte follows, the character comes out whole.
        var next = tokenizer.Encode(" fox", addSpecialTokens: false);
        Assert.StartsWith("🦊", string.Concat(ids.Concat(next).Select(new IncrementalDetokenizer(tokenizer, true).Push)));
    }

    /// <summary>
    /// Random texts fed in random pieces (as tokens deliver text) with stop strings that span the pieces: what is released
    /// equals the plain answer: at the first piece boundary where the text so far contains a stop string, the text before the
    /// earliest such occurrence (through it with no_stop_trim); the whole text when none ever appears.
    /// </summary>
    [Fact]
    public void StopStringsAreHeldBackUntilTheyCanNoLongerMatch()
    {
        var rng = new SplitMix64(5);
        const string alphabet = "ab é→🦊 ";
        for (var trial = 0; trial < 2000; trial++)
        {
            var text = new StringBuilder();
            for (var n = (int)(rng.NextUInt64() % 40); n > 0; n--) text.Append(RandomPiece(rng, alphabet));
            var whole = text.ToString();
            var stops = Enumerable.Range(0, 1 + (int)(rng.NextUInt64() % 3)).Select(_ =>
            {
                if (whole.Length > 3 && rng.NextUInt64() % 2 == 0)
                {
                    var at = (int)(rng.NextUInt64() % (ulong)(whole.Length - 1));
                    return whole.Substring(at, 1 + (int)(rng.NextUInt64() % (ulong)Math.Min(4, whole.Length - at)));
                }
                var random = new StringBuilder();
                for (var n = 1 + (int)(rng.NextUInt64() % 3); n > 0; n--) random.Append(RandomPiece(rng, alphabet));
                return random.ToString();
            }).ToList();
            var pieces = new List<string>();
            for (var position = 0; position < whole.Length;)
            {
                var length = Math.Min(whole.Length - position, 1 + (int)(rng.NextUInt64() % 5));
                if (char.IsHighSurrogate(whole[position + length - 1]) && position + length < whole.Length) length++;
                pieces.Add(whole.Substring(position, length));
                position += length;
            }
            foreach (var noStopTrim in new[] { false, true })
            {
                var matcher = new StopMatcher(stops, noStopTrim);
                var released = new StringBuilder();
                var seen = 0;
                foreach (var piece in pieces)
                {
                    released.Append(matcher.Push(piece));
                    seen += piece.Length;
                    if (matcher.Matched is not null) break;
                    // Text is held back no longer than a stop string could still need: less than the longest one.
                    Assert.True(seen - released.Length < stops.Max(s => s.Length), "text held back too long");
                }
                if (matcher.Matched is null) released.Append(matcher.Flush());
                Assert.True(Expected(pieces, stops, noStopTrim) == released.ToString(),
                    $"text {Escape(whole)}, stops [{string.Join(", ", stops.Select(Escape))}], no_stop_trim {noStopTrim}: released {Escape(released.ToString())}");
            }
        }
    }

    private static string Expected(List<string> pieces, IReadOnlyList<string> stops, bool noStopTrim)
    {
        var text = "";
        foreach (var piece in pieces)
        {
            text += piece;
            int best = -1, length = 0;
            foreach (var stop in stops)
            {
                var at = text.IndexOf(stop, StringComparison.Ordinal);
                if (at >= 0 && (best < 0 || at < best))
                {
                    best = at;
                    length = stop.Length;
                }
            }
            if (best >= 0) return noStopTrim ? text[..(best + length)] : text[..best];
        }
        return text;
    }

    private static string Escape(string s) => string.Concat(s.Select(c => c < 128 && !char.IsControl(c) ? c.ToString() : $"\\u{(int)c:X4}"));

    private static string RandomPiece(SplitMix64 rng, string alphabet)
    {
        var runes = alphabet.EnumerateRunes().ToArray();
        return runes[(int)(rng.NextUInt64() % (ulong)runes.Length)].ToString();
    }
}
