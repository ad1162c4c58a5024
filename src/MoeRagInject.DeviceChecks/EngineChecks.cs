using MoeRagInject.Backend;
using MoeRagInject.Engine;
using MoeRagInject.Rag;

namespace MoeRagInject.DeviceChecks;

/// <summary>The engine on a device: batch safety with graphs replayed and injections firing, in deterministic and default modes.</summary>
public static class EngineChecks
{
    public static async Task<List<CheckResult>> RunAsync(IRunnerFactory device, string modelPath, string corpus, string workDir)
    {
        var results = new List<CheckResult>();
        Directory.CreateDirectory(workDir);
        try
        {
            results.Add(await BatchSafetyAsync(device, modelPath, corpus, workDir, deterministic: true).ConfigureAwait(false));
            results.Add(await BatchSafetyAsync(device, modelPath, corpus, workDir, deterministic: false).ConfigureAwait(false));
        }
        catch (Exception e)
        {
            results.Add(new CheckResult("engine", "batch safety", false, double.NaN, 0, $"{e.GetType().Name}: {e.Message}"));
        }
        return results;
    }

    private static EngineOptions Options(IRunnerFactory device, string modelPath, string corpus, string workDir, bool deterministic) => new()
    {
        ModelPath = modelPath,
        Runner = device,
        Retriever = corpus,
        Deterministic = deterministic,
        MaxRunningRequests = 16,
        ContextLength = 256,
        Trigger = new TriggerOptions { Threshold = 0, CooldownTokens = 3, MaxRetrievalsPerRequest = 3 },
        LogDir = Path.Combine(workDir, "logs"),
        Notices = TextWriter.Null,
    };

    private static GenerationRequest Greedy(int[] prompt, InjectionMode mode) => new()
    {
        PromptIds = prompt,
        Sampling = new SamplingParams { Temperature = 0, MaxNewTokens = 16, IgnoreEos = true },
        Rag = new RagOverrides { Mode = mode },
    };

    private static async Task<(List<int> Tokens, List<RagEvent> Events)> Collect(IGenerationEngine engine, GenerationRequest request)
    {
        var tokens = new List<int>();
        var events = new List<RagEvent>();
        await foreach (var update in engine.GenerateAsync(request).ConfigureAwait(false))
        {
            tokens.AddRange(update.NewTokenIds);
            events.AddRange(update.NewEvents);
        }
        return (tokens, events);
    }

    /// <summary>
    /// 16 greedy requests, half with latent injection firing (threshold 0), half with RAG off. Deterministic: each gets exactly
    /// its solo tokens when run together. Default mode: the RAG-off ones get the same tokens beside injecting requests as
    /// beside RAG-off ones. Either way some injection fires in a step of several requests replayed from a graph.
    /// </summary>
    private static async Task<CheckResult> BatchSafetyAsync(IRunnerFactory device, string modelPath, string corpus, string workDir, bool deterministic)
    {
        await using var engine = InferenceEngine.Create(Options(device, modelPath, corpus, workDir, deterministic));
        string[] questions = ["What is Quantum?", "What is a fox?", "What is coffee?", "What is an abacus?", "What is a lighthouse?",
            "What is bravery?", "What is a glacier?", "What is a sonnet?"];
        var prompts = questions.Select(q => engine.Tokenizer.Encode(q)).ToList();
        var requests = Enumerable.Range(0, 16).Select(i => Greedy(prompts[i % 8], i % 2 == 0 ? InjectionMode.Off : InjectionMode.Latent)).ToList();
        var together = await Task.WhenAll(requests.Select(r => Collect(engine, r))).ConfigureAwait(false);
        var events = together.SelectMany(t => t.Events).ToList();
        var batched = events.Count(e => e.BatchSize > 1 && e.InjectionNorm > 0);
        var graphs = (engine.Runner as ModelRunner)?.CapturedBuckets.Count ?? 0;
        List<int>[] expected;
        string what;
        if (deterministic)
        {
            expected = new List<int>[16];
            for (var i = 0; i < 16; i++) expected[i] = (await Collect(engine, requests[i]).ConfigureAwait(false)).Tokens;
            what = "deterministic: concurrent tokens == solo tokens (16 requests, 8 injecting)";
        }
        else
        {
            var plain = await Task.WhenAll(requests.Select(r => Collect(engine, r with { Rag = new RagOverrides { Mode = InjectionMode.Off } })))
                .ConfigureAwait(false);
            expected = [.. plain.Select(p => p.Tokens)];
            what = "default: RAG-off tokens unchanged beside injecting requests";
        }
        var differ = Enumerable.Range(0, 16).Where(i => (deterministic || i % 2 == 0) && !together[i].Tokens.SequenceEqual(expected[i])).ToList();
        var passed = differ.Count == 0 && batched > 0 && graphs > 0;
        return new CheckResult("engine", what, passed, differ.Count, 0,
            $"{batched} injections fired in steps of several requests, max batch {events.Select(e => e.BatchSize).DefaultIfEmpty(0).Max()}, {graphs} graphs captured"
            + (differ.Count > 0 ? $"; requests differing: {string.Join(",", differ)}" : ""));
    }
}
