using System.Net;
using System.Net.Sockets;
using System.Text;
using MoeRagInject.Backend.Cpu;
using MoeRagInject.Rag;
using static MoeRagInject.Engine.Tests.EngineStatusWaits;

namespace MoeRagInject.Engine.Tests;

/// <summary>The engine end to end on the embedded default checkpoint: batching, RAG triggers and injection, faults.</summary>
public sealed class EngineTests : IDisposable
{
    private readonly string _temp = Directory.CreateTempSubdirectory("moe-rag-engine-").FullName;

    public void Dispose() => Directory.Delete(_temp, recursive: true);

    private string WriteCorpus()
    {
        var path = Path.Combine(_temp, "corpus.jsonl");
        File.WriteAllLines(path,
        [
            """{"id": "q1", "title": "Quantum", "text": "A quantum is the smallest discrete amount of a physical quantity, such as energy carried by light."}""",
            """{"id": "f1", "title": "Fox", "text": "The red fox is a quick and clever animal that jumps over obstacles and hunts at dusk."}""",
            """{"id": "d1", "title": "Dog", "text": "A lazy dog sleeps most of the day; dogs were domesticated from wolves."}""",
            """{"id": "c1", "title": "Cafe", "text": "A cafe serves coffee; the word comes from French. Naive customers order tea."}""",
        ]);
        return path;
    }

    private LlmEngine CreateEngine(string? retriever, double threshold = 0.5, TimeSpan? timeout = null, TextWriter? notices = null) =>
        InferenceEngine.Create(new EngineOptions
        {
            ModelPath = TestPaths.DefaultModel,
            Runner = new CpuRunnerFactory(2),
            Retriever = retriever,
            RetrievalTimeout = timeout ?? TimeSpan.FromSeconds(2),
            Trigger = new TriggerOptions { Threshold = threshold, CooldownTokens = 3, MaxRetrievalsPerRequest = 3 },
            LogDir = Path.Combine(_temp, "logs"),
            Notices = notices ?? TextWriter.Null,
            KvCacheTokens = 4096,
        });

    private static async Task<(List<int> Tokens, List<RagEvent> Events, FinishReason Finish, List<float[]> Entropy)> Collect(
        IGenerationEngine engine, GenerationRequest request, CancellationToken cancellationToken = default)
    {
        var tokens = new List<int>();
        var events = new List<RagEvent>();
        var entropy = new List<float[]>();
        FinishReason? finish = null;
        await foreach (var update in engine.GenerateAsync(request, cancellationToken))
        {
            tokens.AddRange(update.NewTokenIds);
            events.AddRange(update.NewEvents);
            entropy.AddRange(update.NewRouterEntropy);
            finish = update.Finish ?? finish;
        }
        return (tokens, events, finish!, entropy);
    }

    private static GenerationRequest Greedy(int[] prompt, InjectionMode mode, int maxNewTokens = 12) => new()
    {
        PromptIds = prompt,
        Sampling = new SamplingParams { Temperature = 0, MaxNewTokens = maxNewTokens, IgnoreEos = true },
        Rag = new RagOverrides { Mode = mode },
        ReturnRouterEntropy = true,
    };

    [Fact]
    public async Task SixteenConcurrentRequestsGiveTheTokensEachGivesAlone()
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        await using var engine = CreateEngine(WriteCorpus());
        var requests = Enumerable.Range(0, 16)
            .Select(i => Greedy(reference.Prompts[i % 4].InputIds, i % 2 == 0 ? InjectionMode.Off : InjectionMode.Latent))
            .ToList();

        var alone = new List<(List<int> Tokens, List<RagEvent> Events, FinishReason Finish, List<float[]> Entropy)>();
        foreach (var request in requests) alone.Add(await Collect(engine, request));
        var together = await Task.WhenAll(requests.Select(r => Collect(engine, r)));

