using System.CommandLine;
using System.Diagnostics;
using System.Text.Json.Nodes;
using MoeRagInject.Backend.Cpu;
using MoeRagInject.Cli;
using MoeRagInject.Cli.CommandLine;
using MoeRagInject.Rag;

namespace MoeRagInject.Server.Tests;

/// <summary>The CLI: its options' mapping onto EngineOptions, and the commands run in-process through Program.Main.</summary>
public sealed class CliTests
{
    /// <summary>The engine options on a command of their own, parsed as serve, generate and bench parse them.</summary>
    private static (EngineFlags Flags, ParseResult Parse) ParseEngine(params string[] args)
    {
        var flags = new EngineFlags();
        var command = new Command("engine");
        flags.AddTo(command);
        return (flags, command.Parse(args));
    }

    [Fact]
    public void EngineFlags_MapOntoEngineOptions()
    {
        var (flags, parse) = ParseEngine(
            "--model-path", TestData.CheckpointPath, "--entropy-threshold", "1.25", "--log-dir", "/tmp/x", "--load-format", "dummy",
            "--context-length", "128", "--max-running-requests", "3", "--threads", "2", "--rag-mode", "PROMPT", "--trigger-layers", "0,1",
            "--trigger-aggregation", "mean", "--cooldown-tokens", "2", "--max-retrievals", "7", "--injection-scale", "-0.5",
            "--injection-layers", "1", "--injection-tokens", "4", "--injector-proj", "identity", "--projection-seed", "9",
            "--retriever", "/tmp/corpus.jsonl", "--retrieval-timeout-ms=250", "--retrieval-top-k", "5", "--query-window", "16",
            "--kv-cache-tokens", "4096", "--mem-fraction-static", "0.5", "--chunked-prefill-size", "64", "--max-prefill-tokens", "512",
            "--cuda-graph-max-bs", "8", "--disable-cuda-graph", "--deterministic", "--log-fsync");
        Assert.Empty(parse.Errors);
        var o = flags.ToOptions(parse);
        Assert.Equal(TestData.CheckpointPath, o.ModelPath);
        Assert.Equal("cpu", o.Runner.Device);
        Assert.Equal("dummy", o.LoadFormat);
        Assert.Equal(128, o.ContextLength);
        Assert.Equal(3, o.MaxRunningRequests);
        Assert.Equal(2, Assert.IsType<CpuRunnerFactory>(o.Runner).Threads);
        Assert.Equal(InjectionMode.Prompt, o.Mode);
        Assert.Equal(1.25, o.Trigger.Threshold);
        Assert.Equal([0, 1], o.Trigger.Layers);
        Assert.Equal(LayerAggregation.Mean, o.Trigger.Aggregation);
        Assert.Equal(2, o.Trigger.CooldownTokens);
        Assert.Equal(7, o.Trigger.MaxRetrievalsPerRequest);
        Assert.Equal(-0.5f, o.InjectionScale);
        Assert.Equal([1], o.InjectionLayers);
        Assert.Equal(4, o.InjectionTokens);
        Assert.Equal(ProjectionKind.Identity, o.Projection);
        Assert.Equal(9, o.ProjectionSeed);
        Assert.Equal("/tmp/corpus.jsonl", o.Retriever);
        Assert.Equal(TimeSpan.FromMilliseconds(250), o.RetrievalTimeout);
        Assert.Equal(5, o.RetrievalTopK);
        Assert.Equal(16, o.QueryWindowTokens);
        Assert.Equal("/tmp/x", o.LogDir);
        Assert.Equal(4096, o.KvCacheTokens);
        Assert.Equal(0.5, o.MemFractionStatic);
        Assert.Equal(64, o.ChunkedPrefillSize);
        Assert.Equal(512, o.MaxPrefillTokens);
        Assert.Equal(8, o.CudaGraphMaxBatchSize);
        Assert.True(o.DisableCudaGraph && o.Deterministic && o.LogFsync);

        // Without flags: the engine's own defaults (the words "all", "fired" and "rest" parse to the same nulls).
        var (plainFlags, plain) = ParseEngine("--model-path", TestData.CheckpointPath);
        var defaults = plainFlags.ToOptions(plain);
        var engineDefaults = new MoeRagInject.Engine.EngineOptions { ModelPath = TestData.CheckpointPath, Runner = defaults.Runner };
        Assert.Equal(engineDefaults, defaults);
        Assert.Equal(0.8, defaults.Trigger.Threshold);
        Assert.Equal("./logs", defaults.LogDir);
        var (wordFlags, words) = ParseEngine("--model-path", TestData.CheckpointPath, "--trigger-layers", "all", "--injection-layers", "fired",
            "--injection-tokens", "rest");
        Assert.Equal(defaults with { Runner = null! }, wordFlags.ToOptions(words) with { Runner = null! });
    }

