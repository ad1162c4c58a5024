using System.Net;
using System.Net.Sockets;
using System.Text;
using System.Text.Json.Nodes;
using MoeRagInject.Backend;
using MoeRagInject.Backend.Cpu;
using MoeRagInject.DeviceChecks;
using MoeRagInject.Model;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine.Tests;

/// <summary>A fact that runs once tools/projector/make_injection_reference.py's output is committed.</summary>
public sealed class InjectionReferenceFactAttribute : FactAttribute
{
    public InjectionReferenceFactAttribute()
    {
        if (!InjectionReference.Available)
            Skip = "the injection reference is not generated yet: run tools/projector/run-gpu.sh on the GPU machine and commit "
                + "tests/data/reference/demo-injection (tools/projector/README.md)";
    }
}

/// <summary>A theory that runs once tools/projector/make_injection_reference.py's output is committed.</summary>
public sealed class InjectionReferenceTheoryAttribute : TheoryAttribute
{
    public InjectionReferenceTheoryAttribute()
    {
        if (!InjectionReference.Available)
            Skip = new InjectionReferenceFactAttribute().Skip;
    }
}

/// <summary>tests/data/reference/demo-injection: PyTorch's log-probabilities of the demo model with a projector's injection.</summary>
public sealed class InjectionReference : IDisposable
{
    public static string Folder => Path.Combine(TestPaths.RepoRoot, "tests", "data", "reference", "demo-injection");

    public static bool Available => File.Exists(Path.Combine(Folder, "reference.json")) && File.Exists(Path.Combine(Folder, "reference.safetensors"));

    private readonly SafeTensorsFile _tensors = new(Path.Combine(Folder, "reference.safetensors"));

    public InjectionReference()
    {
        var root = JsonNode.Parse(File.ReadAllText(Path.Combine(Folder, "reference.json")))!;
        Cases = [.. root["cases"]!.AsArray().Select(c => new InjectionCase(
            c!["name"]!.GetValue<string>(),
            c["projector"]?.GetValue<string>(),
            Ints(c["layers"]!),
            c["alpha"]!.GetValue<float>(),
            c["context"]?.GetValue<string>(),
            c["question"]!.GetValue<string>(),
            Ints(c["prompt_ids"]!),
            [.. c["passages"]!.AsArray().Select(p => p!.GetValue<string>())],
            c["passage_text"]!.GetValue<string>(),
            Ints(c["passage_ids"]!),
            c["answer_index"]!.GetValue<int>(),
            c["start_position"]!.GetValue<int>(),
            Ints(c["generated_ids"]!),
            Ints(c["full_ids"]!)))];
    }

    private static int[] Ints(JsonNode node) => [.. node.AsArray().Select(x => x!.GetValue<int>())];

    public IReadOnlyList<InjectionCase> Cases { get; }

    public float[] Tensor(string name, int index) => _tensors.Tensors[$"{name}.{index}"].ToFloatArray();

    public void Dispose() => _tensors.Dispose();
}

/// <summary>One case of reference.json; <see cref="Context"/> is null for embed-mean (the cases from before attn projectors).</summary>
public sealed record InjectionCase(string Name, string? Projector, int[] Layers, float Alpha, string? Context, string Question, int[] PromptIds,
    string[] Passages, string PassageText, int[] PassageIds, int AnswerIndex, int StartPosition, int[] GeneratedIds, int[] FullIds);

/// <summary>
/// The engine's latent injection equals the PyTorch forward that tools/projector trains through (issue 9): the same
/// checkpoint, projector files (mlp, linear and attn) and passages give the same log-probabilities within 1e-4 at every
/// position, and the engine's own generation, its trigger firing at the first answer token, gives PyTorch's tokens.
/// </summary>
public sealed class InjectionReferenceTests(Xunit.Abstractions.ITestOutputHelper output)
{
    private static LoadedModel Load() => LoadedModel.Load(TestPaths.DemoModel, "auto", new CpuRunnerFactory(2),
        c => new RunnerOptions { MaxSequences = 1, MaxRows = 256, ContextLength = 256, KvCacheTokens = 256 });

