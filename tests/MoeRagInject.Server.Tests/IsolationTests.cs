using System.Text.Json.Nodes;
using MoeRagInject.Engine;
using MoeRagInject.Rag;

namespace MoeRagInject.Server.Tests;

/// <summary>The server with fault injection on requests whose rid names a fault, and latent RAG available to every request.</summary>
public sealed class FaultServerFixture : ServerFixture
{
    private sealed class Faults : IFaultInjection
    {
        public bool FailSampling(string rid) => rid.StartsWith("poison-sampler", StringComparison.Ordinal);

        public void CorruptInjection(string rid, Span<float> vector)
        {
            if (rid.StartsWith("poison-nan", StringComparison.Ordinal)) vector.Fill(float.NaN);
        }
    }

    protected override EngineOptions Configure(EngineOptions options) => options with { Faults = new Faults(), MaxRunningRequests = 16 };
}

/// <summary>One request's failure is its own: poisoned requests in a batch leave the others' tokens exactly as they are alone.</summary>
public sealed class IsolationTests(FaultServerFixture server) : IClassFixture<FaultServerFixture>
{
    private static JsonObject Request(int[] ids, string rid, JsonObject? rag = null, double temperature = 0) => new()
    {
        ["input_ids"] = TestData.ToJson(ids),
        ["rid"] = rid,
        ["sampling_params"] = new JsonObject { ["max_new_tokens"] = 16, ["temperature"] = temperature, ["ignore_eos"] = true },
        ["rag"] = rag ?? new JsonObject { ["mode"] = "off" },
    };

    private static int[] Prompt(int i)
    {
        var reference = TestData.ReferencePrompts[i % 4].InputIds;
        // Eight distinct prompts: the reference prompts, and the same with one token changed.
        return i < 4 ? reference : [.. reference[..^1], 10 + i];
    }

    [Fact]
    public async Task PoisonedRequestsLeaveTheOthersTokensUnchanged()
    {
        var solo = new List<int[]>();
        for (var i = 0; i < 8; i++)
            solo.Add(TestData.IntArray((await server.Client.PostOkAsync("/generate", Request(Prompt(i), $"solo-{i}")))["output_ids"]));

        var latentEveryToken = new JsonObject { ["mode"] = "latent", ["threshold"] = 0 };
        var healthy = Enumerable.Range(0, 8).Select(i => server.Client.PostOkAsync("/generate", Request(Prompt(i), $"healthy-{i}"))).ToList();
        var nan = server.Client.PostOkAsync("/generate", Request(Prompt(1), "poison-nan", latentEveryToken.DeepClone().AsObject()));
        var sampler = server.Client.PostOkAsync("/generate", Request(Prompt(2), "poison-sampler"));
        var extreme = server.Client.PostOkAsync("/generate", Request(Prompt(3), "poison-scale",
            new JsonObject { ["mode"] = "latent", ["threshold"] = 0, ["scale"] = RagOverrides.MaxScale }, temperature: 1));
        await Task.WhenAll([.. healthy, nan, sampler, extreme]);

        for (var i = 0; i < 8; i++)
        {
            var result = await healthy[i];
            Assert.Equal(solo[i], TestData.IntArray(result["output_ids"]));
            Assert.Equal("length", result["meta_info"]!["finish_reason"]!["type"]!.GetValue<string>());
        }
        // The sampler failure ends that request alone, with a message.
        var failed = (await sampler)["meta_info"]!["finish_reason"]!;
        Assert.Equal("abort", failed["type"]!.GetValue<string>());
        Assert.Contains("sampling failed", failed["message"]!.GetValue<string>());
        // The NaN injection is dropped and the request goes on without it, to its full length.
        var poisoned = (await nan)["meta_info"]!;
        Assert.Equal("length", poisoned["finish_reason"]!["type"]!.GetValue<string>());
        Assert.Equal(16, poisoned["completion_tokens"]!.GetValue<int>());
        Assert.NotEmpty(poisoned["rag"]!.AsArray());
        // The extreme (but allowed) scale is just a strong injection.
        Assert.Equal("length", (await extreme)["meta_info"]!["finish_reason"]!["type"]!.GetValue<string>());

        // And the server goes on serving.
        Assert.Equal(solo[0], TestData.IntArray((await server.Client.PostOkAsync("/generate", Request(Prompt(0), "after")))["output_ids"]));
    }

    [Theory]
    [InlineData("1e308")]
    [InlineData("20000")]
    [InlineData("-1e5")]
    public async Task AScaleOutOfRangeIsRejectedBeforeAnythingRuns(string scale)
    {
        using var response = await server.Client.PostAsync("/generate", Http.Json(
            "{\"text\": \"hi\", \"rag\": {\"mode\": \"latent\", \"scale\": " + scale + "}}"));
        Assert.Equal(400, (int)response.StatusCode);
        Assert.Contains("rag.scale", await response.Content.ReadAsStringAsync());
    }
}
