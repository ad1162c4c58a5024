using MoeRagInject.Backend;
using MoeRagInject.Backend.Cpu;
using MoeRagInject.Rag;
using static MoeRagInject.Engine.Tests.EngineStatusWaits;

namespace MoeRagInject.Engine.Tests;

/// <summary>
/// Parallel sampling (n) with the prompt's full KV blocks shared between the samples, and top logprobs, on the tiny-mixtral
/// reference checkpoint: tokens are compared with the same requests run alone and with transformers' greedy output, logprobs
/// with transformers' logits.
/// </summary>
public sealed class ParallelSamplingTests : IDisposable
{
    private const int BlockSize = 16;
    private readonly string _temp = Directory.CreateTempSubdirectory("moe-rag-parallel-").FullName;

    public void Dispose() => Directory.Delete(_temp, recursive: true);

    private LlmEngine CreateEngine(string? retriever = null, InjectionMode mode = InjectionMode.Off, double threshold = 0.5) =>
        InferenceEngine.Create(new EngineOptions
        {
            ModelPath = TestPaths.DefaultModel,
            Runner = new CpuRunnerFactory(2),
            Mode = mode,
            Retriever = retriever,
            Trigger = new TriggerOptions { Threshold = threshold, CooldownTokens = 4, MaxRetrievalsPerRequest = 1 },
            LogDir = Path.Combine(_temp, "logs"),
            Notices = TextWriter.Null,
            KvCacheTokens = 4096,
        });

    private static async Task<List<int>> TokensOf(GenerationStream stream, List<TokenLogprob[]>? top = null, List<float>? logprobs = null)
    {
        var tokens = new List<int>();
        await foreach (var update in stream)
        {
            tokens.AddRange(update.NewTokenIds);
            top?.AddRange(update.NewTopLogprobs);
            logprobs?.AddRange(update.NewLogprobs);
            Assert.NotEqual(FinishKind.Abort, update.Finish?.Kind);
        }
        return tokens;
    }

    private static GenerationRequest Sampled(int[] prompt, ulong seed, int maxNewTokens = 10) => new()
    {
        PromptIds = prompt,
        Sampling = new SamplingParams { Temperature = 1.0f, MaxNewTokens = maxNewTokens, IgnoreEos = true, Seed = seed },
    };

    [Fact]
    public async Task AbortByTheRequestsRid_EndsEverySample_AndReturnsTheSharedBlocks()
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        var prompt = reference.Prompts[1].InputIds;
        await using var engine = CreateEngine();
        var streams = engine.SubmitParallel(Sampled(prompt, seed: 5, maxNewTokens: 1500) with { Rid = "parallel" }, 3);
        var finishes = streams.Select(async stream =>
        {
            FinishReason? finish = null;
            await foreach (var update in stream) finish = update.Finish ?? finish;
            return finish;
        }).ToList();
        // Every sample has produced a token (so the shared blocks are held by all three) before the abort.
        for (var i = 0; i < 500 && engine.GetStatus().Running < 3; i++) await Task.Delay(10);
        await Task.Delay(50);

