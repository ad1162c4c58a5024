using System.Diagnostics;
using System.Globalization;
using System.Text;
using MoeRagInject.Model;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine;

/// <summary>One measured configuration: B concurrent requests of P prompt tokens generating N tokens each.</summary>
public sealed record BenchmarkRow(string Mode, int BatchSize, int PromptTokens, int NewTokens, double PrefillSeconds,
    double DecodeSeconds, int Retrievals)
{
    /// <summary>Prompt tokens per second until every request had its first token.</summary>
    public double PrefillTokensPerSecond => BatchSize * PromptTokens / PrefillSeconds;
    /// <summary>Generated tokens per second after the first token, over all requests.</summary>
    public double DecodeTokensPerSecond => BatchSize * (NewTokens - 1) / DecodeSeconds;
}

/// <summary>
/// Throughput of the engine on this machine: prefill and decode at several batch sizes with RAG off, and the same with
/// latent RAG firing at the first token (threshold 0, one retrieval per request), so its cost is a ratio to the baseline
/// measured in the same run.
/// </summary>
public static class EngineBenchmark
{
    public static async Task<IReadOnlyList<BenchmarkRow>> RunAsync(EngineOptions options, IReadOnlyList<int> batchSizes, int promptTokens,
        int newTokens, TextWriter progress, CancellationToken cancellationToken)
    {
        var maxBatch = batchSizes.Max();
        await using var engine = InferenceEngine.Create(options with
        {
            MaxRunningRequests = Math.Max(options.MaxRunningRequests, maxBatch),
            Trigger = options.Trigger with { Threshold = 0, MaxRetrievalsPerRequest = 1 },
            Notices = TextWriter.Null,
        });
        var vocab = engine.Config.VocabSize;
        var rng = new SplitMix64(1234);
        var rows = new List<BenchmarkRow>();
        var modes = options.Retriever is null ? new[] { InjectionMode.Off } : [InjectionMode.Off, InjectionMode.Latent];
        // A warm-up round of every mode at the largest batch, so that tiered JIT compilation is done before timing.
        var warmup = Prompts(rng, vocab, maxBatch, promptTokens);
        foreach (var mode in modes)
            for (var round = 0; round < 2; round++)
                await MeasureAsync(engine, mode, maxBatch, warmup, newTokens, cancellationToken).ConfigureAwait(false);
        foreach (var batch in batchSizes)
        {
            var prompts = Prompts(rng, vocab, batch, promptTokens);
            foreach (var mode in modes)
            {
                var row = await MeasureAsync(engine, mode, batch, prompts, newTokens, cancellationToken);
                rows.Add(row);
                progress.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"  {row.Mode,-6} batch {batch,3}: prefill {row.PrefillTokensPerSecond,9:F1} tok/s, decode {row.DecodeTokensPerSecond,8:F1} tok/s, retrievals {row.Retrievals}"));
            }
        }
        return rows;
    }

    private static List<int[]> Prompts(SplitMix64 rng, int vocab, int count, int length)
    {
        var prompts = new List<int[]>();
        for (var i = 0; i < count; i++)
        {
            var ids = new int[length];
            ids[0] = 1;
            // Ordinary tokens only: skip the specials and byte-fallback ids at the bottom of the vocabulary.
            for (var j = 1; j < length; j++) ids[j] = 259 + (int)(rng.NextUInt64() % (ulong)Math.Max(1, vocab - 259));
            prompts.Add(ids);
        }
        return prompts;
    }

    private static async Task<BenchmarkRow> MeasureAsync(LlmEngine engine, InjectionMode mode, int batch, List<int[]> prompts,
        int newTokens, CancellationToken cancellationToken)
    {
        var start = Stopwatch.GetTimestamp();
        var firstTokens = new long[batch];
        var retrievals = 0;
        await Task.WhenAll(Enumerable.Range(0, batch).Select(async i =>
        {
            var request = new GenerationRequest
            {
                PromptIds = prompts[i],
                Sampling = new SamplingParams { Temperature = 0, MaxNewTokens = newTokens, IgnoreEos = true },
                Rag = new RagOverrides { Mode = mode },
            };
            await foreach (var update in engine.GenerateAsync(request, cancellationToken).ConfigureAwait(false))
            {
                if (firstTokens[i] == 0 && update.NewTokenIds.Count > 0) firstTokens[i] = Stopwatch.GetTimestamp();
                Interlocked.Add(ref retrievals, update.NewEvents.Count);
            }
        })).ConfigureAwait(false);
        var end = Stopwatch.GetTimestamp();
        var prefillEnd = firstTokens.Max();
        return new BenchmarkRow(mode.ToString().ToLowerInvariant(), batch, prompts[0].Length, newTokens,
            Stopwatch.GetElapsedTime(start, prefillEnd).TotalSeconds, Stopwatch.GetElapsedTime(prefillEnd, end).TotalSeconds, retrievals);
    }

    /// <summary>A markdown table, with the latent rows' decode speed as a ratio of the RAG-off row of the same batch size.</summary>
    public static string ToMarkdown(IReadOnlyList<BenchmarkRow> rows, string machine, string model)
    {
        var text = new StringBuilder();
        text.AppendLine(CultureInfo.InvariantCulture, $"Machine: {machine}. Model: {model}.");
        text.AppendLine();
        text.AppendLine("| mode | batch | prompt tokens | new tokens | prefill tok/s | decode tok/s | decode vs off | retrievals |");
        text.AppendLine("|---|---|---|---|---|---|---|---|");
        foreach (var row in rows)
        {
            var baseline = rows.First(r => r.Mode == "off" && r.BatchSize == row.BatchSize);
            text.AppendLine(string.Create(CultureInfo.InvariantCulture,
                $"| {row.Mode} | {row.BatchSize} | {row.PromptTokens} | {row.NewTokens} | {row.PrefillTokensPerSecond:F1} | {row.DecodeTokensPerSecond:F1} | {row.DecodeTokensPerSecond / baseline.DecodeTokensPerSecond:F2}× | {row.Retrievals} |"));
        }
        return text.ToString();
    }

    /// <summary>"N cores, CPU model, OS" of this machine.</summary>
    public static string DescribeMachine()
    {
        var cpu = "unknown CPU";
        try
        {
            cpu = File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("model name", StringComparison.Ordinal))?.Split(':', 2)[1].Trim() ?? cpu;
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
        return $"{Environment.ProcessorCount} cores, {cpu}, {System.Runtime.InteropServices.RuntimeInformation.OSDescription}";
    }
}
