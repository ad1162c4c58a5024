using System.Collections.Concurrent;
using System.Globalization;
using System.Text.Json.Nodes;
using MoeRagInject.Engine;
using Xunit.Abstractions;

namespace MoeRagInject.Server.Tests;

/// <summary>Eight running requests at most, so that a load of 24 concurrent clients keeps some waiting.</summary>
public sealed class MetricsServerFixture : ServerFixture
{
    protected override EngineOptions Configure(EngineOptions options) => options with { MaxRunningRequests = 8 };
}

/// <summary>One series of a parsed scrape: its labels, and its value (counters, gauges) or histogram fields.</summary>
public sealed record Series(IReadOnlyDictionary<string, string> Labels, double Value, IReadOnlyDictionary<string, double> Buckets, double Count, double Sum)
{
    public string Key => string.Join(",", Labels.OrderBy(l => l.Key, StringComparer.Ordinal).Select(l => $"{l.Key}={l.Value}"));
}

/// <summary>A scrape of /metrics as the official Prometheus Python client's parser reads it (families of samples), by series.</summary>
public sealed class Scrape
{
    private readonly Dictionary<string, (string Type, List<Series> Series)> _families = new(StringComparer.Ordinal);

    /// <param name="families">One scrape as parse_metrics.py writes it.</param>
    public Scrape(JsonArray families)
    {
        foreach (var family in families)
        {
            var name = family!["name"]!.GetValue<string>();
            var type = family["type"]!.GetValue<string>();
            var samples = family["samples"]!.AsArray().Select(s => (
                Name: s!["name"]!.GetValue<string>(),
                Labels: s["labels"]!.AsObject().ToDictionary(l => l.Key, l => l.Value!.GetValue<string>()),
                Value: s["value"]!.GetValue<double>())).ToList();
            List<Series> series;
            if (type == "histogram")
            {
                // One series per label set without "le": its _bucket samples, _count and _sum.
                series = [.. samples.GroupBy(s => string.Join(",", s.Labels.Where(l => l.Key != "le").OrderBy(l => l.Key, StringComparer.Ordinal)))
                    .Select(g => new Series(
                        g.First().Labels.Where(l => l.Key != "le").ToDictionary(l => l.Key, l => l.Value), double.NaN,
                        g.Where(s => s.Name == name + "_bucket").ToDictionary(s => s.Labels["le"], s => s.Value),
                        g.Single(s => s.Name == name + "_count").Value, g.Single(s => s.Name == name + "_sum").Value))];
            }
            else
            {
                series = [.. samples.Select(s => new Series(s.Labels, s.Value, new Dictionary<string, double>(), double.NaN, double.NaN))];
            }
            _families[name] = (type, series);
        }
    }

    public IEnumerable<string> Names => _families.Keys;

    public string Type(string name) => _families.TryGetValue(name, out var f) ? f.Type : "absent";

    public IReadOnlyList<Series> Of(string name) =>
        _families.TryGetValue(name, out var f) ? f.Series : throw new Xunit.Sdk.XunitException($"{name} is not in the scrape");

    public Series One(string name) => Assert.Single(Of(name));

    public double Total(string name) => Of(name).Sum(s => s.Value);
}

/// <summary>
/// /metrics during and after a load of real HTTP requests (/generate streamed and not, /v1/completions, aborts by rid,
/// stop strings, latent RAG), every scrape read by the official Prometheus Python client's text-format parser: every metric the README names is
/// there with its type; counters and histograms never go down between scrapes; gauges stay in range; and at rest the
/// numbers agree exactly with what the responses reported (requests by finish reason, tokens, histogram counts) and with
/// the RAG events the server returned.
/// </summary>
public sealed class MetricsTests(MetricsServerFixture server, ITestOutputHelper output) : IClassFixture<MetricsServerFixture>
{
    private static readonly (string Name, string Type)[] Expected =
    [
        ("moe_rag_time_to_first_token_seconds", "histogram"),
        ("moe_rag_inter_token_latency_seconds", "histogram"),
        ("moe_rag_e2e_request_latency_seconds", "histogram"),
        ("moe_rag_num_requests_running", "gauge"),
        ("moe_rag_num_requests_waiting", "gauge"),
        ("moe_rag_kv_cache_usage_ratio", "gauge"),
        ("moe_rag_prompt_tokens_total", "counter"),
        ("moe_rag_generation_tokens_total", "counter"),
        ("moe_rag_requests_total", "counter"),
        ("moe_rag_triggers_total", "counter"),
        ("moe_rag_retrieval_seconds", "histogram"),
        ("moe_rag_retrieval_errors_total", "counter"),
        ("moe_rag_router_entropy_nats", "histogram"),
    ];

