namespace MoeRagInject.Rag.Tests;

public sealed class RetrieverFactoryTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    [Fact]
    public async Task JsonlCorpusIsIndexedIntoTheCacheAndReused()
    {
        string corpus = _dir.Write("kb.jsonl", "{\"id\": \"a\", \"text\": \"Saturn has rings of ice.\"}\n");
        string cache = _dir.File("cache");
        string firstPath;
        using (var retriever = RetrieverFactory.Create(corpus, cache))
        {
            var fts = Assert.IsType<SqliteFtsRetriever>(retriever);
            firstPath = fts.IndexPath;
            Assert.Equal(cache, Path.GetDirectoryName(firstPath));
            Assert.Equal("a", (await retriever.RetrieveAsync("saturn rings", 1, CancellationToken.None))[0].Id);
        }

        var stamp = File.GetLastWriteTimeUtc(firstPath);
        using (var again = (SqliteFtsRetriever)RetrieverFactory.Create(corpus, cache))
        {
            Assert.Equal(firstPath, again.IndexPath);
            Assert.Equal(stamp, File.GetLastWriteTimeUtc(firstPath));
        }

        File.AppendAllText(corpus, "{\"id\": \"b\", \"text\": \"Jupiter is a gas giant.\"}\n");
        File.SetLastWriteTimeUtc(corpus, DateTime.UtcNow.AddMinutes(1));
        using (var rebuilt = (SqliteFtsRetriever)RetrieverFactory.Create(corpus, cache))
        {
            Assert.NotEqual(firstPath, rebuilt.IndexPath);
            Assert.Equal("b", (await rebuilt.RetrieveAsync("jupiter", 1, CancellationToken.None))[0].Id);
        }

        Assert.False(File.Exists(firstPath));
        Assert.Single(Directory.GetFiles(cache));
    }

    [Fact]
    public void IndexFilesOpenAndMissingOnesFail()
    {
        string corpus = _dir.Write("c.jsonl", "{\"text\": \"hello world\"}\n");
        string db = _dir.File("built.db");
        CorpusIndex.Build([corpus], db);
        using (var retriever = RetrieverFactory.Create(db, _dir.File("cache")))
        {
            Assert.IsType<SqliteFtsRetriever>(retriever);
        }

        File.Copy(db, _dir.File("copy.sqlite"));
        using (var sqlite = RetrieverFactory.Create(_dir.File("copy.sqlite"), _dir.File("cache")))
        {
            Assert.IsType<SqliteFtsRetriever>(sqlite);
        }

        var missing = Assert.Throws<FileNotFoundException>(() => RetrieverFactory.Create(_dir.File("missing.db"), _dir.File("cache")));
        Assert.Contains("missing.db", missing.Message, StringComparison.Ordinal);
        Assert.Throws<FileNotFoundException>(() => RetrieverFactory.Create(_dir.File("missing.jsonl"), _dir.File("cache")));
    }

    [Fact]
    public void UrlsMakeHttpRetrievers()
    {
        using var generic = Assert.IsType<HttpRetriever>(RetrieverFactory.Create("http://127.0.0.1:8080/search", "c"));
        Assert.Equal(HttpRetrieverProtocol.Generic, generic.Options.Protocol);
        Assert.Equal("http:generic:http://127.0.0.1:8080/search", generic.Name);

        using var es = Assert.IsType<HttpRetriever>(RetrieverFactory.Create("es+https://user:secret@127.0.0.1:9200/wiki?field=content&title=heading", "c"));
        Assert.Equal(HttpRetrieverProtocol.Elasticsearch, es.Options.Protocol);
        Assert.Equal("wiki", es.Options.Index);
        Assert.Equal("content", es.Options.TextField);
        Assert.Equal("heading", es.Options.TitleField);
        Assert.Equal(new Uri("https://127.0.0.1:9200/wiki/_search"), es.RequestUri);
        Assert.Equal("http:elasticsearch:https://127.0.0.1:9200/wiki", es.Name);
        Assert.DoesNotContain("secret", es.Name, StringComparison.Ordinal);
        Assert.Equal("{\"size\":3,\"query\":{\"match\":{\"content\":\"q \\u0022x\\u0022\"}}}", es.BuildRequestBody("q \"x\"", 3));
    }

    [Theory]
    [InlineData("ftp://example/index")]
    [InlineData("corpus.txt")]
    [InlineData("no-extension")]
    [InlineData("es+http://127.0.0.1:9200/")]
    [InlineData("es+http://127.0.0.1:9200/idx?bogus=1")]
    [InlineData("  ")]
    public void UnknownSpecsAreArgumentErrors(string spec)
    {
        var ex = Assert.Throws<ArgumentException>(() => RetrieverFactory.Create(spec, _dir.File("cache")));
        if (!string.IsNullOrWhiteSpace(spec))
        {
            Assert.Contains(spec.Trim(), ex.Message, StringComparison.Ordinal);
        }

        if (!spec.StartsWith("es+", StringComparison.Ordinal))
        {
            Assert.Contains("*.jsonl", ex.Message, StringComparison.Ordinal);
            Assert.Contains("es+http", ex.Message, StringComparison.Ordinal);
        }
    }
}
