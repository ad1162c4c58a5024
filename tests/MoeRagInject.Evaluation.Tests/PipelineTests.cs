using System.Text.Json.Nodes;
using MoeRagInject.Backend;
using MoeRagInject.Backend.Cpu;
using MoeRagInject.Engine;
using MoeRagInject.Rag;

namespace MoeRagInject.Evaluation.Tests;

public static class TestPaths
{
    public static string RepoRoot { get; } = FindRoot();

    private static string FindRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "MoeRagInject.slnx"))) return dir.FullName;
        throw new InvalidOperationException("repository root (MoeRagInject.slnx) not found above " + AppContext.BaseDirectory);
    }

    public static string TinyModel => Path.Combine(RepoRoot, "tests", "data", "reference", "tiny-mixtral");
}

/// <summary>A tiny corpus and QA set (4 taught, 2 held-out questions) in a temporary folder.</summary>
public sealed class TinyData : IDisposable
{
    public TinyData()
    {
        Directory = System.IO.Directory.CreateTempSubdirectory("moe-rag-eval-test-").FullName;
        (string Id, string Term, string Definition, string Split)[] entries =
        [
            ("wn-fox", "fox", "alert carnivorous mammal with pointed muzzle and ears and a bushy tail", "taught"),
            ("wn-quantum", "quantum", "a discrete amount of a physical quantity such as energy", "taught"),
            ("wn-cafe", "cafe", "a small restaurant where drinks and snacks are sold", "taught"),
            ("wn-dog", "dog", "a domesticated member of the genus Canis kept as a pet", "taught"),
            ("wn-abash", "abash", "cause to be embarrassed; cause to feel self-conscious", "heldout"),
            ("wn-aardwolf", "aardwolf", "striped hyena of southeast Africa that feeds chiefly on insects", "heldout"),
        ];
        Corpus = Path.Combine(Directory, "corpus.jsonl");
        File.WriteAllLines(Corpus, entries.Select(e => new JsonObject
        {
            ["id"] = e.Id,
            ["title"] = e.Term,
            ["text"] = $"{e.Term} (noun): {e.Definition}.",
            ["split"] = e.Split,
        }.ToJsonString()));
        Qa = Path.Combine(Directory, "qa.jsonl");
        File.WriteAllLines(Qa, entries.Select(e => new JsonObject
        {
            ["id"] = "qa-" + e.Term,
            ["question"] = $"What is {e.Term}?",
            ["answer"] = e.Definition,
            ["passage_id"] = e.Id,
            ["split"] = e.Split,
        }.ToJsonString()));
    }

    public string Directory { get; }
    public string Corpus { get; }
    public string Qa { get; }

    public void Dispose() => System.IO.Directory.Delete(Directory, recursive: true);
}

public sealed class PipelineTests : IDisposable
{
    private readonly TinyData _data = new();

    public void Dispose() => _data.Dispose();

    [Fact]
    public void PairTokensLineUpTheQuestionsLastTokenAndTheAnswer()
    {
        using var loaded = LoadedModel.Load(TestPaths.TinyModel, "auto", new CpuRunnerFactory(1), c => new RunnerOptions { ContextLength = c.MaxPositionEmbeddings });
        var tokenizer = loaded.Tokenizer;
        var pair = Calibrator.TokenizePair(tokenizer, "What is fox?", "alert carnivorous mammal", "fox (noun): alert carnivorous mammal.", 16);
        var prompt = tokenizer.Encode("What is fox?");
        Assert.Equal(prompt, pair.A[..prompt.Length]);
        Assert.Equal(prompt.Length - 1, pair.QuestionLastA);
        Assert.Equal(pair.A[pair.QuestionLastA..], pair.B[pair.QuestionLastB..]);
        Assert.Equal(pair.A.Length - pair.QuestionLastA, pair.Positions); // 1 + answer tokens (< 16 here)
        // B = BOS + the engine's prompt-mode context + the question without BOS + the answer.
        var context = tokenizer.Encode("Context:\nfox (noun): alert carnivorous mammal.\n\n", addSpecialTokens: false);
        Assert.Equal(tokenizer.BosTokenId, pair.B[0]);
        Assert.Equal(context, pair.B[1..(1 + context.Length)]);
        Assert.Equal(prompt[1..], pair.B[(1 + context.Length)..(pair.QuestionLastB + 1)]);
        Assert.Equal("alert carnivorous mammal", tokenizer.Decode(pair.A[prompt.Length..]).Trim());
    }