    [InjectionReferenceFact]
    public void LogprobsWithTheInjectionMatchPyTorchWithin1e4()
    {
        using var reference = new InjectionReference();
        using var loaded = Load();
        var runner = loaded.Runner;
        var config = loaded.Config;
        runner.Bind(0);
        var logprobs = new List<double[][]>();
        for (var i = 0; i < reference.Cases.Count; i++)
        {
            var c = reference.Cases[i];
            // The engine's tokenizer gives PyTorch's token ids for the prompt and for the joined passages.
            Assert.Equal(c.PromptIds, loaded.Tokenizer.Encode(c.Question));
            Assert.Equal(c.PassageText, string.Join("\n", c.Passages));
            Assert.Equal(c.PassageIds, loaded.Tokenizer.Encode(c.PassageText, addSpecialTokens: false));
            Assert.Equal(c.FullIds, c.PromptIds.Concat(c.GeneratedIds));

            var expectedVector = reference.Tensor("vector", i);
            if (c.Projector is { } file)
            {
                var injector = ContextInjector.LoadFromFile(loaded.Embeddings, Path.Combine(InjectionReference.Folder, file));
                Assert.Equal(c.Context ?? ContextInjector.EmbedMeanContext,
                    injector.SequenceLength is { } t ? ContextInjector.EmbedSeqContextPrefix + t : ContextInjector.EmbedMeanContext);
                Assert.Equal(c.Layers, injector.Layers);
                Assert.Equal(c.Alpha, injector.Alpha);
                // A reader with one vector an answer position makes K vectors (vector k for answer token k).
                var vector = new float[injector.AnswerPositions * config.HiddenSize];
                Assert.Equal(expectedVector.Length, vector.Length);
                injector.ComputeInjection(c.PassageIds, c.Alpha, vector);
                var scale = Math.Max(1.0, expectedVector.Max(v => Math.Abs(v)));
                for (var h = 0; h < vector.Length; h++)
                    Assert.True(Math.Abs(vector[h] - expectedVector[h]) <= 1e-5 * scale, $"{c.Name}: v[{h}] = {vector[h]} vs {expectedVector[h]}");
                output.WriteLine($"{c.Name}: {injector.Description}: max |Δ v| = {vector.Zip(expectedVector, (a, b) => Math.Abs(a - b)).Max():E3}");
                runner.SetInjection(0, vector, c.Layers, c.StartPosition, int.MaxValue, answerBase: c.PromptIds.Length - 1);
            }
            else
            {
                Assert.All(expectedVector, v => Assert.Equal(0f, v));
                runner.ClearInjection(0);
            }

            var logits = LogitRows(runner, c, positionVectors: expectedVector.Length > config.HiddenSize);
            var theirs = reference.Tensor("logprobs", i);
            var vocab = config.VocabSize;
            var rows = new double[c.FullIds.Length][];
            double worst = 0;
            for (var row = 0; row < c.FullIds.Length; row++)
            {
                rows[row] = Sampler.LogSoftmax(logits[row]);
                for (var v = 0; v < vocab; v++) worst = Math.Max(worst, Math.Abs(rows[row][v] - theirs[row * vocab + v]));
            }
            output.WriteLine($"{c.Name}: max |Δ logprob| = {worst:E3} over {c.FullIds.Length} positions × {vocab}, {c.PassageIds.Length} passage tokens");
            Assert.True(worst < 1e-4, $"{c.Name}: max |Δ logprob| = {worst:E3}");
            // Greedy: each generated token is the engine's argmax with the injection too (the last case reuses the first's tokens).
            for (var k = 0; k < (c.Projector is null ? 0 : c.GeneratedIds.Length); k++)
                Assert.Equal(c.GeneratedIds[k], Array.IndexOf(rows[c.PromptIds.Length - 1 + k], rows[c.PromptIds.Length - 1 + k].Max()));
            logprobs.Add(rows);
        }

        // The reference is sensitive: the same tokens without injection (case "plain") differ from the first case from its
        // start position on, and not before it.
        var injected = logprobs[0];
        var plainIndex = reference.Cases.ToList().FindIndex(x => x.Name == "plain");
        var plain = logprobs[plainIndex];
        Assert.Equal(reference.Cases[0].FullIds, reference.Cases[plainIndex].FullIds);
        var start = reference.Cases[0].StartPosition;
        for (var row = 0; row < start; row++) Assert.Equal(plain[row], injected[row]);
        Assert.True(Enumerable.Range(start, injected.Length - start).Max(r => injected[r].Zip(plain[r], (a, b) => Math.Abs(a - b)).Max()) > 0.5);
    }

