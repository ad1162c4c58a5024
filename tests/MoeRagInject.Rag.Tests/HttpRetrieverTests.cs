using System.Diagnostics;

namespace MoeRagInject.Rag.Tests;

public class HttpRetrieverTests(FakeSearchServer server) : IClassFixture<FakeSearchServer>
{
    private static readonly TimeSpan Generous = TimeSpan.FromSeconds(10);

    private RetrievalService Service(string path, TimeSpan? timeout = null, int topK = 5) =>
        new(new HttpRetriever(new HttpRetrieverOptions { Endpoint = server.Url(path) }), timeout ?? Generous, topK);

    [Fact]
    public async Task GenericContractReturnsPassages()
    {
        var service = Service("generic", topK: 5);
        using var retriever = service.Retriever;
        var result = await service.RetrieveAsync("what is \"quantum\"? 量子", CancellationToken.None);
        Assert.Null(result.Error);
        Assert.Equal(3, result.Passages.Count);
        Assert.Equal(new RetrievedPassage("p1", "First", "echo:what is \"quantum\"? 量子:5", 2.5), result.Passages[0]);
        Assert.Equal("7", result.Passages[1].Id);
        Assert.Equal("a bare string passage", result.Passages[2].Text);
        Assert.Equal(5, (int)server.LastBodies["/generic"]!["top_k"]!);
        Assert.StartsWith("http:generic:http://127.0.0.1:", retriever.Name, StringComparison.Ordinal);
    }

    [Fact]
    public async Task GenericContractHonoursTopKAndOtherShapes()
    {
        var limited = await Service("generic", topK: 2).RetrieveAsync("q", CancellationToken.None);
        Assert.Equal(2, limited.Passages.Count);

        var results = await Service("results").RetrieveAsync("q", CancellationToken.None);
        Assert.Null(results.Error);
        Assert.Equal("from results", results.Passages.Single().Text);
        Assert.Equal(1.0, results.Passages[0].Score);

        var bare = await Service("bare").RetrieveAsync("q", CancellationToken.None);
        Assert.Equal(["one", "two", "three"], bare.Passages.Select(p => p.Text).ToArray());

        var none = await Service("none").RetrieveAsync("q", CancellationToken.None);
        Assert.Null(none.Error);
        Assert.Empty(none.Passages);
    }

    [Fact]
    public async Task ElasticsearchPresetReadsHits()
    {
        using var retriever = (HttpRetriever)RetrieverFactory.Create($"es+{server.BaseUri}wiki", "unused-cache");
        Assert.Equal(server.Url("wiki/_search"), retriever.RequestUri);
        Assert.Equal($"http:elasticsearch:{server.BaseUri}wiki", retriever.Name);
        var result = await new RetrievalService(retriever, Generous, 4).RetrieveAsync("Rhine delta", CancellationToken.None);
        Assert.Null(result.Error);
        Assert.Equal(2, result.Passages.Count); // the hit without _source.text is skipped
        Assert.Equal(new RetrievedPassage("doc-1", "Doc one", "match:Rhine delta:4", 7.25), result.Passages[0]);
        Assert.Equal(new RetrievedPassage("doc-2", null, "another document", 3.5), result.Passages[1]);
        Assert.Equal(4, (int)server.LastBodies["/wiki/_search"]!["size"]!);
    }

    [Fact]
    public async Task ElasticsearchPresetWithPathPrefixAndField()
    {
        using var retriever = RetrieverFactory.Create($"es+{server.BaseUri}prefix/kb?field=content", "unused-cache");
        var result = await new RetrievalService(retriever, Generous, 3).RetrieveAsync("glaciers", CancellationToken.None);
        Assert.Null(result.Error);
        Assert.Equal("content:glaciers", result.Passages.Single().Text);
    }