    /// <summary>
    /// --trigger-signal router-probe: the probe file is the one given (or the model's), --entropy-threshold given with it is the
    /// probe's threshold (the entropy signals keep theirs), and without it the engine takes the probe's calibrated one.
    /// </summary>
    [Fact]
    public void EngineFlags_RouterProbe_MapOntoEngineOptions()
    {
        var probe = Path.Combine(Path.GetTempPath(), $"probe-{Guid.NewGuid():N}.json");
        File.WriteAllText(probe, "{}");
        try
        {
            var (flags, parse) = ParseEngine("--model-path", TestData.CheckpointPath, "--trigger-signal", "router-probe", "--router-probe", probe,
                "--entropy-threshold", "0.3");
            Assert.Empty(parse.Errors);
            var o = flags.ToOptions(parse);
            Assert.Equal(TriggerSignal.RouterProbe, o.Trigger.Signal);
            Assert.Equal(probe, o.RouterProbePath);
            Assert.Equal(0.3, o.RouterProbeThreshold);
            Assert.Equal(0.8, o.Trigger.Threshold);

            (flags, parse) = ParseEngine("--model-path", TestData.CheckpointPath, "--trigger-signal", "router-probe", "--router-probe", probe);
            o = flags.ToOptions(parse);
            Assert.Null(o.RouterProbeThreshold);
            (flags, parse) = ParseEngine("--model-path", TestData.CheckpointPath, "--trigger-signal", "output-entropy", "--entropy-threshold", "1.5");
            o = flags.ToOptions(parse);
            Assert.Equal((1.5, (double?)null, (string?)null), (o.Trigger.Threshold, o.RouterProbeThreshold, o.RouterProbePath));
        }
        finally
        {
            File.Delete(probe);
        }
    }

    [Fact]
    public void EngineFlags_WithoutModelPath_ServeTheEmbeddedModelAndCorpus()
    {
        var (flags, parse) = ParseEngine();
        var o = flags.ToOptions(parse);
        Assert.Equal(Path.Combine(TestData.RepoRoot, "assets", "models", "moe-wordnet-demo"), o.ModelPath);
        Assert.Equal(Path.Combine(TestData.RepoRoot, "assets", "corpus", "wordnet", "wordnet-demo.jsonl.gz"), o.Retriever);
    }

    internal static async Task<(int Code, string Out, string Error)> RunAsync(params string[] args)
    {
        var (oldOut, oldError) = (Console.Out, Console.Error);
        using var output = new StringWriter();
        using var error = new StringWriter();
        Console.SetOut(output);
        Console.SetError(error);
        try
        {
            var code = await Program.Main(args);
            return (code, output.ToString(), error.ToString());
        }
        finally
        {
            Console.SetOut(oldOut);
            Console.SetError(oldError);
        }
    }