        for (var i = 0; i < 16; i++)
        {
            Assert.Equal(alone[i].Tokens, together[i].Tokens);
            Assert.Equal(alone[i].Events.Count, together[i].Events.Count);
            if (i % 2 == 0)
            {
                Assert.Equal(reference.Prompts[i % 4].GreedyIds, together[i].Tokens);
                Assert.Empty(together[i].Events);
            }
        }
        // The latent requests really retrieved and injected, and the injection changed what they say.
        var injected = Enumerable.Range(0, 16).Where(i => i % 2 == 1 && together[i].Events.Any(e => e.InjectionNorm > 0)).ToList();
        Assert.NotEmpty(injected);
        Assert.Contains(injected, i => !together[i].Tokens.SequenceEqual(reference.Prompts[i % 4].GreedyIds));
        Assert.True(together.Max(t => t.Events.Max(e => (int?)e.BatchSize) ?? 0) > 1, "some trigger fired inside a batch of several requests");
    }

    [Fact]
    public async Task TriggerFiresAboveTheThresholdAndEventsAreLogged()
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        var notices = new StringWriter();
        await using var engine = CreateEngine(WriteCorpus(), threshold: 0.5, notices: notices);
        var result = await Collect(engine, Greedy(reference.Prompts[3].InputIds, InjectionMode.Latent, 16));
        Assert.NotEmpty(result.Events);
        Assert.Equal(16, result.Entropy.Count);
        foreach (var e in result.Events)
        {
            Assert.Null(e.Error);
            Assert.NotEmpty(e.Snippets);
            Assert.True(e.Entropy > 0.5);
            Assert.All(e.Layers, l => Assert.True(l >= 0 && l < 4));
            Assert.Equal(e.Layers, e.InjectionLayers);
            Assert.True(e.InjectionNorm > 0);
            // The entropy reported for the triggering token is that of its recomputed forward pass; up to the first
            // injected layer the stream is unchanged, so there it still exceeds the threshold.
            Assert.True(result.Entropy[e.TokenIndex][e.Layers.Min()] > 0.5);
        }
        Assert.Contains("[MoE-RAG] entropy=", notices.ToString());
        Assert.Contains("-> triggering RAG", notices.ToString());
        var logged = RagEventLog.ReadAll(Path.Combine(_temp, "logs", "rag-events.jsonl"));
        Assert.Equal(result.Events.Count, logged.Count);
    }

    [Fact]
    public async Task OffModeMeasuresEntropyAndRetrievesNothing()
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        await using var engine = CreateEngine(WriteCorpus(), threshold: 0.0);
        var result = await Collect(engine, Greedy(reference.Prompts[0].InputIds, InjectionMode.Off));
        Assert.Empty(result.Events);
        Assert.Equal(reference.Prompts[0].GreedyIds, result.Tokens);
        Assert.All(result.Entropy, row => Assert.All(row, h => Assert.InRange(h, 0f, (float)Math.Log(8) + 1e-5f)));
    }

    [Fact]
    public async Task PromptModeRebuildsTheContextWithThePassages()
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        await using var engine = CreateEngine(WriteCorpus(), threshold: 0.5);
        var result = await Collect(engine, Greedy(reference.Prompts[3].InputIds, InjectionMode.Prompt, 16));
        Assert.NotEmpty(result.Events);
        Assert.All(result.Events, e => Assert.Equal("prompt", e.Mode));
        Assert.Contains(result.Events, e => e.Error is null && e.Snippets.Count > 0);
        Assert.Equal(16, result.Tokens.Count);
    }

    /// <summary>A retriever that is down, slow past its timeout, or answers garbage never fails a request.</summary>
    [Theory]
    [InlineData("down")]
    [InlineData("slow")]
    [InlineData("garbage")]
    public async Task RetrieverFaultsAreRecordedAndRequestsComplete(string fault)
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        using var server = fault == "down" ? null : new FaultyServer(fault);
        var url = server?.Url ?? $"http://127.0.0.1:{FreePort()}/search";
        await using var engine = CreateEngine(url, threshold: 0.3, timeout: TimeSpan.FromMilliseconds(300));
        var results = await Task.WhenAll(Enumerable.Range(0, 4).Select(i =>
            Collect(engine, Greedy(reference.Prompts[i].InputIds, InjectionMode.Latent))));
        foreach (var (tokens, events, finish, _) in results.Select((r, i) => (r.Tokens, r.Events, r.Finish, i)))
        {
            Assert.Equal(FinishKind.Length, finish.Kind);
            Assert.Equal(12, tokens.Count);
            Assert.All(events, e => Assert.False(string.IsNullOrEmpty(e.Error)));
            Assert.All(events, e => Assert.Equal(0, e.InjectionNorm));
        }
        Assert.Contains(results, r => r.Events.Count > 0);
        // With no injection the tokens are those of plain greedy decoding.
        for (var i = 0; i < 4; i++) Assert.Equal(reference.Prompts[i].GreedyIds, results[i].Tokens);
    }

    /// <summary>
    /// --trigger-signal output-entropy: the request's own next-token entropies, measured with RAG off, place the threshold
    /// just under their maximum; the trigger then fires exactly at that token, reports that entropy and every layer, and
    /// the tokens before it are the RAG-off ones. Just above the maximum it never fires.
    /// </summary>
    [Fact]
    public async Task OutputEntropySignal_FiresAtTheTokenWhoseNextTokenEntropyCrossesTheThreshold()
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        var prompt = reference.Prompts[1].InputIds;
        var corpus = WriteCorpus();
        LlmEngine Engine(double threshold) => InferenceEngine.Create(new EngineOptions
        {
            ModelPath = TestPaths.DefaultModel,
            Runner = new CpuRunnerFactory(2),
            Retriever = corpus,
            Trigger = new TriggerOptions { Signal = TriggerSignal.OutputEntropy, Threshold = threshold, CooldownTokens = 100, MaxRetrievalsPerRequest = 1 },
            LogDir = Path.Combine(_temp, "logs"),
            Notices = TextWriter.Null,
            KvCacheTokens = 4096,
        });
        var measured = new List<float>();
        var offTokens = new List<int>();
        await using (var off = Engine(0))
            await foreach (var update in off.GenerateAsync(Greedy(prompt, InjectionMode.Off, 10) with { ReturnRouterEntropy = true }))
            {
                measured.AddRange(update.NewOutputEntropy);
                offTokens.AddRange(update.NewTokenIds);
            }
        Assert.Equal(10, measured.Count);
        var peak = measured.IndexOf(measured.Max());
        var second = measured.Where((_, j) => j != peak).Max();
        Assert.True(measured[peak] - second > 2e-3, "the maximum is not distinct enough to place a threshold under it alone");

        await using (var below = Engine(measured[peak] - 1e-3))
        {
            var fired = await Collect(below, Greedy(prompt, InjectionMode.Latent, 10));
            var e = Assert.Single(fired.Events);
            Assert.Equal("output-entropy", e.Signal);
            Assert.Equal(peak, e.TokenIndex);
            Assert.Equal(measured[peak], e.Entropy, 1e-4);
            Assert.Equal(Enumerable.Range(0, below.Info.NumMoeLayers), e.Layers);
            Assert.Equal(offTokens.Take(peak), fired.Tokens.Take(peak));
        }
        await using (var above = Engine(measured[peak] + 1e-3))
            Assert.Empty((await Collect(above, Greedy(prompt, InjectionMode.Latent, 10))).Events);
    }

    /// <summary>
    /// Prompt-mode RAG that fires a few tokens into the answer (--prompt-rag-restart answer, the default): the answer is
    /// generated again after the rebuilt context, and the client gets exactly the tokens a RAG-off request with that
    /// context as its prompt gets (none of the dropped ones, which were held back); with continue the tokens before the
    /// trigger stay. The trigger is placed by the request's own output entropies, measured with RAG off.
    /// </summary>
    [Theory]
    [InlineData(PromptRagRestart.Answer)]
    [InlineData(PromptRagRestart.Continue)]
    public async Task PromptRagFiringInTheAnswer_RestartsItOrContinues(PromptRagRestart restart)
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        var corpus = WriteCorpus();
        const int Window = EngineOptions.PromptRestartWindowTokens, MaxNew = 12;
        LlmEngine Engine(double threshold) => InferenceEngine.Create(new EngineOptions
        {
            ModelPath = TestPaths.DefaultModel,
            Runner = new CpuRunnerFactory(2),
            Retriever = corpus,
            Mode = InjectionMode.Prompt,
            PromptRagRestart = restart,
            Trigger = new TriggerOptions { Signal = TriggerSignal.OutputEntropy, Threshold = threshold, CooldownTokens = 100, MaxRetrievalsPerRequest = 1 },
            LogDir = Path.Combine(_temp, "logs"),
            Notices = TextWriter.Null,
            KvCacheTokens = 4096,
        });

        // A prompt whose largest output entropy over the first Window tokens is distinct and not at the first token.
        int[]? prompt = null;
        List<int> offTokens = [];
        var peak = -1;
        double threshold = 0;
        await using (var off = Engine(0))
            foreach (var candidate in reference.Prompts.Select(p => p.InputIds))
            {
                var measured = new List<float>();
                var tokens = new List<int>();
                await foreach (var update in off.GenerateAsync(Greedy(candidate, InjectionMode.Off, MaxNew)))
                {
                    measured.AddRange(update.NewOutputEntropy);
                    tokens.AddRange(update.NewTokenIds);
                }
                var head = measured.Take(Window).ToList();
                var at = head.IndexOf(head.Max());
                if (at < 1 || head.Where((_, j) => j != at).Max() > head[at] - 2e-3) continue;
                (prompt, offTokens, peak, threshold) = (candidate, tokens, at, head[at] - 1e-3);
                break;
            }
        Assert.NotNull(prompt);

        await using var engine = Engine(threshold);
        var fired = await Collect(engine, Greedy(prompt, InjectionMode.Prompt, MaxNew));
        var e = Assert.Single(fired.Events);
        Assert.Equal(peak, e.TokenIndex);
        Assert.Equal(restart == PromptRagRestart.Answer ? "answer" : "continue", e.Restart);
        Assert.Equal(MaxNew, fired.Tokens.Count);
        if (restart == PromptRagRestart.Continue)
        {
            Assert.Equal(offTokens.Take(peak), fired.Tokens.Take(peak));
            return;
        }
        // The context the restart built: BOS, the passages, then the prompt; a RAG-off request with it as its prompt.
        var tokenizer = engine.Tokenizer;
        var context = new List<int> { tokenizer.BosTokenId!.Value };
        context.AddRange(tokenizer.Encode("Context:\n" + string.Join("\n", e.Snippets) + "\n\n", addSpecialTokens: false));
        context.AddRange(prompt.Skip(prompt[0] == tokenizer.BosTokenId ? 1 : 0));
        var expected = await Collect(engine, Greedy([.. context], InjectionMode.Off, MaxNew));
        Assert.Equal(expected.Tokens, fired.Tokens);
        Assert.NotEqual(offTokens.Take(peak), fired.Tokens.Take(peak));
    }

    /// <summary>
    /// --retrieve-first in prompt mode: the passages the question retrieves go ahead of it before anything is computed, so the
    /// engine computes that context once (the first-step trigger computes the bare prompt first, then the context), and
    /// the answer is that of a RAG-off request whose prompt is the context, as the first-step trigger's restarted answer is.
    /// </summary>
    [Fact]
    public async Task RetrieveFirst_PromptMode_ComputesThePassagesAndThePromptOnce()
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        var corpus = WriteCorpus();
        var prompt = reference.Prompts[3].InputIds;
        LlmEngine Engine(bool first) => InferenceEngine.Create(new EngineOptions
        {
            ModelPath = TestPaths.DefaultModel,
            Runner = new CpuRunnerFactory(2),
            Retriever = corpus,
            Mode = InjectionMode.Prompt,
            RetrieveFirst = first,
            Trigger = new TriggerOptions { Threshold = 0, MaxRetrievalsPerRequest = 1 },
            LogDir = Path.Combine(_temp, "logs"),
            Notices = TextWriter.Null,
            KvCacheTokens = 4096,
        });

        (List<int> Tokens, List<RagEvent> Events, long Computed) atStep, first;
        await using (var engine = Engine(first: false))
        {
            var result = await Collect(engine, Greedy(prompt, InjectionMode.Prompt, 10));
            atStep = (result.Tokens, result.Events, (await WaitForIdleAsync(engine)).PromptTokensComputed);
        }
        await using var firstEngine = Engine(first: true);
        var collected = await Collect(firstEngine, Greedy(prompt, InjectionMode.Prompt, 10));
        first = (collected.Tokens, collected.Events, (await WaitForIdleAsync(firstEngine)).PromptTokensComputed);

        var stepEvent = Assert.Single(atStep.Events);
        Assert.Equal((0, "answer"), (stepEvent.TokenIndex, stepEvent.Restart));
        var e = Assert.Single(first.Events);
        Assert.Null(e.Error);
        Assert.Equal((0, prompt.Length - 1, RagEvent.RetrieveFirstSignal, 0, (string?)null), (e.TokenIndex, e.Position, e.Signal, e.BatchSize, e.Restart));
        Assert.True(double.IsNaN(e.Entropy) && double.IsNaN(e.Threshold));
        Assert.Equal(stepEvent.Query, e.Query);
        Assert.Equal(stepEvent.SnippetIds, e.SnippetIds);

        var tokenizer = firstEngine.Tokenizer;
        var context = new List<int> { tokenizer.BosTokenId!.Value };
        context.AddRange(tokenizer.Encode("Context:\n" + string.Join("\n", e.Snippets) + "\n\n", addSpecialTokens: false));
        context.AddRange(prompt.Skip(prompt[0] == tokenizer.BosTokenId ? 1 : 0));
        Assert.Equal(context.Count, first.Computed);
        Assert.Equal(prompt.Length + context.Count, atStep.Computed);
        var expected = await Collect(firstEngine, Greedy([.. context], InjectionMode.Off, 10));
        Assert.Equal(expected.Tokens, first.Tokens);
        Assert.Equal(atStep.Tokens, first.Tokens);
    }

    /// <summary>
    /// --retrieve-first with the demo model's trained projector (one vector an answer position): the vectors are in place
    /// when the question is first computed, so the answer, its logprobs and its events' passages are those of the first-step
    /// trigger's restarted answer, without computing the question's last position twice; and the injection changes answers.
    /// </summary>
    [Fact]
    public async Task RetrieveFirst_LatentMode_InjectsFromThePromptsLastPositionWithoutARestart()
    {
        var projector = Path.Combine(TestPaths.DemoModel, "projector.safetensors");
        var info = ContextInjector.ReadFileInfo(projector);
        string[] questions = ["What is witticism?", "What is opsonization?", "What is aril?", "What is thioridazine?"];
        LlmEngine Engine(InjectionMode mode, bool first) => InferenceEngine.Create(new EngineOptions
        {
            ModelPath = TestPaths.DemoModel,
            Runner = new CpuRunnerFactory(2),
            Retriever = Path.Combine(TestPaths.RepoRoot, "assets", "corpus", "wordnet", "wordnet-demo.jsonl.gz"),
            Mode = mode,
            RetrieveFirst = first,
            Trigger = new TriggerOptions { Threshold = 0, MaxRetrievalsPerRequest = 1 },
            Projection = ProjectionKind.File,
            ProjectionPath = projector,
            InjectionLayers = info.Layers,
            InjectionScale = info.Alpha ?? 1,
            LogDir = Path.Combine(_temp, "logs"),
            Notices = TextWriter.Null,
            KvCacheTokens = 2048,
        });
        async Task<(List<(List<int> Tokens, List<float> Logprobs, List<RagEvent> Events)> Answers, long Computed)> Answer(InjectionMode mode, bool first)
        {
            await using var engine = Engine(mode, first);
            var answers = new List<(List<int>, List<float>, List<RagEvent>)>();
            foreach (var question in questions)
            {
                var request = new GenerationRequest
                {
                    PromptIds = engine.Tokenizer.Encode(question),
                    Sampling = new SamplingParams { Temperature = 0, MaxNewTokens = 12, IgnoreEos = true },
                    ReturnLogprob = true,
                };
                var (tokens, logprobs, events) = (new List<int>(), new List<float>(), new List<RagEvent>());
                await foreach (var update in engine.GenerateAsync(request))
                {
                    tokens.AddRange(update.NewTokenIds);
                    logprobs.AddRange(update.NewLogprobs);
                    events.AddRange(update.NewEvents);
                }
                answers.Add((tokens, logprobs, events));
            }
            return (answers, (await WaitForIdleAsync(engine)).PromptTokensComputed);
        }

        var off = await Answer(InjectionMode.Off, first: false);
        var atStep = await Answer(InjectionMode.Latent, first: false);
        var first = await Answer(InjectionMode.Latent, first: true);
        Assert.Equal(off.Computed, first.Computed);
        Assert.Equal(off.Computed + questions.Length, atStep.Computed);
        for (var q = 0; q < questions.Length; q++)
        {
            var (a, b) = (atStep.Answers[q], first.Answers[q]);
            var stepEvent = Assert.Single(a.Events);
            Assert.Equal((0, "answer"), (stepEvent.TokenIndex, stepEvent.Restart));
            var e = Assert.Single(b.Events);
            Assert.Equal((0, RagEvent.RetrieveFirstSignal, (string?)null, (string?)null), (e.TokenIndex, e.Signal, e.Restart, e.Error));
            Assert.Equal(stepEvent.SnippetIds, e.SnippetIds);
            Assert.Equal(stepEvent.InjectionNorm, e.InjectionNorm, 6);
            Assert.True(e.InjectionNorm > 0);
            Assert.Equal(a.Tokens, b.Tokens);
            for (var j = 0; j < a.Logprobs.Count; j++) Assert.Equal(a.Logprobs[j], b.Logprobs[j], 1e-5);
        }
        Assert.Contains(Enumerable.Range(0, questions.Length), q => !off.Answers[q].Tokens.SequenceEqual(first.Answers[q].Tokens));
    }

    /// <summary>A request aborted while it retrieves before admission ends, cancels its retrieval, and leaves nothing held.</summary>
    [Fact]
    public async Task RetrieveFirst_AbortedWhileRetrieving_EndsAndHoldsNothing()
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        using var server = new HangingServer();
        await using var engine = InferenceEngine.Create(new EngineOptions
        {
            ModelPath = TestPaths.DefaultModel,
            Runner = new CpuRunnerFactory(2),
            Retriever = server.Url,
            RetrievalTimeout = TimeSpan.FromSeconds(30),
            RetrieveFirst = true,
            LogDir = Path.Combine(_temp, "logs"),
            Notices = TextWriter.Null,
            KvCacheTokens = 4096,
        });
        var collecting = Collect(engine, Greedy(reference.Prompts[0].InputIds, InjectionMode.Latent) with { Rid = "first" });
        await server.Connected.WaitAsync(TimeSpan.FromSeconds(20));
        // The retrieval starts on the submitting thread, and the status is the loop's snapshot: it shows the request
        // retrieving once the loop has taken it in, which may be just after the server saw the connection.
        var status = await WaitForStatusAsync(engine, s => s.Retrieving > 0);
        Assert.Equal((0, 0, 1), (status.Running, status.Waiting, status.Retrieving));
        Assert.Equal(status.TotalKvBlocks, status.FreeKvBlocks);
        Assert.True(engine.Abort("first"));
        var result = await collecting.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.Equal(FinishKind.Abort, result.Finish.Kind);
        Assert.Empty(result.Tokens);
        await server.Disconnected.WaitAsync(TimeSpan.FromSeconds(5));
        status = await WaitForIdleAsync(engine);
        Assert.Equal((0, 0, 0), (status.Running, status.Waiting, status.Retrieving));
    }

    /// <summary>Within a request an identical query is answered from the request's cache, not sent again.</summary>
    [Fact]
    public async Task IdenticalQueriesWithinARequestAreRetrievedOnce()
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        // Greedy output of prompt 2 is 976, 86, 86, 86, ...: with a one-token query window and a trigger at every token,
        // the queries at output tokens 2, 3 and 4 are the same text. The retriever is down, so no injection changes the tokens.
        await using var engine = InferenceEngine.Create(new EngineOptions
        {
            ModelPath = TestPaths.DefaultModel,
            Runner = new CpuRunnerFactory(2),
            Retriever = $"http://127.0.0.1:{FreePort()}/search",
            RetrievalTimeout = TimeSpan.FromMilliseconds(300),
            Trigger = new TriggerOptions { Threshold = 0, CooldownTokens = 1, MaxRetrievalsPerRequest = 12 },
            QueryWindowTokens = 1,
            LogDir = Path.Combine(_temp, "logs"),
            Notices = TextWriter.Null,
        });
        var result = await Collect(engine, Greedy(reference.Prompts[2].InputIds, InjectionMode.Latent, 6));
        Assert.Equal(reference.Prompts[2].GreedyIds.Take(6), result.Tokens);
        Assert.Equal(6, result.Events.Count);
        var seen = new HashSet<string>();
        foreach (var e in result.Events)
            Assert.Equal(!seen.Add(e.Query), e.Cached);
        Assert.Equal(2, result.Events.Count(e => e.Cached));
    }

    [Fact]
    public async Task CancellingARequestAbortsItAndFreesItsSlot()
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        await using var engine = CreateEngine(null);
        using var cts = new CancellationTokenSource();
        var request = Greedy(reference.Prompts[1].InputIds, InjectionMode.Off, 1000);
        var count = 0;
        FinishReason? finish = null;
        await foreach (var update in engine.GenerateAsync(request, cts.Token))
        {
            count += update.NewTokenIds.Count;
            if (count >= 3) await cts.CancelAsync();
            finish = update.Finish ?? finish;
        }
        Assert.Equal(FinishKind.Abort, finish!.Kind);
        var after = await Collect(engine, Greedy(reference.Prompts[0].InputIds, InjectionMode.Off));
        Assert.Equal(reference.Prompts[0].GreedyIds, after.Tokens);
    }

    [Fact]
    public async Task InvalidRequestsAreRejectedBeforeQueueing()
    {
        await using var engine = CreateEngine(null);
        await Assert.ThrowsAsync<ArgumentException>(() => Collect(engine, Greedy([1, 5000], InjectionMode.Off)));
        await Assert.ThrowsAsync<ArgumentException>(() => Collect(engine, Greedy([1, 2], InjectionMode.Off, 100_000)));
        await Assert.ThrowsAsync<ArgumentException>(() => Collect(engine, new GenerationRequest
        {
            PromptIds = [1, 2],
            Sampling = new SamplingParams { TopP = 0 },
        }));
    }

    [Fact]
    public void LayersOutsideTheModelAreRejectedAtStart()
    {
        var error = Assert.Throws<ArgumentException>(() => InferenceEngine.Create(new EngineOptions
        {
            ModelPath = TestPaths.DefaultModel,
            Runner = new CpuRunnerFactory(1),
            InjectionLayers = [4],
            LogDir = Path.Combine(_temp, "logs"),
        }));
        Assert.Contains("injection layer 4", error.Message);
    }

    [Fact]
    public async Task SeededSamplingIsReproducibleAndStopsAtStopTokens()
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        await using var engine = CreateEngine(null);
        GenerationRequest Sampled(ulong seed) => new()
        {
            PromptIds = reference.Prompts[0].InputIds,
            Sampling = new SamplingParams { Temperature = 0.8f, TopP = 0.9f, TopK = 50, MaxNewTokens = 20, Seed = seed, IgnoreEos = true },
        };
        var a = await Collect(engine, Sampled(42));
        var b = await Collect(engine, Sampled(42));
        Assert.Equal(a.Tokens, b.Tokens);
        var stopAt = a.Tokens[5];
        var stopped = await Collect(engine, Sampled(42) with { Sampling = Sampled(42).Sampling with { StopTokenIds = [stopAt] } });
        Assert.Equal(FinishKind.Stop, stopped.Finish.Kind);
        Assert.Equal(stopAt, stopped.Tokens[^1]);
        Assert.Equal(a.Tokens.IndexOf(stopAt) + 1, stopped.Tokens.Count);
    }

    /// <summary>Submit validates at once: a bad request throws before anything is queued, never while its stream is read.</summary>
    [Fact]
    public async Task SubmitRejectsInvalidRequestsSynchronously()
    {
        await using var engine = CreateEngine(null);
        GenerationRequest Valid() => Greedy([1, 5, 9], InjectionMode.Off);
        Assert.Throws<ArgumentException>(() => engine.Submit(Valid() with { PromptIds = [1, 5000] }));
        Assert.Throws<ArgumentException>(() => engine.Submit(Valid() with { Sampling = Valid().Sampling with { MaxNewTokens = 100_000 } }));
        Assert.Throws<ArgumentException>(() => engine.Submit(Valid() with { Rag = new RagOverrides { Scale = 1e30f } }));
        Assert.Throws<ArgumentException>(() => engine.Submit(Valid() with { Rag = new RagOverrides { Threshold = double.NaN } }));
        Assert.Throws<ArgumentException>(() => engine.Submit(Valid() with { Sampling = Valid().Sampling with { StopTokenIds = [-1] } }));
        await using var first = engine.Submit(Valid() with { Rid = "same" });
        Assert.Throws<ArgumentException>(() => engine.Submit(Valid() with { Rid = "same" }));
        // The first of the two with that rid was valid and runs to its end.
        FinishReason? finish = null;
        await foreach (var update in first) finish = update.Finish ?? finish;
        Assert.Equal(FinishKind.Length, finish?.Kind);
    }

    /// <summary>Leaving a stream early (disposing its enumerator) aborts the request and frees its blocks and slot.</summary>
    [Fact]
    public async Task DisposingAStreamAbortsItsRequest()
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        await using var engine = CreateEngine(null);
        await foreach (var update in engine.Submit(Greedy(reference.Prompts[1].InputIds, InjectionMode.Off, 1000)))
            if (update.NewTokenIds.Count > 0) break;
        var status = await WaitForIdleAsync(engine);
        Assert.Equal(0, status.Running);
        Assert.Equal(status.TotalKvBlocks, status.FreeKvBlocks);
        var after = await Collect(engine, Greedy(reference.Prompts[0].InputIds, InjectionMode.Off));
        Assert.Equal(reference.Prompts[0].GreedyIds, after.Tokens);
    }

    /// <summary>Aborting a request whose retrieval is in flight cancels the retrieval: the search server sees its client leave.</summary>
    [Fact]
    public async Task AbortingARequestCancelsItsRetrieval()
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        using var server = new HangingServer();
        await using var engine = CreateEngine(server.Url, threshold: 0, timeout: TimeSpan.FromSeconds(30));
        var request = Greedy(reference.Prompts[0].InputIds, InjectionMode.Latent) with { Rid = "to-abort" };
        var collecting = Collect(engine, request);
        await server.Connected.WaitAsync(TimeSpan.FromSeconds(20));
        Assert.True(engine.Abort("to-abort"));
        var result = await collecting.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.Equal(FinishKind.Abort, result.Finish.Kind);
        await server.Disconnected.WaitAsync(TimeSpan.FromSeconds(5));
    }

    /// <summary>A real TCP server on loopback that reads an HTTP request and never answers, noting when its client hangs up.</summary>
    private sealed class HangingServer : IDisposable
    {
        private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
        private readonly TaskCompletionSource _connected = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private readonly TaskCompletionSource _disconnected = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public HangingServer()
        {
            _listener.Start();
            Url = $"http://127.0.0.1:{((IPEndPoint)_listener.LocalEndpoint).Port}/search";
            _ = Task.Run(async () =>
            {
                try
                {
                    using var client = await _listener.AcceptTcpClientAsync();
                    var stream = client.GetStream();
                    var buffer = new byte[4096];
                    // "Connected" once the request has arrived: a connection the client opened but has not yet sent on
                    // goes back to its pool when the request is cancelled, and is not closed.
                    var received = new List<byte>();
                    int read;
                    while ((read = await stream.ReadAsync(buffer)) > 0)
                    {
                        received.AddRange(buffer.AsSpan(0, read));
                        if (Encoding.ASCII.GetString([.. received]).Contains("\r\n\r\n", StringComparison.Ordinal)) break;
                    }
                    _connected.TrySetResult();
                    // Read until the client closes the connection (Read returns 0) or resets it.
                    while (read > 0 && await stream.ReadAsync(buffer) > 0)
                    {
                    }
                }
                catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException)
                {
                }
                _disconnected.TrySetResult();
            });
        }

        public string Url { get; }
        public Task Connected => _connected.Task;
        public Task Disconnected => _disconnected.Task;

        public void Dispose() => _listener.Stop();
    }

    private static int FreePort()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }

    /// <summary>A real HTTP server on loopback that answers slowly or with garbage.</summary>
    private sealed class FaultyServer : IDisposable
    {
        private readonly HttpListener _listener = new();
        private readonly CancellationTokenSource _stop = new();

        public FaultyServer(string fault)
        {
            var port = FreePort();
            Url = $"http://127.0.0.1:{port}/search";
            _listener.Prefixes.Add($"http://127.0.0.1:{port}/");
            _listener.Start();
            _ = Task.Run(async () =>
            {
                while (!_stop.IsCancellationRequested)
                {
                    HttpListenerContext context;
                    try
                    {
                        context = await _listener.GetContextAsync();
                    }
                    catch (Exception)
                    {
                        return;
                    }
                    _ = Task.Run(async () =>
                    {
                        try
                        {
                            if (fault == "slow") await Task.Delay(3000, _stop.Token);
                            var body = "<html>not json</html>"u8.ToArray();
                            context.Response.ContentType = "text/html";
                            await context.Response.OutputStream.WriteAsync(body);
                            context.Response.Close();
                        }
                        catch (Exception)
                        {
                            context.Response.Abort();
                        }
                    });
                }
            });
        }

        public string Url { get; }

        public void Dispose()
        {
            _stop.Cancel();
            _listener.Close();
            _stop.Dispose();
        }
    }
}
