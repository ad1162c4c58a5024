using MoeRagInject.Cli.Flags;
using MoeRagInject.Engine;

namespace MoeRagInject.Cli.Commands;

/// <summary>Measures prefill and decode throughput at several batch sizes, RAG off and latent RAG firing, in one run.</summary>
public static class BenchCommand
{
    public static FlagSet Flags() => new FlagSet(
            "bench", "bench [flags]",
            "Throughput of the engine on this machine: B concurrent greedy requests of P random prompt tokens generating N tokens\n"
            + "each, with RAG off and with latent RAG firing once per request at the first token (when a retriever is set).\n"
            + "Prints a markdown table; --out writes it to a file too.")
        .Add(new("batch-sizes", FlagKind.List, "batch sizes to measure", "1,4,16", "B1,B2"))
        .Add(new("prompt-tokens", FlagKind.Int, "prompt length", "64", "P"))
        .Add(new("new-tokens", FlagKind.Int, "tokens generated per request", "32", "N"))
        .Add(new("out", FlagKind.String, "also write the markdown table to this file", null, "FILE"))
        .AddRange(EngineFlags.Specs());

    public static async Task<int> RunAsync(IReadOnlyList<string> args)
    {
        if (Flags().ParseOrPrintHelp(args) is not { } flags) return 0;
        var batchSizes = flags.IntList("batch-sizes") ?? [1, 4, 16];
        if (batchSizes.Count == 0 || batchSizes.Any(b => b < 1)) throw new UsageException("invalid value for --batch-sizes: positive integers expected");
        var promptTokens = flags.IntIn("prompt-tokens", 2) ?? 64;
        var newTokens = flags.IntIn("new-tokens", 2) ?? 32;
        var options = EngineFlags.ToOptions(flags) with { LogDir = Path.Combine(Path.GetTempPath(), "moe-rag-inject-bench-logs") };

        Console.Out.WriteLine($"bench: {options.ModelPath} ({options.LoadFormat}), batch sizes {string.Join(",", batchSizes)}, {promptTokens} prompt + {newTokens} new tokens");
        var rows = await EngineBenchmark.RunAsync(options, batchSizes, promptTokens, newTokens, Console.Out, CancellationToken.None).ConfigureAwait(false);
        var table = EngineBenchmark.ToMarkdown(rows, EngineBenchmark.DescribeMachine(), $"{Path.GetFileName(options.ModelPath)} ({options.LoadFormat} weights)");
        Console.Out.WriteLine();
        Console.Out.Write(table);
        if (flags.String("out") is { } path) await File.WriteAllTextAsync(path, table).ConfigureAwait(false);
        return 0;
    }
}