    /// <summary>Every mistake is exit 2 and one line on stderr that names the flag (or word) at fault, before any work starts.</summary>
    [Theory]
    [InlineData(new[] { "serve", "--bogus" }, "'--bogus'")]
    [InlineData(new[] { "serve", "--prot", "3" }, "'--prot'. Did you mean --port?")]
    [InlineData(new[] { "serve", "--port", "70000" }, "invalid value for --port: 70000 (must be in [0, 65535])")]
    [InlineData(new[] { "serve", "--port", "abc" }, "invalid value for --port: 'abc' is not an integer")]
    [InlineData(new[] { "serve", "--port" }, "'--port'")]
    [InlineData(new[] { "serve", "--device", "gpu" }, "invalid value for --device: 'gpu'")]
    [InlineData(new[] { "serve", "--device", "cuda:x" }, "invalid value for --device: 'cuda:x'")]
    [InlineData(new[] { "serve", "--log-level", "loud" }, "invalid value for --log-level: 'loud' (expected debug, info, warning or error)")]
    [InlineData(new[] { "serve", "--rag-mode", "loud" }, "invalid value for --rag-mode: 'loud' (expected off, latent or prompt)")]
    [InlineData(new[] { "serve", "--trigger-layers", "0,x" }, "invalid value for --trigger-layers: 'x' is not an integer")]
    [InlineData(new[] { "serve", "--trigger-layers", "-1" }, "invalid value for --trigger-layers: -1 (must be >= 0)")]
    [InlineData(new[] { "serve", "--trigger-aggregation", "median" }, "invalid value for --trigger-aggregation: 'median'")]
    [InlineData(new[] { "serve", "--injector-proj", "/no/such.safetensors" }, "invalid value for --injector-proj: '/no/such.safetensors'")]
    [InlineData(new[] { "serve", "--injection-tokens", "0" }, "invalid value for --injection-tokens: '0'")]
    [InlineData(new[] { "serve", "--entropy-threshold", "-1" }, "invalid value for --entropy-threshold: -1 (must be >= 0)")]
    [InlineData(new[] { "serve", "--trigger-signal", "vibes" }, "invalid value for --trigger-signal: 'vibes' (expected router-entropy, output-entropy or router-probe)")]
    [InlineData(new[] { "serve", "--trigger-signal", "router-probe", "--entropy-threshold", "1.5" }, "invalid value for --entropy-threshold: 1.5 (with --trigger-signal router-probe it is a probability in [0, 1])")]
    [InlineData(new[] { "eval", "--trigger-signal", "vibes" }, "invalid value for --trigger-signal: 'vibes' (expected router-entropy, output-entropy or router-probe)")]
    [InlineData(new[] { "serve", "--entropy-threshold", "1e999" }, "invalid value for --entropy-threshold: '1e999' is not a number")]
    [InlineData(new[] { "serve", "--mem-fraction-static", "0" }, "invalid value for --mem-fraction-static")]
    [InlineData(new[] { "serve", "--model-config", "mixtral-8x7b" }, "--model-config gives a shape without weights")]
    [InlineData(new[] { "serve", "--deterministic=maybe" }, "'maybe'")]
    [InlineData(new[] { "serve", "--expert-layout", "tiled" }, "invalid value for --expert-layout: 'tiled' (expected row-major or boxed)")]
    [InlineData(new[] { "generate" }, "generate needs a prompt")]
    [InlineData(new[] { "generate", "hi", "there" }, "'there'")]
    [InlineData(new[] { "generate", "hi", "--max-new-tokens", "-1" }, "invalid value for --max-new-tokens: -1 (must be >= 0)")]
    [InlineData(new[] { "generate", "hi", "--top-p", "0" }, "--top-p must be in (0, 1]")]
    [InlineData(new[] { "generate", "hi", "--temperature", "hot" }, "invalid value for --temperature: 'hot' is not a number")]
    [InlineData(new[] { "index", "a.jsonl" }, "index needs --output")]
    [InlineData(new[] { "index", "--output", "x.db" }, "index needs at least one input file")]
    [InlineData(new[] { "index", "a.jsonl", "--output", "x.db", "--max-passage-chars", "10" }, "invalid value for --max-passage-chars: 10")]
    [InlineData(new[] { "bench", "--batch-sizes", "1,0" }, "invalid value for --batch-sizes: 0 (must be >= 1)")]
    [InlineData(new[] { "bench", "--modes", "on" }, "invalid value for --modes: 'on'")]
    [InlineData(new[] { "bench", "--trigger-rate", "2" }, "invalid value for --trigger-rate: 2 (must be in [0, 1])")]
    [InlineData(new[] { "calibrate", "--target-rate", "1.5" }, "invalid value for --target-rate: 1.5")]
    [InlineData(new[] { "eval", "--modes", "none,bogus" }, "invalid value for --modes: 'bogus'")]
    [InlineData(new[] { "eval", "--sweep-limit", "0" }, "invalid value for --sweep-limit: '0'")]
    [InlineData(new[] { "eval", "--sweep-percentiles", "50,100" }, "invalid value for --sweep-percentiles: '100'")]
    [InlineData(new[] { "check-device", "--device", "null" }, "invalid value for --device: 'null' (expected cpu, cuda or cuda:N)")]
    [InlineData(new[] { "check-device", "--groups", "ops,gpu" }, "invalid value for --groups: 'gpu'")]
    [InlineData(new[] { "frobnicate" }, "'frobnicate'")]
    [InlineData(new[] { "serv" }, "'serv'. Did you mean serve?")]
    public async Task Main_CommandLineMistakes_AreExit2_OneLineNamingTheFlag(string[] args, string fragment)
    {
        var (code, output, error) = await RunAsync(args);
        Assert.Equal(2, code);
        Assert.Equal("", output);
        Assert.Contains(fragment, error, StringComparison.Ordinal);
        Assert.Single(error.TrimEnd().Split('\n'));
        Assert.StartsWith("moe-rag-inject: ", error, StringComparison.Ordinal);
    }

