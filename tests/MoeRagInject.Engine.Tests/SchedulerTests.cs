using MoeRagInject.Backend.Cpu;
using MoeRagInject.Engine.Scheduling;
using MoeRagInject.Model;
using MoeRagInject.Rag;
using static MoeRagInject.Engine.Tests.EngineStatusWaits;

namespace MoeRagInject.Engine.Tests;

/// <summary>The scheduler's bookkeeping alone, then the engine under KV pressure against each request's solo tokens.</summary>
public sealed class SchedulerTests : IDisposable
{
    private readonly string _temp = Directory.CreateTempSubdirectory("moe-rag-scheduler-").FullName;

    public void Dispose() => Directory.Delete(_temp, recursive: true);

    private static long s_arrival;

    private static Sequence NewSequence(int promptTokens, int maxNewTokens = 8) => new(
        $"s{Interlocked.Increment(ref s_arrival)}", s_arrival,
        new GenerationRequest { PromptIds = Enumerable.Range(1, promptTokens).ToArray(), Sampling = new SamplingParams { MaxNewTokens = maxNewTokens } },
        InjectionMode.Off, new TriggerOptions(), 1f);

    /// <summary>Applies a step as the engine does: the chunk's positions are computed; a sequence that reached its end gets a token.</summary>
    private static void Complete(IReadOnlyList<ScheduledChunk> batch)
    {
        foreach (var (s, tokens, _) in batch)
        {
            s.Computed += tokens;
            if (s.Computed == s.TotalTokens) s.Generated.Add(7);
        }
    }

    [Fact]
    public void ALongPromptIsPrefilledInChunksWhileOthersDecodeEveryStep()
    {
        var scheduler = new Scheduler(new KvBlockManager(64, 4), maxSequences: 4, chunkSize: 16, prefillBudget: 16);
        var decoding = NewSequence(5);
        scheduler.Add(decoding);
        Complete(scheduler.Schedule());
        Assert.Single(decoding.Generated);

        var longPrompt = NewSequence(100);
        scheduler.Add(longPrompt);
        for (var step = 0; step < 7; step++)
        {
            var batch = scheduler.Schedule();
            // Every step: the decode first (one token), then a chunk of the long prompt within the budget.
            Assert.Equal(decoding, batch[0].Sequence);
            Assert.Equal(1, batch[0].Tokens);
            Assert.Equal(longPrompt, batch[1].Sequence);
            Assert.Equal(Math.Min(16, 100 - longPrompt.Computed), batch[1].Tokens);
            Complete(batch);
        }
        Assert.Equal(8, decoding.Generated.Count);
        Assert.Equal(100, longPrompt.Computed);
        Assert.Single(longPrompt.Generated);
    }

    [Fact]
    public void BlocksAreTakenOnDemandAndTheNewestRequestIsPreemptedWhenTheyRunOut()
    {
        // 6 blocks of 4 positions: enough for the two prompts, not for both to grow past 12 positions each.
        var blocks = new KvBlockManager(6, 4);
        var scheduler = new Scheduler(blocks, maxSequences: 4, chunkSize: 64, prefillBudget: 64);
        var older = NewSequence(8, maxNewTokens: 16);
        var newer = NewSequence(8, maxNewTokens: 16);
        scheduler.Add(older);
        scheduler.Add(newer);
        Complete(scheduler.Schedule());
        // Only the prompts' blocks are taken: 2 each.
        Assert.Equal(2, older.BlockTable.Count);
        Assert.Equal(2, newer.BlockTable.Count);
        Assert.Equal(2, blocks.FreeBlocks);

        var preemptedAt = -1;
        for (var step = 0; step < 12 && preemptedAt < 0; step++)
        {
            var batch = scheduler.Schedule();
            if (scheduler.Preemptions > 0)
            {
                preemptedAt = step;
                Assert.Equal(SequenceState.Waiting, newer.State);
                Assert.Empty(newer.BlockTable);
                Assert.Equal(0, newer.Computed);
                Assert.DoesNotContain(batch, c => c.Sequence == newer);
            }
            Complete(batch);
        }
        Assert.True(preemptedAt >= 0, "the newest request was never preempted");
        Assert.Equal(SequenceState.Running, older.State);
        // The preempted request comes back once the older one finishes and frees its blocks.
        scheduler.Remove(older);
        var resumed = scheduler.Schedule();
        Assert.Contains(resumed, c => c.Sequence == newer && c.Tokens == newer.TotalTokens);
    }

