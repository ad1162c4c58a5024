using System.Text.Json.Nodes;
using MoeRagInject.Backend;
using MoeRagInject.Engine;
using MoeRagInject.Rag;

namespace MoeRagInject.DeviceChecks;

/// <summary>
/// The engine on a device: batch safety with graphs replayed and injections firing, in deterministic and default modes;
/// and a projector with one vector an answer position against PyTorch's tokens.
/// </summary>
public static class EngineChecks
{
    /// <param name="injectionReference">tests/data/reference/demo-injection: the cases of make_injection_reference.py.</param>
    public static async Task<List<CheckResult>> RunAsync(IRunnerFactory device, string modelPath, string corpus, string workDir,
        string injectionReference)
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
        try
        {
            results.Add(await AnswerPositionsAsync(device, modelPath, workDir, injectionReference).ConfigureAwait(false));
        }
        catch (Exception e)
        {
            results.Add(new CheckResult("engine", "one vector an answer position", false, double.NaN, 0, $"{e.GetType().Name}: {e.Message}"));
        }
        return results;
    }

    /// <summary>
    /// The injection reference's 6-position attn case (make_injection_reference.py) as 4 concurrent greedy requests under
    /// --deterministic, the trigger firing at the first answer token: each must give PyTorch's tokens, with the answer
    /// restarted, and the injections must run in steps of several requests (replayed from graphs where the device captures).
    /// </summary>
    private static async Task<CheckResult> AnswerPositionsAsync(IRunnerFactory device, string modelPath, string workDir, string reference)
    {
        var root = JsonNode.Parse(await File.ReadAllTextAsync(Path.Combine(reference, "reference.json")).ConfigureAwait(false))!;
        var c = root["cases"]!.AsArray().Single(x => x!["name"]!.GetValue<string>() == "attnpos-heldout-j0")!;
        int[] Ints(string key) => [.. c[key]!.AsArray().Select(x => x!.GetValue<int>())];
        var prompt = Ints("prompt_ids");
        var expected = Ints("generated_ids");
        string[] passages = [.. c["passages"]!.AsArray().Select(p => p!.GetValue<string>())];
        using var retriever = new FixedPassagesServer(passages);
        await using var engine = InferenceEngine.Create(new EngineOptions
        {
            ModelPath = modelPath,
            Runner = device,
            Retriever = retriever.Url,
            RetrievalTopK = passages.Length,
            Deterministic = true,
            MaxRunningRequests = 4,
            ContextLength = 256,
            // Router entropy is above 0 everywhere: the trigger fires at the first answer token, once.
            Trigger = new TriggerOptions { Threshold = 0, MaxRetrievalsPerRequest = 1 },
            Mode = InjectionMode.Latent,
            Projection = ProjectionKind.File,
            ProjectionPath = Path.Combine(reference, c["projector"]!.GetValue<string>()),
            InjectionScale = c["alpha"]!.GetValue<float>(),
            LogDir = Path.Combine(workDir, "logs-positions"),
            Notices = TextWriter.Null,
        });
        var request = new GenerationRequest
        {
            PromptIds = prompt,
            Sampling = new SamplingParams { Temperature = 0, MaxNewTokens = expected.Length, IgnoreEos = true },
        };
        var runs = await Task.WhenAll(Enumerable.Range(0, 4).Select(_ => Collect(engine, request))).ConfigureAwait(false);
        var events = runs.SelectMany(r => r.Events).ToList();
        var differ = runs.Count(r => !r.Tokens.SequenceEqual(expected));
        var restarted = events.Count(e => e.Error is null && e.Restart == "answer");
        var batched = events.Count(e => e.BatchSize > 1);
        var graphs = (engine.Runner as ModelRunner)?.CapturedBuckets.Count ?? 0;
        return new CheckResult("engine", "one vector an answer position: 4 concurrent requests give PyTorch's tokens", differ == 0 && restarted == 4 && batched > 0,
            differ, 0, $"{restarted} of 4 answers restarted, {batched} injections in steps of several requests, {graphs} graphs captured");
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