    /// <summary>The command lines the repository's own scripts and documents give (tools/gpu/run.sh, docs/, README) still parse.</summary>
    [Theory]
    [InlineData("check-device --device cuda --json out/check.json")]
    [InlineData("check-device --device cuda --groups none --case /tmp/mixtral-2l --json out/parity.json")]
    [InlineData("bench --device cuda --load-format dummy --model-config mixtral-8x7b --batch-sizes 1,8,64,256 --retriever assets/corpus/wordnet/wordnet-demo.jsonl.gz --modes off,latent --input-len 128 --output-len 128 --max-running-requests 256 --json --out out/bench.json")]
    [InlineData("bench --device cuda --load-format dummy --model-config mixtral-8x7b --batch-sizes 1,64 --modes off --input-len 128 --output-len 32 --max-running-requests 64 --deterministic --json --out out/bench-det-on.json")]
    [InlineData("bench --device null --batch-sizes 1,64,256 --input-len 64 --output-len 128 --max-running-requests 256 --trigger-rate 0.05 --null-step-ms 6")]
    [InlineData("bench --batch-sizes 1,4,16 --input-len 16 --output-len 32")]
    [InlineData("eval --modes none,latent_random,latent_identity --limit 500 --no-sweep --latent-scale 300 --out /tmp/eval-scale/eval.json")]
    [InlineData("generate \"What is Quantum？\" --max-new-tokens 32 --json")]
    [InlineData("serve --device cuda --model-path /models/mixtral --served-model-name mixtral")]
    public void CommandLines_OfTheRepositorysScriptsAndDocs_Parse(string line)
    {
        var parse = CliRoot.Create().Parse(line);
        Assert.True(parse.Errors.Count == 0, string.Join("; ", parse.Errors.Select(e => e.Message)));
    }

    [Theory]
    [InlineData(new[] { "generate", "hi", "--model-path", "/no/such/model" }, "model folder not found: /no/such/model")]
    [InlineData(new[] { "index", "/no/such.jsonl", "--output", "/tmp/x.db" }, "input file not found")]
    [InlineData(new[] { "generate", "hi", "--router-probe", "/no/such/probe.json" }, "/no/such/probe.json does not exist: run `./moe-rag-inject calibrate`")]
    public async Task Main_Failures_AreExit1_OneLineWithoutAStackTrace(string[] args, string fragment)
    {
        var (code, _, error) = await RunAsync(args);
        Assert.Equal(1, code);
        Assert.Contains(fragment, error, StringComparison.Ordinal);
        Assert.Single(error.TrimEnd().Split('\n'));
        Assert.DoesNotContain("   at ", error, StringComparison.Ordinal);
    }

    /// <summary>--trigger-signal router-probe on a model folder without router-probe.json: exit 1, and the line says how to make one.</summary>
    [Fact]
    public async Task Main_RouterProbeSignalWithoutAProbe_SaysToRunCalibrate()
    {
        Assert.False(File.Exists(Path.Combine(TestData.CheckpointPath, "router-probe.json")));
        var (code, _, error) = await RunAsync("generate", "hi", "--trigger-signal", "router-probe", "--model-path", TestData.CheckpointPath);
        Assert.Equal(1, code);
        Assert.Contains($"{Path.Combine(TestData.CheckpointPath, "router-probe.json")} does not exist: run `./moe-rag-inject calibrate`", error, StringComparison.Ordinal);
        Assert.Single(error.TrimEnd().Split('\n'));
    }

    [Fact]
    public async Task Main_WithoutACommand_ListsTheCommandsOnStderr_Exit2()
    {
        var (code, output, error) = await RunAsync();
        Assert.Equal(2, code);
        Assert.Equal("", output);
        foreach (var command in (string[])["serve", "generate", "index", "bench", "calibrate", "eval", "check-device"])
            Assert.Contains($"\n  {command} ", error, StringComparison.Ordinal);
    }

