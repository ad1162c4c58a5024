using System.Diagnostics;
using System.Text.Json.Nodes;

namespace MoeRagInject.Server.Tests;

/// <summary>
/// Aborts and clients that leave, on a server with one running slot and a long context: a request that kept running
/// would hold the only slot for thousands of tokens, so a follow-up that completes promptly shows the slot was freed.
/// </summary>
public sealed class AbortTests(SingleSlotServerFixture server) : IClassFixture<SingleSlotServerFixture>
{
    private static JsonObject LongStream(string rid) => new()
    {
        ["text"] = "What is Quantum？",
        ["rid"] = rid,
        ["stream"] = true,
        ["sampling_params"] = new JsonObject
        {
            ["max_new_tokens"] = SingleSlotServerFixture.ContextLength - 64,
            ["temperature"] = 0,
            ["ignore_eos"] = true,
        },
    };

    private static async Task<HttpResponseMessage> OpenStreamAsync(HttpClient client, JsonNode body, CancellationToken cancellationToken)
    {
        var request = new HttpRequestMessage(HttpMethod.Post, "/generate") { Content = Http.Json(body.ToJsonString()) };
        var response = await client.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, cancellationToken);
        // Only read the body on failure: reading it here would wait for the whole stream.
        if (!response.IsSuccessStatusCode) Assert.Fail(await response.Content.ReadAsStringAsync(cancellationToken));
        return response;
    }

    private async Task AssertServesPromptlyAsync()
    {
        var watch = Stopwatch.StartNew();
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        using var response = await server.Client.PostAsync("/generate", Http.Json("""
            {"text": "are you free?", "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": true}}
            """), timeout.Token);
        var text = await response.Content.ReadAsStringAsync(timeout.Token);
        Assert.True(response.IsSuccessStatusCode, text);
        Assert.Equal(4, JsonNode.Parse(text)!["meta_info"]!["completion_tokens"]!.GetValue<int>());
        Assert.True(watch.Elapsed < TimeSpan.FromSeconds(30), $"follow-up took {watch.Elapsed}");
    }

    [Fact]
    public async Task AbortRequest_EndsTheStreamWithAbort_AndFreesTheSlot()
    {
        using var response = await OpenStreamAsync(server.Client, LongStream("abort-me"), CancellationToken.None);
        using var reader = new StreamReader(await response.Content.ReadAsStreamAsync());
        var first = await reader.ReadLineAsync();
        Assert.StartsWith("data: {", first);

        var abort = await server.Client.PostOkAsync("/abort_request", new JsonObject { ["rid"] = "abort-me" });
        Assert.True(abort["success"]!.GetValue<bool>(), abort.ToJsonString());

        var rest = await Http.ReadEventsAsync(reader, CancellationToken.None);
        var events = Http.JsonEvents(rest);
        var finish = events[^1]["meta_info"]!["finish_reason"]!;
        Assert.Equal("abort", finish["type"]!.GetValue<string>());
        Assert.True(events[^1]["meta_info"]!["completion_tokens"]!.GetValue<int>() < SingleSlotServerFixture.ContextLength - 64);

        await AssertServesPromptlyAsync();
        var again = await server.Client.PostOkAsync("/abort_request", new JsonObject { ["rid"] = "abort-me" });
        Assert.False(again["success"]!.GetValue<bool>());
    }

    [Fact]
    public async Task ClientThatLeavesMidStream_FreesItsSlot()
    {
        using (var cancel = new CancellationTokenSource())
        {
            var response = await OpenStreamAsync(server.Client, LongStream("leave-me"), cancel.Token);
            var reader = new StreamReader(await response.Content.ReadAsStreamAsync(cancel.Token));
            // Two events in: the request is running.
            for (var seen = 0; seen < 2;)
            {
                var line = await reader.ReadLineAsync(cancel.Token);
                Assert.NotNull(line);
                if (line.StartsWith("data: {", StringComparison.Ordinal)) seen++;
            }
            // Leave: cancel the read and drop the connection.
            await cancel.CancelAsync();
            reader.Dispose();
            response.Dispose();
        }

        // With one slot, this only completes if the abandoned request was aborted.
        await AssertServesPromptlyAsync();
        Assert.False(server.Engine.Abort("leave-me"), "the abandoned request is still running in the engine");
    }

    [Fact]
    public async Task AbortingAnUnknownRid_ReportsNoSuccess()
    {
        var abort = await server.Client.PostOkAsync("/abort_request", new JsonObject { ["rid"] = "never-existed" });
        Assert.False(abort["success"]!.GetValue<bool>());
    }

    /// <summary>With the only slot taken, a second stream is queued, yet its response headers come at once (validation is synchronous).</summary>
    [Fact]
    public async Task QueuedRequest_GetsItsHeadersAtOnce()
    {
        using var running = await OpenStreamAsync(server.Client, LongStream("hold-the-slot"), CancellationToken.None);
        using var first = new StreamReader(await running.Content.ReadAsStreamAsync());
        Assert.StartsWith("data: {", await first.ReadLineAsync());

        using var headersIn = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        var watch = Stopwatch.StartNew();
        using var queued = await OpenStreamAsync(server.Client, LongStream("queued"), headersIn.Token);
        Assert.Equal("text/event-stream", queued.Content.Headers.ContentType?.MediaType);
        Assert.True(server.Engine.GetStatus().Waiting >= 1 || watch.Elapsed < TimeSpan.FromSeconds(10));
        Assert.True(server.Engine.Abort("queued"));
        Assert.True(server.Engine.Abort("hold-the-slot"));
        using var second = new StreamReader(await queued.Content.ReadAsStreamAsync());
        var events = Http.JsonEvents(await Http.ReadEventsAsync(second, CancellationToken.None));
        Assert.Equal("abort", events[^1]["meta_info"]!["finish_reason"]!["type"]!.GetValue<string>());
        Assert.Empty(TestData.IntArray(events[^1]["output_ids"]));
    }
}
