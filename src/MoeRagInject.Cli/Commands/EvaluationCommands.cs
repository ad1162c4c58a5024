using MoeRagInject.Cli.Flags;
using MoeRagInject.Evaluation;

namespace MoeRagInject.Cli.Commands;

/// <summary>The embedded demo model, its QA set and corpus: the defaults of calibrate and eval.</summary>
internal static class DemoAssets
{
    public static string Model => Path.Combine(Home.Locate(), "assets", "models", "moe-wordnet-demo");
    public static string Qa => Path.Combine(Home.Locate(), "assets", "eval", "wordnet-qa.jsonl");
    public static string Corpus => Path.Combine(Home.Locate(), "assets", "corpus", "wordnet", "wordnet-demo.jsonl.gz");

    public static string Existing(string path, string what) =>
        File.Exists(path) || Directory.Exists(path) ? path : throw new CliException($"{what} not found: {path}");
}

public static class CalibrateCommand
{
    public static FlagSet Flags() => new FlagSet(
            "calibrate", "calibrate [flags]",
            "(a) The router-entropy distribution per layer over a sample of QA prompts and the threshold for a target trigger rate;\n"
            + "(b) a projection P for latent injection, fitted by ridge regression from the mean-pooled passage embedding to the\n"
            + "change that the passage in the context makes to the residual stream. Writes P (safetensors) and calibration.json.")
        .Add(new("model-path", FlagKind.String, "checkpoint folder", "the embedded demo model", "PATH"))
        .Add(new("qa", FlagKind.String, "QA JSONL: {id, question, answer, passage_id, split}", "assets/eval/wordnet-qa.jsonl", "FILE"))
        .Add(new("corpus", FlagKind.String, "corpus holding the gold passages (.jsonl, .jsonl.gz or index .db)", "the embedded WordNet corpus", "SPEC"))
        .Add(new("out", FlagKind.String, "projection file; calibration.json goes beside it", "<model>/injector-proj.safetensors", "FILE"))
        .Add(new("limit", FlagKind.Int, "prompts sampled for the entropy distribution", "256", "N"))
        .Add(new("target-rate", FlagKind.Double, "fraction of generated tokens that should trigger", "0.1", "R"))
        .Add(new("pairs", FlagKind.Int, "(question, passage) pairs for the fit", "512", "N"))
        .Add(new("layer", FlagKind.Int, "MoE layer whose output is fitted (and injected at)", "the last", "L"))
        .Add(new("ridge", FlagKind.Double, "ridge λ", "chosen on a validation split", "λ"))
        .Add(new("intercept", FlagKind.Bool, "also fit a bias"))
        .Add(new("skip-projection", FlagKind.Bool, "only measure the entropy distribution"))
        .Add(new("concurrency", FlagKind.Int, "requests in flight", "8", "N"))
        .Add(new("threads", FlagKind.Int, "CPU threads", "all cores", "N"));

    public static async Task<int> RunAsync(IReadOnlyList<string> args)
    {
        if (Flags().ParseOrPrintHelp(args) is not { } flags) return 0;
        var defaults = new CalibrationOptions { ModelPath = "", Qa = "", Runner = EngineFlags.Runner("cpu", null) };
        var options = new CalibrationOptions
        {
            ModelPath = DemoAssets.Existing(flags.String("model-path") ?? DemoAssets.Model, "model folder"),
            Qa = DemoAssets.Existing(flags.String("qa") ?? DemoAssets.Qa, "QA file"),
            Corpus = flags.Bool("skip-projection") ? null : flags.String("corpus") ?? DemoAssets.Corpus,
            Out = flags.String("out"),
            Limit = flags.IntIn("limit", 1) ?? defaults.Limit,
            TargetRate = flags.DoubleIn("target-rate", 0, 1) ?? defaults.TargetRate,
            Pairs = flags.IntIn("pairs", 2) ?? defaults.Pairs,
            Layer = flags.IntIn("layer", 0),
            Ridge = flags.DoubleIn("ridge", 0),
            Intercept = flags.Bool("intercept"),
            SkipProjection = flags.Bool("skip-projection"),
            Concurrency = flags.IntIn("concurrency", 1) ?? defaults.Concurrency,
            Threads = flags.IntIn("threads", 1),
            Runner = EngineFlags.Runner("cpu", flags.IntIn("threads", 1)),
        };
        await Calibrator.RunAsync(options, Console.Out, CancellationToken.None).ConfigureAwait(false);
        return 0;
    }
}