    /// <summary>
    /// --expert-layout reaches the runner's options (row-major unless asked); the CPU backend, which has no boxed kernels,
    /// refuses the boxed layout at load with one line naming the flag.
    /// </summary>
    [Fact]
    public async Task ExpertLayout_ReachesTheRunner_AndTheCpuRefusesBoxed()
    {
        var (flags, parse) = ParseEngine("--model-path", TestData.CheckpointPath, "--expert-layout", "boxed");
        Assert.Equal(MoeRagInject.Backend.ExpertLayout.Boxed, flags.ToOptions(parse).ExpertLayout);
        var (plainFlags, plain) = ParseEngine("--model-path", TestData.CheckpointPath);
        Assert.Equal(MoeRagInject.Backend.ExpertLayout.RowMajor, plainFlags.ToOptions(plain).ExpertLayout);

        var (code, _, error) = await RunAsync("generate", "hi", "--expert-layout", "boxed", "--max-new-tokens", "1");
        Assert.Equal(1, code);
        Assert.Contains("--expert-layout boxed", error, StringComparison.Ordinal);
        Assert.Single(error.TrimEnd().Split('\n'));
    }

    /// <summary>Without a GPU, --device cuda fails at load with one line that says what is missing (with one, it would run).</summary>
    [Fact]
    public async Task Main_CudaWithoutAGpu_SaysWhatIsMissing()
    {
        if (MoeRagInject.Backend.Cuda.CudaRunnerFactory.IsAvailable(out _)) return;
        var (code, _, error) = await RunAsync("generate", "hi", "--device", "cuda", "--max-new-tokens", "1");
        Assert.Equal(1, code);
        Assert.Contains("--device cuda:", error, StringComparison.Ordinal);
        Assert.Contains("CUDA", error, StringComparison.Ordinal);
    }

    public static IEnumerable<object[]> Commands() => CliFlagInventory.Flags.Select(f => f.Command).Distinct().Select(c => new object[] { c });

    /// <summary>Every command's --help goes to stdout, exits 0, and is the text the README shows for it.</summary>
    [Theory]
    [MemberData(nameof(Commands))]
    public async Task Help_OfEachCommand_Works_AndIsInTheReadme(string command)
    {
        var (code, output, error) = await RunAsync(command, "--help");
        Assert.True(code == 0, error);
        Assert.StartsWith("Description:\n", output, StringComparison.Ordinal);
        Assert.Contains($"Usage:\n  moe-rag-inject {command} ", output, StringComparison.Ordinal);
        Assert.Contains("-?, -h, --help", output, StringComparison.Ordinal);

        static string Lines(string text) => string.Join('\n', text.Split('\n').Select(l => l.TrimEnd())).Trim();
        var readme = Lines(await File.ReadAllTextAsync(Path.Combine(TestData.RepoRoot, "README.md")));
        Assert.True(readme.Contains($"$ ./moe-rag-inject {command} --help\n{Lines(output)}\n```", StringComparison.Ordinal),
            $"README.md does not show the current output of `{command} --help`:\n{output}");
    }

    /// <summary>Tab completion: System.CommandLine's [suggest] directive answers from the same options the parser uses.</summary>
    [Theory]
    [InlineData("ser", new[] { "serve" })]
    [InlineData("serve --rag-mode ", new[] { "latent", "off", "prompt" })]
    [InlineData("serve --log-l", new[] { "--log-level" })]
    [InlineData("generate hi --device ", new[] { "cpu", "cuda", "cuda:0", "null" })]
    [InlineData("check-device --groups ", new[] { "engine", "gemm-bench", "graph", "models", "none", "ops" })]
    public async Task Suggest_Directive_CompletesCommandsOptionsAndValues(string line, string[] expected)
    {
        var (code, output, error) = await RunAsync($"[suggest:{line.Length}]", line);
        Assert.True(code == 0, error);
        Assert.Equal(expected, output.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Order(StringComparer.Ordinal));
    }

