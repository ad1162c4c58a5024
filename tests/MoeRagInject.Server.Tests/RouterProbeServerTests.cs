using System.Text.Json.Nodes;
using MoeRagInject.Engine;
using MoeRagInject.Rag;

namespace MoeRagInject.Server.Tests;

/// <summary>The server watching the router probe (--trigger-signal router-probe) with a seeded probe for the test checkpoint.</summary>
public sealed class RouterProbeServerFixture : ServerFixture
{
    public const double Threshold = 0.45;

    public string ProbePath => Path.Combine(TempDirectory, RouterProbe.FileName);

    protected override EngineOptions Configure(EngineOptions options)
    {
        var rng = new Random(3);
        new RouterProbe
        {
            Layers = 2,
            Experts = 4,
            Window = 2,
            Weights = [.. Enumerable.Range(0, 8).Select(_ => (float)(rng.NextDouble() * 6 - 3))],
            Bias = 0.1,
            Threshold = Threshold,
        }.Save(ProbePath);
        return options with { RouterProbePath = ProbePath, Trigger = options.Trigger with { Signal = TriggerSignal.RouterProbe } };
    }
}

/// <summary>The router-probe signal over real HTTP: named in /get_server_info, its scores in meta_info, per request in rag.</summary>
public sealed class RouterProbeServerTests(RouterProbeServerFixture server) : IClassFixture<RouterProbeServerFixture>
{
    private HttpClient Client => server.Client;

    [Fact]
    public async Task ServerInfo_NamesTheSignalItsThresholdAndTheProbe()
    {
        var info = await Client.GetOkAsync("/get_server_info");
        Assert.Equal("router-probe", info["trigger_signal"]!.GetValue<string>());
        Assert.Equal(RouterProbeServerFixture.Threshold, info["entropy_threshold"]!.GetValue<double>(), 9);
        Assert.Equal(server.ProbePath, info["router_probe"]!.GetValue<string>());
    }

    /// <summary>
    /// RAG off, every output token's probe score comes back in meta_info.output_router_probe; a request that watches the probe
    /// at threshold 0 fires at the first token, over every layer, and its event reports that token's score.
    /// </summary>
    [Fact]
    public async Task Scores_AreReported_AndAPerRequestTriggerFiresOnThem()
    {
        var off = await Client.PostOkAsync("/generate", new JsonObject
        {
            ["text"] = "What is Quantum?",
            ["sampling_params"] = new JsonObject { ["temperature"] = 0, ["max_new_tokens"] = 5, ["ignore_eos"] = true },
            ["return_router_entropy"] = true,
            ["rag"] = new JsonObject { ["mode"] = "off" },
        });
        var scores = off["meta_info"]!["output_router_probe"]!.AsArray().Select(v => v!.GetValue<double>()).ToList();
        Assert.Equal(5, scores.Count);
        Assert.All(scores, s => Assert.InRange(s, 0, 1));

        var fired = await Client.PostOkAsync("/generate", new JsonObject
        {
            ["text"] = "What is Quantum?",
            ["sampling_params"] = new JsonObject { ["temperature"] = 0, ["max_new_tokens"] = 3 },
            ["rag"] = new JsonObject { ["mode"] = "latent", ["trigger_signal"] = "router-probe", ["threshold"] = 0 },
        });
        var e = fired["meta_info"]!["rag"]!.AsArray()[0]!;
        Assert.Equal("router-probe", e["signal"]!.GetValue<string>());
        Assert.Equal(0, e["token_index"]!.GetValue<int>());
        Assert.Equal([0, 1], e["layers"]!.AsArray().Select(l => l!.GetValue<int>()));
        Assert.Equal(scores[0], e["entropy"]!.GetValue<double>(), 6);
        Assert.Equal(0, e["threshold"]!.GetValue<double>());
    }
}
