namespace MoeRagInject.Rag.Tests;

public sealed class CorpusIndexTests : IDisposable
{
    private const string Jsonl = """
        {"id": "photo", "title": "Photosynthesis", "text": "Plants use chlorophyll to turn sunlight, water and carbon dioxide into glucose and oxygen."}
        {"id": "quantum", "title": "Quantum", "text": "In physics, a quantum is the minimum amount of any physical entity involved in an interaction."}

        {"id": 42, "text": "The Rhine flows from the Swiss Alps to the North Sea through Germany and the Netherlands."}
        {"text": "Mitochondria are the powerhouse of the cell and produce most of its chemical energy.", "title": null}
        {"id": "ecole", "title": "École", "text": "L'École polytechnique est une grande école d'ingénieurs. 量子 力学 是 物理学 的 分支。"}
        """;

    private readonly TempDir _dir = new();
    private readonly string _index;
    private readonly string _notes;

    public CorpusIndexTests()
    {
        string jsonl = _dir.Write("corpus.jsonl", Jsonl);
        string longParagraph = string.Join(" ", Enumerable.Range(1, 30).Select(i => $"Sentence number {i} talks about volcanoes and lava."));
        _notes = _dir.Write("notes.txt",
            "Glaciers are slow rivers of ice.\nThey carve valleys over\nthousands of years.\n\n\n" +
            longParagraph + "\n   \n" +
            "Honeybees communicate with a waggle dance.\r\n");
        _index = _dir.File("index.db");
        Added = CorpusIndex.Build([jsonl, _notes], _index, maxPassageChars: 200);
    }

    private int Added { get; }

    public void Dispose() => _dir.Dispose();

    [Fact]
    public void BuildCountsAndSplitsPlainText()
    {
        using var retriever = new SqliteFtsRetriever(_index);
        Assert.Equal(Added, retriever.CountPassages());
        Assert.StartsWith("sqlite-fts5:", retriever.Name, StringComparison.Ordinal);
        // 5 JSONL passages; notes: glaciers, the long paragraph (30 × ~52 chars ≈ 1570 chars → at least 8 pieces of ≤ 200), honeybees.
        Assert.True(Added >= 5 + 1 + 8 + 1, $"added {Added}");
    }

    [Fact]
    public async Task Bm25RanksThePassageWithTheQueryTermsFirst()
    {
        using var retriever = new SqliteFtsRetriever(_index);
        var hits = await retriever.RetrieveAsync("How do plants use chlorophyll and sunlight?", 3, CancellationToken.None);
        Assert.NotEmpty(hits);
        Assert.Equal("photo", hits[0].Id);
        Assert.Equal("Photosynthesis", hits[0].Title);
        Assert.Contains("chlorophyll", hits[0].Text, StringComparison.Ordinal);
        Assert.True(hits.Zip(hits.Skip(1)).All(p => p.First.Score >= p.Second.Score), "scores descend");

        var rhine = await retriever.RetrieveAsync("which sea does the Rhine reach", 2, CancellationToken.None);
        Assert.Equal("42", rhine[0].Id);

        var mito = await retriever.RetrieveAsync("mitochondria energy", 1, CancellationToken.None);
        Assert.Single(mito);
        Assert.Equal("corpus.jsonl#5", mito[0].Id); // no id: file name and line number (line 4 is blank)
        Assert.Null(mito[0].Title);
    }

    [Fact]
    public async Task PlainTextPassagesHaveFileIdsAndJoinedLines()
    {
        using var retriever = new SqliteFtsRetriever(_index);
        var glacier = await retriever.RetrieveAsync("glaciers carve valleys", 1, CancellationToken.None);
        Assert.Equal("notes.txt#1", glacier[0].Id);
        Assert.Equal("Glaciers are slow rivers of ice. They carve valleys over thousands of years.", glacier[0].Text);

        var bees = await retriever.RetrieveAsync("waggle dance", 1, CancellationToken.None);
        Assert.Equal("Honeybees communicate with a waggle dance.", bees[0].Text);

        var lava = await retriever.RetrieveAsync("volcanoes lava", 50, CancellationToken.None);
        var pieces = lava.Where(p => p.Id.StartsWith("notes.txt#", StringComparison.Ordinal)).ToList();
        Assert.True(pieces.Count >= 8);
        Assert.All(pieces, p =>
        {
            Assert.InRange(p.Text.Length, 1, 200);
            Assert.EndsWith("lava.", p.Text, StringComparison.Ordinal); // cut at a sentence boundary
        });
        Assert.True(pieces.Count(p => p.Text.Length >= 100) >= pieces.Count - 1, "only the paragraph's tail may be short");
    }

    [Fact]
    public async Task UnicodeAndDiacriticsMatch()
    {
        using var retriever = new SqliteFtsRetriever(_index);
        Assert.Equal("ecole", (await retriever.RetrieveAsync("Ecole polytechnique", 1, CancellationToken.None))[0].Id);
        Assert.Equal("ecole", (await retriever.RetrieveAsync("ÉCOLE", 1, CancellationToken.None))[0].Id);
        Assert.Equal("ecole", (await retriever.RetrieveAsync("什么 量子?", 1, CancellationToken.None))[0].Id);
    }

