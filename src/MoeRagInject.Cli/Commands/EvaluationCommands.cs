using System.CommandLine;
using MoeRagInject.Cli.CommandLine;
using MoeRagInject.Evaluation;
using MoeRagInject.Rag;

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
    public static Command Create()
    {
        var modelPath = CliOption.OptionalText("--model-path", "checkpoint folder", "PATH", "the embedded demo model");
        var qa = CliOption.OptionalText("--qa", "QA JSONL: {id, question, answer, passage_id, split}", "FILE", "assets/eval/wordnet-qa.jsonl");
        var corpus = CliOption.OptionalText("--corpus", "corpus holding the gold passages (.jsonl, .jsonl.gz or index .db)", "SPEC",
            "the embedded WordNet corpus");
        var output = CliOption.OptionalText("--out", "projection file; calibration.json goes beside it", "FILE",
            "<model>/injector-proj.safetensors");
        var limit = CliOption.Int("--limit", "prompts sampled for the signals' distributions and the router probe", "N", 1000, min: 1);
        var targetRate = CliOption.Double("--target-rate", "fraction of generated tokens that should trigger", "R", 0.1, min: 0, max: 1);
        var pairs = CliOption.Int("--pairs", "(question, passage) pairs for the fit", "N", 512, min: 2);
        var layer = CliOption.OptionalInt("--layer", "MoE layer whose output is fitted (and injected at)", "L", "the last", min: 0);
        var ridge = CliOption.OptionalDouble("--ridge", "ridge λ", "λ", "chosen on a validation split", min: 0);
        var intercept = CliOption.Switch("--intercept", "also fit a bias");
        var skipProjection = CliOption.Switch("--skip-projection", "no projection fit");
        var skipProbe = CliOption.Switch("--skip-probe", "no router probe");
        var concurrency = CliOption.Int("--concurrency", "requests in flight", "N", 8, min: 1);
        var threads = CliOption.OptionalInt("--threads", "CPU threads", "N", "all cores", min: 1);
        var command = new Command("calibrate",
            "(a) Each trigger signal over a sample of QA prompts answered with RAG off: the router-entropy distribution per layer, "
            + "each signal's threshold for a target trigger rate and its AUROCs for a wrong answer and a held-out term on questions "
            + "kept back; (b) the router probe, a logistic regression from all routers' probabilities to a wrong answer, trained on "
            + "the other questions (router-probe.json); (c) a projection P for latent injection, fitted by ridge regression from the "
            + "mean-pooled passage embedding to the change that the passage in the context makes to the residual stream. Writes P "
            + "(safetensors), router-probe.json and calibration.json.")
        {
            modelPath, qa, corpus, output, limit, targetRate, pairs, layer, ridge, intercept, skipProjection, skipProbe, concurrency, threads,
        };
        command.SetAction(async (parse, cancellationToken) =>
        {
            var options = new CalibrationOptions
            {
                ModelPath = DemoAssets.Existing(parse.GetValue(modelPath) ?? DemoAssets.Model, "model folder"),
                Qa = DemoAssets.Existing(parse.GetValue(qa) ?? DemoAssets.Qa, "QA file"),
                Corpus = parse.GetValue(skipProjection) ? null : parse.GetValue(corpus) ?? DemoAssets.Corpus,
                Out = parse.GetValue(output),
                Limit = parse.GetValue(limit),
                TargetRate = parse.GetValue(targetRate),
                Pairs = parse.GetValue(pairs),
                Layer = parse.GetValue(layer),
                Ridge = parse.GetValue(ridge),
                Intercept = parse.GetValue(intercept),
                SkipProjection = parse.GetValue(skipProjection),
                SkipProbe = parse.GetValue(skipProbe),
                Concurrency = parse.GetValue(concurrency),
                Threads = parse.GetValue(threads),
                Runner = EngineFlags.Runner("cpu", parse.GetValue(threads)),
            };
            await Calibrator.RunAsync(options, Console.Out, CancellationToken.None).ConfigureAwait(false);
            return 0;
        });
        return command;
    }
}