    private sealed record Served(string Finish, int PromptTokens, int CompletionTokens);

    private readonly ConcurrentBag<Served> _served = [];

    [ObservabilityFact(parser: true)]
    public async Task ScrapesDuringALoadParseAndAgreeWithTheResponses()
    {
        var layers = (await server.Client.GetOkAsync("/get_model_info"))["num_moe_layers"]!.GetValue<int>();
        // Before any request: the counters at zero under every label value, the gauges; histograms appear with their first
        // observation (OpenTelemetry writes no empty histogram).
        var before = (await ParseAsync([await server.Client.GetStringAsync("/metrics")]))[0];
        AssertShape(before, layers, complete: false);
        Assert.Equal(0, before.Total("moe_rag_requests_total"));
        Assert.Equal(0, before.Total("moe_rag_generation_tokens_total"));

        // 24 clients, 4 requests each; a scraper reads /metrics meanwhile, every 25 ms for the first 40 scrapes (the load
        // lasts a second or two on an idle machine), then every 200 ms.
        using var stop = new CancellationTokenSource();
        var texts = new List<string>();
        var scraper = Task.Run(async () =>
        {
            while (!stop.IsCancellationRequested)
            {
                texts.Add(await server.Client.GetStringAsync("/metrics"));
                await Task.Delay(texts.Count < 40 ? 25 : 200);
            }
        });
        await Task.WhenAll(Enumerable.Range(0, 24).Select(c => Task.Run(() => ClientAsync(c))));
        await stop.CancelAsync();
        await scraper;
        await WaitForIdleAsync();
        texts.Add(await server.Client.GetStringAsync("/metrics"));

        var scrapes = new List<Scrape> { before };
        scrapes.AddRange(await ParseAsync(texts));
        var last = scrapes[^1];
        output.WriteLine($"{_served.Count} requests, {scrapes.Count} scrapes; finishes: " +
            string.Join(", ", _served.GroupBy(s => s.Finish).Select(g => $"{g.Key} {g.Count()}")));

        foreach (var scrape in scrapes) AssertShape(scrape, layers, complete: scrape == last);
        for (var i = 1; i < scrapes.Count; i++) AssertNothingWentDown(scrapes[i - 1], scrapes[i]);
        // Under this load requests ran and queued, and held KV blocks, at some scrape.
        Assert.Contains(scrapes, s => s.One("moe_rag_num_requests_running").Value > 0);
        Assert.Contains(scrapes, s => s.One("moe_rag_kv_cache_usage_ratio").Value > 0);

        // At rest: nothing running, and every number agrees with what the clients were told.
        Assert.Equal(0, last.One("moe_rag_num_requests_running").Value);
        Assert.Equal(0, last.One("moe_rag_num_requests_waiting").Value);
        Assert.Equal(0, last.One("moe_rag_kv_cache_usage_ratio").Value);
        var served = _served.ToList();
        Assert.Equal(96, served.Count);
        Assert.Equal(served.Count, last.One("moe_rag_e2e_request_latency_seconds").Count);
        foreach (var reason in new[] { "stop", "length", "abort" })
            Assert.Equal(served.Count(s => s.Finish == reason), last.Of("moe_rag_requests_total").Single(s => s.Labels["finish_reason"] == reason).Value);
        Assert.Contains(served, s => s.Finish == "stop");
        Assert.Contains(served, s => s.Finish == "length");
        var tokens = served.Sum(s => s.CompletionTokens);
        Assert.Equal(served.Sum(s => s.PromptTokens), last.One("moe_rag_prompt_tokens_total").Value);
        Assert.Equal(tokens, last.One("moe_rag_generation_tokens_total").Value);
        Assert.Equal(served.Count(s => s.CompletionTokens > 0), last.One("moe_rag_time_to_first_token_seconds").Count);
        Assert.Equal(served.Where(s => s.CompletionTokens > 0).Sum(s => s.CompletionTokens - 1), last.One("moe_rag_inter_token_latency_seconds").Count);
        var entropy = last.Of("moe_rag_router_entropy_nats");
        Assert.Equal(Enumerable.Range(0, layers).Select(l => l.ToString(CultureInfo.InvariantCulture)), entropy.Select(s => s.Labels["layer"]).Order());
        Assert.All(entropy, s => Assert.Equal(tokens, s.Count));
        Assert.All(entropy, s => Assert.InRange(s.Sum / s.Count, 0, Math.Log(8) + 1e-6));

        // RAG: one trigger count under each layer that fired, one retrieval per event not answered from the request's
        // cache, and one error for each of those that brought nothing back.
        var events = (await server.Client.GetOkAsync("/rag_events?limit=200"))["events"]!.AsArray().Select(e => e!).ToList();
        Assert.InRange(events.Count, 1, 199);
        Assert.Equal(events.Sum(e => e["layers"]!.AsArray().Count), last.Total("moe_rag_triggers_total"));
        Assert.All(last.Of("moe_rag_triggers_total").Where(s => s.Value > 0), s => Assert.Equal("latent", s.Labels["mode"]));
        var retrieved = events.Where(e => !e["cached"]!.GetValue<bool>()).ToList();
        output.WriteLine($"{tokens} tokens generated, {events.Count} RAG events, {retrieved.Count} retrievals, "
            + $"{last.Total("moe_rag_triggers_total")} layer triggers, {last.Total("moe_rag_retrieval_errors_total")} retrieval errors");
        Assert.Equal(retrieved.Count, last.One("moe_rag_retrieval_seconds").Count);
        Assert.Equal(retrieved.Count(e => e["error"] is not null), last.Total("moe_rag_retrieval_errors_total"));
    }

