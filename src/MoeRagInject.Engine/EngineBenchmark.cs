using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;
using MoeRagInject.Model;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine;

/// <summary>One measured configuration: B concurrent requests of P prompt tokens generating N tokens each.</summary>
/// <param name="PrefillSeconds">From submitting the requests until each had its first token (as its reader saw it): the last request's time to first token.</param>
/// <param name="MeanFirstTokenSeconds">The requests' time to first token, from submission, on average.</param>
/// <param name="DecodeTokensPerSecond">Tokens accepted in decode steps per second of decode-step time, measured in the engine loop.</param>
/// <param name="StepMilliseconds">Mean time of a decode step, scheduling to results applied.</param>
/// <param name="HostMicrosecondsPerStep">Of a decode step, the time spent outside the runner (the engine's own cost).</param>
/// <param name="MeanDecodeBatch">
/// Sequences in a decode step on average: fewer than the batch while requests wait for retrievals, and at the end of a
/// run, when the requests that began decoding first (their prompts prefilled in the first chunks) finish first.
/// </param>
public sealed record BenchmarkRow(string Mode, int BatchSize, int PromptTokens, int NewTokens, double PrefillSeconds,
    double MeanFirstTokenSeconds, double DecodeTokensPerSecond, int Retrievals, double StepMilliseconds, double HostMicrosecondsPerStep,
    double MeanDecodeBatch)
{
    /// <summary>Prompt tokens per second until every request had its first token.</summary>
    public double PrefillTokensPerSecond => BatchSize * PromptTokens / PrefillSeconds;

    /// <summary>Set for a GPU run: the bytes a decode step must read, and the card's copy rate measured in the same run.</summary>
    public Roofline? Roofline { get; init; }

    /// <summary>
    /// Set for a GPU run: the same limit for steps of <see cref="MeanDecodeBatch"/> sequences, the steps the run measured
    /// (at batch 256 the last requests' tail leaves about 225 on average). Its share is the decode steps' time against the
    /// time their bytes take at the copy rate, where the share at <see cref="BatchSize"/> also counts the tail's fewer tokens.
    /// </summary>
    public Roofline? MeanBatchRoofline { get; init; }

    /// <summary>
    /// The time the .NET runtime held this process's threads for garbage collection during the run (GC.GetTotalPauseDuration),
    /// in ms: the engine loop cannot enqueue work then, so a pause inside a step shows as idle device time.
    /// </summary>
    public double GcPauseMilliseconds { get; init; }

    /// <summary>
    /// Mean time of the run's steps that prefilled prompt rows, scheduling to results applied, and of that the time inside the
    /// runner: with the time to first token they tell the device's share from the engine's and from waiting to be scheduled.
    /// </summary>
    public double PrefillStepMilliseconds { get; init; }

    /// <inheritdoc cref="PrefillStepMilliseconds"/>
    public double PrefillRunnerMilliseconds { get; init; }

    /// <summary>With --repeats: every run, in run order (the row holds their medians; the JSON lists the figures that vary most).</summary>
    public IReadOnlyList<BenchmarkRow> Runs { get; init; } = [];

    /// <summary>Decode tokens/s over the roofline at the batch size, and over the roofline at the mean decode batch.</summary>
    public (double AtBatch, double AtMeanBatch)? RooflineShares => Roofline is { } r && MeanBatchRoofline is { } m && MeanDecodeBatch > 0
        ? (DecodeTokensPerSecond / r.TokensPerSecond(BatchSize), DecodeTokensPerSecond / m.TokensPerSecond(MeanDecodeBatch))
        : null;

    public JsonObject ToJson()
    {
        var json = Fields();
        if (Roofline is { } r)
        {
            json["bytes_per_step"] = r.BytesPerStep;
            json["copy_bandwidth_gbs"] = Math.Round(r.CopyBandwidth / 1e9, 1);
            json["roofline_tok_s"] = Math.Round(r.TokensPerSecond(BatchSize), 1);
            json["roofline_share"] = Math.Round(DecodeTokensPerSecond / r.TokensPerSecond(BatchSize), 3);
        }
        if (MeanBatchRoofline is { } m && RooflineShares is { } shares)
        {
            json["mean_batch_bytes_per_step"] = m.BytesPerStep;
            json["mean_batch_roofline_share"] = Math.Round(shares.AtMeanBatch, 3);
        }
        if (Runs.Count > 1)
            json["runs"] = new JsonArray([.. Runs.Select(run => (JsonNode)new JsonObject
            {
                ["ttft_ms_last"] = Math.Round(run.PrefillSeconds * 1e3, 2), ["step_ms"] = Math.Round(run.StepMilliseconds, 4),
                ["prefill_step_ms"] = Math.Round(run.PrefillStepMilliseconds, 3), ["prefill_runner_ms"] = Math.Round(run.PrefillRunnerMilliseconds, 3),
                ["gc_pause_ms"] = Math.Round(run.GcPauseMilliseconds, 2),
            })]);
        return json;
    }

    private JsonObject Fields() => new()
    {
        ["batch_size"] = BatchSize,
        ["mode"] = Mode,
        ["input_len"] = PromptTokens,
        ["output_len"] = NewTokens,
        ["prefill_tok_s"] = Math.Round(PrefillTokensPerSecond, 1),
        ["ttft_ms_mean"] = Math.Round(MeanFirstTokenSeconds * 1e3, 2),
        ["ttft_ms_last"] = Math.Round(PrefillSeconds * 1e3, 2),
        ["decode_tok_s"] = Math.Round(DecodeTokensPerSecond, 1),
        ["step_ms"] = Math.Round(StepMilliseconds, 4),
        ["host_us_per_step"] = Math.Round(HostMicrosecondsPerStep, 2),
        ["mean_decode_batch"] = Math.Round(MeanDecodeBatch, 1),
        ["retrievals"] = Retrievals,
        ["prefill_step_ms"] = Math.Round(PrefillStepMilliseconds, 3),
        ["prefill_runner_ms"] = Math.Round(PrefillRunnerMilliseconds, 3),
        ["gc_pause_ms"] = Math.Round(GcPauseMilliseconds, 2),
    };
}

