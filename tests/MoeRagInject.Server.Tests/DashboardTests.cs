using System.Globalization;
using System.Text.Json.Nodes;
using MoeRagInject.Engine;
using Xunit.Abstractions;

namespace MoeRagInject.Server.Tests;

public sealed class DashboardServerFixture : ServerFixture
{
    protected override EngineOptions Configure(EngineOptions options) => options with { MaxRunningRequests = 8 };
}

/// <summary>
/// /dashboard in a real browser (headless Debian Chromium through playwright-core, tests/observability/dashboard.mjs)
/// against a server under a steady load of RAG requests: the charts fill from /metrics, the event list from /rag_events,
/// and the heatmap probe typed into the page draws the entropies of its own /generate request; the screenshot shows a
/// picture (not one flat colour) in each of those regions. MOE_RAG_DASHBOARD_SCREENSHOT=PATH keeps the screenshot.
/// </summary>
public sealed class DashboardTests(DashboardServerFixture server, ITestOutputHelper output) : IClassFixture<DashboardServerFixture>
{
    private static readonly string[] Charts = ["chart-throughput", "chart-latency", "chart-queue", "chart-rag"];

    [ObservabilityFact(browser: true)]
    public async Task TheDashboardDrawsLiveChartsEventsAndAnEntropyHeatmap()
    {
        var layers = (await server.Client.GetOkAsync("/get_model_info"))["num_moe_layers"]!.GetValue<int>();
        var screenshot = Path.Combine(server.TempDirectory, "dashboard.png");
        using var stop = new CancellationTokenSource();
        var traffic = Enumerable.Range(0, 4).Select(c => Task.Run(() => TrafficAsync(c, stop.Token))).ToList();
        JsonNode result;
        try
        {
            var json = await ObservabilityTools.RunNodeAsync("dashboard.mjs",
                [server.Host.BaseAddress.ToString(), screenshot, "What is Quantum?", "20", "latent", "1.2"], null, TimeSpan.FromMinutes(4));
            result = JsonNode.Parse(json)!;
        }
        finally
        {
            await stop.CancelAsync();
            await Task.WhenAll(traffic);
        }
        if (Environment.GetEnvironmentVariable("MOE_RAG_DASHBOARD_SCREENSHOT") is { Length: > 0 } keep) File.Copy(screenshot, keep, overwrite: true);

        var dom = result["dom"]!;
        output.WriteLine($"cards: {dom["cards"]!.ToJsonString()}");
        output.WriteLine($"regions: {result["regions"]!.ToJsonString()}");
        Assert.Empty(result["errors"]!.AsArray());

        // Charts: drawn by uPlot from several scrapes, with nonzero values; the cards show the load.
        foreach (var id in Charts)
        {
            var chart = dom["charts"]![id]!;
            Assert.True(chart["points"]!.GetValue<int>() >= 4, $"{id}: {chart.ToJsonString()}");
            Assert.True(chart["nonEmpty"]!.GetValue<int>() > 0, $"{id}: {chart.ToJsonString()}");
            Assert.Equal(1, chart["canvases"]!.GetValue<int>());
        }
        Assert.True(double.Parse(dom["cards"]!["generated tok/s"]!.GetValue<string>(), CultureInfo.InvariantCulture) > 0);

        // Events: the page's rows are RAG events of the server, as its event log recorded them (request, query, layers).
        var logged = Rag.RagEventLog.ReadAll(Path.Combine(server.LogDirectory, Rag.RagEventLog.FileName))
            .Select(e => (e.RequestId, Query: e.Query.Trim(), Layers: string.Join(", ", e.Layers))).ToHashSet();
        var rows = dom["events"]!.AsArray();
        Assert.NotEmpty(rows);
        Assert.All(rows, r =>
        {
            Assert.Contains((r!["requestId"]!.GetValue<string>(), r["query"]!.GetValue<string>().Trim(), r["layers"]!.GetValue<string>()), logged);
            Assert.Equal("latent", r["mode"]!.GetValue<string>());
        });

        // Heatmap: one column per generated token and one row per MoE layer of the page's own request, a marker per trigger.
        var probe = result["probe"]!["meta_info"]!;
        var tokens = probe["completion_tokens"]!.GetValue<int>();
        var heatmap = dom["heatmap"]!;
        Assert.InRange(tokens, 1, 20);
        Assert.Equal(tokens, probe["output_router_entropy"]!.AsArray().Count);
        Assert.Equal(tokens, heatmap["tokens"]!.GetValue<int>());
        Assert.Equal(layers, heatmap["layers"]!.GetValue<int>());
        var triggers = probe["rag"]!.AsArray().Count(e => e!["token_index"]!.GetValue<int>() < tokens);
        Assert.True(triggers > 0, "the probe at threshold 1.2 should have triggered");
        Assert.Equal(triggers, heatmap["triggers"]!.GetValue<int>());

        // The screenshot: each plot area holds coloured data lines (an empty plot has only its grey grid), the heatmap is
        // mostly coloured cells, and the event list is full of text.
        var regions = result["regions"]!;
        foreach (var id in Charts)
            Assert.True(regions[id]!["saturated"]!.GetValue<double>() > 0.003, $"{id} has no data drawn: {regions[id]!.ToJsonString()}");
        Assert.True(regions["heatmap"]!["saturated"]!.GetValue<double>() > 0.2, $"the heatmap looks empty: {regions["heatmap"]!.ToJsonString()}");
        Assert.True(regions["events"]!["nonBackground"]!.GetValue<double>() > 0.05, $"the event list looks empty: {regions["events"]!.ToJsonString()}");
    }

    /// <summary>Requests with latent RAG, one after another, until stopped.</summary>
    private async Task TrafficAsync(int client, CancellationToken stop)
    {
        string[] words = ["Quantum", "fox", "dog", "coffee", "cafe", "light"];
        for (var n = 0; !stop.IsCancellationRequested; n++)
        {
            var body = new JsonObject
            {
                ["text"] = $"What is {words[(client + n) % words.Length]}?",
                ["sampling_params"] = new JsonObject { ["max_new_tokens"] = 8 + (client * 5 + n) % 16, ["temperature"] = 0.7 },
                ["rag"] = new JsonObject { ["mode"] = "latent", ["threshold"] = 1.2 },
            };
            try
            {
                using var response = await server.Client.PostAsync("/generate", Http.Json(body.ToJsonString()), stop);
                response.EnsureSuccessStatusCode();
            }
            catch (OperationCanceledException) when (stop.IsCancellationRequested)
            {
                return;
            }
        }
    }
}