    /// <summary>A second host over the same engine with metrics off: /metrics is not found; the dashboard and /rag_events are served.</summary>
    [Fact]
    public async Task WithMetricsDisabledOnlyMetricsIsGone()
    {
        await using var host = ServerHost.Create(new ServerOptions { Host = "127.0.0.1", Port = 0, EnableMetrics = false }, server.Engine);
        await host.StartAsync();
        using var client = new HttpClient { BaseAddress = host.BaseAddress };
        using (var metrics = await client.GetAsync("/metrics")) Assert.Equal(System.Net.HttpStatusCode.NotFound, metrics.StatusCode);
        Assert.NotNull((await client.GetOkAsync("/rag_events?limit=5"))["events"]!.AsArray());
        using (var bad = await client.GetAsync("/rag_events?limit=0"))
        {
            Assert.Equal(System.Net.HttpStatusCode.BadRequest, bad.StatusCode);
            Assert.Contains("limit", (await bad.Content.ReadAsStringAsync()), StringComparison.Ordinal);
        }
        foreach (var (path, type) in new[] { ("/dashboard", "text/html"), ("/dashboard/dashboard.js", "text/javascript"), ("/dashboard/vendor/uPlot.min.css", "text/css") })
        {
            using var response = await client.GetAsync(path);
            Assert.True(response.IsSuccessStatusCode, path);
            Assert.Equal(type, response.Content.Headers.ContentType?.MediaType);
            Assert.True((await response.Content.ReadAsByteArrayAsync()).Length > 100, path);
        }
        using (var missing = await client.GetAsync("/dashboard/nothing.js")) Assert.Equal(System.Net.HttpStatusCode.NotFound, missing.StatusCode);
    }

    private static async Task<List<Scrape>> ParseAsync(IReadOnlyList<string> texts) =>
        [.. JsonNode.Parse(await ObservabilityTools.ParseMetricsAsync(texts))!.AsArray().Select(s => new Scrape(s!.AsArray()))];

    /// <summary>Every metric (histograms once observed, or all when <paramref name="complete"/>), with its type and labels; histograms well formed; gauges in range.</summary>
    private static void AssertShape(Scrape scrape, int layers, bool complete)
    {
        foreach (var (name, type) in Expected)
            if (complete || type != "histogram" || scrape.Type(name) != "absent")
                Assert.True(scrape.Type(name) == type, $"{name}: {scrape.Type(name)}, expected {type}");
        Assert.All(scrape.Names, n => Assert.StartsWith("moe_rag_", n));
        foreach (var (name, type) in Expected.Where(e => e.Type == "histogram"))
        {
            if (scrape.Type(name) == "absent") continue;
            foreach (var s in scrape.Of(name))
            {
                var cumulative = s.Buckets.Where(b => b.Key != "+Inf").OrderBy(b => double.Parse(b.Key, CultureInfo.InvariantCulture)).Select(b => b.Value).ToList();
                Assert.True(cumulative.Zip(cumulative.Skip(1)).All(p => p.First <= p.Second), $"{name}: buckets not cumulative");
                Assert.Equal(s.Count, s.Buckets["+Inf"]);
                Assert.True(s.Sum >= 0 && (s.Count > 0 || s.Sum == 0), $"{name}: sum {s.Sum} with count {s.Count}");
            }
        }
        Assert.InRange(scrape.One("moe_rag_num_requests_running").Value, 0, 8);
        Assert.InRange(scrape.One("moe_rag_num_requests_waiting").Value, 0, 24);
        Assert.InRange(scrape.One("moe_rag_kv_cache_usage_ratio").Value, 0, 1);
        Assert.Equal(["abort", "length", "stop"], scrape.Of("moe_rag_requests_total").Select(s => s.Labels["finish_reason"]).Order());
        Assert.Equal(layers * 2, scrape.Of("moe_rag_triggers_total").Count);
        Assert.Contains(scrape.Of("moe_rag_retrieval_errors_total"), s => s.Labels["kind"] == "timeout");
    }

