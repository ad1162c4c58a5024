using System.Diagnostics;

namespace MoeRagInject.Rag.Tests;

public class RetrievalServiceTests
{
    private sealed class FakeRetriever(Func<string, int, CancellationToken, Task<IReadOnlyList<RetrievedPassage>>> body) : IRetriever
    {
        public string Name => "fake";

        public Task<IReadOnlyList<RetrievedPassage>> RetrieveAsync(string query, int topK, CancellationToken cancellationToken) =>
            body(query, topK, cancellationToken);

        public void Dispose()
        {
        }
    }

    private static RetrievalService Service(Func<string, int, CancellationToken, Task<IReadOnlyList<RetrievedPassage>>> body, int timeoutMs = 5000, int topK = 3) =>
        new(new FakeRetriever(body), TimeSpan.FromMilliseconds(timeoutMs), topK);

    [Fact]
    public async Task PassesQueryAndTopKAndTrimsResults()
    {
        string? seenQuery = null;
        int seenK = 0;
        var service = Service((q, k, _) =>
        {
            seenQuery = q;
            seenK = k;
            IReadOnlyList<RetrievedPassage> list = [.. Enumerable.Range(0, 5).Select(i => new RetrievedPassage($"{i}", null, $"text {i}", 5 - i))];
            return Task.FromResult(list);
        }, topK: 3);
        var result = await service.RetrieveAsync("hello", CancellationToken.None);
        Assert.Null(result.Error);
        Assert.True(result.Succeeded);
        Assert.Equal("hello", seenQuery);
        Assert.Equal(3, seenK);
        Assert.Equal(3, result.Passages.Count);
        Assert.True(result.Latency >= TimeSpan.Zero);
    }

    [Fact]
    public async Task ExceptionsBecomeErrors()
    {
        var asyncThrow = await Service(async (_, _, ct) =>
        {
            await Task.Yield();
            throw new InvalidOperationException("backend exploded");
        }).RetrieveAsync("q", CancellationToken.None);
        Assert.Contains("backend exploded", asyncThrow.Error, StringComparison.Ordinal);
        Assert.StartsWith("fake: ", asyncThrow.Error, StringComparison.Ordinal);
        Assert.Empty(asyncThrow.Passages);

        var syncThrow = await Service((_, _, _) => throw new IOException("disk on fire")).RetrieveAsync("q", CancellationToken.None);
        Assert.Contains("disk on fire", syncThrow.Error, StringComparison.Ordinal);

        var nullList = await Service((_, _, _) => Task.FromResult<IReadOnlyList<RetrievedPassage>>(null!)).RetrieveAsync("q", CancellationToken.None);
        Assert.NotNull(nullList.Error);

        var blank = await Service((_, _, _) => Task.FromResult<IReadOnlyList<RetrievedPassage>>([new("a", null, "  ", 1)])).RetrieveAsync("q", CancellationToken.None);
        Assert.Contains("empty", blank.Error, StringComparison.Ordinal);

        var emptyQuery = await Service((_, _, _) => throw new InvalidOperationException("must not be called")).RetrieveAsync(" ", CancellationToken.None);
        Assert.Equal("empty query", emptyQuery.Error);
    }

    [Fact]
    public async Task RetrieverIgnoringItsTokenStillTimesOut()
    {
        var clock = Stopwatch.StartNew();
        var result = await Service(async (_, _, _) =>
        {
            await Task.Delay(5000, CancellationToken.None);
            return [];
        }, timeoutMs: 200).RetrieveAsync("q", CancellationToken.None);
        Assert.Contains("timed out after 200 ms", result.Error, StringComparison.Ordinal);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(2), $"took {clock.Elapsed}");
    }

    [Fact]
    public async Task CallerCancellationThrows()
    {
        using var cts = new CancellationTokenSource();
        var service = Service(async (_, _, ct) =>
        {
            await Task.Delay(5000, ct);
            return [];
        });
        var pending = service.RetrieveAsync("q", cts.Token);
        await cts.CancelAsync();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => pending);

        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => service.RetrieveAsync("q", cts.Token));
    }

    [Fact]
    public async Task CallerCancellationWinsOverARetrieverException()
    {
        using var cts = new CancellationTokenSource();
        var service = Service(async (_, _, ct) =>
        {
            await cts.CancelAsync();
            throw new HttpRequestException("connection reset");
        });
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => service.RetrieveAsync("q", cts.Token));
    }
}
