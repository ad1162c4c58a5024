using System.Diagnostics;

namespace MoeRagInject.Server.Tests;

/// <summary>
/// A test that drives the observability tests' independent tools: skipped, saying what is missing, on a machine without
/// them (the README's test command on a fresh machine), unless MOE_RAG_INJECT_REQUIRE_TEST_TOOLS=1, which .ci/run sets
/// after installing them, so that CI runs it or fails.
/// </summary>
public sealed class ObservabilityFactAttribute : FactAttribute
{
    /// <param name="browser">Needs Node.js, npm and Chromium (the dashboard test).</param>
    /// <param name="parser">Needs Debian's python3 with python3-prometheus-client (the metrics test).</param>
    public ObservabilityFactAttribute(bool browser = false, bool parser = false)
    {
        if (ObservabilityTools.Required) return;
        var missing = ObservabilityTools.Missing(browser, parser);
        if (missing.Count > 0)
            Skip = $"{string.Join(", ", missing)} missing, so this test did not run (.ci/run installs them: apt-get install {string.Join(' ', missing)})";
    }
}

/// <summary>
/// The independent tools of the observability tests, under tests/observability, run as child processes with a time limit:
/// the official Prometheus Python client's text-format parser (Debian's python3-prometheus-client, under Debian's
/// /usr/bin/python3) and Node helpers (headless Chromium through playwright-core), installed on first use with
/// <c>npm ci</c> from the committed lock file. .ci/run installs all of them beforehand.
/// </summary>
public static class ObservabilityTools
{
    private const string Python = "/usr/bin/python3";

    /// <summary>Set by .ci/run: the tests run (and fail with what is missing) instead of skipping.</summary>
    public static bool Required => Environment.GetEnvironmentVariable("MOE_RAG_INJECT_REQUIRE_TEST_TOOLS") == "1";

    /// <summary>The Debian packages whose tools are absent here, of those the asked-for tests need.</summary>
    public static IReadOnlyList<string> Missing(bool browser, bool parser)
    {
        var missing = new List<string>();
        if (browser)
        {
            if (NodeProcess.Find("node") is null || NodeProcess.Find("npm") is null) missing.AddRange(["nodejs", "npm"]);
            if (!File.Exists(Environment.GetEnvironmentVariable("CHROMIUM") ?? "/usr/bin/chromium")) missing.Add("chromium");
        }
        if (parser && !PythonHasPrometheusClient()) missing.Add("python3-prometheus-client");
        return missing;
    }

    private static bool PythonHasPrometheusClient()
    {
        if (!File.Exists(Python)) return false;
        using var process = Process.Start(new ProcessStartInfo(Python, ["-c", "import prometheus_client"])
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        })!;
        return process.WaitForExit(30_000) && process.ExitCode == 0;
    }
    private static readonly SemaphoreSlim InstallGate = new(1, 1);
    private static readonly string[] Packages = ["playwright-core", "pngjs"];

    public static string Folder => Path.Combine(TestData.RepoRoot, "tests", "observability");

    public static async Task EnsureInstalledAsync()
    {
        await InstallGate.WaitAsync();
        try
        {
            if (Packages.All(p => Directory.Exists(Path.Combine(Folder, "node_modules", p)))) return;
            var (code, stdout, stderr) = await RunProcessAsync("npm", ["ci", "--no-audit", "--no-fund"], null, TimeSpan.FromMinutes(5));
            Assert.True(code == 0, $"npm ci in {Folder} failed ({code}):\n{stdout}\n{stderr}");
        }
        finally
        {
            InstallGate.Release();
        }
    }

    /// <summary>
    /// The scrapes as the official Python client parses them, in one process (JSON: a list with, per scrape, its families
    /// and their samples); fails the test when one does not parse.
    /// </summary>
    public static async Task<string> ParseMetricsAsync(IReadOnlyList<string> scrapes)
    {
        var folder = Directory.CreateTempSubdirectory("moe-rag-inject-scrapes-").FullName;
        try
        {
            var files = new List<string>();
            for (var i = 0; i < scrapes.Count; i++)
            {
                files.Add(Path.Combine(folder, $"scrape-{i:D3}.txt"));
                await File.WriteAllTextAsync(files[^1], scrapes[i]);
            }
            var (code, stdout, stderr) = await RunProcessAsync(Python, ["parse_metrics.py", .. files], null, TimeSpan.FromSeconds(120));
            Assert.True(code == 0, $"parse_metrics.py exited with {code}: {stderr}");
            return stdout;
        }
        finally
        {
            Directory.Delete(folder, recursive: true);
        }
    }

    /// <summary>Runs <c>node SCRIPT ARGS</c> in tests/observability and returns its stdout; fails the test on a non-zero exit.</summary>
    public static async Task<string> RunNodeAsync(string script, IReadOnlyList<string> args, string? stdin, TimeSpan timeout)
    {
        await EnsureInstalledAsync();
        var (code, stdout, stderr) = await RunProcessAsync("node", [script, .. args], stdin, timeout);
        Assert.True(code == 0, $"node {script} exited with {code}:\n{stderr}\n{stdout}");
        return stdout;
    }

    private static async Task<(int Code, string Stdout, string Stderr)> RunProcessAsync(string file, IReadOnlyList<string> args, string? stdin, TimeSpan timeout)
    {
        var info = new ProcessStartInfo(file)
        {
            WorkingDirectory = Folder,
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var arg in args) info.ArgumentList.Add(arg);
        Process process;
        try
        {
            process = Process.Start(info)!;
        }
        catch (System.ComponentModel.Win32Exception e)
        {
            Assert.Fail($"'{file}' could not be started ({e.Message}): these tests need Node.js and npm, and Debian's python3 with "
                + "python3-prometheus-client (.ci/run installs them: apt-get install nodejs npm python3-prometheus-client)");
            throw;
        }
        using (process)
        {
            var stdout = process.StandardOutput.ReadToEndAsync();
            var stderr = process.StandardError.ReadToEndAsync();
            if (stdin is not null) await process.StandardInput.WriteAsync(stdin);
            process.StandardInput.Close();
            using var limit = new CancellationTokenSource(timeout);
            try
            {
                await process.WaitForExitAsync(limit.Token);
            }
            catch (OperationCanceledException)
            {
                process.Kill(entireProcessTree: true);
                Assert.Fail($"{file} {string.Join(' ', args)} did not finish within {timeout.TotalSeconds} s:\n{await stderr}");
            }
            return (process.ExitCode, await stdout, await stderr);
        }
    }
}
