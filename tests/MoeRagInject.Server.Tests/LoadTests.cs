using System.Collections.Concurrent;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json.Nodes;
using MoeRagInject.Engine;
using MoeRagInject.Model;
using Xunit.Abstractions;

namespace MoeRagInject.Server.Tests;

/// <summary>A server with room for many requests and a KV pool small enough that they compete for it.</summary>
public sealed class LoadServerFixture : ServerFixture
{
    protected override EngineOptions Configure(EngineOptions options) =>
        options with { MaxRunningRequests = 32, KvCacheTokens = 6 * 256, ChunkedPrefillSize = 64 };
}

/// <summary>
/// 64 concurrent clients over real HTTP for MOE_RAG_LOAD_SECONDS (60 by default; tools/load/run-load-test.sh runs 600):
/// /generate and both OpenAI routes, streaming and not, RAG off, latent and prompt, stop strings, aborts by rid and clients
/// that leave mid-stream. Every request ends with stop, length, or the abort it asked for; afterwards every KV block is free
/// and nothing runs; the managed heap does not grow after warm-up.
/// </summary>
public sealed class LoadTests(LoadServerFixture server, ITestOutputHelper output) : IClassFixture<LoadServerFixture>
{
    private enum Kind { Generate, GenerateStream, Completion, CompletionStream, ChatStream, AbortByRid, Leave }

    private readonly ConcurrentDictionary<string, int> _outcomes = new();
    private readonly ConcurrentBag<string> _failures = [];

    [Fact]
    public async Task SixtyFourClientsWithAMixOfEverything()
    {
        var seconds = int.TryParse(Environment.GetEnvironmentVariable("MOE_RAG_LOAD_SECONDS"), CultureInfo.InvariantCulture, out var s) ? s : 60;
        var duration = TimeSpan.FromSeconds(seconds);
        var clock = Stopwatch.StartNew();
        long warmHeap = 0;
        var warmup = Task.Run(async () =>
        {
            await Task.Delay(duration / 5);
            warmHeap = GC.GetTotalMemory(forceFullCollection: true);
        });
        var clients = Enumerable.Range(0, 64).Select(c => Task.Run(() => ClientAsync(c, clock, duration))).ToList();
        await Task.WhenAll(clients);
        await warmup;
        var status = await WaitForIdleAsync();
        var endHeap = GC.GetTotalMemory(forceFullCollection: true);

        output.WriteLine($"{seconds} s, 64 clients: {string.Join(", ", _outcomes.OrderBy(o => o.Key).Select(o => $"{o.Key} {o.Value}"))}");
        output.WriteLine($"engine: {status.Steps} steps, {status.Preemptions} preemptions; KV {status.FreeKvBlocks}/{status.TotalKvBlocks} blocks free");
        output.WriteLine($"managed heap after warm-up {warmHeap / 1e6:F1} MB, at the end {endHeap / 1e6:F1} MB");
        Assert.True(_failures.IsEmpty, string.Join("\n", _failures.Take(20)));
        Assert.True(_outcomes.Values.Sum() > 64, "too few requests completed to call this a load test");
        Assert.Equal(0, status.Running + status.Waiting + status.Retrieving);
        Assert.Equal(status.TotalKvBlocks, status.FreeKvBlocks);
        Assert.True(endHeap < warmHeap + Math.Max(32_000_000, warmHeap / 2), $"the heap grew from {warmHeap} to {endHeap} bytes");
    }

    private async Task ClientAsync(int client, Stopwatch clock, TimeSpan duration)
    {
        var rng = new SplitMix64((ulong)client * 7919 + 1);
        var n = 0;
        while (clock.Elapsed < duration)
        {
            var kind = (Kind)(int)(rng.NextUInt64() % 7);
            var rid = $"load-{client}-{n++}";
            try
            {
                await RunAsync(kind, rid, rng);
            }
            catch (Exception e)
            {
                _failures.Add($"{rid} ({kind}): {e.GetType().Name}: {e.Message}");
            }
        }
    }

    private static string Prompt(SplitMix64 rng)
    {
        string[] words = ["What", "is", "Quantum", "fox", "dog", "coffee", "a", "the", "café", "🦊", "lazy", "quick", "?"];
        return string.Join(' ', Enumerable.Range(0, 2 + (int)(rng.NextUInt64() % 24)).Select(_ => words[rng.NextUInt64() % (ulong)words.Length]));
    }

    private static JsonObject Rag(SplitMix64 rng) => (rng.NextUInt64() % 3) switch
    {
        0 => new JsonObject { ["mode"] = "off" },
        1 => new JsonObject { ["mode"] = "latent", ["threshold"] = 1.2 },
        _ => new JsonObject { ["mode"] = "prompt", ["threshold"] = 1.3 },
    };