    [Fact]
    public async Task CalibrationThenEvaluationEndToEnd()
    {
        var progress = new StringWriter();
        var projection = Path.Combine(_data.Directory, "cal", "injector-proj.safetensors");
        var calibration = await Calibrator.RunAsync(new CalibrationOptions
        {
            Runner = new CpuRunnerFactory(2),
            ModelPath = TestPaths.TinyModel,
            Qa = _data.Qa,
            Corpus = _data.Corpus,
            Out = projection,
            Limit = null,
            MaxNewTokens = 8,
            TargetRate = 0.25,
            Pairs = 8,
            Concurrency = 4,
            Threads = 2,
        }, progress, CancellationToken.None);

        Assert.Equal(3, calibration.Layer); // the last of 4 layers
        Assert.InRange(calibration.Threshold, 0, Math.Log(8));
        Assert.InRange(calibration.AchievedRate, 0.0, 0.25 + 1e-9);
        Assert.Equal(6, calibration.Prompts);
        Assert.True(File.Exists(projection));
        var fit = calibration.Projection!;
        Assert.Equal(4, fit.Pairs); // only the 4 taught questions
        Assert.Equal(1, fit.ValidationPairs);
        Assert.True(fit.DNormMean > 0);
        Assert.True(fit.TrainR2 is > -1 and <= 1);
        // The saved projection loads as the engine loads it.
        using (var loaded = LoadedModel.Load(TestPaths.TinyModel, "auto", new CpuRunnerFactory(1), c => new RunnerOptions { ContextLength = c.MaxPositionEmbeddings }))
        {
            var injector = ContextInjector.LoadFromFile(loaded.Embeddings, projection);
            Assert.Equal(ProjectionKind.File, injector.Kind);
        }
        var calJson = JsonNode.Parse(File.ReadAllText(calibration.JsonPath))!;
        Assert.Equal(Path.Combine(_data.Directory, "cal", "calibration.json"), calibration.JsonPath);
        Assert.Equal(3, calJson["layer"]!.GetValue<int>());
        Assert.Equal(calibration.Threshold, calJson["threshold"]!.GetValue<double>(), 5);
        Assert.Equal(0.25, calJson["target_rate"]!.GetValue<double>());
        Assert.Equal(4, calJson["entropy"]!["per_layer"]!.AsArray().Count);
        Assert.NotNull(calJson["entropy"]!["max_over_layers"]!["p95"]);
        Assert.NotNull(calJson["j0"]!["by_split"]!["heldout"]);
        Assert.NotNull(calJson["projection"]!["validation_r2"]);
        // The tiny random model answers nothing right: no router probe can be fitted, and calibrate says why.
        Assert.Null(calibration.RouterProbe);
        Assert.Contains("at least two of each label (4 answered wrong, 0 right)", calJson["router_probe"]!["skipped"]!.GetValue<string>());
        Assert.False(File.Exists(Path.Combine(_data.Directory, "cal", "router-probe.json")));
        Assert.Equal(["router-entropy", "output-entropy"], calJson["signals"]!.AsObject().Select(kv => kv.Key));
        Assert.Equal(6, calibration.FitQuestions.Count + calibration.CheckQuestions.Count);
        Assert.Equal(2, calibration.CheckQuestions.Count);
        Assert.Equal(6, calJson["projection"]!["ridge_search"]!.AsArray().Count);

        var outPath = Path.Combine(_data.Directory, "eval", "results.json");
        var result = await Evaluator.RunAsync(new EvaluationOptions
        {
            Runner = new CpuRunnerFactory(2),
            ModelPath = TestPaths.TinyModel,
            Qa = _data.Qa,
            Corpus = _data.Corpus,
            Out = outPath,
            Modes = [EvalModes.None, EvalModes.PromptAlways, EvalModes.LatentRandom, EvalModes.LatentCalibrated],
            InjectorProj = projection,
            MaxNewTokens = 10,
            Concurrency = 4,
            Threads = 2,
            SweepPercentiles = [50, 90],
        }, progress, CancellationToken.None);

        // The threshold and layer came from calibration.json beside the projection.
        Assert.Equal(calibration.Threshold, result.Threshold, 5);
        var json = JsonNode.Parse(File.ReadAllText(outPath))!;
        foreach (var mode in new[] { "none", "prompt_always", "latent_random", "latent_calibrated" })
        {
            var m = json["modes"]![mode]!;
            Assert.Equal(6, m["n"]!.GetValue<int>());
            Assert.InRange(m["token_f1"]!.GetValue<double>(), 0, 1);
            Assert.InRange(m["contains"]!.GetValue<double>(), 0, 1);
            Assert.NotNull(m["retrievals_per_question"]);
            Assert.True(m["latency_s"]!["mean"]!.GetValue<double>() > 0);
            Assert.NotNull(m["latency_s"]!["p95"]);
            Assert.Equal(4, m["by_split"]!["taught"]!["n"]!.GetValue<int>());
            Assert.Equal(2, m["by_split"]!["heldout"]!["n"]!.GetValue<int>());
        }
        Assert.Equal(0, json["modes"]!["none"]!["retrievals_per_question"]!.GetValue<double>());
        Assert.Equal(1, json["modes"]!["prompt_always"]!["retrievals_per_question"]!.GetValue<double>());
        // Every mode's CPU time a question, measured while it answered (positive; prompt RAG computes the passages too).
        foreach (var mode in new[] { "none", "prompt_always", "latent_random", "latent_calibrated" })
            Assert.True(json["modes"]![mode]!["cpu_ms_per_question"]!.GetValue<double>() > 0, mode);
        Assert.Equal(0, json["modes"]!["prompt_always"]!["retrieval_errors_per_question"]!.GetValue<double>());
        Assert.All(result.Modes["prompt_always"].Runs, r =>
        {
            var e = Assert.Single(r.Events);
            Assert.Equal(0, e.TokenIndex);
            Assert.Equal("prompt", e.Mode);
        });
        Assert.All(result.Modes["none"].Runs, r => Assert.Empty(r.Events));
        Assert.All(result.Modes["latent_calibrated"].Runs.SelectMany(r => r.Events), e => Assert.Equal([3], e.InjectionLayers));

        var trigger = json["trigger"]!;
        Assert.Equal(6, trigger["n"]!.GetValue<int>());
        foreach (var key in new[] { "router_max_j0", "router_mean_j0", "router_layer0_j0", "router_layer3_j0", "output_entropy_j0", "output_entropy_mean" })
        {
            Assert.True(trigger["auroc_wrong"]!.AsObject().ContainsKey(key));
            Assert.True(trigger["auroc_heldout"]!.AsObject().ContainsKey(key));
        }
        Assert.InRange(trigger["auroc_heldout"]!["router_max_j0"]!.GetValue<double>(), 0, 1);

        var sweep = json["sweep"]!.AsArray();
        Assert.Equal(2, sweep.Count); // latent_calibrated at p50 and p90 (prompt_trigger was not asked for)
        Assert.All(sweep, p => Assert.Equal("latent_calibrated", p!["mode"]!.GetValue<string>()));
        Assert.True(sweep[0]!["threshold"]!.GetValue<double>() <= sweep[1]!["threshold"]!.GetValue<double>());

        var goals = json["goals"]!;
        foreach (var key in new[] { "heldout_auroc", "latent_recovery", "latency_ratio" })
            Assert.Contains(goals[key]!["status"]!.GetValue<string>(), new[] { "MET", "NOT MET", "UNDEFINED" });

        var config = json["config"]!;
        Assert.Equal(6, config["n"]!.GetValue<int>());
        Assert.Equal(Environment.ProcessorCount, config["machine"]!["cores"]!.GetValue<int>());
        Assert.False(string.IsNullOrEmpty(config["machine"]!["os"]!.GetValue<string>()));
        Assert.NotNull(config["date"]);
        Assert.StartsWith("./moe-rag-inject eval ", config["command"]!.GetValue<string>());

        var markdown = File.ReadAllText(Path.Combine(_data.Directory, "eval", "results.md"));
        Assert.Contains("| prompt_always |", markdown);
        Assert.Contains("## Goals", markdown);
        Assert.Contains("./moe-rag-inject eval", markdown);
        Assert.Equal(3, result.PlotPaths.Count);
        foreach (var png in result.PlotPaths)
        {
            var bytes = File.ReadAllBytes(png);
            Assert.True(bytes.Length > 1000);
            Assert.Equal(new byte[] { 0x89, (byte)'P', (byte)'N', (byte)'G' }, bytes[..4]);
            Assert.Contains(Path.GetFileName(png), markdown);
        }
        var predictions = File.ReadAllLines(result.PredictionsPath);
        Assert.Equal(4 * 6, predictions.Length);
    }