    [Fact]
    public async Task ElasticsearchErrorsAreReported()
    {
        using var wrongField = new HttpRetriever(new HttpRetrieverOptions
        {
            Endpoint = server.BaseUri,
            Protocol = HttpRetrieverProtocol.Elasticsearch,
            Index = "wiki",
            TextField = "body",
        });
        var result = await new RetrievalService(wrongField, Generous, 3).RetrieveAsync("x", CancellationToken.None);
        Assert.Empty(result.Passages);
        Assert.Contains("_source.body", result.Error, StringComparison.Ordinal);

        using var missing = RetrieverFactory.Create($"es+{server.BaseUri}es-error", "unused-cache");
        result = await new RetrievalService(missing, Generous, 3).RetrieveAsync("x", CancellationToken.None);
        Assert.Contains("404", result.Error, StringComparison.Ordinal);
        Assert.Contains("index_not_found_exception", result.Error, StringComparison.Ordinal);

        using var shape = RetrieverFactory.Create($"es+{server.BaseUri}es-shape", "unused-cache");
        result = await new RetrievalService(shape, Generous, 3).RetrieveAsync("x", CancellationToken.None);
        Assert.Contains("hits.hits", result.Error, StringComparison.Ordinal);
    }

    [Fact]
    public async Task ServerDownIsAnError()
    {
        int port = FakeSearchServer.ClosedPort();
        using var retriever = new HttpRetriever(new HttpRetrieverOptions { Endpoint = new Uri($"http://127.0.0.1:{port}/search") });
        var clock = Stopwatch.StartNew();
        var result = await new RetrievalService(retriever, Generous, 3).RetrieveAsync("anything", CancellationToken.None);
        Assert.Empty(result.Passages);
        Assert.NotNull(result.Error);
        Assert.Contains("could not be reached", result.Error, StringComparison.Ordinal);
        Assert.Contains($"127.0.0.1:{port}", result.Error, StringComparison.Ordinal);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(5), $"took {clock.Elapsed}");
    }

    [Fact]
    public async Task SlowServerTimesOutWithinBoundedTime()
    {
        var clock = Stopwatch.StartNew();
        var result = await Service("slow", timeout: TimeSpan.FromMilliseconds(300)).RetrieveAsync("q", CancellationToken.None);
        Assert.Empty(result.Passages);
        Assert.Contains("timed out after 300 ms", result.Error, StringComparison.Ordinal);
        Assert.InRange(result.Latency, TimeSpan.FromMilliseconds(250), TimeSpan.FromSeconds(3));
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(3), $"took {clock.Elapsed}");

        // The retriever's own timeout, under a generous service timeout.
        using var own = new HttpRetriever(new HttpRetrieverOptions { Endpoint = server.Url("slow"), Timeout = TimeSpan.FromMilliseconds(300) });
        clock.Restart();
        var ownResult = await new RetrievalService(own, Generous, 3).RetrieveAsync("q", CancellationToken.None);
        Assert.Contains("timeout of 300 ms", ownResult.Error, StringComparison.Ordinal);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(3), $"took {clock.Elapsed}");
        await Assert.ThrowsAsync<TimeoutException>(() => own.RetrieveAsync("q", 3, CancellationToken.None));
    }

    [Theory]
    [InlineData("html", "HTML")]
    [InlineData("wrong-shape", "answer, docs")]
    [InlineData("no-text", "without a string \"text\"")]
    [InlineData("numbers", "passage 0 as a JSON number")]
    [InlineData("fail", "HTTP 500")]
    [InlineData("empty", "empty body")]
    [InlineData("truncated", "instead of JSON")]
    [InlineData("does-not-exist", "HTTP 404")]
    public async Task GarbageAnswersAreErrors(string path, string expected)
    {
        var result = await Service(path).RetrieveAsync("q", CancellationToken.None);
        Assert.Empty(result.Passages);
        Assert.NotNull(result.Error);
        Assert.Contains(expected, result.Error, StringComparison.Ordinal);
        Assert.Contains(path, result.Error, StringComparison.Ordinal);
    }

    [Fact]
    public async Task ServerErrorBodyIsQuoted()
    {
        var result = await Service("fail").RetrieveAsync("q", CancellationToken.None);
        Assert.Contains("internal kaboom", result.Error, StringComparison.Ordinal);
    }

    [Fact]
    public async Task CallerCancellationPropagates()
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromMilliseconds(200));
        var clock = Stopwatch.StartNew();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => Service("slow").RetrieveAsync("q", cts.Token));
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(3));
    }
}