        Assert.True(engine.Abort("parallel"));
        foreach (var finish in await Task.WhenAll(finishes)) Assert.Equal(FinishKind.Abort, finish?.Kind);
        var idle = await WaitForIdleAsync(engine);
        Assert.Equal(idle.TotalKvBlocks, idle.FreeKvBlocks);
        Assert.False(engine.Abort("parallel"));
    }

    [Fact]
    public async Task FourSamples_PrefillTheSharedPromptBlocksOnce_AndEachEqualsItsSeedAlone()
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        var prompt = reference.Prompts[1].InputIds; // 40 tokens: two full blocks shared, 8 tokens each sample computes
        Assert.Equal(40, prompt.Length);
        const int n = 4;
        var shared = (prompt.Length - 1) / BlockSize * BlockSize;
        await using var engine = CreateEngine();

        var before = await WaitForIdleAsync(engine);
        var samples = await Task.WhenAll(engine.SubmitParallel(Sampled(prompt, seed: 1000), n).Select(s => TokensOf(s)));
        var after = await WaitForIdleAsync(engine);

        // Prefilled once: the shared blocks by the first sample only, the last partial block by each.
        Assert.Equal(shared + n * (prompt.Length - shared), after.PromptTokensComputed - before.PromptTokensComputed);
        Assert.Equal((n - 1) * shared, after.PromptTokensShared - before.PromptTokensShared);
        // Every block went back to the pool: shared blocks are freed by their last holder.
        Assert.Equal(after.TotalKvBlocks, after.FreeKvBlocks);

        // Sample j is the request with seed + j run alone (which computes its whole prompt).
        for (var j = 0; j < n; j++)
        {
            var alone = await TokensOf(engine.Submit(Sampled(prompt, seed: 1000 + (ulong)j)));
            Assert.Equal(alone, samples[j]);
        }
        var single = await WaitForIdleAsync(engine);
        Assert.Equal(n * prompt.Length, single.PromptTokensComputed - after.PromptTokensComputed);
        // Different seeds draw different continuations at temperature 1.
        Assert.True(samples.Select(s => string.Join(',', s)).Distinct().Count() > 1, "the samples differ");
    }

    [Fact]
    public async Task GreedySamples_EqualTransformersGreedyOutput()
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        await using var engine = CreateEngine();
        foreach (var p in reference.Prompts)
        {
            var request = new GenerationRequest
            {
                PromptIds = p.InputIds,
                Sampling = new SamplingParams { Temperature = 0, MaxNewTokens = p.GreedyIds.Length, IgnoreEos = true },
            };
            var samples = await Task.WhenAll(engine.SubmitParallel(request, 3).Select(s => TokensOf(s)));
            Assert.All(samples, tokens => Assert.Equal(p.GreedyIds, tokens));
        }
        Assert.Equal(engine.GetStatus().TotalKvBlocks, (await WaitForIdleAsync(engine)).FreeKvBlocks);
    }

    [Fact]
    public async Task PromptModeRag_RebuildsEachSampleInItsOwnBlocks_WithoutTouchingTheShared()
    {
        // Every token's entropy exceeds 0: each sample triggers once, and prompt mode rewrites its cache from position 0.
        using var reference = new ReferenceCase("tiny-mixtral");
        var corpus = Path.Combine(_temp, "corpus.jsonl");
        File.WriteAllLines(corpus,
        [
            """{"id": "q1", "title": "Quantum", "text": "A quantum is the smallest discrete amount of a physical quantity."}""",
            """{"id": "f1", "title": "Fox", "text": "The red fox is a quick and clever animal that hunts at dusk."}""",
        ]);
        await using var engine = CreateEngine(corpus, InjectionMode.Prompt, threshold: 0.0);
        var request = new GenerationRequest
        {
            PromptIds = reference.Prompts[1].InputIds,
            Sampling = new SamplingParams { Temperature = 0, MaxNewTokens = 8, IgnoreEos = true },
        };
        var alone = await TokensOf(engine.Submit(request));
        var samples = await Task.WhenAll(engine.SubmitParallel(request, 4).Select(s => TokensOf(s)));
        Assert.All(samples, tokens => Assert.Equal(alone, tokens));
        var idle = await WaitForIdleAsync(engine);
        Assert.Equal(idle.TotalKvBlocks, idle.FreeKvBlocks);
    }

    /// <summary>
    /// rag.retrieve_first with parallel samples, in both modes: each sample retrieves before its prompt and equals the
    /// request with its seed alone; latent samples still share the first sample's prompt blocks (the injection starts at
    /// the prompt's last position, which every sample computes itself), prompt-mode samples compute their own context.
    /// </summary>
    [Theory]
    [InlineData(InjectionMode.Latent)]
    [InlineData(InjectionMode.Prompt)]
    public async Task RetrieveFirstSamples_EachEqualsItsSeedAlone(InjectionMode mode)
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        var corpus = Path.Combine(_temp, "corpus.jsonl");
        File.WriteAllLines(corpus,
        [
            """{"id": "q1", "title": "Quantum", "text": "A quantum is the smallest discrete amount of a physical quantity."}""",
            """{"id": "f1", "title": "Fox", "text": "The red fox is a quick and clever animal that hunts at dusk."}""",
        ]);
        await using var engine = CreateEngine(corpus, mode, threshold: 100);
        var prompt = engine.Tokenizer.Encode("Tell me about the quantum, the smallest discrete amount of a physical quantity, and the red fox.");
        Assert.True(prompt.Length > 2 * BlockSize);
        var request = Sampled(prompt, seed: 77) with { Rag = new RagOverrides { RetrieveFirst = true } };
        const int n = 3;
        var before = await WaitForIdleAsync(engine);
        var streams = engine.SubmitParallel(request, n);
        var samples = await Task.WhenAll(streams.Select(s => TokensOf(s)));
        var after = await WaitForIdleAsync(engine);
        var events = engine.RagEvents.Latest(10);
        Assert.Equal(n, events.Count);
        Assert.All(events, e => Assert.Equal((RagEvent.RetrieveFirstSignal, (string?)null), (e.Signal, e.Error)));
        Assert.Equal(after.TotalKvBlocks, after.FreeKvBlocks);
        Assert.Equal(mode == InjectionMode.Latent ? (n - 1) * ((prompt.Length - 1) / BlockSize * BlockSize) : 0,
            after.PromptTokensShared - before.PromptTokensShared);
        for (var j = 0; j < n; j++)
            Assert.Equal(await TokensOf(engine.Submit(request with { Sampling = request.Sampling with { Seed = 77 + (ulong)j } })), samples[j]);
    }

    [Fact]
    public async Task TopLogprobs_AreTransformersMostLikelyTokens_AndTheChosenOneLeadsUnderGreedy()
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        const int k = 5;
        await using var engine = CreateEngine();
        for (var p = 0; p < reference.Prompts.Count; p++)
        {
            var prompt = reference.Prompts[p];
            var top = new List<TokenLogprob[]>();
            var logprobs = new List<float>();
            var tokens = await TokensOf(engine.Submit(new GenerationRequest
            {
                PromptIds = prompt.InputIds,
                Sampling = new SamplingParams { Temperature = 0, MaxNewTokens = prompt.GreedyIds.Length, IgnoreEos = true },
                ReturnLogprob = true,
                TopLogprobs = k,
            }), top, logprobs);
            Assert.Equal(prompt.GreedyIds, tokens);
            Assert.Equal(tokens.Count, top.Count);

            var vocab = engine.Config.VocabSize;
            var logits = reference.Tensor($"logits.{p}").ToFloatArray();
            for (var j = 0; j < tokens.Count; j++)
            {
                // Output token j was sampled from the logits at position prompt length − 1 + j of the full sequence.
                var row = prompt.InputIds.Length - 1 + j;
                var theirs = Sampler.LogSoftmax(logits.AsSpan(row * vocab, vocab));
                var order = Enumerable.Range(0, vocab).OrderByDescending(v => theirs[v]).ThenBy(v => v).Take(k).ToArray();
                Assert.Equal(k, top[j].Length);
                for (var i = 0; i < k; i++)
                {
                    Assert.Equal(theirs[top[j][i].TokenId], top[j][i].Logprob, 1e-4);
                    Assert.Equal(theirs[order[i]], top[j][i].Logprob, 1e-4);
                    if (i > 0) Assert.True(top[j][i].Logprob <= top[j][i - 1].Logprob);
                }
                Assert.Equal(tokens[j], top[j][0].TokenId);
                Assert.Equal(logprobs[j], top[j][0].Logprob);
            }
        }
    }

    [Fact]
    public void HostTopLogprobs_MatchASortOfTheWholeRow_WithTiesByLowerId()
    {
        var random = new Random(5);
        for (var trial = 0; trial < 50; trial++)
        {
            var vocab = random.Next(3, 200);
            // Few distinct values, so that ties are common.
            var logits = Enumerable.Range(0, vocab).Select(_ => (float)random.Next(-20, 20) / 4).ToArray();
            if (trial % 5 == 0) logits[random.Next(vocab)] = float.NegativeInfinity;
            var k = random.Next(1, StepState.MaxTopLogprobs + 1);
            var ids = new int[k];
            var values = new float[k];
            Sampler.TopLogprobs(logits, ids, values);

            var logZ = Math.Log(logits.Sum(x => Math.Exp(x)));
            var expected = Enumerable.Range(0, vocab).OrderByDescending(v => logits[v]).ThenBy(v => v).Take(k).ToArray();
            Assert.Equal(expected, ids.Take(expected.Length));
            Assert.All(ids.Skip(expected.Length), id => Assert.Equal(-1, id));
            for (var i = 0; i < expected.Length; i++) Assert.Equal(logits[expected[i]] - logZ, values[i], 1e-5);
        }
    }
}