    private LlmEngine CreateEngine(int contextLength, int kvTokens, int maxRunning) => InferenceEngine.Create(new EngineOptions
    {
        ModelPath = TestPaths.DefaultModel,
        Runner = new CpuRunnerFactory(2),
        Mode = InjectionMode.Off,
        ContextLength = contextLength,
        KvCacheTokens = kvTokens,
        MaxRunningRequests = maxRunning,
        LogDir = Path.Combine(_temp, "logs"),
        Notices = TextWriter.Null,
    });

    private static async Task<(List<int> Tokens, FinishReason Finish)> Collect(IGenerationEngine engine, GenerationRequest request)
    {
        var tokens = new List<int>();
        FinishReason? finish = null;
        await foreach (var update in engine.GenerateAsync(request))
        {
            tokens.AddRange(update.NewTokenIds);
            finish = update.Finish ?? finish;
        }
        return (tokens, finish!);
    }

    /// <summary>
    /// A KV cache of two contexts' worth of blocks and 32 concurrent requests of mixed lengths: requests are preempted (their
    /// blocks freed and their tokens recomputed later), and every one still gets exactly the tokens it gets alone.
    /// </summary>
    [Fact]
    public async Task UnderKvPressureEveryRequestCompletesWithItsSoloTokens()
    {
        const int context = 128;
        await using var engine = CreateEngine(context, kvTokens: 2 * context, maxRunning: 32);
        var rng = new SplitMix64(11);
        var requests = Enumerable.Range(0, 32).Select(i =>
        {
            var prompt = new int[8 + (int)(rng.NextUInt64() % 40)];
            prompt[0] = 1;
            for (var j = 1; j < prompt.Length; j++) prompt[j] = 3 + (int)(rng.NextUInt64() % 990);
            return new GenerationRequest
            {
                PromptIds = prompt,
                Sampling = new SamplingParams { Temperature = 0, MaxNewTokens = 16 + (int)(rng.NextUInt64() % 48), IgnoreEos = true },
            };
        }).ToList();

        var alone = new List<List<int>>();
        foreach (var request in requests) alone.Add((await Collect(engine, request)).Tokens);
        Assert.Equal(0, engine.GetStatus().Preemptions);

        var together = await Task.WhenAll(requests.Select(r => Collect(engine, r)));
        for (var i = 0; i < requests.Count; i++)
        {
            Assert.Equal(FinishKind.Length, together[i].Finish.Kind);
            Assert.Equal(alone[i], together[i].Tokens);
        }
        var status = await WaitForIdleAsync(engine);
        Assert.True(status.Preemptions > 0, "the test did not exercise preemption");
        Assert.Equal(status.TotalKvBlocks, status.FreeKvBlocks);
    }

    /// <summary>A request's KV blocks grow with it: a request allowed a whole context holds only what it has used so far.</summary>
    [Fact]
    public async Task ARequestHoldsOnlyTheBlocksItHasUsed()
    {
        const int context = 512;
        await using var engine = CreateEngine(context, kvTokens: context, maxRunning: 4);
        var prompt = new[] { 1, 5, 9, 13 };
        await using var stream = engine.Submit(new GenerationRequest
        {
            PromptIds = prompt,
            Sampling = new SamplingParams { Temperature = 0, MaxNewTokens = context - prompt.Length, IgnoreEos = true },
        });
        await using var updates = stream.GetAsyncEnumerator();
        var tokens = 0;
        while (tokens < 3 && await updates.MoveNextAsync()) tokens += updates.Current.NewTokenIds.Count;
        var status = engine.GetStatus();
        // Everything generated up to the abort, which follows the snapshot, bounds what had been generated at the snapshot.
        stream.Abort();
        FinishReason? finish = null;
        while (await updates.MoveNextAsync())
        {
            tokens += updates.Current.NewTokenIds.Count;
            finish = updates.Current.Finish ?? finish;
        }
        Assert.Equal(FinishKind.Abort, finish?.Kind);
        var used = status.TotalKvBlocks - status.FreeKvBlocks;
        // One position past what was generated can be in flight when the snapshot is taken.
        Assert.InRange(used, 1, (prompt.Length + tokens + 1 + status.KvBlockSize - 1) / status.KvBlockSize);
        Assert.True(prompt.Length + tokens < context / 2, $"the engine ran ahead ({tokens} tokens) before the snapshot; the check shows nothing");
        Assert.Equal(status.TotalKvBlocks, (await WaitForIdleAsync(engine)).FreeKvBlocks);
    }
}