public static class EvalCommand
{
    public static FlagSet Flags() => new FlagSet(
            "eval", "eval [flags]",
            "Answers a QA set in each mode (none, prompt_always, prompt_trigger, latent_random, latent_identity, latent_calibrated) and\n"
            + "reports answer quality (token F1, containment), retrievals and latency per question, the trigger's AUROC (router entropy\n"
            + "vs output-token entropy) and the project's goals. Writes --out (JSON), a markdown report and PNG plots beside it.")
        .Add(new("model-path", FlagKind.String, "checkpoint folder", "the embedded demo model", "PATH"))
        .Add(new("qa", FlagKind.String, "QA JSONL: {id, question, answer, passage_id?, split?}", "assets/eval/wordnet-qa.jsonl", "FILE"))
        .Add(new("corpus", FlagKind.String, "the retriever: .jsonl, .jsonl.gz, index .db or any --retriever spec", "the embedded WordNet corpus", "SPEC"))
        .Add(new("out", FlagKind.String, "results JSON; the report, plots and predictions go beside it", "eval/eval.json", "FILE"))
        .Add(new("limit", FlagKind.Int, "questions evaluated (a seeded sample keeping the split proportions)", "all", "N"))
        .Add(new("modes", FlagKind.List, "modes to run", "all six", "M1,M2"))
        .Add(new("threshold", FlagKind.Double, "router-entropy threshold for the trigger modes", "calibration.json's, else 0.8", "NATS"))
        .Add(new("injector-proj", FlagKind.String, "projection for latent_calibrated", "<model>/injector-proj.safetensors", "FILE"))
        .Add(new("calibration", FlagKind.String, "calibration.json", "beside the projection or in the model folder", "FILE"))
        .Add(new("max-new-tokens", FlagKind.Int, "answer length limit", "48", "N"))
        .Add(new("concurrency", FlagKind.Int, "questions in flight; latencies are measured under this load", "8", "N"))
        .Add(new("threads", FlagKind.Int, "CPU threads", "all cores", "N"))
        .Add(new("seed", FlagKind.Int, "seed of the --limit sample", "0", "N"))
        .Add(new("no-sweep", FlagKind.Bool, "skip the threshold sweep"))
        .Add(new("sweep-percentiles", FlagKind.List, "thresholds of the sweep, as percentiles of the none run's entropies", "50,75,90,95,99", "P1,P2"))
        .Add(new("sweep-limit", FlagKind.String, "questions each sweep point runs (a seeded sample)", "1000", "N|all"))
        .Add(new("latent-scale", FlagKind.Double, "α of latent_random and latent_identity (latent_calibrated keeps its fitted scale)", "1", "α"))
        .Add(new("top-k", FlagKind.Int, "passages per retrieval", "3", "K"))
        .Add(new("no-plots", FlagKind.Bool, "skip the PNG plots"));

    public static async Task<int> RunAsync(IReadOnlyList<string> args)
    {
        if (Flags().ParseOrPrintHelp(args) is not { } flags) return 0;
        var defaults = new EvaluationOptions { ModelPath = "", Qa = "", Corpus = "", Out = "", Runner = EngineFlags.Runner("cpu", null) };
        var modes = flags.List("modes");
        foreach (var mode in modes ?? [])
            if (!EvalModes.All.Contains(mode))
                throw new UsageException($"invalid value for --modes: '{mode}' (expected any of {string.Join(", ", EvalModes.All)})");
        var percentiles = flags.List("sweep-percentiles")?.Select(p =>
            double.TryParse(p, System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out var v) && v is > 0 and < 100
                ? v : throw new UsageException($"invalid value for --sweep-percentiles: '{p}' (expected numbers in (0, 100))")).ToList();
        var output = flags.String("out") ?? Path.Combine("eval", "eval.json");
        Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(output))!);
        var options = defaults with
        {
            ModelPath = DemoAssets.Existing(flags.String("model-path") ?? DemoAssets.Model, "model folder"),
            Qa = DemoAssets.Existing(flags.String("qa") ?? DemoAssets.Qa, "QA file"),
            Corpus = flags.String("corpus") ?? DemoAssets.Corpus,
            Out = output,
            Limit = flags.IntIn("limit", 1),
            Modes = modes,
            Threshold = flags.DoubleIn("threshold", 0),
            InjectorProj = flags.String("injector-proj"),
            Calibration = flags.String("calibration"),
            MaxNewTokens = flags.IntIn("max-new-tokens", 1) ?? defaults.MaxNewTokens,
            Concurrency = flags.IntIn("concurrency", 1) ?? defaults.Concurrency,
            Threads = flags.IntIn("threads", 1),
            Runner = EngineFlags.Runner("cpu", flags.IntIn("threads", 1)),
            Seed = flags.IntIn("seed", 0) ?? 0,
            Sweep = !flags.Bool("no-sweep"),
            SweepPercentiles = percentiles ?? defaults.SweepPercentiles,
            SweepLimit = flags.String("sweep-limit") switch
            {
                null => defaults.SweepLimit,
                "all" => null,
                var n when int.TryParse(n, System.Globalization.NumberStyles.Integer, System.Globalization.CultureInfo.InvariantCulture, out var v) && v >= 1 => v,
                var n => throw new UsageException($"invalid value for --sweep-limit: '{n}' (expected a positive integer or all)"),
            },
            RetrievalTopK = flags.IntIn("top-k", 1) ?? defaults.RetrievalTopK,
            LatentScale = (float)(flags.DoubleIn("latent-scale", 0) ?? defaults.LatentScale),
            Plots = !flags.Bool("no-plots"),
        };
        await Evaluator.RunAsync(options, Console.Out, CancellationToken.None).ConfigureAwait(false);
        return 0;
    }
}
