namespace MoeRagInject.Rag.Tests;

/// <summary>The background event log: every event lands as one whole line, in order per writer, and disposing drains the queue.</summary>
public sealed class RagEventWriterTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("moe-rag-writer-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static RagEvent Event(string request, int index) => new()
    {
        EventId = RagEvent.NewEventId(DateTimeOffset.UtcNow),
        StartTime = DateTimeOffset.UtcNow,
        RequestId = request,
        Query = $"query {index} with a long tail {new string('x', index % 300)} and ünïcödé",
        TokenIndex = index,
        Position = index,
        Layers = [0, 1],
        Entropy = 1.5,
        Threshold = 0.8,
        BatchSize = 4,
        Retriever = "test",
        Mode = "latent",
    };

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task EventsFromManyThreadsAreWrittenWholeAndNoneIsLostOnDispose(bool fsync)
    {
        const int threads = 8, perThread = 150;
        string path;
        await using (var writer = new RagEventWriter(_dir, fsync))
        {
            path = writer.FilePath;
            // Fire and forget, as requests do; only some callers wait for their line (as --log-fsync does).
            await Task.WhenAll(Enumerable.Range(0, threads).Select(t => Task.Run(async () =>
            {
                for (var i = 0; i < perThread; i++)
                {
                    var written = writer.AppendAsync(Event($"r{t}", i));
                    if (i % 50 == 0) await written;
                }
            })));
        }
        var events = RagEventLog.ReadAll(path);
        Assert.Equal(threads * perThread, events.Count);
        for (var t = 0; t < threads; t++)
            Assert.Equal(Enumerable.Range(0, perThread), events.Where(e => e.RequestId == $"r{t}").Select(e => e.TokenIndex));
        Assert.All(File.ReadAllLines(path), line => Assert.StartsWith("{\"event_id\":", line));
    }

    [Fact]
    public async Task AnEventAfterDisposeFailsItsTaskInsteadOfVanishing()
    {
        var writer = new RagEventWriter(_dir, fsync: false);
        await writer.DisposeAsync();
        await Assert.ThrowsAsync<ObjectDisposedException>(() => writer.AppendAsync(Event("late", 0)));
    }
}