public static class EvalCommand
{
    public static Command Create()
    {
        var modelPath = CliOption.OptionalText("--model-path", "checkpoint folder", "PATH", "the embedded demo model");
        var qa = CliOption.OptionalText("--qa", "QA JSONL: {id, question, answer, passage_id?, split?}", "FILE", "assets/eval/wordnet-qa.jsonl");
        var corpus = CliOption.OptionalText("--corpus", "the retriever: .jsonl, .jsonl.gz, index .db or any --retriever spec", "SPEC",
            "the embedded WordNet corpus");
        var output = CliOption.Text("--out", "results JSON; the report, plots and predictions go beside it", "FILE", "eval/eval.json");
        var limit = CliOption.OptionalInt("--limit", "questions evaluated (a seeded sample keeping the split proportions)", "N", "all", min: 1);
        var modes = CliOption.List("--modes", "modes to run", "M1,M2", "all seven", [.. EvalModes.Known]);
        var threshold = CliOption.OptionalDouble("--threshold",
            "threshold of the triggered modes' signal (nats; for router-probe a probability)", "NATS", "calibration.json's, else 0.8", min: 0);
        var signal = TriggerSignalOption();
        var injectorProj = CliOption.OptionalText("--injector-proj", "projection for latent_calibrated", "FILE", "<model>/injector-proj.safetensors");
        var trainedProj = CliOption.OptionalText("--trained-proj", "projector for latent_trained (tools/projector)", "FILE",
            "<model>/projector.safetensors");
        var calibration = CliOption.OptionalText("--calibration", "calibration.json", "FILE", "beside the projection or in the model folder");
        var maxNewTokens = CliOption.Int("--max-new-tokens", "answer length limit", "N", 48, min: 1);
        var concurrency = CliOption.Int("--concurrency", "questions in flight; latencies are measured under this load", "N", 8, min: 1);
        var threads = CliOption.OptionalInt("--threads", "CPU threads", "N", "all cores", min: 1);
        var seed = CliOption.Int("--seed", "seed of the --limit sample", "N", 0, min: 0);
        var noSweep = CliOption.Switch("--no-sweep", "skip the threshold sweep");
        var sweepPercentiles = SweepPercentilesOption();
        var sweepLimit = SweepLimitOption();
        var latentScale = CliOption.Double("--latent-scale",
            "α of latent_random and latent_identity (latent_calibrated keeps its fitted scale)", "α", 1, min: 0);
        var topK = CliOption.Int("--top-k", "passages per retrieval", "K", 3, min: 1);
        var maxRetrievals = CliOption.Int("--max-retrievals", "retrievals per question at most in the triggered modes", "N", 4, min: 1);
        var triggerWindow = CliOption.Int("--trigger-window",
            "the triggered modes fire within the first N answer tokens only (0: at any token; the server's --trigger-window)", "N", 0, min: 0);
        var latentRestart = CliOption.Choice("--latent-rag-restart",
            "latent_trained, firing early in the answer: answer generates it again, continue keeps the answer so far (the server's --latent-rag-restart)",
            "answer", "answer", "continue");
        var noPlots = CliOption.Switch("--no-plots", "skip the PNG plots");
        var command = new Command("eval",
            "Answers a QA set in each mode (none, prompt_always, prompt_trigger, latent_random, latent_identity, latent_calibrated, "
            + "latent_trained) and reports answer quality (token F1, containment), retrievals and latency per question, each trigger "
            + "signal's AUROCs (router entropy, output entropy, router probe) and F1 against retrievals as its threshold moves, every "
            + "question's answers and signals, and the project's goals. Writes --out (JSON), a markdown report and PNG plots beside it.")
        {
            modelPath, qa, corpus, output, limit, modes, signal, threshold, injectorProj, trainedProj, calibration, maxNewTokens, concurrency, threads, seed,
            noSweep, sweepPercentiles, sweepLimit, latentScale, topK, maxRetrievals, triggerWindow, latentRestart, noPlots,
        };
        command.SetAction(async (parse, cancellationToken) =>
        {
            var defaults = new EvaluationOptions { ModelPath = "", Qa = "", Corpus = "", Out = "", Runner = EngineFlags.Runner("cpu", null) };
            var outputPath = parse.GetRequiredValue(output);
            Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(outputPath))!);
            var options = defaults with
            {
                ModelPath = DemoAssets.Existing(parse.GetValue(modelPath) ?? DemoAssets.Model, "model folder"),
                Qa = DemoAssets.Existing(parse.GetValue(qa) ?? DemoAssets.Qa, "QA file"),
                Corpus = parse.GetValue(corpus) ?? DemoAssets.Corpus,
                Out = outputPath,
                Limit = parse.GetValue(limit),
                Modes = parse.GetValue(modes),
                Threshold = parse.GetValue(threshold),
                Signal = parse.GetValue(signal) is { } name ? TriggerSignals.Parse(name) : null,
                InjectorProj = parse.GetValue(injectorProj),
                TrainedProj = parse.GetValue(trainedProj),
                Calibration = parse.GetValue(calibration),
                MaxNewTokens = parse.GetValue(maxNewTokens),
                Concurrency = parse.GetValue(concurrency),
                Threads = parse.GetValue(threads),
                Runner = EngineFlags.Runner("cpu", parse.GetValue(threads)),
                Seed = parse.GetValue(seed),
                Sweep = !parse.GetValue(noSweep),
                SweepPercentiles = parse.GetValue(sweepPercentiles) ?? defaults.SweepPercentiles,
                SweepLimit = parse.GetValue(sweepLimit) is var sweep and > 0 ? sweep : null,
                RetrievalTopK = parse.GetValue(topK),
                MaxRetrievals = parse.GetValue(maxRetrievals),
                TriggerWindow = parse.GetValue(triggerWindow) is var window and > 0 ? window : null,
                LatentScale = (float)parse.GetValue(latentScale),
                LatentRagRestart = parse.GetRequiredValue(latentRestart) == "continue" ? Engine.LatentRagRestart.Continue : Engine.LatentRagRestart.Answer,
                Plots = !parse.GetValue(noPlots),
            };
            await Evaluator.RunAsync(options, Console.Out, CancellationToken.None).ConfigureAwait(false);
            return 0;
        });
        return command;
    }

    /// <summary>One of the trigger signals, or absent (calibrate's best).</summary>
    private static Option<string?> TriggerSignalOption()
    {
        var option = new Option<string?>("--trigger-signal")
        {
            Description = "what prompt_trigger and the latent modes watch: router-entropy, output-entropy or router-probe [default: calibration.json's best by held-out AUROC, else router-entropy]",
            HelpName = "SIGNAL",
            CustomParser = r =>
            {
                var value = r.Tokens[^1].Value;
                if (TriggerSignals.Parse(value) is { } parsed) return TriggerSignals.Name(parsed);
                r.AddError($"invalid value for --trigger-signal: '{value}' (expected {string.Join(", ", TriggerSignals.Names.SkipLast(1))} or {TriggerSignals.Names[^1]})");
                return null;
            },
        };
        option.CompletionSources.Add([.. TriggerSignals.Names]);
        return option;
    }

    /// <summary>Percentiles in (0, 100), comma-separated.</summary>
    private static Option<IReadOnlyList<double>?> SweepPercentilesOption() => new("--sweep-percentiles")
    {
        Description = "thresholds of the sweep, as percentiles of the none run's entropies [default: 50,75,90,95,99]",
        HelpName = "P1,P2",
        CustomParser = r =>
        {
            var values = new List<double>();
            foreach (var item in CliOption.Split(r.Tokens[^1].Value))
            {
                if (double.TryParse(item, System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out var v)
                    && v is > 0 and < 100)
                {
                    values.Add(v);
                    continue;
                }
                r.AddError($"invalid value for --sweep-percentiles: '{item}' (expected numbers in (0, 100))");
                return values;
            }
            return values;
        },
    };

    /// <summary>A positive count, or all: 0, which a user cannot give (System.CommandLine takes a parser's null for a failure).</summary>
    private static Option<int> SweepLimitOption()
    {
        var option = new Option<int>("--sweep-limit")
        {
            Description = "questions each sweep point runs (a seeded sample)",
            HelpName = "N|all",
            DefaultValueFactory = _ => 1000,
            CustomParser = r =>
            {
                var text = r.Tokens[^1].Value;
                if (text == "all") return 0;
                if (int.TryParse(text, System.Globalization.NumberStyles.Integer, System.Globalization.CultureInfo.InvariantCulture, out var n) && n >= 1)
                    return n;
                r.AddError($"invalid value for --sweep-limit: '{text}' (expected a positive integer or all)");
                return 0;
            },
        };
        option.CompletionSources.Add("all");
        return option;
    }
}