/// <summary>
/// The memory-bandwidth limit of a decode step: the bytes it must read (every non-expert weight, the experts the batch's
/// tokens touch (8·(1 − (1 − k/E)^B) of E per layer with uniform routing, as random weights route), and the KV cache the
/// batch attends over) over the card's measured copy rate.
/// </summary>
public sealed record Roofline(long BytesPerStep, double CopyBandwidth)
{
    public double TokensPerSecond(double batch) => batch * CopyBandwidth / BytesPerStep;

    /// <param name="batch">Sequences a step; a mean (not whole) for the steps a run measured.</param>
    public static Roofline For(Model.ModelConfig c, double batch, int meanContext, double copyBandwidth)
    {
        long h = c.HiddenSize, q = (long)c.NumHeads * c.HeadDim, kv = (long)c.NumKvHeads * c.HeadDim;
        var attention = h * q + 2 * h * kv + q * h + 2 * h + (long)c.NumExperts * h;
        var expert = 3L * h * c.IntermediateSize;
        var touched = c.NumExperts * (1 - Math.Pow(1 - (double)c.NumExpertsPerToken / c.NumExperts, batch));
        var weights = 2 * (c.NumLayers * (attention + (long)(touched * expert)) + (long)c.VocabSize * h + h);
        var cache = (long)Math.Round(batch * meanContext * 2 * kv * 2 * c.NumLayers);
        return new Roofline(weights + cache, copyBandwidth);
    }
}