    [Fact]
    public async Task LatentCalibratedIsSkippedWithANoteWhenThereIsNoProjection()
    {
        var outPath = Path.Combine(_data.Directory, "skip", "results.json");
        var result = await Evaluator.RunAsync(new EvaluationOptions
        {
            Runner = new CpuRunnerFactory(2),
            ModelPath = TestPaths.TinyModel,
            Qa = _data.Qa,
            Corpus = _data.Corpus,
            Out = outPath,
            Modes = [EvalModes.None, EvalModes.LatentCalibrated],
            Limit = 2,
            MaxNewTokens = 4,
            Threads = 2,
            Sweep = false,
        }, TextWriter.Null, CancellationToken.None);
        Assert.Contains("no projection file", result.Skipped["latent_calibrated"]);
        var json = JsonNode.Parse(File.ReadAllText(outPath))!;
        Assert.Contains("no projection file", json["modes"]!["latent_calibrated"]!["skipped"]!.GetValue<string>());
        Assert.Equal("NOT MEASURED", json["goals"]!["latent_recovery"]!["status"]!.GetValue<string>());
        Assert.Equal(0.8, result.Threshold);
        Assert.Contains("skipped: no projection file", File.ReadAllText(result.MarkdownPath));
    }
    [Fact]
    public async Task LatentTrainedRunsTheProjectorAtItsLayersAndAlphaOrIsSkipped()
    {
        // A seeded MLP projector for the tiny checkpoint (hidden 128), as tools/projector writes one.
        var projector = Path.Combine(_data.Directory, "trained", "projector.safetensors");
        System.IO.Directory.CreateDirectory(Path.GetDirectoryName(projector)!);
        var rng = new Model.SplitMix64(3);
        float[] Values(int n) => [.. Enumerable.Range(0, n).Select(_ => (float)(rng.NextGaussian() * 0.2))];
        ContextInjector.SaveMlp(projector, 128, 8, Values(8 * 128), Values(8), Values(128 * 8), Values(128), layers: [1, 2], alpha: 0.5f);
        var outPath = Path.Combine(_data.Directory, "trained", "results.json");
        var result = await Evaluator.RunAsync(new EvaluationOptions
        {
            Runner = new CpuRunnerFactory(2),
            ModelPath = TestPaths.TinyModel,
            Qa = _data.Qa,
            Corpus = _data.Corpus,
            Out = outPath,
            Modes = [EvalModes.None, EvalModes.PromptAlways, EvalModes.LatentTrained],
            TrainedProj = projector,
            Threshold = 0,
            MaxNewTokens = 4,
            Threads = 2,
            Sweep = false,
            Plots = false,
        }, TextWriter.Null, CancellationToken.None);
        var trained = result.Modes[EvalModes.LatentTrained];
        var events = trained.Runs.SelectMany(r => r.Events).ToList();
        Assert.Equal(6, trained.Runs.Count(r => r.Events.Count > 0));
        Assert.All(events, e =>
        {
            Assert.Null(e.Error);
            Assert.Equal([1, 2], e.InjectionLayers);
            Assert.Equal(0.5, e.Scale, 6);
            Assert.True(e.InjectionNorm > 0);
        });
        Assert.Contains("layers=[1,2] scale=0.5", trained.Settings);
        var json = JsonNode.Parse(File.ReadAllText(outPath))!;
        Assert.Equal(Path.GetFullPath(projector), json["config"]!["trained_proj"]!.GetValue<string>());
        foreach (var key in new[] { "trained_recovery", "trained_latency_ratio", "trained_taught_f1_delta" })
        {
            var goal = json["goals"]![key]!;
            var status = goal["status"]!.GetValue<string>();
            Assert.Contains(status, new[] { "MET", "NOT MET", "UNDEFINED" });
            if (status != "UNDEFINED") Assert.Equal(2, goal["ci95"]!.AsArray().Count);  // no interval where the ratio is undefined

        }
        Assert.Contains("| latent_trained |", File.ReadAllText(result.MarkdownPath));
        Assert.Contains("--trained-proj", json["config"]!["command"]!.GetValue<string>());

        // Without a projector in the model folder the mode is skipped, and its goals say why they were not measured.
        var skipped = await Evaluator.RunAsync(new EvaluationOptions
        {
            Runner = new CpuRunnerFactory(2),
            ModelPath = TestPaths.TinyModel,
            Qa = _data.Qa,
            Corpus = _data.Corpus,
            Out = Path.Combine(_data.Directory, "trained-skip", "results.json"),
            Modes = [EvalModes.None, EvalModes.LatentTrained],
            Limit = 2,
            MaxNewTokens = 4,
            Threads = 2,
            Sweep = false,
            Plots = false,
        }, TextWriter.Null, CancellationToken.None);
        Assert.Contains("no trained projector", skipped.Skipped[EvalModes.LatentTrained]);
        Assert.Equal("NOT MEASURED", skipped.Goals.Single(g => g.Key == "trained_recovery").Status);
        await Assert.ThrowsAsync<FileNotFoundException>(() => Evaluator.RunAsync(new EvaluationOptions
        {
            Runner = new CpuRunnerFactory(2),
            ModelPath = TestPaths.TinyModel,
            Qa = _data.Qa,
            Corpus = _data.Corpus,
            Out = Path.Combine(_data.Directory, "trained-missing", "results.json"),
            TrainedProj = Path.Combine(_data.Directory, "nowhere.safetensors"),
        }, TextWriter.Null, CancellationToken.None));
    }
}
