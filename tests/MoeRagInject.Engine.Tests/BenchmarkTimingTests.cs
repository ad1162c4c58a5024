using MoeRagInject.Backend;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine.Tests;

/// <summary>
/// The bench's time to first token, on the null device with steps of a fixed length: four prompts that the prefill budget
/// admits one a step get their first tokens a step apart (the last one four steps in, the mean two and a half), and four
/// admitted together get theirs in the same step (mean equal to the last). They measure wall time in steps of 25 ms, so no
/// other test runs beside them (on CI's 2 cores a busy neighbour delayed one of four submissions past a step).
/// </summary>
[Collection(nameof(BenchmarkTimingTests))]
public sealed class BenchmarkTimingTests
{
    private const int StepMs = 25, Batch = 4, PromptTokens = 16;

    private static async Task<BenchmarkRow> MeasureAsync(int prefillBudget, int repeats = 1)
    {
        var options = new EngineOptions
        {
            ModelPath = TestPaths.DefaultModel,
            Runner = new NullRunnerFactory(0, TimeSpan.FromMilliseconds(StepMs)),
            ChunkedPrefillSize = prefillBudget,
            MaxPrefillTokens = prefillBudget,
            MaxRunningRequests = Batch,
        };
        var rows = await EngineBenchmark.RunAsync(options, [Batch], [InjectionMode.Off], PromptTokens, newTokens: 4, TextWriter.Null,
            CancellationToken.None, repeats: repeats);
        return Assert.Single(rows);
    }

    [Fact]
    public async Task PromptsPrefilledInTurnGetTheirFirstTokensStepsApart()
    {
        var row = await MeasureAsync(prefillBudget: PromptTokens);
        // First tokens after steps 1, 2, 3 and 4: last ≈ 4 steps, mean ≈ 2.5 steps (ratio 1.6; host time shifts both).
        Assert.InRange(row.PrefillSeconds, 4 * StepMs / 1e3, 10 * StepMs / 1e3);
        Assert.InRange(row.PrefillSeconds / row.MeanFirstTokenSeconds, 1.3, 2.0);
        Assert.Equal(Math.Round(row.MeanFirstTokenSeconds * 1e3, 2), (double)row.ToJson()["ttft_ms_mean"]!);
        Assert.Equal(Math.Round(row.PrefillSeconds * 1e3, 2), (double)row.ToJson()["ttft_ms_last"]!);
    }

    [Fact]
    public async Task RepeatedRunsReportOneRowOfTheSameTiming()
    {
        var row = await MeasureAsync(prefillBudget: PromptTokens, repeats: 3);
        Assert.InRange(row.PrefillSeconds, 4 * StepMs / 1e3, 10 * StepMs / 1e3);
        Assert.InRange(row.StepMilliseconds, StepMs, 3 * StepMs);
    }

    [Fact]
    public void EachFigureIsTheMedianOfTheRuns()
    {
        BenchmarkRow Run(double ttft, double step, double tokensPerSecond) =>
            new("off", Batch, PromptTokens, 4, ttft, ttft / 2, tokensPerSecond, 0, step, 10, Batch)
            {
                GcPauseMilliseconds = step / 10, PrefillStepMilliseconds = step, PrefillRunnerMilliseconds = step / 2,
            };
        var odd = EngineBenchmark.Median([Run(0.30, 9, 400), Run(0.10, 11, 300), Run(0.20, 10, 500)]);
        Assert.Equal((0.20, 0.10, 400.0, 10.0), (odd.PrefillSeconds, odd.MeanFirstTokenSeconds, odd.DecodeTokensPerSecond, odd.StepMilliseconds));
        var even = EngineBenchmark.Median([Run(0.30, 9, 400), Run(0.10, 11, 300)]);
        Assert.Equal((0.20, 10.0, 350.0), (even.PrefillSeconds, even.StepMilliseconds, even.DecodeTokensPerSecond));
        // Every run stays in the JSON, in run order.
        var runs = odd.ToJson()["runs"]!.AsArray();
        Assert.Equal([300.0, 100.0, 200.0], runs.Select(r => (double)r!["ttft_ms_last"]!));
        Assert.Equal([9.0, 11.0, 10.0], runs.Select(r => (double)r!["step_ms"]!));
        Assert.Equal([0.9, 1.1, 1.0], runs.Select(r => (double)r!["gc_pause_ms"]!));
        Assert.Equal([9.0, 11.0, 10.0], runs.Select(r => (double)r!["prefill_step_ms"]!));
        Assert.Equal(1.0, (double)odd.ToJson()["gc_pause_ms"]!);
        Assert.Null(Run(0.1, 9, 400).ToJson()["runs"]);
    }

    [Fact]
    public async Task GarbageCollectionPausesDuringARunAreCounted()
    {
        // Blocking full collections while the run lasts: their pauses are the run's.
        using var stop = new CancellationTokenSource();
        var collector = Task.Run(async () =>
        {
            while (!stop.IsCancellationRequested)
            {
                GC.Collect(2, GCCollectionMode.Forced, blocking: true, compacting: true);
                await Task.Delay(5);
            }
        });
        var row = await MeasureAsync(prefillBudget: PromptTokens);
        await stop.CancelAsync();
        await collector;
        Assert.True(row.GcPauseMilliseconds > 0, $"gc pause {row.GcPauseMilliseconds} ms");
    }

    [Fact]
    public async Task PromptsPrefilledTogetherGetTheirFirstTokensInOneStep()
    {
        var row = await MeasureAsync(prefillBudget: Batch * PromptTokens);
        Assert.InRange(row.PrefillSeconds, StepMs / 1e3, 4 * StepMs / 1e3);
        // The one prefill step: a step of the null device's length, nearly all of it inside the runner.
        Assert.InRange(row.PrefillRunnerMilliseconds, StepMs, 2 * StepMs);
        Assert.InRange(row.PrefillStepMilliseconds, row.PrefillRunnerMilliseconds, row.PrefillRunnerMilliseconds + StepMs);
        Assert.InRange(row.PrefillSeconds / row.MeanFirstTokenSeconds, 1.0, 1.15);
    }
}

/// <summary>The timing tests run alone: xUnit runs no other test while a collection without parallelization runs.</summary>
[CollectionDefinition(nameof(BenchmarkTimingTests), DisableParallelization = true)]
public sealed class BenchmarkTimingCollection;
