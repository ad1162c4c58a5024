using System.Diagnostics;
using System.Text;
using System.Text.RegularExpressions;

namespace MoeRagInject.Server.Tests;

/// <summary>A test that needs Node.js and npm on the PATH: skipped, saying why, where they are missing.</summary>
public sealed class NodeFactAttribute : FactAttribute
{
    public NodeFactAttribute()
    {
        if (ObservabilityTools.Required) return;
        foreach (var tool in new[] { "node", "npm" })
            if (NodeProcess.Find(tool) is null)
                Skip = $"{tool} is not on the PATH, so the official openai npm client was not run (.ci/run installs Node.js where apt-get can)";
    }
}

/// <summary>
/// The official <c>openai</c> npm package (pinned in tests/node-openai/package-lock.json, installed with <c>npm ci</c>) runs its
/// test file against this class's real server: n, logprobs with top_logprobs, streaming with include_usage, stop strings,
/// seeds and the 400s. Node's own test runner reports each test; all of them must pass.
/// </summary>
public sealed partial class OpenAiNodeClientTests(ServerFixture server) : IClassFixture<ServerFixture>
{
    private static string Folder => Path.Combine(TestData.RepoRoot, "tests", "node-openai");

    [NodeFact]
    public async Task TheOfficialOpenAiClient_PassesEveryTest()
    {
        await InstallAsync();
        var baseUrl = new Uri(server.Host.BaseAddress, "v1").ToString();
        var (code, output) = await NodeProcess.RunAsync("node", ["--test", "--test-reporter=tap", "openai-client.test.mjs"], Folder,
            TimeSpan.FromMinutes(5), ("MOE_RAG_BASE_URL", baseUrl));
        Assert.True(code == 0, $"node --test exited with {code}:\n{output}");
        var declared = TestCall().Matches(await File.ReadAllTextAsync(Path.Combine(Folder, "openai-client.test.mjs"))).Count;
        Assert.True(declared >= 7, $"the test file declares {declared} tests");
        Assert.Matches($@"(?m)^# pass {declared}$", output);
        Assert.Matches(@"(?m)^# fail 0$", output);
    }

    /// <summary><c>npm ci</c> when node_modules is missing or older than the lock file (a clean clone, or a changed pin).</summary>
    private static async Task InstallAsync()
    {
        var installed = Path.Combine(Folder, "node_modules", ".package-lock.json");
        var lockFile = Path.Combine(Folder, "package-lock.json");
        if (File.Exists(installed) && File.GetLastWriteTimeUtc(installed) >= File.GetLastWriteTimeUtc(lockFile)) return;
        var (code, output) = await NodeProcess.RunAsync("npm", ["ci", "--no-audit", "--no-fund"], Folder, TimeSpan.FromMinutes(3));
        Assert.True(code == 0, $"npm ci in tests/node-openai failed ({code}):\n{output}");
    }

    [GeneratedRegex(@"(?m)^test\(")]
    private static partial Regex TestCall();
}

/// <summary>Runs a Node.js tool with a deadline, collecting stdout and stderr together.</summary>
internal static class NodeProcess
{
    public static string? Find(string tool)
    {
        foreach (var dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries))
        {
            var path = Path.Combine(dir, tool);
            if (File.Exists(path)) return path;
        }
        return null;
    }

    public static async Task<(int ExitCode, string Output)> RunAsync(string tool, string[] arguments, string directory, TimeSpan timeout,
        params (string Name, string Value)[] environment)
    {
        var start = new ProcessStartInfo(Find(tool) ?? tool)
        {
            WorkingDirectory = directory,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var argument in arguments) start.ArgumentList.Add(argument);
        foreach (var (name, value) in environment) start.Environment[name] = value;
        var output = new StringBuilder();
        using var process = new Process { StartInfo = start };
        process.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (output) output.AppendLine(e.Data); };
        process.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (output) output.AppendLine(e.Data); };
        process.Start();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        using var deadline = new CancellationTokenSource(timeout);
        try
        {
            await process.WaitForExitAsync(deadline.Token);
        }
        catch (OperationCanceledException)
        {
            process.Kill(entireProcessTree: true);
            lock (output) return (-1, $"{tool} did not finish within {timeout.TotalSeconds:F0} s:\n{output}");
        }
        process.WaitForExit(); // drains the output readers
        lock (output) return (process.ExitCode, output.ToString());
    }
}
