using System.Text.Json.Nodes;
using MoeRagInject.Backend.Cpu;
using MoeRagInject.Model;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine.Tests;

/// <summary>
/// --trigger-signal router-probe end to end on the CPU backend: the scores the engine reports equal a scalar oracle's (the
/// double-precision forward pass's router probabilities, pooled and squashed here), the trigger fires where the oracle's
/// scores cross the threshold, and what is wrong is refused with a message that says so.
/// </summary>
public sealed class RouterProbeTests : IDisposable
{
    private readonly string _temp = Directory.CreateTempSubdirectory("moe-rag-probe-").FullName;

    public void Dispose() => Directory.Delete(_temp, recursive: true);

    private string WriteCorpus()
    {
        var path = Path.Combine(_temp, "corpus.jsonl");
        File.WriteAllLines(path,
        [
            """{"id": "q1", "title": "Quantum", "text": "A quantum is the smallest discrete amount of a physical quantity."}""",
            """{"id": "f1", "title": "Fox", "text": "The red fox is a quick and clever animal that hunts at dusk."}""",
        ]);
        return path;
    }

    /// <summary>A probe for the tiny model (4 layers × 8 experts) with seeded weights, pooled over two tokens.</summary>
    private static RouterProbe RandomProbe(int layers, int experts, int window = 2, double threshold = 0.5)
    {
        var rng = new SplitMix64(21);
        return new RouterProbe
        {
            Layers = layers,
            Experts = experts,
            Window = window,
            Weights = [.. Enumerable.Range(0, layers * experts).Select(_ => (float)(4 * rng.NextGaussian()))],
            Bias = -0.3,
            Threshold = threshold,
            Training = new JsonObject { ["note"] = "random weights for a test" },
        };
    }

    private LlmEngine Engine(string probePath, TriggerOptions trigger, double? probeThreshold = null, string? retriever = null) =>
        InferenceEngine.Create(new EngineOptions
        {
            ModelPath = TestPaths.DefaultModel,
            Runner = new CpuRunnerFactory(2),
            Retriever = retriever,
            RouterProbePath = probePath,
            RouterProbeThreshold = probeThreshold,
            Trigger = trigger,
            LogDir = Path.Combine(_temp, "logs"),
            Notices = TextWriter.Null,
            KvCacheTokens = 4096,
        });

    private static GenerationRequest Greedy(int[] prompt, InjectionMode mode, int maxNewTokens, TriggerSignal? signal = null) => new()
    {
        PromptIds = prompt,
        Sampling = new SamplingParams { Temperature = 0, MaxNewTokens = maxNewTokens, IgnoreEos = true },
        Rag = new RagOverrides { Mode = mode, Signal = signal },
        ReturnRouterEntropy = true,
    };

    /// <summary>The oracle's score of each answer token: σ(mean over the window of Σ w·p + b), p from the scalar forward pass.</summary>
    private static double[] OracleScores(RouterProbe probe, int[] prompt, IReadOnlyList<int> answer)
    {
        var config = ModelConfig.Load(TestPaths.DefaultModel);
        using var checkpoint = Checkpoint.Open(TestPaths.DefaultModel);
        var weights = MixtralWeights.Resolve(checkpoint, config);
        // Answer token j comes from the forward pass at position prompt.Length − 1 + j.
        int[] ids = [.. prompt, .. answer.Take(answer.Count - 1)];
        var probs = ScalarOracle.RouterProbabilities(config, weights, ids);
        var sums = new double[answer.Count];
        for (var j = 0; j < answer.Count; j++)
        {
            var p = probs[prompt.Length - 1 + j];
            for (var l = 0; l < probe.Layers; l++)
                for (var e = 0; e < probe.Experts; e++) sums[j] += probe.Weights[l * probe.Experts + e] * p[l][e];
        }
        return [.. Enumerable.Range(0, answer.Count).Select(j =>
        {
            var first = Math.Max(0, j - probe.Window + 1);
            var mean = sums[first..(j + 1)].Average();
            return 1 / (1 + Math.Exp(-(mean + probe.Bias)));
        })];
    }

