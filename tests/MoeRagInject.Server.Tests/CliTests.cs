using System.Text.Json.Nodes;
using MoeRagInject.Backend.Cpu;
using MoeRagInject.Cli;
using MoeRagInject.Cli.Commands;
using MoeRagInject.Cli.Flags;
using MoeRagInject.Rag;

namespace MoeRagInject.Server.Tests;

/// <summary>The CLI's flag parser, its mapping onto EngineOptions, and the commands run in-process through Program.Main.</summary>
public sealed class CliTests
{
    private static FlagSet Sample() => new FlagSet("demo", "demo [flags]", "a demo")
        .Add(new("port", FlagKind.Int, "port"))
        .Add(new("scale", FlagKind.Double, "scale"))
        .Add(new("json", FlagKind.Bool, "json"))
        .Add(new("layers", FlagKind.List, "layers"))
        .Add(new("name", FlagKind.String, "name"));

    [Fact]
    public void Parser_TakesSpaceAndEqualsForms_BoolsListsAndPositionals()
    {
        var flags = Sample().Parse(["first", "--port", "5", "--scale=-0.5", "--json", "--layers", "0, 2,3", "--name=a=b", "--", "--not-a-flag"]);
        Assert.Equal(5, flags.Int("port"));
        Assert.Equal(-0.5, flags.Double("scale"));
        Assert.True(flags.Bool("json"));
        Assert.Equal([0, 2, 3], flags.IntList("layers"));
        Assert.Equal("a=b", flags.String("name"));
        Assert.Equal(["first", "--not-a-flag"], flags.Positionals);
        Assert.False(flags.HelpRequested);

        var off = Sample().Parse(["--json=false", "--layers=all"]);
        Assert.False(off.Bool("json"));
        Assert.Null(off.IntList("layers", all: "all"));
        Assert.Null(off.Int("port"));
    }

