using System.Text;
using System.Text.Json;
using MoeRagInject.Model.Tokenization;

namespace MoeRagInject.Model.Tests;

/// <summary>
/// Cross-checks the heap/linked-list BPE against a deliberately naive implementation (repeatedly merge the leftmost
/// lowest-rank pair) on random text, using the reference vocabulary and merges.
/// </summary>
public class BpeCrossCheckTests
{
    private sealed class NaiveLegacyBpe
    {
        private readonly Dictionary<string, int> _vocab = new(StringComparer.Ordinal);
        private readonly Dictionary<(string, string), int> _ranks = new();

        public NaiveLegacyBpe(string tokenizerJsonPath)
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(tokenizerJsonPath));
            var model = doc.RootElement.GetProperty("model");
            foreach (var p in model.GetProperty("vocab").EnumerateObject()) _vocab[p.Name] = p.Value.GetInt32();
            int rank = 0;
            foreach (var m in model.GetProperty("merges").EnumerateArray())
                _ranks[(m[0].GetString()!, m[1].GetString()!)] = rank++;
        }

        /// <summary>Llama legacy pipeline for text without added tokens: prepend ▁, spaces to ▁, one word.</summary>
        public List<int> Encode(string text)
        {
            if (text.Length == 0) return [];
            string word = "\u2581" + text.Replace(' ', '\u2581');
            var symbols = new List<string>();
            foreach (var rune in word.EnumerateRunes())
            {
                string s = rune.ToString();
                if (_vocab.ContainsKey(s)) symbols.Add(s);
                else foreach (byte b in Encoding.UTF8.GetBytes(s)) symbols.Add($"<0x{b:X2}>");
            }
            while (true)
            {
                int best = -1, bestRank = int.MaxValue;
                for (int i = 0; i + 1 < symbols.Count; i++)
                {
                    if (_ranks.TryGetValue((symbols[i], symbols[i + 1]), out int r) && r < bestRank)
                    {
                        best = i;
                        bestRank = r;
                    }
                }
                if (best < 0) break;
                symbols[best] += symbols[best + 1];
                symbols.RemoveAt(best + 1);
            }
            return symbols.Select(s => _vocab[s]).ToList();
        }
    }

    [Fact]
    public void HeapBpeEqualsNaiveBpeOnRandomText()
    {
        string path = TestPaths.TestData("tokenizers", "legacy", "tokenizer.json");
        var tok = Tokenizer.LoadFiles(path, null);
        var naive = new NaiveLegacyBpe(path);
        const string alphabet = "etaoinshrdlucmfwypvbgkqjxz ETAOINS.,!?'-\n0123456789éü日🙂";
        var runes = alphabet.EnumerateRunes().Select(r => r.ToString()).ToArray();
        var rng = new Random(12345);
        for (int n = 0; n < 3000; n++)
        {
            int len = rng.Next(1, 80);
            var sb = new StringBuilder();
            for (int i = 0; i < len; i++) sb.Append(runes[rng.Next(runes.Length)]);
            string text = sb.ToString();
            Assert.True(naive.Encode(text).SequenceEqual(tok.Encode(text, addSpecialTokens: false)), $"text: {JsonSerializer.Serialize(text)}");
            Assert.Equal(text, tok.Decode(tok.Encode(text)));
        }
    }
}