    private async Task RunAsync(Kind kind, string rid, SplitMix64 rng)
    {
        var maxTokens = 4 + (int)(rng.NextUInt64() % 60);
        var stop = rng.NextUInt64() % 4 == 0 ? new JsonArray("e ", "qu") : new JsonArray();
        var sampling = new JsonObject
        {
            ["max_new_tokens"] = maxTokens, ["temperature"] = rng.NextUInt64() % 2 == 0 ? 0 : 0.8, ["stop"] = stop,
            ["sampling_seed"] = (int)(rng.NextUInt64() % 1000),
        };
        var generate = new JsonObject { ["text"] = Prompt(rng), ["rid"] = rid, ["sampling_params"] = sampling, ["rag"] = Rag(rng) };
        switch (kind)
        {
            case Kind.Generate:
                Expect(kind, Finish((await server.Client.PostOkAsync("/generate", generate))["meta_info"]!), abort: false);
                break;
            case Kind.GenerateStream:
                generate["stream"] = true;
                Expect(kind, Finish(Http.JsonEvents(await server.Client.PostSseAsync("/generate", generate))[^1]["meta_info"]!), abort: false);
                break;
            case Kind.Completion or Kind.CompletionStream:
            {
                var body = new JsonObject
                {
                    ["model"] = "m", ["prompt"] = Prompt(rng), ["max_tokens"] = maxTokens, ["temperature"] = 0.7, ["stop"] = stop.DeepClone(),
                    ["rag"] = Rag(rng), ["stream"] = kind == Kind.CompletionStream,
                };
                var finish = kind == Kind.Completion
                    ? (await server.Client.PostOkAsync("/v1/completions", body))["choices"]![0]!["finish_reason"]!.GetValue<string>()
                    : Http.JsonEvents(await server.Client.PostSseAsync("/v1/completions", body))
                        .Select(e => e["choices"]!.AsArray().FirstOrDefault()?["finish_reason"]?.GetValue<string>()).Last(f => f is not null)!;
                Expect(kind, finish, abort: false);
                break;
            }
            case Kind.ChatStream:
            {
                var body = new JsonObject
                {
                    ["model"] = "m", ["messages"] = new JsonArray(new JsonObject { ["role"] = "user", ["content"] = Prompt(rng) }),
                    ["max_tokens"] = maxTokens, ["stream"] = true, ["stream_options"] = new JsonObject { ["include_usage"] = true },
                };
                var finish = Http.JsonEvents(await server.Client.PostSseAsync("/v1/chat/completions", body))
                    .Select(e => e["choices"]!.AsArray().FirstOrDefault()?["finish_reason"]?.GetValue<string>()).Last(f => f is not null)!;
                Expect(kind, finish, abort: false);
                break;
            }
            case Kind.AbortByRid or Kind.Leave:
            {
                generate["stream"] = true;
                sampling["max_new_tokens"] = 150;
                using var cancel = new CancellationTokenSource(TimeSpan.FromSeconds(60));
                using var request = new HttpRequestMessage(HttpMethod.Post, "/generate") { Content = Http.Json(generate.ToJsonString()) };
                using var response = await server.Client.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, cancel.Token);
                response.EnsureSuccessStatusCode();
                using var reader = new StreamReader(await response.Content.ReadAsStreamAsync(cancel.Token));
                var first = await reader.ReadLineAsync(cancel.Token);
                if (kind == Kind.Leave)
                {
                    // Leave mid-stream: the server must notice and free the request's slot and blocks.
                    await cancel.CancelAsync();
                    _outcomes.AddOrUpdate("left", 1, (_, v) => v + 1);
                    return;
                }
                await server.Client.PostOkAsync("/abort_request", new JsonObject { ["rid"] = rid });
                var events = Http.JsonEvents([first!["data: ".Length..], .. await Http.ReadEventsAsync(reader, cancel.Token)]);
                Expect(kind, Finish(events[^1]["meta_info"]!), abort: true);
                break;
            }
        }
    }

    private static string Finish(JsonNode meta) => meta["finish_reason"]!["type"]!.GetValue<string>();

    /// <summary>
    /// stop or length, unless the client asked for an abort: then abort, or stop/length when the request finished before the abort arrived.
    /// </summary>
    private void Expect(Kind kind, string finish, bool abort)
    {
        _outcomes.AddOrUpdate($"{kind}:{finish}", 1, (_, v) => v + 1);
        if (finish is "stop" or "length") return;
        if (abort && finish == "abort") return;
        _failures.Add($"{kind} ended with {finish}");
    }

    private async Task<EngineStatus> WaitForIdleAsync()
    {
        var engine = server.Engine;
        for (var i = 0; i < 1000; i++)
        {
            var status = engine.GetStatus();
            if (status.Running + status.Waiting + status.Retrieving == 0 && status.FreeKvBlocks == status.TotalKvBlocks) return status;
            await Task.Delay(10);
        }
        return engine.GetStatus();
    }
}
