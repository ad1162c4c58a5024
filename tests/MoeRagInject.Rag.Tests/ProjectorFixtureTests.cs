using System.Text.Json.Nodes;

namespace MoeRagInject.Rag.Tests;

/// <summary>
/// Files that tools/projector writes (Python) read by the engine as they were meant: projector files (linear, mlp, an
/// attention reader over 3 rows, one case cut at them, and the same reader with one vector for each of 2 answer
/// positions) against a Python double-precision oracle, and the retriever against the Python replica that picks the training passages.
/// </summary>
public sealed class ProjectorFixtureTests
{
    private static readonly string s_root = FindRoot();
    private static readonly string s_fixtures = Path.Combine(s_root, "tests", "data", "projector");

    private static string FindRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "MoeRagInject.slnx")))
            {
                return dir.FullName;
            }
        }

        throw new InvalidOperationException("repository root (MoeRagInject.slnx) not found above " + AppContext.BaseDirectory);
    }

    [Fact]
    public void PythonWrittenProjectorsGiveThePythonOraclesInjection()
    {
        var fixture = JsonNode.Parse(File.ReadAllText(Path.Combine(s_fixtures, "format-fixture.json")))!;
        int vocab = fixture["vocab"]!.GetValue<int>();
        int hidden = fixture["hidden"]!.GetValue<int>();
        float[] table = [.. fixture["embeddings"]!.AsArray().Select(v => (float)v!.GetValue<double>())];
        var embeddings = new ArrayEmbeddings(table, vocab, hidden);
        var cases = fixture["cases"]!.AsArray();
        Assert.Equal(12, cases.Count);
        foreach (var c in cases)
        {
            var file = c!["file"]!.GetValue<string>();
            var injector = ContextInjector.LoadFromFile(embeddings, Path.Combine(s_fixtures, file));
            var kind = c["kind"]!.GetValue<string>();
            Assert.Equal(kind switch { "mlp" => ProjectorArchitecture.Mlp, "attn" => ProjectorArchitecture.Attn, _ => ProjectorArchitecture.Linear }, injector.Architecture);
            Assert.Equal(c["layers"]!.AsArray().Select(x => x!.GetValue<int>()), injector.Layers!);
            float alpha = (float)c["alpha"]!.GetValue<double>();
            Assert.Equal(alpha, injector.Alpha);
            int[] ids = [.. c["token_ids"]!.AsArray().Select(x => x!.GetValue<int>())];
            int positions = c["answer_positions"]!.GetValue<int>();
            Assert.Equal(positions, injector.AnswerPositions);
            var actual = new float[positions * hidden];
            injector.ComputeInjection(ids, alpha, actual);
            var expected = c["expected"]!.AsArray().Select(x => x!.GetValue<double>()).ToArray();
            Assert.Equal(actual.Length, expected.Length);
            for (int i = 0; i < actual.Length; i++)
            {
                Assert.True(Math.Abs(expected[i] - actual[i]) < 1e-5 * Math.Max(1, Math.Abs(expected[i])), $"{file} {string.Join(",", ids)}: v[{i}] = {actual[i]}, oracle {expected[i]}");
            }
        }
    }

    [Fact]
    public async Task TheEnginesRetrieverReturnsWhatThePythonReplicaReturns()
    {
        var fixture = JsonNode.Parse(File.ReadAllText(Path.Combine(s_fixtures, "retrieval-fixture.json")))!;
        var corpus = Path.Combine(s_root, fixture["corpus"]!.GetValue<string>());
        if (!File.Exists(corpus))
        {
            Assert.Fail($"{corpus} is missing");
        }

        using var dir = new TempDir();
        string index = dir.File("demo.db");
        CorpusIndex.Build([corpus], index);
        using var retriever = new SqliteFtsRetriever(index);
        int k = fixture["top_k"]!.GetValue<int>();
        foreach (var c in fixture["cases"]!.AsArray())
        {
            var query = c!["query"]!.GetValue<string>();
            var hits = await retriever.RetrieveAsync(query, k, CancellationToken.None);
            Assert.Equal(c["ids"]!.AsArray().Select(x => x!.GetValue<string>()), hits.Select(h => h.Id));
        }
    }
}