    [Theory]
    [InlineData("")]
    [InlineData("   ")]
    [InlineData("\"")]
    [InlineData("\"unbalanced quote")]
    [InlineData("AND")]
    [InlineData("OR NOT AND")]
    [InlineData("NEAR(")]
    [InlineData("NEAR(quantum physics, 3)")]
    [InlineData("*")]
    [InlineData("quant*")]
    [InlineData("title:quantum")]
    [InlineData("text: -physics")]
    [InlineData("-")]
    [InlineData("^quantum")]
    [InlineData("(((")]
    [InlineData(")) OR ((")]
    [InlineData("{title text}: quantum")]
    [InlineData("'; DROP TABLE passages; --")]
    [InlineData("😀 量子 Ünïcödé \u0301\u200b")]
    [InlineData("\0\u0001\t\n")]
    [InlineData("a\"b\"\"c")]
    [InlineData("+ - * / : ; , . ! ?")]
    public async Task NastyQueriesNeverThrow(string query)
    {
        using var retriever = new SqliteFtsRetriever(_index);
        var hits = await retriever.RetrieveAsync(query, 5, CancellationToken.None);
        Assert.NotNull(hits);
        Assert.True(hits.Count <= 5);
    }

    [Fact]
    public async Task OperatorWordsAreSearchedAsWordsAndEmptyQueriesFindNothing()
    {
        using var retriever = new SqliteFtsRetriever(_index);
        Assert.Empty(await retriever.RetrieveAsync("", 5, CancellationToken.None));
        Assert.Empty(await retriever.RetrieveAsync("?!. ,;:-*\"()", 5, CancellationToken.None));
        var hits = await retriever.RetrieveAsync("NEAR(quantum AND physics*", 5, CancellationToken.None);
        Assert.Equal("quantum", hits[0].Id);
        string longQuery = string.Join(" ", Enumerable.Repeat("lorem \"ipsum\" OR NEAR(dolor)", 2000)) + " Rhine";
        Assert.NotNull(await retriever.RetrieveAsync(longQuery, 5, CancellationToken.None));
    }

    [Fact]
    public async Task ConcurrentQueriesAgree()
    {
        using var retriever = new SqliteFtsRetriever(_index);
        var results = await Task.WhenAll(Enumerable.Range(0, 32).Select(i =>
            retriever.RetrieveAsync(i % 2 == 0 ? "chlorophyll sunlight" : "Rhine North Sea", 3, CancellationToken.None)));
        for (int i = 0; i < results.Length; i++)
        {
            Assert.Equal(i % 2 == 0 ? "photo" : "42", results[i][0].Id);
        }
    }

    [Fact]
    public async Task RebuildingReplacesPassagesWithTheSameId()
    {
        int before;
        using (var retriever = new SqliteFtsRetriever(_index))
        {
            before = (int)retriever.CountPassages();
        }

        string update = _dir.Write("update.jsonl", "{\"id\": \"photo\", \"text\": \"Updated text about zeppelins.\"}\n");
        Assert.Equal(1, CorpusIndex.Build([update], _index));
        using var again = new SqliteFtsRetriever(_index);
        Assert.Equal(before, again.CountPassages());
        Assert.Empty(await again.RetrieveAsync("chlorophyll", 5, CancellationToken.None));
        Assert.Equal("photo", (await again.RetrieveAsync("zeppelins", 5, CancellationToken.None))[0].Id);
    }

    [Fact]
    public void MalformedJsonlNamesFileAndLine()
    {
        string bad = _dir.Write("bad.jsonl", "{\"text\": \"fine\"}\n\n{\"text\": \"broken\"\n");
        var ex = Assert.Throws<InvalidDataException>(() => CorpusIndex.Build([bad], _dir.File("bad.db")));
        Assert.Contains("bad.jsonl:3", ex.Message, StringComparison.Ordinal);

        string noText = _dir.Write("notext.jsonl", "{\"title\": \"x\"}\n");
        ex = Assert.Throws<InvalidDataException>(() => CorpusIndex.Build([noText], _dir.File("bad.db")));
        Assert.Contains("notext.jsonl:1", ex.Message, StringComparison.Ordinal);
        Assert.Contains("text", ex.Message, StringComparison.Ordinal);

        string array = _dir.Write("array.jsonl", "[1, 2]\n");
        ex = Assert.Throws<InvalidDataException>(() => CorpusIndex.Build([array], _dir.File("bad.db")));
        Assert.Contains("array.jsonl:1", ex.Message, StringComparison.Ordinal);

        Assert.Throws<FileNotFoundException>(() => CorpusIndex.Build([_dir.File("nope.jsonl")], _dir.File("bad.db")));
    }

    [Fact]
    public void RetrieverRejectsMissingAndForeignFiles()
    {
        Assert.Throws<FileNotFoundException>(() => new SqliteFtsRetriever(_dir.File("missing.db")));
        string text = _dir.Write("fake.db", "not a database");
        Assert.Throws<InvalidDataException>(() => new SqliteFtsRetriever(text));
    }

    [Fact]
    public async Task CancelledCallerTokenCancels()
    {
        using var retriever = new SqliteFtsRetriever(_index);
        using var cts = new CancellationTokenSource();
        await cts.CancelAsync();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => retriever.RetrieveAsync("quantum", 3, cts.Token));
    }
}
