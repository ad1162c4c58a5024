using System.Text;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;

namespace MoeRagInject.Rag.Tests;

public class RagEventTests
{
    private static RagEvent Sample(string? id = null, string query = "What is Quantum?") => new()
    {
        EventId = id ?? RagEvent.NewEventId(DateTimeOffset.UtcNow),
        StartTime = new DateTimeOffset(2025, 11, 9, 8, 53, 54, 35, TimeSpan.Zero),
        EndTime = new DateTimeOffset(2025, 11, 9, 16, 53, 54, 356, TimeSpan.FromHours(8)),
        RequestId = "req-1",
        Query = query,
        Snippets = ["In physics, a quantum is the \"minimum\" amount\nof any entity.", "量子 — 第二段"],
        SnippetIds = ["wiki#1", "wiki#2"],
        TokenIndex = 3,
        Position = 24,
        Layers = [5, 7],
        Entropy = 1.88,
        Threshold = 0.8,
        BatchSize = 1,
        Retriever = "sqlite-fts5:/tmp/x.db",
        LatencyMs = 321.5,
        Mode = "latent",
        InjectionLayers = [7],
        Scale = 0.25,
        InjectionNorm = 3.5,
        Cached = false,
    };

    [Fact]
    public void JsonHasSnakeCaseFieldsAndMillisecondUtcTimes()
    {
        var json = Sample("rag-x").ToJson();
        string[] expected =
        [
            "event_id", "start_time", "end_time", "request_id", "query", "snippets", "snippet_ids", "token_index", "position",
            "layers", "signal", "entropy", "threshold", "batch_size", "retriever", "latency_ms", "mode", "restart", "injection_layers", "scale",
            "injection_norm", "cached", "error",
        ];
        Assert.Equal(expected.Order(StringComparer.Ordinal), json.Select(p => p.Key).Order(StringComparer.Ordinal));
        Assert.Equal("rag-x", (string?)json["event_id"]);
        Assert.Equal("2025-11-09T08:53:54.035Z", (string?)json["start_time"]);
        Assert.Equal("2025-11-09T08:53:54.356Z", (string?)json["end_time"]); // +08:00 converted to UTC
        Assert.Equal(3, (int)json["token_index"]!);
        Assert.Equal(24, (int)json["position"]!);
        Assert.Equal(1.88, (double)json["entropy"]!);
        Assert.Equal("router-entropy", (string?)json["signal"]);
        Assert.Equal(321.5, (double)json["latency_ms"]!);
        Assert.Equal("latent", (string?)json["mode"]);
        Assert.Equal(new[] { 5, 7 }, json["layers"]!.AsArray().Select(n => (int)n!));
        Assert.Equal("量子 — 第二段", (string?)json["snippets"]![1]);
        Assert.Null(json["error"]);
        Assert.True(json.ContainsKey("error"));

        string line = Sample().ToJsonLine();
        Assert.DoesNotContain('\n', line);
        Assert.Contains("\"error\":null", line, StringComparison.Ordinal);
    }

    [Fact]
    public void ErrorAndNonFiniteNumbersSerialise()
    {
        var json = (Sample() with { Error = "timed out", Entropy = double.NaN }).ToJson();
        Assert.Equal("timed out", (string?)json["error"]);
        Assert.Null(json["entropy"]);
        _ = json.ToJsonString(); // must not throw on NaN
    }

    [Fact]
    public void EventIdsHaveTheFormatAndAreUnique()
    {
        var now = new DateTimeOffset(2025, 11, 9, 8, 53, 50, TimeSpan.Zero);
        string id = RagEvent.NewEventId(now);
        Assert.Matches(new Regex("^rag-20251109-085350-[0-9a-f]{8}$"), id);
        Assert.StartsWith("rag-20251109-005350-", RagEvent.NewEventId(new DateTimeOffset(2025, 11, 9, 8, 53, 50, TimeSpan.FromHours(8))), StringComparison.Ordinal);

        var ids = new System.Collections.Concurrent.ConcurrentBag<string>();
        Parallel.For(0, 20000, _ => ids.Add(RagEvent.NewEventId(now)));
        Assert.Equal(20000, ids.Distinct().Count());
    }

