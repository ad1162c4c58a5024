using System.Net.Http.Headers;
using System.Text;
using System.Text.Json.Nodes;
using MoeRagInject.Backend.Cpu;
using MoeRagInject.Engine;
using MoeRagInject.Rag;

[assembly: CollectionBehavior(DisableTestParallelization = true)]

namespace MoeRagInject.Server.Tests;

/// <summary>
/// One real server per test class: the real engine over the a-fp32 reference checkpoint, Kestrel on 127.0.0.1 port 0,
/// and an HttpClient that talks to it over TCP. RAG is off by default; a small JSONL corpus is configured as the retriever
/// so that requests can turn it on with a "rag" override.
/// </summary>
public class ServerFixture : IAsyncLifetime
{
    private string? _tempDirectory;
    private ServerHost? _host;
    private IGenerationEngine? _engine;
    private HttpClient? _client;

    public HttpClient Client => _client ?? throw new InvalidOperationException("fixture not started");
    public IGenerationEngine Engine => _engine ?? throw new InvalidOperationException("fixture not started");
    public ServerHost Host => _host ?? throw new InvalidOperationException("fixture not started");
    public string TempDirectory => _tempDirectory ?? throw new InvalidOperationException("fixture not started");
    public string LogDirectory => Path.Combine(TempDirectory, "logs");
    public string CorpusPath => Path.Combine(TempDirectory, "corpus.jsonl");

    protected virtual EngineOptions Configure(EngineOptions options) => options;

    public async Task InitializeAsync()
    {
        _tempDirectory = Directory.CreateTempSubdirectory("moe-rag-inject-server-tests-").FullName;
        await File.WriteAllTextAsync(CorpusPath, TestData.CorpusJsonl);
        var options = Configure(new EngineOptions
        {
            ModelPath = TestData.CheckpointPath,
            Runner = new CpuRunnerFactory(2),
            Mode = InjectionMode.Off,
            Retriever = CorpusPath,
            LogDir = LogDirectory,
            MaxRunningRequests = 8,
            Notices = TextWriter.Null,
        });
        _engine = await InferenceEngine.CreateAsync(options);
        _host = ServerHost.Create(new ServerOptions { Host = "127.0.0.1", Port = 0, Engine = options }, _engine);
        await _host.StartAsync();
        _client = new HttpClient { BaseAddress = _host.BaseAddress, Timeout = TimeSpan.FromSeconds(120) };
    }

    public async Task DisposeAsync()
    {
        _client?.Dispose();
        if (_host is not null) await _host.DisposeAsync();
        if (_engine is not null) await _engine.DisposeAsync();
        try
        {
            if (_tempDirectory is not null) Directory.Delete(_tempDirectory, recursive: true);
        }
        catch (IOException)
        {
            // A log file still held open by a background writer; the OS cleans temp folders.
        }
    }
}

/// <summary>One running request at a time, and a long context: a request that is not aborted would hold the only slot for long.</summary>
public sealed class SingleSlotServerFixture : ServerFixture
{
    public const int ContextLength = 8192;

    protected override EngineOptions Configure(EngineOptions options) => options with { MaxRunningRequests = 1, ContextLength = ContextLength };
}

public static class Http
{
    public static StringContent Json(string json) => new(json, Encoding.UTF8, new MediaTypeHeaderValue("application/json"));

    public static Task<HttpResponseMessage> PostAsync(this HttpClient client, string path, JsonNode body)
        => client.PostAsync(path, Json(body.ToJsonString()));

    public static async Task<JsonNode> PostOkAsync(this HttpClient client, string path, JsonNode body)
    {
        using var response = await client.PostAsync(path, body);
        var text = await response.Content.ReadAsStringAsync();
        Assert.True(response.IsSuccessStatusCode, $"POST {path} {body.ToJsonString()} -> {(int)response.StatusCode}: {text}");
        return JsonNode.Parse(text)!;
    }

    public static async Task<JsonNode> GetOkAsync(this HttpClient client, string path)
    {
        using var response = await client.GetAsync(path);
        var text = await response.Content.ReadAsStringAsync();
        Assert.True(response.IsSuccessStatusCode, $"GET {path} -> {(int)response.StatusCode}: {text}");
        return JsonNode.Parse(text)!;
    }

    /// <summary>Posts with a streamed response and returns every <c>data:</c> payload, [DONE] included, in order.</summary>
    public static async Task<List<string>> PostSseAsync(this HttpClient client, string path, JsonNode body)
    {
        using var request = new HttpRequestMessage(HttpMethod.Post, path) { Content = Json(body.ToJsonString()) };
        using var response = await client.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
        if (!response.IsSuccessStatusCode)
            Assert.Fail($"POST {path} -> {(int)response.StatusCode}: {await response.Content.ReadAsStringAsync()}");
        Assert.Equal("text/event-stream", response.Content.Headers.ContentType?.MediaType);
        using var reader = new StreamReader(await response.Content.ReadAsStreamAsync());
        return await ReadEventsAsync(reader, CancellationToken.None);
    }

    public static async Task<List<string>> ReadEventsAsync(StreamReader reader, CancellationToken cancellationToken)
    {
        var events = new List<string>();
        while (await reader.ReadLineAsync(cancellationToken) is { } line)
        {
            if (line.Length == 0) continue;
            Assert.StartsWith("data: ", line);
            events.Add(line["data: ".Length..]);
        }
        return events;
    }

    /// <summary>The JSON events of a finished stream, after checking that it ended with exactly one [DONE].</summary>
    public static List<JsonNode> JsonEvents(List<string> events)
    {
        Assert.NotEmpty(events);
        Assert.Equal("[DONE]", events[^1]);
        Assert.Equal(1, events.Count(e => e == "[DONE]"));
        return events.SkipLast(1).Select(e => JsonNode.Parse(e)!).ToList();
    }
}