    [Theory]
    [InlineData(new[] { "--bogus", "1" }, "unknown flag --bogus for 'demo'")]
    [InlineData(new[] { "-x" }, "unknown flag -x")]
    [InlineData(new[] { "--port" }, "--port needs a value")]
    [InlineData(new[] { "--port", "abc" }, "invalid value for --port: 'abc' is not an integer")]
    [InlineData(new[] { "--scale=1e999" }, "invalid value for --scale")]
    [InlineData(new[] { "--json=maybe" }, "invalid value for --json")]
    public void Parser_RejectsMistakes_NamingTheFlag(string[] args, string fragment)
    {
        var e = Assert.Throws<UsageException>(() => Sample().Parse(args));
        Assert.Contains(fragment, e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Parser_Help_ListsEveryFlag()
    {
        var flags = Sample().Parse(["--help"]);
        Assert.True(flags.HelpRequested);
        var help = ServeCommand.Flags().Help();
        foreach (var flag in (string[])["--model-path", "--device", "--host", "--port", "--entropy-threshold", "--log-dir", "--load-format",
                     "--context-length", "--max-running-requests", "--threads", "--rag-mode", "--trigger-layers", "--trigger-aggregation",
                     "--cooldown-tokens", "--max-retrievals", "--injection-scale", "--injection-layers", "--injection-tokens",
                     "--injector-proj", "--projection-seed", "--retriever", "--retrieval-timeout-ms", "--retrieval-top-k", "--query-window"])
            Assert.Contains(flag + " ", help, StringComparison.Ordinal);
    }

    [Fact]
    public void EngineFlags_MapOntoEngineOptions()
    {
        var flags = ServeCommand.Flags().Parse([
            "--model-path", TestData.CheckpointPath, "--entropy-threshold", "1.25", "--log-dir", "/tmp/x", "--load-format", "dummy",
            "--context-length", "128", "--max-running-requests", "3", "--threads", "2", "--rag-mode", "prompt", "--trigger-layers", "0,1",
            "--trigger-aggregation", "mean", "--cooldown-tokens", "2", "--max-retrievals", "7", "--injection-scale", "0.5",
            "--injection-layers", "1", "--injection-tokens", "4", "--injector-proj", "identity", "--projection-seed", "9",
            "--retriever", "/tmp/corpus.jsonl", "--retrieval-timeout-ms", "250", "--retrieval-top-k", "5", "--query-window", "16"]);
        var o = EngineFlags.ToOptions(flags);
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
        Assert.Equal(0.5f, o.InjectionScale);
        Assert.Equal([1], o.InjectionLayers);
        Assert.Equal(4, o.InjectionTokens);
        Assert.Equal(ProjectionKind.Identity, o.Projection);
        Assert.Equal(9, o.ProjectionSeed);
        Assert.Equal("/tmp/corpus.jsonl", o.Retriever);
        Assert.Equal(TimeSpan.FromMilliseconds(250), o.RetrievalTimeout);
        Assert.Equal(5, o.RetrievalTopK);
        Assert.Equal(16, o.QueryWindowTokens);
        Assert.Equal("/tmp/x", o.LogDir);

        var defaults = EngineFlags.ToOptions(ServeCommand.Flags().Parse(["--model-path", TestData.CheckpointPath]));
        Assert.Equal(0.8, defaults.Trigger.Threshold);
        Assert.Equal("./logs", defaults.LogDir);
        Assert.Null(defaults.Trigger.Layers);
        Assert.Null(defaults.InjectionLayers);
        Assert.Null(defaults.Retriever);
    }

    [Fact]
    public void EngineFlags_WithoutModelPath_ServeTheEmbeddedModelAndCorpus()
    {
        var o = EngineFlags.ToOptions(ServeCommand.Flags().Parse([]));
        Assert.Equal(Path.Combine(TestData.RepoRoot, "assets", "models", "moe-wordnet-demo"), o.ModelPath);
        Assert.Equal(Path.Combine(TestData.RepoRoot, "assets", "corpus", "wordnet", "wordnet-demo.jsonl.gz"), o.Retriever);
    }

    [Theory]
    [InlineData(new[] { "--device", "cuda:x" }, "invalid value for --device")]
    [InlineData(new[] { "--device", "tpu" }, "invalid value for --device")]
    [InlineData(new[] { "--rag-mode", "loud" }, "invalid value for --rag-mode")]
    [InlineData(new[] { "--trigger-layers", "0,x" }, "invalid value for --trigger-layers")]
    [InlineData(new[] { "--trigger-aggregation", "median" }, "invalid value for --trigger-aggregation")]
    [InlineData(new[] { "--injector-proj", "/no/such.safetensors" }, "invalid value for --injector-proj")]
    [InlineData(new[] { "--injection-tokens", "0" }, "invalid value for --injection-tokens")]
    [InlineData(new[] { "--port", "70000" }, "invalid value for --port")]
    public void EngineFlags_BadValues_AreUsageErrors(string[] args, string fragment)
    {
        var e = Assert.Throws<UsageException>(() =>
        {
            var flags = ServeCommand.Flags().Parse(args);
            EngineFlags.ToOptions(flags);
            flags.IntIn("port", 0, 65535);
        });
        Assert.Contains(fragment, e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void EngineFlags_MissingModelFolder_IsAUserError()
    {
        var e = Assert.Throws<CliException>(() => EngineFlags.ToOptions(ServeCommand.Flags().Parse(["--model-path", "/no/such/model"])));
        Assert.Contains("model folder not found: /no/such/model", e.Message, StringComparison.Ordinal);
    }

    private static async Task<(int Code, string Out, string Error)> RunAsync(params string[] args)
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

    [Theory]
    [InlineData(2, new[] { "serve", "--bogus" }, "unknown flag --bogus")]
    [InlineData(2, new[] { "serve", "--device", "gpu" }, "invalid value for --device")]
    [InlineData(2, new[] { "frobnicate" }, "unknown command 'frobnicate'")]
    [InlineData(2, new[] { "generate" }, "generate needs a prompt")]
    [InlineData(1, new[] { "generate", "hi", "--model-path", "/no/such/model" }, "model folder not found")]
    [InlineData(2, new[] { "index", "a.jsonl" }, "index needs --output")]
    [InlineData(1, new[] { "index", "/no/such.jsonl", "--output", "/tmp/x.db" }, "input file not found")]
    public async Task Main_UserErrors_AreOneLine_WithTheExitCode(int expected, string[] args, string fragment)
    {
        var (code, _, error) = await RunAsync(args);
        Assert.Equal(expected, code);
        Assert.Contains(fragment, error, StringComparison.Ordinal);
        Assert.Single(error.TrimEnd().Split('\n'));
        Assert.DoesNotContain("   at ", error, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Main_Help_ExitsZero()
    {
        var (code, output, _) = await RunAsync("generate", "--help");
        Assert.Equal(0, code);
        Assert.Contains("--max-new-tokens", output, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Generate_Json_MatchesTheReference()
    {
        var prompt = TestData.ReferencePrompts[0];
        var (code, output, error) = await RunAsync("generate", prompt.Text, "--model-path", TestData.CheckpointPath,
            "--max-new-tokens", "12", "--ignore-eos", "--rag-mode", "off", "--log-dir", Path.Combine(Path.GetTempPath(), "moe-rag-inject-cli-test"), "--json");
        Assert.True(code == 0, error);
        var result = JsonNode.Parse(output)!;
        Assert.Equal(prompt.GreedyIds, TestData.IntArray(result["output_ids"]));
    }

    [Fact]
    public async Task Generate_PrintsTextThenOneJsonLinePerEvent()
    {
        var dir = Directory.CreateTempSubdirectory("moe-rag-inject-cli-").FullName;
        try
        {
            var corpus = Path.Combine(dir, "corpus.jsonl");
            await File.WriteAllTextAsync(corpus, TestData.CorpusJsonl);
            var (code, output, error) = await RunAsync("generate", "What is Quantum？", "--model-path", TestData.CheckpointPath,
                "--max-new-tokens", "10", "--ignore-eos", "--rag-mode", "latent", "--entropy-threshold", "0", "--retriever", corpus,
                "--log-dir", Path.Combine(dir, "logs"));
            Assert.True(code == 0, error);
            // The generated text may itself hold newlines; the event lines are the JSON objects after it.
            var events = output.Split('\n').Where(l => l.StartsWith("{\"event_id\"", StringComparison.Ordinal)).Select(l => JsonNode.Parse(l)!).ToList();
            Assert.NotEmpty(events);
            Assert.True(output.IndexOf("{\"event_id\"", StringComparison.Ordinal) > 0, "the text comes first");
            Assert.All(events, e => Assert.Equal("latent", e["mode"]!.GetValue<string>()));
            Assert.Contains("[MoE-RAG]", error, StringComparison.Ordinal);
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
