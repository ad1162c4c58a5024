using System.CommandLine;
using System.Text.Json;
using MoeRagInject.Cli.CommandLine;
using MoeRagInject.Engine;
using MoeRagInject.Rag;

namespace MoeRagInject.Cli.Commands;

/// <summary>Measures prefill and decode throughput and the engine's host time per step at several batch sizes, RAG off and triggers firing, in one run.</summary>
public static class BenchCommand
{
    public static Command Create()
    {
        var batchSizes = CliOption.IntList("--batch-sizes", "batch sizes to measure", "B1,B2", "1,4,16", min: 1);
        var inputLen = CliOption.Int("--input-len", "prompt length", "P", 64, min: 2);
        inputLen.Aliases.Add("--prompt-tokens");
        var outputLen = CliOption.Int("--output-len", "tokens generated per request", "N", 32, min: 2);
        outputLen.Aliases.Add("--new-tokens");
        var modes = CliOption.List("--modes", "RAG modes to measure", "off,latent,prompt", "off,latent (off when no retriever is set)",
            ["off", "latent", "prompt"]);
        var triggerRate = CliOption.Double("--trigger-rate", "with --device null: share of tokens whose router entropies fire the trigger",
            "R", 0.05, min: 0, max: 1);
        var nullStepMs = CliOption.Double("--null-step-ms", "with --device null: how long a step lasts (as a device would take)", "MS", 0, min: 0);
        var repeats = CliOption.Int("--repeats", "runs of each batch size and mode; each figure is the median of its runs", "N", 1, min: 1);
        var json = CliOption.Switch("--json", "print one JSON object instead of the table");
        var output = CliOption.OptionalText("--out", "also write the table (or JSON) to this file", "FILE");
        var engine = new EngineFlags();

        var command = new Command("bench",
            "Throughput of the engine on this machine: B concurrent greedy requests of P random prompt tokens generating N tokens "
            + "each, with RAG off and with triggers firing (latent RAG at threshold 0, once per request; with --device null, on "
            + "--trigger-rate of tokens). Reports prefill tokens/s, time to first token (mean and last), decode tokens/s, ms per decode step, and the engine's own µs per "
            + "step outside the runner. Prints a markdown table (--json: one JSON object); --out writes it to a file too.")
        {
            batchSizes, inputLen, outputLen, modes, triggerRate, nullStepMs, repeats, json, output,
        };
        engine.AddTo(command);
        command.SetAction((parse, _) => RunAsync(
            engine.ToOptions(parse, (float)parse.GetValue(triggerRate), TimeSpan.FromMilliseconds(parse.GetValue(nullStepMs))),
            parse.GetValue(batchSizes) ?? [1, 4, 16], parse.GetValue(inputLen), parse.GetValue(outputLen), parse.GetValue(modes),
            parse.GetValue(repeats), parse.GetValue(json), parse.GetValue(output)));
        return command;
    }

    private static async Task<int> RunAsync(EngineOptions engineOptions, IReadOnlyList<int> batchSizes, int promptTokens, int newTokens,
        IReadOnlyList<string>? modeNames, int repeats, bool json, string? outputPath)
    {
        var options = engineOptions with { LogDir = Path.Combine(Path.GetTempPath(), "moe-rag-inject-bench-logs") };
        var modes = (modeNames ?? (options.Retriever is null ? ["off"] : ["off", "latent"]))
            .Select(m => Server.Requests.RequestParsing.ParseMode(m) ?? throw new UsageException($"invalid value for --modes: '{m}' (expected off, latent or prompt)"))
            .Distinct().ToList();
        if (modes.Any(m => m != InjectionMode.Off) && options.Retriever is null)
            throw new UsageException("--modes latent or prompt needs a retriever (--retriever)");

        var log = json ? Console.Error : Console.Out;
        log.WriteLine($"bench: {options.ModelPath} ({options.LoadFormat}) on {options.Runner.Device}, batch sizes {string.Join(",", batchSizes)}, {promptTokens} prompt + {newTokens} new tokens");
        double? bandwidth = null;
        if (options.Runner is Backend.Cuda.CudaRunnerFactory cuda)
        {
            bandwidth = Backend.Cuda.CudaRunnerFactory.MeasureCopyBandwidth(cuda.Ordinal);
            log.WriteLine(FormattableString.Invariant($"copy bandwidth (read + write): {bandwidth / 1e12:F2} TB/s"));
        }
        var rows = await EngineBenchmark.RunAsync(options, batchSizes, modes, promptTokens, newTokens, log, CancellationToken.None, bandwidth, repeats)
            .ConfigureAwait(false);
        var machine = EngineBenchmark.DescribeMachine();
        var model = $"{Path.GetFileName(options.ModelPath)} ({options.LoadFormat} weights)";
        var text = json
            ? EngineBenchmark.ToJson(rows, machine, options.Runner.Device, model).ToJsonString(new JsonSerializerOptions { WriteIndented = true })
            : EngineBenchmark.ToMarkdown(rows, machine, options.Runner.Device, model);
        if (!json) Console.Out.WriteLine();
        Console.Out.WriteLine(text);
        if (outputPath is { } path) await File.WriteAllTextAsync(path, text).ConfigureAwait(false);
        return 0;
    }
}