    /// <summary>
    /// Every position's logits, in one step; with one vector an answer position, the positions from the injection's start
    /// one step each (as the engine decodes them), since a step may hold only one injected row of such a slot.
    /// </summary>
    private static float[][] LogitRows(IModelRunner runner, InjectionCase c, bool positionVectors)
    {
        var split = positionVectors ? c.StartPosition : c.FullIds.Length;
        var forward = runner.Forward(c.FullIds[..split]);
        var rows = Enumerable.Range(0, split).Select(r => forward.LogitRow(r).ToArray()).ToList();
        for (var p = split; p < c.FullIds.Length; p++)
            rows.Add(runner.Forward([c.FullIds[p]], start: p).LogitRow(0).ToArray());
        return [.. rows];
    }

    [InjectionReferenceTheory]
    [InlineData("mlp-heldout-j0")]
    [InlineData("attn-heldout-j0")]
    [InlineData("attnpos-heldout-j0")]
    public async Task TheEngineGeneratesPyTorchsTokensWhenItsTriggerFiresAtTheFirstAnswerToken(string name)
    {
        using var reference = new InjectionReference();
        var c = reference.Cases.Single(x => x.Name == name);
        Assert.True(c.Projector is not null && c.AnswerIndex == 0, $"{name} is not a case with a projector and a trigger at answer token 0");
        // Router entropy is above 0 everywhere: the trigger fires at the first answer token, once.
        var (tokens, events) = await GenerateWithInjectionAsync(c, new TriggerOptions { Threshold = 0, MaxRetrievalsPerRequest = 1 });
        var e = Assert.Single(events);
        Assert.Null(e.Error);
        Assert.Equal(0, e.TokenIndex);
        Assert.Equal(c.StartPosition, e.Position);
        Assert.Equal(c.Layers, e.InjectionLayers);
        Assert.Equal(c.Passages, e.Snippets);
        var expectedNorm = Math.Sqrt(reference.Tensor("vector", reference.Cases.ToList().IndexOf(c)).Sum(v => (double)v * v));
        Assert.Equal(expectedNorm, e.InjectionNorm, 3);
        // One vector an answer position restarts the answer (none to drop here: the trigger fired at its first token).
        Assert.Equal(name.StartsWith("attnpos", StringComparison.Ordinal) ? "answer" : null, e.Restart);
        Assert.Equal(c.GeneratedIds, tokens);
    }

    /// <summary>
    /// The model's own answer without injection (as long as the case's), and an output-entropy threshold between the
    /// entropies of its first tokens such that a trigger on it fires first at a token j ≥ <paramref name="earliest"/>.
    /// </summary>
    private (List<int> Own, List<double> OwnLogprobs, int J, double Threshold) FirstFiringAfterTheFirstToken(InjectionCase c, int earliest = 1)
    {
        var entropies = new List<double>();
        var own = new List<int>();
        var ownLogprobs = new List<double>();
        using (var loaded = Load())
        {
            var runner = loaded.Runner;
            runner.Bind(0);
            var ids = c.PromptIds.ToList();
            for (var k = 0; k < Math.Max(5, c.GeneratedIds.Length); k++)
            {
                var logprobs = Sampler.LogSoftmax(runner.Forward(ids).LogitRow(ids.Count - 1));
                if (k < 5) entropies.Add(-logprobs.Sum(l => Math.Exp(l) * l));
                own.Add(Array.IndexOf(logprobs, logprobs.Max()));
                ownLogprobs.Add(logprobs[own[^1]]);
                ids.Add(own[^1]);
            }
        }
        var j = Enumerable.Range(earliest, entropies.Count - earliest).First(k => entropies[k] > entropies.Take(k).Max());
        var threshold = (entropies[j] + entropies.Take(j).Max()) / 2;
        output.WriteLine($"output entropies {string.Join(", ", entropies.Select(e => e.ToString("F3")))}: threshold {threshold:F3} fires at token {j}");
        return (own, ownLogprobs, j, threshold);
    }