    [Fact]
    public void JsonRoundTrips()
    {
        var original = Sample("rag-rt") with { Error = "boom", Cached = true };
        var back = RagEvent.FromJson(original.ToJson());
        Assert.Equal(original.EventId, back.EventId);
        Assert.Equal(original.StartTime, back.StartTime);
        Assert.Equal(original.EndTime.UtcDateTime, back.EndTime.UtcDateTime);
        Assert.Equal(original.Snippets, back.Snippets);
        Assert.Equal(original.Layers, back.Layers);
        Assert.Equal(original.Entropy, back.Entropy);
        Assert.Equal("boom", back.Error);
        Assert.True(back.Cached);
    }

    [Fact]
    public void LogCreatesDirectoryAndAppendsLines()
    {
        using var dir = new TempDir();
        string logDir = Path.Combine(dir.Path, "nested", "logs");
        using (var log = new RagEventLog(logDir))
        {
            Assert.Equal(Path.Combine(logDir, "rag-events.jsonl"), log.FilePath);
            log.Append(Sample("a"));
            log.Append(Sample("b"));
        }

        using (var log = new RagEventLog(logDir))
        {
            log.Append(Sample("c"));
            Assert.Throws<ObjectDisposedException>(() =>
            {
                log.Dispose();
                log.Append(Sample("d"));
            });
        }

        var lines = File.ReadAllLines(Path.Combine(logDir, "rag-events.jsonl"));
        Assert.Equal(new[] { "a", "b", "c" }, lines.Select(l => (string)JsonNode.Parse(l)!["event_id"]!));
    }

    [Fact]
    public async Task ConcurrentAppendsProduceOnlyWholeLines()
    {
        using var dir = new TempDir();
        const int Threads = 8;
        const int PerThread = 150;
        string big = new string('x', 6000) + " 量子\n\"quoted\"";
        using (var log = new RagEventLog(dir.Path))
        {
            var tasks = Enumerable.Range(0, Threads).Select(t => Task.Run(() =>
            {
                for (int i = 0; i < PerThread; i++)
                {
                    log.Append(Sample($"t{t}-{i}", query: i % 3 == 0 ? big : $"query {t} {i}"));
                }
            }));
            await Task.WhenAll(tasks);
        }

        string path = Path.Combine(dir.Path, RagEventLog.FileName);
        byte[] bytes = await File.ReadAllBytesAsync(path);
        Assert.Equal((byte)'\n', bytes[^1]);
        var lines = Encoding.UTF8.GetString(bytes).Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal(Threads * PerThread, lines.Length);
        var ids = lines.Select(l => (string)JsonNode.Parse(l)!["event_id"]!).ToHashSet();
        Assert.Equal(Threads * PerThread, ids.Count);
        Assert.Equal(Threads * PerThread, RagEventLog.ReadAll(path).Count);
    }

    [Fact]
    public void ReadAllSkipsATornFinalLine()
    {
        using var dir = new TempDir();
        string path;
        using (var log = new RagEventLog(dir.Path))
        {
            log.Append(Sample("one"));
            log.Append(Sample("two"));
            path = log.FilePath;
        }

        string torn = Sample("three").ToJsonLine();
        File.AppendAllText(path, torn[..(torn.Length / 2)]);
        var events = RagEventLog.ReadAll(path);
        Assert.Equal(["one", "two"], events.Select(e => e.EventId).ToArray());
    }

    [Fact]
    public void ReadAllRejectsACorruptMiddleLineNamingIt()
    {
        using var dir = new TempDir();
        string path = dir.File("rag-events.jsonl");
        File.WriteAllText(path, Sample("one").ToJsonLine() + "\n{not json\n" + Sample("three").ToJsonLine() + "\n");
        var ex = Assert.Throws<InvalidDataException>(() => RagEventLog.ReadAll(path));
        Assert.Contains(":2:", ex.Message, StringComparison.Ordinal);
    }
}
