using System.Diagnostics;
using System.Globalization;
using MoeRagInject.Engine;
using MoeRagInject.Rag;

namespace MoeRagInject.Evaluation;

/// <summary>What one question's generation produced.</summary>
public sealed record QuestionRun
{
    public required QaItem Item { get; init; }
    public required IReadOnlyList<int> Tokens { get; init; }
    /// <summary>The whole output text.</summary>
    public required string Text { get; init; }
    /// <summary>The answer: output text up to the first newline, trimmed.</summary>
    public string Answer => AnswerOf(Text);
    public required IReadOnlyList<RagEvent> Events { get; init; }
    /// <summary>Router entropy per layer for each generated token (index 0: the forward pass of the last prompt position).</summary>
    public required IReadOnlyList<float[]> RouterEntropy { get; init; }
    /// <summary>Output-distribution entropy of each generated token.</summary>
    public required IReadOnlyList<float> OutputEntropy { get; init; }
    /// <summary>The router probe's score of each generated token (empty when the engine has no probe).</summary>
    public IReadOnlyList<float> RouterProbe { get; init; } = [];
    public required FinishReason? Finish { get; init; }
    /// <summary>End-to-end seconds from submission to the last update.</summary>
    public required double LatencySeconds { get; init; }

    public static string AnswerOf(string text)
    {
        var newline = text.IndexOf('\n', StringComparison.Ordinal);
        return (newline < 0 ? text : text[..newline]).Trim();
    }
}

/// <summary>Runs QA prompts through an engine with bounded concurrency.</summary>
public static class QuestionRunner
{
    /// <summary>Greedy decoding up to <paramref name="maxNewTokens"/>, stopping at EOS (and at a newline when <paramref name="stopAtNewline"/>).</summary>
    public static async Task<QuestionRun[]> RunAsync(IGenerationEngine engine, IReadOnlyList<QaItem> items, int maxNewTokens,
        int concurrency, bool stopAtNewline, RagOverrides? rag, TextWriter progress, string label, CancellationToken cancellationToken)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(concurrency, 1);
        var results = new QuestionRun[items.Count];
        using var gate = new SemaphoreSlim(concurrency);
        var done = 0;
        var clock = Stopwatch.StartNew();
        var reportEvery = Math.Max(1, items.Count / 10);
        var tasks = items.Select(async (item, index) =>
        {
            await gate.WaitAsync(cancellationToken).ConfigureAwait(false);
            try
            {
                results[index] = await RunOneAsync(engine, item, maxNewTokens, stopAtNewline, rag, cancellationToken).ConfigureAwait(false);
            }
            finally
            {
                gate.Release();
            }
            var n = Interlocked.Increment(ref done);
            if (n % reportEvery == 0 || n == items.Count)
            {
                lock (progress)
                    progress.WriteLine(string.Create(CultureInfo.InvariantCulture,
                        $"[{label}] {n}/{items.Count} questions ({clock.Elapsed.TotalSeconds:F1} s)"));
            }
        }).ToList();
        await Task.WhenAll(tasks).ConfigureAwait(false);
        return results;
    }

    public static async Task<QuestionRun> RunOneAsync(IGenerationEngine engine, QaItem item, int maxNewTokens, bool stopAtNewline,
        RagOverrides? rag, CancellationToken cancellationToken)
    {
        var prompt = engine.Tokenizer.Encode(item.Question);
        var request = new GenerationRequest
        {
            PromptIds = prompt,
            Sampling = new SamplingParams
            {
                Temperature = 0,
                MaxNewTokens = maxNewTokens,
                Stop = stopAtNewline ? ["\n"] : [],
            },
            Rag = rag,
            ReturnRouterEntropy = true,
        };
        var tokens = new List<int>();
        var events = new List<RagEvent>();
        var router = new List<float[]>();
        var output = new List<float>();
        var probe = new List<float>();
        FinishReason? finish = null;
        var text = new System.Text.StringBuilder();
        var clock = Stopwatch.StartNew();
        await foreach (var update in engine.GenerateAsync(request, cancellationToken).ConfigureAwait(false))
        {
            tokens.AddRange(update.NewTokenIds);
            events.AddRange(update.NewEvents);
            router.AddRange(update.NewRouterEntropy);
            output.AddRange(update.NewOutputEntropy);
            probe.AddRange(update.NewRouterProbe);
            text.Append(update.NewText);
            finish = update.Finish ?? finish;
        }
        clock.Stop();
        if (finish is { Kind: FinishKind.Abort } abort && abort.Message?.StartsWith("internal error", StringComparison.Ordinal) == true)
            throw new InvalidOperationException($"question {item.Id}: the engine failed: {abort.Message}");
        return new QuestionRun
        {
            Item = item,
            Tokens = tokens,
            Text = text.ToString(),
            Events = events,
            RouterEntropy = router,
            OutputEntropy = output,
            RouterProbe = probe,
            Finish = finish,
            LatencySeconds = clock.Elapsed.TotalSeconds,
        };
    }
}