/// <summary>
/// Throughput of the engine: prefill and decode at several batch sizes, with RAG off and with triggers firing (latent RAG at
/// threshold 0 and one retrieval per request on a real device; on the null device, the trigger rate its runner is built
/// with), each a ratio to the RAG-off baseline of the same run. Also the engine's own time per decode step outside the runner.
/// </summary>
public static class EngineBenchmark
{
    /// <param name="copyBandwidth">The card's copy rate (bytes/s) measured in this run, for the roofline fields; null on the CPU.</param>
    /// <param name="repeats">Runs of each batch size and mode; each figure of a row is the median of its runs.</param>
    public static async Task<IReadOnlyList<BenchmarkRow>> RunAsync(EngineOptions options, IReadOnlyList<int> batchSizes,
        IReadOnlyList<InjectionMode> modes, int promptTokens, int newTokens, TextWriter progress, CancellationToken cancellationToken,
        double? copyBandwidth = null, int repeats = 1)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(repeats, 1);
        var maxBatch = batchSizes.Max();
        var nullDevice = options.Runner.Device == "null";
        await using var engine = InferenceEngine.Create(options with
        {
            MaxRunningRequests = Math.Max(options.MaxRunningRequests, maxBatch),
            Trigger = nullDevice ? options.Trigger : options.Trigger with { Threshold = 0, MaxRetrievalsPerRequest = 1 },
            Notices = TextWriter.Null,
        }, line => progress.WriteLine($"  {line}"));
        var vocab = engine.Config.VocabSize;
        var rng = new SplitMix64(1234);
        var rows = new List<BenchmarkRow>();
        // Two warm-up rounds of every mode at the largest batch, so that tiered JIT compilation is done before timing.
        for (var round = 0; round < 2; round++)
        {
            var warmup = Prompts(rng, vocab, maxBatch, promptTokens);
            foreach (var mode in modes)
                await MeasureAsync(engine, mode, maxBatch, warmup, newTokens, cancellationToken).ConfigureAwait(false);
        }
        foreach (var batch in batchSizes)
        {
            // Each run its own prompts, the same for every mode: a run's routing, and the expert group sizes it gives, are as
            // new to the engine as a new request's (a prompt run again would find every GEMM shape in cuBLAS's cache).
            var promptsOfRun = Enumerable.Range(0, repeats).Select(_ => Prompts(rng, vocab, batch, promptTokens)).ToList();
            foreach (var mode in modes)
            {
                var runs = new List<BenchmarkRow>();
                for (var run = 0; run < repeats; run++)
                    runs.Add(await MeasureAsync(engine, mode, batch, promptsOfRun[run], newTokens, cancellationToken).ConfigureAwait(false));
                var row = Median(runs);
                if (copyBandwidth is { } bandwidth)
                    row = row with
                    {
                        Roofline = Roofline.For(engine.Config, batch, promptTokens + newTokens / 2, bandwidth),
                        MeanBatchRoofline = Roofline.For(engine.Config, row.MeanDecodeBatch, promptTokens + newTokens / 2, bandwidth),
                    };
                rows.Add(row);
                var roofline = row.RooflineShares is var (atBatch, atMean)
                    ? string.Create(CultureInfo.InvariantCulture,
                        $", {100 * atBatch:F1}% of the roofline {row.Roofline!.TokensPerSecond(batch):F0} tok/s ({100 * atMean:F1}% at the mean batch)")
                    : "";
                progress.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"  {row.Mode,-6} batch {batch,3}: prefill {row.PrefillTokensPerSecond,10:F1} tok/s (TTFT {1e3 * row.MeanFirstTokenSeconds:F1} ms mean, {1e3 * row.PrefillSeconds:F1} last), decode {row.DecodeTokensPerSecond,9:F1} tok/s, step {row.StepMilliseconds,8:F3} ms (host {row.HostMicrosecondsPerStep,7:F1} µs, {row.MeanDecodeBatch:F1} sequences), retrievals {row.Retrievals}{roofline}"));
            }
        }
        return rows;
    }

    /// <summary>Each figure the median of the runs' (the middle run's, or the mean of the two middle ones).</summary>
    internal static BenchmarkRow Median(IReadOnlyList<BenchmarkRow> runs)
    {
        double Of(Func<BenchmarkRow, double> field)
        {
            var sorted = runs.Select(field).Order().ToList();
            return sorted.Count % 2 == 1 ? sorted[sorted.Count / 2] : (sorted[sorted.Count / 2 - 1] + sorted[sorted.Count / 2]) / 2;
        }

        var first = runs[0];
        return first with
        {
            PrefillSeconds = Of(r => r.PrefillSeconds), MeanFirstTokenSeconds = Of(r => r.MeanFirstTokenSeconds),
            DecodeTokensPerSecond = Of(r => r.DecodeTokensPerSecond), Retrievals = (int)Math.Round(Of(r => r.Retrievals)),
            StepMilliseconds = Of(r => r.StepMilliseconds), HostMicrosecondsPerStep = Of(r => r.HostMicrosecondsPerStep),
            MeanDecodeBatch = Of(r => r.MeanDecodeBatch), GcPauseMilliseconds = Of(r => r.GcPauseMilliseconds),
            PrefillStepMilliseconds = Of(r => r.PrefillStepMilliseconds), PrefillRunnerMilliseconds = Of(r => r.PrefillRunnerMilliseconds),
            Runs = runs,
        };
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
        var gcBefore = GC.GetTotalPauseDuration();
        var start = Stopwatch.GetTimestamp();
        var firstTokenAt = new long[batch];
        var before = engine.Counters;
        var retrievals = 0;
        await Task.WhenAll(Enumerable.Range(0, batch).Select(async i =>
        {
            var request = new GenerationRequest
            {
                PromptIds = prompts[i],
                Sampling = new SamplingParams { Temperature = 0, MaxNewTokens = newTokens, IgnoreEos = true },
                Rag = new RagOverrides { Mode = mode },
            };
            var first = true;
            await foreach (var update in engine.GenerateAsync(request, cancellationToken).ConfigureAwait(false))
            {
                if (first && update.NewTokenIds.Count > 0)
                {
                    first = false;
                    firstTokenAt[i] = Stopwatch.GetTimestamp();
                }
                Interlocked.Add(ref retrievals, update.NewEvents.Count);
            }
        })).ConfigureAwait(false);
        var run = engine.Counters - before;
        var firstTokenSeconds = firstTokenAt.Select(t => Stopwatch.GetElapsedTime(start, t).TotalSeconds).ToList();
        return new BenchmarkRow(mode.ToString().ToLowerInvariant(), batch, prompts[0].Length, newTokens,
            firstTokenSeconds.Max(), firstTokenSeconds.Average(), run.DecodeTokensPerSecond, retrievals,
            run.DecodeStepMilliseconds, run.HostMicrosecondsPerDecodeStep, run.MeanDecodeBatch)
        {
            GcPauseMilliseconds = (GC.GetTotalPauseDuration() - gcBefore).TotalMilliseconds,
            PrefillStepMilliseconds = run.PrefillStepMilliseconds, PrefillRunnerMilliseconds = run.PrefillRunnerMilliseconds,
        };
    }

    /// <summary>A markdown table, with each row's decode speed as a ratio of the RAG-off row of the same batch size.</summary>
    public static string ToMarkdown(IReadOnlyList<BenchmarkRow> rows, string machine, string device, string model)
    {
        var text = new StringBuilder();
        text.AppendLine(CultureInfo.InvariantCulture, $"Machine: {machine}. Device: {device}. Model: {model}.");
        text.AppendLine();
        text.AppendLine("| mode | batch | prompt tokens | new tokens | prefill tok/s | TTFT ms (mean / last) | decode tok/s | decode vs off | step ms | host µs/step | mean decode batch | retrievals |");
        text.AppendLine("|---|---|---|---|---|---|---|---|---|---|---|---|");
        foreach (var row in rows)
        {
            var baseline = rows.FirstOrDefault(r => r.Mode == "off" && r.BatchSize == row.BatchSize);
            var ratio = baseline is null ? "—" : string.Create(CultureInfo.InvariantCulture, $"{row.DecodeTokensPerSecond / baseline.DecodeTokensPerSecond:F2}×");
            text.AppendLine(string.Create(CultureInfo.InvariantCulture,
                $"| {row.Mode} | {row.BatchSize} | {row.PromptTokens} | {row.NewTokens} | {row.PrefillTokensPerSecond:F1} | {1e3 * row.MeanFirstTokenSeconds:F1} / {1e3 * row.PrefillSeconds:F1} | {row.DecodeTokensPerSecond:F1} | {ratio} | {row.StepMilliseconds:F3} | {row.HostMicrosecondsPerStep:F1} | {row.MeanDecodeBatch:F1} | {row.Retrievals} |"));
        }
        return text.ToString();
    }

    /// <summary>The one JSON object <c>bench --json</c> prints.</summary>
    public static JsonObject ToJson(IReadOnlyList<BenchmarkRow> rows, string machine, string device, string model) => new()
    {
        ["machine"] = machine,
        ["device"] = device,
        ["model"] = model,
        ["results"] = new JsonArray([.. rows.Select(r => (JsonNode)r.ToJson())]),
    };

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
