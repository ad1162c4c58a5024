using System.Text.Json;
using MoeRagInject.Cli.Flags;
using MoeRagInject.Engine;
using MoeRagInject.Rag;

namespace MoeRagInject.Cli.Commands;

/// <summary>Measures prefill and decode throughput and the engine's host time per step at several batch sizes, RAG off and triggers firing, in one run.</summary>
public static class BenchCommand
{
    public static FlagSet Flags() => new FlagSet(
            "bench", "bench [flags]",
            "Throughput of the engine on this machine: B concurrent greedy requests of P random prompt tokens generating N tokens\n"
            + "each, with RAG off and with triggers firing (latent RAG at threshold 0, once per request; with --device null, on\n"
            + "--trigger-rate of tokens). Reports prefill and decode tokens/s, ms per decode step, and the engine's own µs per\n"
            + "step outside the runner. Prints a markdown table (--json: one JSON object); --out writes it to a file too.")
        .Add(new("batch-sizes", FlagKind.List, "batch sizes to measure", "1,4,16", "B1,B2"))
        .Add(new("input-len", FlagKind.Int, "prompt length", "64", "P"))
        .Add(new("output-len", FlagKind.Int, "tokens generated per request", "32", "N"))
        .Add(new("prompt-tokens", FlagKind.Int, "the same as --input-len", "64", "P"))
        .Add(new("new-tokens", FlagKind.Int, "the same as --output-len", "32", "N"))
        .Add(new("modes", FlagKind.List, "RAG modes to measure", "off,latent (off when no retriever is set)", "off,latent,prompt"))
        .Add(new("trigger-rate", FlagKind.Double, "with --device null: share of tokens whose router entropies fire the trigger", "0.05", "R"))
        .Add(new("null-step-ms", FlagKind.Double, "with --device null: how long a step lasts (as a device would take)", "0", "MS"))
        .Add(new("json", FlagKind.Bool, "print one JSON object instead of the table"))
        .Add(new("out", FlagKind.String, "also write the table (or JSON) to this file", null, "FILE"))
        .AddRange(EngineFlags.Specs());

    public static async Task<int> RunAsync(IReadOnlyList<string> args)
    {
        if (Flags().ParseOrPrintHelp(args) is not { } flags) return 0;
        var batchSizes = flags.IntList("batch-sizes") ?? [1, 4, 16];
        if (batchSizes.Count == 0 || batchSizes.Any(b => b < 1)) throw new UsageException("invalid value for --batch-sizes: positive integers expected");
        var promptTokens = flags.IntIn("input-len", 2) ?? flags.IntIn("prompt-tokens", 2) ?? 64;
        var newTokens = flags.IntIn("output-len", 2) ?? flags.IntIn("new-tokens", 2) ?? 32;
        var triggerRate = (float)(flags.DoubleIn("trigger-rate", 0, 1) ?? 0.05);
        var json = flags.Bool("json");
        var stepTime = TimeSpan.FromMilliseconds(flags.DoubleIn("null-step-ms", 0) ?? 0);
        var options = EngineFlags.ToOptions(flags, triggerRate, stepTime) with { LogDir = Path.Combine(Path.GetTempPath(), "moe-rag-inject-bench-logs") };
        var modes = (flags.List("modes") ?? (options.Retriever is null ? ["off"] : ["off", "latent"]))
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
        var rows = await EngineBenchmark.RunAsync(options, batchSizes, modes, promptTokens, newTokens, log, CancellationToken.None, bandwidth)
            .ConfigureAwait(false);
        var machine = EngineBenchmark.DescribeMachine();
        var model = $"{Path.GetFileName(options.ModelPath)} ({options.LoadFormat} weights)";
        var text = json
            ? EngineBenchmark.ToJson(rows, machine, options.Runner.Device, model).ToJsonString(new JsonSerializerOptions { WriteIndented = true })
            : EngineBenchmark.ToMarkdown(rows, machine, options.Runner.Device, model);
        if (!json) Console.Out.WriteLine();
        Console.Out.WriteLine(text);
        if (flags.String("out") is { } path) await File.WriteAllTextAsync(path, text).ConfigureAwait(false);
        return 0;
    }
}