    /// <summary>
    /// With one vector an answer position (and --latent-rag-restart answer, the default), a trigger that fires a few tokens
    /// into the answer drops them and restarts it: the engine's tokens are PyTorch's with the injection from the first
    /// answer token on (the case's own tokens).
    /// </summary>
    [InjectionReferenceFact]
    public async Task ALatentTriggerAFewTokensInRestartsTheAnswerWithVectorZero()
    {
        using var reference = new InjectionReference();
        var c = reference.Cases.Single(x => x.Name == "attnpos-heldout-j0");
        var (_, _, j, threshold) = FirstFiringAfterTheFirstToken(c);
        var (tokens, events) = await GenerateWithInjectionAsync(c,
            new TriggerOptions { Signal = TriggerSignal.OutputEntropy, Threshold = threshold, MaxRetrievalsPerRequest = 1 });
        var e = Assert.Single(events);
        Assert.Null(e.Error);
        Assert.Equal(j, e.TokenIndex);
        Assert.Equal("answer", e.Restart);
        // The dropped tokens never reached the client: it got the restarted answer only.
        Assert.Equal(c.GeneratedIds, tokens);
    }

    /// <summary>
    /// With one vector an answer position and --latent-rag-restart continue, a trigger that fires a few tokens into the
    /// answer keeps them, and the answer goes on with vector j at the position that predicts answer token j: the
    /// client gets the model's own first j tokens, then those of the runner decoding greedily with the case's vectors set
    /// from that position on; with retrievals to spare and no cooldown, none follows.
    /// </summary>
    [InjectionReferenceFact]
    public async Task ALatentTriggerAFewTokensInContinuesWithThatPositionsVector()
    {
        using var reference = new InjectionReference();
        var c = reference.Cases.Single(x => x.Name == "attnpos-heldout-j0");
        var (own, ownLogprobs, j, threshold) = FirstFiringAfterTheFirstToken(c);
        var expected = own.Take(j).ToList();
        var expectedLogprobs = ownLogprobs.Take(j).ToList();
        using (var loaded = Load())
        {
            var runner = loaded.Runner;
            var injector = ContextInjector.LoadFromFile(loaded.Embeddings, Path.Combine(InjectionReference.Folder, c.Projector!));
            var vector = new float[injector.AnswerPositions * loaded.Config.HiddenSize];
            injector.ComputeInjection(c.PassageIds, c.Alpha, vector);
            var answerBase = c.PromptIds.Length - 1;
            runner.Bind(0);
            runner.SetInjection(0, vector, c.Layers, answerBase + j, int.MaxValue, answerBase);
            // The prompt and the kept tokens at once (only the last of them is injected), then a position a step.
            var ids = c.PromptIds.Concat(expected).ToArray();
            var row = runner.Forward(ids).LogitRow(ids.Length - 1).ToArray();
            while (true)
            {
                var rowLogprobs = Sampler.LogSoftmax(row);
                expected.Add(Array.IndexOf(rowLogprobs, rowLogprobs.Max()));
                expectedLogprobs.Add(rowLogprobs[expected[^1]]);
                if (expected.Count == c.GeneratedIds.Length) break;
                row = runner.Forward([expected[^1]], start: c.PromptIds.Length + expected.Count - 1).LogitRow(0).ToArray();
            }
        }
        var logprobs = new List<float>();
        var (tokens, events) = await GenerateWithInjectionAsync(c,
            new TriggerOptions { Signal = TriggerSignal.OutputEntropy, Threshold = threshold, MaxRetrievalsPerRequest = 4, CooldownTokens = 0 },
            LatentRagRestart.Continue, logprobs);
        var e = Assert.Single(events);
        Assert.Null(e.Error);
        Assert.Equal((j, "continue"), (e.TokenIndex, e.Restart));
        Assert.Equal(expected, tokens);
        for (var k = 0; k < tokens.Count; k++) Assert.True(Math.Abs(logprobs[k] - expectedLogprobs[k]) < 1e-4, $"token {k}: {logprobs[k]} vs {expectedLogprobs[k]}");
        // The vectors were set: from token j on, the log-probabilities differ from the uninjected model's (this case's
        // greedy tokens may not).
        Assert.True(Enumerable.Range(j, Math.Min(own.Count, tokens.Count) - j)
            .Any(k => own[k] != tokens[k] || Math.Abs(logprobs[k] - ownLogprobs[k]) > 1e-2), "the continued answer is the uninjected one");
    }