    /// <summary>Counters and every histogram field are cumulative: a later scrape never shows less.</summary>
    private static void AssertNothingWentDown(Scrape earlier, Scrape later)
    {
        foreach (var (name, type) in Expected.Where(e => e.Type != "gauge"))
        {
            if (earlier.Type(name) == "absent") continue;
            var then = earlier.Of(name).ToDictionary(s => s.Key);
            foreach (var now in later.Of(name))
            {
                if (!then.TryGetValue(now.Key, out var was)) continue;
                if (type == "counter") Assert.True(now.Value >= was.Value, $"{name}{{{now.Key}}} went down: {was.Value} -> {now.Value}");
                else
                {
                    Assert.True(now.Count >= was.Count && now.Sum >= was.Sum, $"{name}{{{now.Key}}} went down");
                    Assert.All(now.Buckets, b => Assert.True(b.Value >= was.Buckets[b.Key], $"{name}{{{now.Key}}} bucket {b.Key} went down"));
                }
            }
        }
    }

    private async Task ClientAsync(int client)
    {
        for (var n = 0; n < 4; n++)
        {
            var rid = $"metrics-{client}-{n}";
            var maxTokens = 8 + (client * 7 + n * 5) % 40;
            JsonObject Rag() => (client + n) % 2 == 0 ? new() { ["mode"] = "latent", ["threshold"] = 1.2 } : new() { ["mode"] = "off" };
            var sampling = new JsonObject { ["max_new_tokens"] = maxTokens, ["temperature"] = 0 };
            if (client % 3 == 0) sampling["stop"] = new JsonArray("e ", "a");
            var prompt = $"What is the quick fox number {client} {n}?";
            var generate = new JsonObject { ["text"] = prompt, ["rid"] = rid, ["sampling_params"] = sampling, ["rag"] = Rag() };
            switch (n)
            {
                case 0:
                    Add((await server.Client.PostOkAsync("/generate", generate))["meta_info"]!);
                    break;
                case 1:
                    generate["stream"] = true;
                    Add(Http.JsonEvents(await server.Client.PostSseAsync("/generate", generate))[^1]["meta_info"]!);
                    break;
                case 2:
                {
                    var body = new JsonObject
                    {
                        ["model"] = "m", ["prompt"] = prompt, ["max_tokens"] = maxTokens, ["temperature"] = 0,
                        ["stop"] = sampling["stop"]?.DeepClone(), ["rag"] = Rag(),
                    };
                    var response = await server.Client.PostOkAsync("/v1/completions", body);
                    _served.Add(new Served(response["choices"]![0]!["finish_reason"]!.GetValue<string>(),
                        response["usage"]!["prompt_tokens"]!.GetValue<int>(), response["usage"]!["completion_tokens"]!.GetValue<int>()));
                    break;
                }
                default:
                {
                    // Aborted by rid after its first event (RAG off: an abort during a retrieval leaves a trigger without an event).
                    generate["stream"] = true;
                    generate["rag"] = new JsonObject { ["mode"] = "off" };
                    sampling["max_new_tokens"] = 200;
                    sampling.Remove("stop");
                    using var request = new HttpRequestMessage(HttpMethod.Post, "/generate") { Content = Http.Json(generate.ToJsonString()) };
                    using var response = await server.Client.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
                    response.EnsureSuccessStatusCode();
                    using var reader = new StreamReader(await response.Content.ReadAsStreamAsync());
                    var first = await reader.ReadLineAsync();
                    await server.Client.PostOkAsync("/abort_request", new JsonObject { ["rid"] = rid });
                    var events = Http.JsonEvents([first!["data: ".Length..], .. await Http.ReadEventsAsync(reader, CancellationToken.None)]);
                    Add(events[^1]["meta_info"]!);
                    break;
                }
            }
        }
    }

    private void Add(JsonNode meta) => _served.Add(new Served(meta["finish_reason"]!["type"]!.GetValue<string>(),
        meta["prompt_tokens"]!.GetValue<int>(), meta["completion_tokens"]!.GetValue<int>()));

    private async Task WaitForIdleAsync()
    {
        for (var i = 0; i < 1000; i++)
        {
            var status = server.Engine.GetStatus();
            if (status.Running + status.Waiting + status.Retrieving == 0 && status.FreeKvBlocks == status.TotalKvBlocks) return;
            await Task.Delay(10);
        }
        Assert.Fail("the engine did not become idle");
    }
}
