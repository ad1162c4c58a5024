using System.Net;
using System.Text.Json.Nodes;
using MoeRagInject.Backend.Cpu;
using MoeRagInject.Engine;
using MoeRagInject.Rag;

namespace MoeRagInject.Server.Tests;

/// <summary>The host listens before the model has loaded: 503 until then, 200 after; a failed load stays 503 with the reason.</summary>
public sealed class LoadingTests
{
    [Fact]
    public async Task Health_Is503WhileLoading_Then200()
    {
        var loading = new TaskCompletionSource<IGenerationEngine>(TaskCreationOptions.RunContinuationsAsynchronously);
        await using var host = ServerHost.Create(new ServerOptions { Port = 0 }, loading.Task);
        await host.StartAsync();
        using var client = new HttpClient { BaseAddress = host.BaseAddress };

        using (var health = await client.GetAsync("/health"))
            Assert.Equal(HttpStatusCode.ServiceUnavailable, health.StatusCode);
        using (var generate = await client.PostAsync("/generate", Http.Json("""{"text": "hi"}""")))
        {
            Assert.Equal(HttpStatusCode.ServiceUnavailable, generate.StatusCode);
            var error = JsonNode.Parse(await generate.Content.ReadAsStringAsync())!["error"]!;
            Assert.Contains("still loading", error["message"]!.GetValue<string>());
        }

        var engine = await InferenceEngine.CreateAsync(new EngineOptions
        {
            ModelPath = TestData.CheckpointPath,
            Runner = new CpuRunnerFactory(2),
            Mode = InjectionMode.Off,
            LogDir = Path.Combine(Path.GetTempPath(), "moe-rag-inject-loading-test"),
            Notices = TextWriter.Null,
        });
        await using (engine)
        {
            loading.SetResult(engine);
            using (var health = await client.GetAsync("/health"))
                Assert.Equal(HttpStatusCode.OK, health.StatusCode);
            var result = await client.PostOkAsync("/generate", JsonNode.Parse("""{"text": "hi", "sampling_params": {"max_new_tokens": 2}}""")!);
            Assert.Equal(2, result["meta_info"]!["completion_tokens"]!.GetValue<int>());
            await host.StopAsync();
        }
    }

    [Fact]
    public async Task Health_StaysUnavailable_WithTheReason_WhenLoadingFails()
    {
        var failed = Task.FromException<IGenerationEngine>(new DirectoryNotFoundException("model folder not found: /nowhere"));
        await using var host = ServerHost.Create(new ServerOptions { Port = 0 }, failed);
        await host.StartAsync();
        using var client = new HttpClient { BaseAddress = host.BaseAddress };
        using var health = await client.GetAsync("/health");
        Assert.Equal(HttpStatusCode.ServiceUnavailable, health.StatusCode);
        Assert.Contains("/nowhere", await health.Content.ReadAsStringAsync());
    }
}