    [Fact]
    public async Task EngineScoresEqualTheScalarOracle_AndTheTriggerFiresWhereTheOracleCrossesTheThreshold()
    {
        using var reference = new ReferenceCase("tiny-mixtral");
        var config = ModelConfig.Load(TestPaths.DefaultModel);
        var probe = RandomProbe(config.NumLayers, config.NumExperts);
        var probePath = Path.Combine(_temp, "router-probe.json");
        probe.Save(probePath);
        var prompt = reference.Prompts[1].InputIds;
        const int MaxNew = 10;

        // RAG off: the scores the engine reports for each answer token against the oracle's.
        var scores = new List<float>();
        var tokens = new List<int>();
        await using (var off = Engine(probePath, new TriggerOptions { Signal = TriggerSignal.RouterProbe }))
        {
            Assert.NotNull(off.RouterProbe);
            await foreach (var update in off.GenerateAsync(Greedy(prompt, InjectionMode.Off, MaxNew)))
            {
                scores.AddRange(update.NewRouterProbe);
                tokens.AddRange(update.NewTokenIds);
            }
        }
        Assert.Equal(MaxNew, scores.Count);
        var oracle = OracleScores(probe, prompt, tokens);
        for (var j = 0; j < MaxNew; j++) Assert.True(Math.Abs(scores[j] - oracle[j]) < 1e-4, $"token {j}: engine {scores[j]}, oracle {oracle[j]}");
        Assert.True(oracle.Max() - oracle.Min() > 0.05, "the probe's scores hardly vary over the answer: no threshold can be placed");

        // A threshold between the oracle's scores: the first token above it is where the trigger must fire.
        var sorted = oracle.Order().ToArray();
        var gaps = Enumerable.Range(1, sorted.Length - 1).Select(k => (Gap: sorted[k] - sorted[k - 1], At: k)).MaxBy(g => g.Gap);
        Assert.True(gaps.Gap > 2e-3, "no gap between the oracle's scores wide enough for a threshold");
        var threshold = (sorted[gaps.At] + sorted[gaps.At - 1]) / 2;
        var expected = Array.FindIndex(oracle, v => v > threshold);
        await using (var fired = Engine(probePath, new TriggerOptions { Signal = TriggerSignal.RouterProbe, CooldownTokens = 100, MaxRetrievalsPerRequest = 1 },
                         probeThreshold: threshold, retriever: WriteCorpus()))
        {
            var events = new List<RagEvent>();
            var firedTokens = new List<int>();
            await foreach (var update in fired.GenerateAsync(Greedy(prompt, InjectionMode.Latent, MaxNew)))
            {
                events.AddRange(update.NewEvents);
                firedTokens.AddRange(update.NewTokenIds);
            }
            var e = Assert.Single(events);
            Assert.Equal("router-probe", e.Signal);
            Assert.Equal(expected, e.TokenIndex);
            Assert.Equal(oracle[expected], e.Entropy, 1e-4);
            Assert.Equal(threshold, e.Threshold, 9);
            Assert.Equal(Enumerable.Range(0, config.NumLayers), e.Layers);
            Assert.Equal(tokens.Take(expected), firedTokens.Take(expected));
        }

        // Per request on a server watching router entropy: without rag.threshold the probe's own threshold rules, with it the
        // request's.
        await using (var engine = Engine(probePath, new TriggerOptions { Signal = TriggerSignal.RouterEntropy, Threshold = 100, CooldownTokens = 100 },
                         retriever: WriteCorpus()))
        {
            Assert.Equal(probe.Threshold, engine.DefaultThreshold(TriggerSignal.RouterProbe));
            foreach (var (given, at) in new[] { ((double?)null, Array.FindIndex(oracle, v => v > probe.Threshold)), (threshold, expected) })
            {
                var request = Greedy(prompt, InjectionMode.Latent, MaxNew) with
                {
                    Rag = new RagOverrides { Mode = InjectionMode.Latent, Signal = TriggerSignal.RouterProbe, Threshold = given },
                };
                var events = new List<RagEvent>();
                await foreach (var update in engine.GenerateAsync(request)) events.AddRange(update.NewEvents);
                if (at < 0)
                {
                    Assert.Empty(events);
                    continue;
                }
                Assert.Equal(at, events[0].TokenIndex);
                Assert.Equal("router-probe", events[0].Signal);
                Assert.Equal(given ?? probe.Threshold, events[0].Threshold, 9);
            }
        }
    }