    /// <summary>
    /// Once one vector an answer position has restarted the answer, the injection covers it: a trigger that crosses its
    /// threshold at every token, with retrievals to spare and no cooldown, retrieves once, and the answer is PyTorch's.
    /// </summary>
    [InjectionReferenceFact]
    public async Task AfterTheAnswerRestartsWithItsVectorsNoFurtherRetrievalFires()
    {
        using var reference = new InjectionReference();
        var c = reference.Cases.Single(x => x.Name == "attnpos-heldout-j0");
        var (tokens, events) = await GenerateWithInjectionAsync(c,
            new TriggerOptions { Threshold = 0, MaxRetrievalsPerRequest = 4, CooldownTokens = 0 });
        var e = Assert.Single(events);
        Assert.Equal("answer", e.Restart);
        Assert.Equal(c.GeneratedIds, tokens);
    }

    /// <summary>
    /// The engine (CPU backend) generating the case's answer greedily in latent mode with the case's projector, its
    /// passages served by a fixed retriever, under <paramref name="trigger"/>: the tokens the client got and the events.
    /// </summary>
    private static async Task<(List<int> Tokens, List<RagEvent> Events)> GenerateWithInjectionAsync(InjectionCase c, TriggerOptions trigger,
        LatentRagRestart restart = LatentRagRestart.Answer, List<float>? logprobs = null)
    {
        using var retriever = new FixedPassagesServer(c.Passages);
        var temp = Directory.CreateTempSubdirectory("moe-rag-injection-").FullName;
        try
        {
            await using var engine = InferenceEngine.Create(new EngineOptions
            {
                ModelPath = TestPaths.DemoModel,
                Runner = new CpuRunnerFactory(2),
                Retriever = retriever.Url,
                RetrievalTopK = c.Passages.Length,
                Trigger = trigger,
                Mode = InjectionMode.Latent,
                LatentRagRestart = restart,
                Projection = ProjectionKind.File,
                ProjectionPath = Path.Combine(InjectionReference.Folder, c.Projector!),
                InjectionScale = c.Alpha,
                LogDir = temp,
                Notices = TextWriter.Null,
                KvCacheTokens = 512,
                MaxRunningRequests = 2,
            });
            var request = new GenerationRequest
            {
                PromptIds = c.PromptIds,
                Sampling = new SamplingParams { Temperature = 0, MaxNewTokens = c.GeneratedIds.Length, IgnoreEos = true },
                ReturnLogprob = logprobs is not null,
            };
            var tokens = new List<int>();
            var events = new List<RagEvent>();
            await foreach (var update in engine.GenerateAsync(request))
            {
                tokens.AddRange(update.NewTokenIds);
                events.AddRange(update.NewEvents);
                logprobs?.AddRange(update.NewLogprobs);
            }
            return (tokens, events);
        }
        finally
        {
            Directory.Delete(temp, recursive: true);
        }
    }
}