    /// <summary>The bash completion script, in a real bash, asking the real executable (the apphost built beside the tests).</summary>
    [Fact]
    public async Task BashCompletionScript_CompletesOptionValues()
    {
        var program = Path.Combine(AppContext.BaseDirectory, "moe-rag-inject");
        if (!File.Exists("/bin/bash") || !File.Exists(program)) Assert.Fail($"needs /bin/bash and {program}");
        var script = Path.Combine(TestData.RepoRoot, "tools", "completion", "moe-rag-inject.bash");
        var commands = $"""
            source '{script}'
            COMP_LINE='{program} serve --trigger-aggregation m'; COMP_POINT=${"{"}#COMP_LINE{"}"}
            COMP_WORDS=('{program}' serve --trigger-aggregation m); COMP_CWORD=3
            _moe_rag_inject; printf '%s\n' "${"{"}COMPREPLY[@]{"}"}"
            """;
        var start = new ProcessStartInfo("/bin/bash", ["-c", commands]) { RedirectStandardOutput = true, RedirectStandardError = true };
        using var bash = Process.Start(start)!;
        var output = await bash.StandardOutput.ReadToEndAsync();
        await bash.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(60));
        Assert.Equal(["max", "mean"], output.Split('\n', StringSplitOptions.RemoveEmptyEntries).Order(StringComparer.Ordinal));
    }

    [Fact]
    public async Task Generate_Json_IsTheLastLine_AndMatchesTheReference()
    {
        var prompt = TestData.ReferencePrompts[0];
        var (code, output, error) = await RunAsync("generate", prompt.Text, "--model-path", TestData.CheckpointPath,
            "--max-new-tokens", "12", "--ignore-eos", "--rag-mode", "off", "--log-dir", Path.Combine(Path.GetTempPath(), "moe-rag-inject-cli-test"), "--json");
        Assert.True(code == 0, error);
        var lines = output.TrimEnd('\n').Split('\n');
        var result = JsonNode.Parse(lines[^1])!;
        Assert.Equal(prompt.GreedyIds, TestData.IntArray(result["output_ids"]));
        // The text comes first, as without --json, and is the JSON's text.
        Assert.Equal(result["text"]!.GetValue<string>() + "\n", output[..^(lines[^1].Length + 1)]);
    }

    /// <summary>
    /// The embedded demo model answers "What is &lt;term&gt;?" with WordNet's definition: stdout is exactly that text; the
    /// [MoE-RAG] notices (latent RAG fires at the default 0.8) and the events go to stderr.
    /// </summary>
    [Fact]
    public async Task Generate_WithTheDemoModel_StdoutIsOnlyTheText_NoticesAndEventsOnStderr()
    {
        var qa = File.ReadLines(Path.Combine(TestData.RepoRoot, "assets", "eval", "wordnet-qa.jsonl"))
            .Select(l => JsonNode.Parse(l)!).First(q => q["id"]!.GetValue<string>() == "qa-quantum");
        var dir = Directory.CreateTempSubdirectory("moe-rag-inject-cli-").FullName;
        try
        {
            var (code, output, error) = await RunAsync("generate", qa["question"]!.GetValue<string>(), "--max-new-tokens", "64",
                "--log-dir", dir);
            Assert.True(code == 0, error);
            Assert.Equal(" " + qa["answer"]!.GetValue<string>() + "\n", output);

            var lines = error.TrimEnd('\n').Split('\n');
            Assert.Contains(lines, l => l.StartsWith("[MoE-RAG] entropy=", StringComparison.Ordinal) && l.EndsWith("-> triggering RAG", StringComparison.Ordinal));
            var events = lines.Where(l => l.StartsWith('{')).Select(l => JsonNode.Parse(l)!).ToList();
            Assert.NotEmpty(events);
            Assert.All(events, e => Assert.Equal("latent", e["mode"]!.GetValue<string>()));
            Assert.Equal(lines.Count(l => l.StartsWith("[MoE-RAG]", StringComparison.Ordinal)), events.Count);
            Assert.EndsWith($"{events.Count} RAG events]", lines[^1], StringComparison.Ordinal);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public async Task Index_BuildsAnIndex_AndPrintsTheCount()
    {
        var dir = Directory.CreateTempSubdirectory("moe-rag-inject-cli-").FullName;
        try
        {
            var (code, output, error) = await RunAsync("index", Path.Combine(TestData.RepoRoot, "assets", "corpus", "default.jsonl"),
                "--output", Path.Combine(dir, "index.db"));
            Assert.True(code == 0, error);
            Assert.Contains("indexed 42 passages", output, StringComparison.Ordinal);
            Assert.True(File.Exists(Path.Combine(dir, "index.db")));
        }
        finally
        {
            Microsoft.Data.Sqlite.SqliteConnection.ClearAllPools();
            Directory.Delete(dir, recursive: true);
        }
    }
}
