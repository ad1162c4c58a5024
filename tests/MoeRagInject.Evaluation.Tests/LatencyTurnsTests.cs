using System.Text.Json.Nodes;
using MoeRagInject.Backend;
using MoeRagInject.Model;
using MoeRagInject.Rag;

namespace MoeRagInject.Evaluation.Tests;

/// <summary>
/// The machine slows down half-way through an eval (another job starts): the modes must still be compared fairly. Two modes
/// that do the same work (none, and latent_identity with a trigger that never fires) must show the same latency, whereas
/// run one after another the first would take all the fast steps and the second all the slow ones.
/// </summary>
public sealed class LatencyTurnsTests : IDisposable
{
    private const int Questions = 64;
    private readonly TinyData _data = new();
    private readonly string _qa;

    public LatencyTurnsTests()
    {
        _qa = Path.Combine(_data.Directory, "many.jsonl");
        var terms = new[] { "fox", "quantum", "cafe", "dog", "abash", "aardwolf" };
        File.WriteAllLines(_qa, Enumerable.Range(0, Questions).Select(i => new JsonObject
        {
            ["id"] = $"qa-{i}",
            ["question"] = $"What is {terms[i % terms.Length]}?",
            ["answer"] = terms[i % terms.Length],
            ["split"] = i % 3 == 0 ? "heldout" : "taught",
        }.ToJsonString()));
    }

    public void Dispose() => _data.Dispose();

    [Fact]
    public async Task ASlowdownHalfWayThroughFallsOnEveryModeAlike()
    {
        // A first pass at full speed counts the steps the run takes; the second slows every step after half of them by 8x.
        var counting = new DriftingRunnerFactory(slowFromStep: long.MaxValue);
        await RunAsync(counting, "count");
        var drifting = new DriftingRunnerFactory(slowFromStep: counting.Steps / 2);
        var result = await RunAsync(drifting, "drift");

        var none = result.Modes[EvalModes.None];
        var latent = result.Modes[EvalModes.LatentIdentity];
        Assert.Empty(latent.Runs.SelectMany(r => r.Events));  // the same work in both modes: nothing fired
        Assert.Equal(none.Runs.Select(r => r.Item.Id), latent.Runs.Select(r => r.Item.Id));  // paired by question, in order
        // A question that ran in the slow spell takes about 6 steps of 8 ms; one before it, about 6 of 1 ms. Half the steps were
        // slow, and they must have fallen on both modes alike (one mode after the other, the first would have none of them).
        // Counting questions rather than averaging latencies keeps a stall of the machine from deciding the test (the test
        // host's own one, a starved thread pool, is gone: tests/Shared/TestHostThreadPool.cs).
        static int Slow(ModeResult mode) => mode.Runs.Count(r => r.LatencySeconds > 0.025);
        var detail = $"questions in the slow spell: none {Slow(none)}, latent_identity {Slow(latent)}";
        Assert.True(Slow(none) is >= Questions / 4 and <= 3 * Questions / 4, detail);
        Assert.True(Slow(latent) is >= Questions / 4 and <= 3 * Questions / 4, detail);
        Assert.True(Math.Abs(Slow(none) - Slow(latent)) <= 12, detail);
        Assert.Equal(Questions / 8, none.BlockLatencyMeans.Count);
        var json = JsonNode.Parse(File.ReadAllText(result.JsonPath))!;
        Assert.Equal(8, json["config"]!["latency_block"]!.GetValue<int>());
        Assert.Equal(Questions / 8, json["modes"]![EvalModes.None]!["latency_mean_by_block_s"]!.AsArray().Count);
        Assert.Contains("take turns over 8 blocks of up to 8 questions", File.ReadAllText(result.MarkdownPath));
    }

    [Theory]
    [InlineData(5000, 8, 250)]
    [InlineData(500, 8, 200)]
    [InlineData(40, 8, 200)]
    [InlineData(1000, 1, 50)]
    public void BlocksAreATwentiethOfTheQuestionsAndAtLeast25TimesTheConcurrency(int questions, int concurrency, int expected) =>
        Assert.Equal(expected, Evaluator.LatencyBlockSize(questions, concurrency));

    private Task<EvaluationResult> RunAsync(IRunnerFactory runner, string name) => Evaluator.RunAsync(new EvaluationOptions
    {
        Runner = runner,
        ModelPath = TestPaths.TinyModel,
        Qa = _qa,
        Corpus = _data.Corpus,
        Out = Path.Combine(_data.Directory, name, "results.json"),
        Modes = [EvalModes.None, EvalModes.LatentIdentity],
        Signal = TriggerSignal.RouterEntropy,
        Threshold = 100,
        MaxNewTokens = 6,
        Concurrency = 4,
        LatencyBlock = 8,
        Sweep = false,
        Plots = false,
        Warmup = false,
    }, TextWriter.Null, CancellationToken.None);

    /// <summary>Null runners whose steps take 1 ms until <paramref name="slowFromStep"/> steps have run in all of them together, 8 ms after.</summary>
    private sealed class DriftingRunnerFactory(long slowFromStep) : IRunnerFactory
    {
        private readonly NullRunnerFactory _inner = new(triggerRate: 0);
        private long _steps;

        public long Steps => Interlocked.Read(ref _steps);

        public long SlowFromStep => slowFromStep;

        public string Device => "null";

        public IModelRunner Create(ModelConfig config, WeightSource weights, RunnerOptions options, Action<string>? progress = null) =>
            new Runner(_inner.Create(config, weights, options, progress), this);

        private sealed class Runner(IModelRunner inner, DriftingRunnerFactory machine) : IModelRunner
        {
            public string Device => inner.Device;
            public ModelConfig Config => inner.Config;
            public RunnerLimits Limits => inner.Limits;
            public StepState State => inner.State;
            public void BindSlot(int slot, SlotSampling sampling, ReadOnlySpan<int> promptIds) => inner.BindSlot(slot, sampling, promptIds);
            public void SetBlocks(int slot, int firstIndex, ReadOnlySpan<int> blocks) => inner.SetBlocks(slot, firstIndex, blocks);
            public void SetInjection(int slot, ReadOnlySpan<float> vector, IReadOnlyList<int> layers, int start, int end, int answerBase = -1) =>
                inner.SetInjection(slot, vector, layers, start, end, answerBase);
            public void ClearInjection(int slot) => inner.ClearInjection(slot);
            public void AcceptToken(int slot, int token) => inner.AcceptToken(slot, token);

            public void Execute()
            {
                var step = Interlocked.Increment(ref machine._steps);
                Thread.Sleep(step > machine.SlowFromStep ? 8 : 1);
                inner.Execute();
            }

            public EagerResult ForwardEager(IReadOnlyList<EagerSequence> sequences, IReadOnlyList<int>? captureLayers = null) =>
                inner.ForwardEager(sequences, captureLayers);

            public void Dispose() => inner.Dispose();
        }
    }
}