    [Fact]
    public async Task WithoutAProbe_TheSignalIsRefused_AndBadProbesAreErrors()
    {
        var config = ModelConfig.Load(TestPaths.DefaultModel);
        var missing = Path.Combine(_temp, "nowhere", "router-probe.json");
        var error = Assert.Throws<FileNotFoundException>(() => Engine(missing, new TriggerOptions { Signal = TriggerSignal.RouterProbe }));
        Assert.Contains("calibrate", error.Message);
        Assert.Contains(missing, error.Message);

        // The model folder has none: the engine starts without a probe, and a request asking for it is refused at once.
        await using (var plain = InferenceEngine.Create(new EngineOptions
        {
            ModelPath = TestPaths.DefaultModel,
            Runner = new CpuRunnerFactory(1),
            LogDir = Path.Combine(_temp, "logs"),
            Notices = TextWriter.Null,
            KvCacheTokens = 1024,
        }))
        {
            Assert.Null(plain.RouterProbe);
            var refused = Assert.Throws<ArgumentException>(() => plain.Submit(Greedy([1, 5, 9], InjectionMode.Latent, 4, TriggerSignal.RouterProbe)));
            Assert.Contains("calibrate", refused.Message);
            var updates = new List<GenerationUpdate>();
            await foreach (var update in plain.GenerateAsync(Greedy([1, 5, 9], InjectionMode.Off, 3))) updates.Add(update);
            Assert.All(updates, u => Assert.Empty(u.NewRouterProbe));
        }

        // A probe for another shape of model.
        var wrongShape = Path.Combine(_temp, "wrong-shape.json");
        RandomProbe(config.NumLayers + 1, config.NumExperts).Save(wrongShape);
        var shapeError = Assert.Throws<InvalidDataException>(() => Engine(wrongShape, new TriggerOptions { Signal = TriggerSignal.RouterProbe }));
        Assert.Contains($"{config.NumLayers + 1} MoE layers", shapeError.Message);

        // Files that are not probes: weights that do not add up, a threshold that is no probability, not JSON at all.
        var probe = RandomProbe(config.NumLayers, config.NumExperts);
        foreach (var (name, text, expected) in new[]
                 {
                     ("short", ProbeJson(probe) with { Weights = probe.Weights[..5] }, "weights has 5 values"),
                     ("threshold", ProbeJson(probe) with { Threshold = 1.5 }, "threshold must be a probability"),
                 }.Select(x => (x.Item1, Serialize(x.Item2), x.Item3))
                 .Append(("garbage", "{\"layers\": 4", "is not a router probe")))
        {
            var path = Path.Combine(_temp, name + ".json");
            File.WriteAllText(path, text);
            var bad = Assert.Throws<InvalidDataException>(() => RouterProbe.Load(path));
            Assert.Contains(expected, bad.Message);
            Assert.Contains(path, bad.Message);
        }
        // A request's threshold for the probe is a probability.
        Assert.Contains("[0, 1]", new RagOverrides { Signal = TriggerSignal.RouterProbe, Threshold = 2 }.Validate());
        Assert.Null(new RagOverrides { Signal = TriggerSignal.RouterProbe, Threshold = 0.9 }.Validate());
    }

    [Fact]
    public void SavedProbe_LoadsBackUnchanged()
    {
        var probe = RandomProbe(4, 8, window: 3, threshold: 0.37);
        var path = Path.Combine(_temp, "sub", "router-probe.json");
        probe.Save(path);
        var loaded = RouterProbe.Load(path);
        Assert.Equal(probe.Weights, loaded.Weights);
        Assert.Equal((probe.Layers, probe.Experts, probe.Window, probe.Bias, probe.Threshold), (loaded.Layers, loaded.Experts, loaded.Window, loaded.Bias, loaded.Threshold));
        Assert.Equal("random weights for a test", loaded.Training!["note"]!.GetValue<string>());
    }

    /// <summary>A probe as a record whose fields may be set to what <see cref="RouterProbe.Validate"/> rejects.</summary>
    private sealed record RawProbe(int Layers, int Experts, int Window, float[] Weights, double Bias, double Threshold);

    private static RawProbe ProbeJson(RouterProbe p) => new(p.Layers, p.Experts, p.Window, p.Weights, p.Bias, p.Threshold);

    private static string Serialize(RawProbe p) => new JsonObject
    {
        ["layers"] = p.Layers,
        ["experts"] = p.Experts,
        ["window"] = p.Window,
        ["weights"] = new JsonArray([.. p.Weights.Select(w => (JsonNode?)JsonValue.Create(w))]),
        ["bias"] = p.Bias,
        ["threshold"] = p.Threshold,
    }.ToJsonString();
}
