using System.Diagnostics;
using System.Net.Http.Json;
using System.Text.Json.Nodes;

namespace MoeRagInject.Server.Tests;

/// <summary>
/// <c>serve</c> as a user runs it: the built CLI in a process of its own on a free port, asked over real HTTP what model it
/// serves. The OpenAI id is the model folder's name, or --served-model-name, never a path of this machine.
/// </summary>
public sealed class ServeCommandTests
{
    [Fact]
    public async Task Models_WithoutModelPath_NamesTheEmbeddedModelByItsFolder()
    {
        await using var server = await CliServer.StartAsync();
        var card = await server.ModelCardAsync();
        Assert.Equal("moe-wordnet-demo", card["id"]!.GetValue<string>());
        Assert.Equal("moe-wordnet-demo", card["root"]!.GetValue<string>());
        var info = await server.Client.GetFromJsonAsync<JsonNode>("/get_model_info");
        Assert.Equal("moe-wordnet-demo", info!["served_model_name"]!.GetValue<string>());
    }

    [Fact]
    public async Task Models_WithServedModelName_UsesIt_InModelsAndInCompletions()
    {
        await using var server = await CliServer.StartAsync("--model-path", TestData.CheckpointPath + "/", "--served-model-name", "mixtral-test",
            "--rag-mode", "off");
        Assert.Equal("mixtral-test", (await server.ModelCardAsync())["id"]!.GetValue<string>());
        using var response = await server.Client.PostAsync("/v1/completions",
            Http.Json("""{"model": "mixtral-test", "prompt": "Hello", "max_tokens": 2}"""));
        var completion = JsonNode.Parse(await response.Content.ReadAsStringAsync())!;
        Assert.True(response.IsSuccessStatusCode, completion.ToJsonString());
        Assert.Equal("mixtral-test", completion["model"]!.GetValue<string>());
    }

    [Fact]
    public async Task Models_WithModelPath_NamesItByItsFolder()
    {
        await using var server = await CliServer.StartAsync("--model-path", TestData.CheckpointPath + "/", "--rag-mode", "off");
        Assert.Equal("a-fp32", (await server.ModelCardAsync())["id"]!.GetValue<string>());
    }

    /// <summary>`dotnet moe-rag-inject.dll serve --port 0 ...`, up until its "listening on" line, and killed at the end.</summary>
    private sealed class CliServer : IAsyncDisposable
    {
        private readonly Process _process;
        private readonly string _logDirectory;

        private CliServer(Process process, Uri address, string logDirectory)
        {
            _process = process;
            _logDirectory = logDirectory;
            Client = new HttpClient { BaseAddress = address, Timeout = TimeSpan.FromSeconds(60) };
        }

        public HttpClient Client { get; }

        public static async Task<CliServer> StartAsync(params string[] args)
        {
            var logs = Directory.CreateTempSubdirectory("moe-rag-inject-serve-test-").FullName;
            var start = new ProcessStartInfo("dotnet")
            {
                RedirectStandardOutput = true,
                RedirectStandardError = true,
                WorkingDirectory = logs,
            };
            foreach (var arg in (string[])[Path.Combine(AppContext.BaseDirectory, "moe-rag-inject.dll"), "serve", "--port", "0", "--threads", "2",
                         "--log-dir", logs, .. args])
                start.ArgumentList.Add(arg);
            var process = Process.Start(start)!;
            var errors = process.StandardError.ReadToEndAsync();
            using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(120));
            try
            {
                while (await process.StandardOutput.ReadLineAsync(timeout.Token) is { } line)
                {
                    const string marker = "listening on ";
                    var at = line.IndexOf(marker, StringComparison.Ordinal);
                    if (at >= 0) return new CliServer(process, new Uri(line[(at + marker.Length)..]), logs);
                }
            }
            catch (OperationCanceledException)
            {
                // Reported below with what the server said.
            }
            process.Kill(entireProcessTree: true);
            await process.WaitForExitAsync();
            throw new Xunit.Sdk.XunitException($"serve {string.Join(' ', args)} did not start: {await errors}");
        }

        public async Task<JsonNode> ModelCardAsync()
        {
            var models = await Client.GetFromJsonAsync<JsonNode>("/v1/models");
            return models!["data"]!.AsArray().Single()!;
        }

        public async ValueTask DisposeAsync()
        {
            Client.Dispose();
            if (!_process.HasExited) _process.Kill(entireProcessTree: true);
            await _process.WaitForExitAsync();
            _process.Dispose();
            Directory.Delete(_logDirectory, recursive: true);
        }
    }
}
