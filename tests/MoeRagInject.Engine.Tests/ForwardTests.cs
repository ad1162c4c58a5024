using MoeRagInject.Backend;
using MoeRagInject.Backend.Cpu.Ops;
using MoeRagInject.Model;

namespace MoeRagInject.Engine.Tests;

/// <summary>The CPU backend's forward pass against the scalar oracle, and batched against single-sequence runs.</summary>
public sealed class ForwardTests
{
    private static ModelConfig Config(int hidden, int layers, int heads, int kvHeads, int headDim, int experts, int topK, int? window) => new()
    {
        ModelType = "mixtral", VocabSize = 97, HiddenSize = hidden, IntermediateSize = 40, NumLayers = layers, NumHeads = heads,
        NumKvHeads = kvHeads, HeadDim = headDim, NumExperts = experts, NumExpertsPerToken = topK, MaxPositionEmbeddings = 128,
        RmsNormEps = 1e-5f, RopeTheta = 10000f, SlidingWindow = window,
    };

    public static TheoryData<int, int, int, int, int, int, int, int?, DType> Shapes => new()
    {
        { 32, 2, 4, 2, 8, 4, 2, null, DType.F32 },
        { 48, 1, 6, 1, 16, 5, 3, 4, DType.BF16 },
        { 24, 3, 2, 2, 12, 3, 1, null, DType.F16 },
        { 40, 2, 8, 4, 10, 6, 6, 7, DType.F32 },
    };

    [Theory]
    [MemberData(nameof(Shapes))]
    public void PrefillMatchesTheScalarOracle(int hidden, int layers, int heads, int kvHeads, int headDim, int experts, int topK, int? window, DType dtype)
    {
        var config = Config(hidden, layers, heads, kvHeads, headDim, experts, topK, window);
        using var checkpoint = Checkpoint.CreateDummy(config, dtype, seed: 7);
        var weights = MixtralWeights.Resolve(checkpoint, config);
        using var runner = TestRunners.Cpu(config, weights, blockSize: 4, blocks: 8);
        int[] ids = [1, 5, 9, 33, 2, 96, 40, 40, 7, 12, 0];
        runner.Bind(0, 3, 0, 6);
        var output = runner.Forward(ids);
        var (logits, entropies) = ScalarOracle.Forward(config, weights, ids);
        for (var i = 0; i < ids.Length; i++)
        {
            for (var v = 0; v < config.VocabSize; v++)
                Assert.True(Math.Abs(output.LogitRow(i)[v] - logits[i][v]) < 1e-4, $"row {i} logit {v}: {output.LogitRow(i)[v]} vs {logits[i][v]}");
            for (var l = 0; l < layers; l++)
                Assert.True(Math.Abs(output.EntropyRow(i)[l] - entropies[i][l]) < 1e-5, $"row {i} layer {l} entropy");
        }
    }

    /// <summary>
    /// Three sequences prefilled and decoded together (different lengths, scattered KV blocks, one with an injection)
    /// give bit-identical logits and entropies to each run alone.
    /// </summary>
    [Fact]
    public void BatchedStepsAreBitIdenticalToSingleSequenceSteps()
    {
        var config = Config(48, 2, 6, 2, 8, 4, 2, 5);
        using var checkpoint = Checkpoint.CreateDummy(config, DType.BF16, seed: 3);
        var weights = MixtralWeights.Resolve(checkpoint, config);
        int[][] prompts = [[1, 4, 8, 15, 16, 23, 42], [1, 2], [1, 90, 80, 70, 60]];
        int[][] tables = [[5, 2], [7], [0, 3]];
        var vector = Enumerable.Range(0, 48).Select(i => MathF.Sin(i)).ToArray();

        float[][] Run(int[] which)
        {
            using var runner = TestRunners.Cpu(config, weights, blockSize: 4, blocks: 8);
            foreach (var s in which) runner.Bind(s, tables[s]);
            // Sequence 1 has an injection after layer 1 from position 1 on.
            if (which.Contains(1)) runner.SetInjection(1, vector, [1], 1, int.MaxValue);
            var first = runner.ForwardEager(which.Select(s => new EagerSequence(s, prompts[s], 0)).ToList());
            var next = which.Select((s, i) => Sampler.ArgMax(first.LogitRow(i))).ToArray();
            var second = runner.ForwardEager(which.Select((s, i) => new EagerSequence(s, [next[i]], prompts[s].Length)).ToList());
            return which.Select((s, i) => first.LogitRow(i).ToArray().Concat(second.LogitRow(i).ToArray()).ToArray()).ToArray();
        }

        var batched = Run([0, 1, 2]);
        for (var s = 0; s < 3; s++)
        {
            var alone = Run([s])[0];
            Assert.Equal(alone, batched[s]);
        }
    }

    [Fact]
    public void InjectionChangesOnlyItsSequenceFromItsStartPosition()
    {
        var config = Config(32, 2, 4, 2, 8, 4, 2, null);
        using var checkpoint = Checkpoint.CreateDummy(config, DType.F32, seed: 11);
        var weights = MixtralWeights.Resolve(checkpoint, config);
        int[] ids = [1, 7, 9, 11, 13];
        var vector = Enumerable.Repeat(0.5f, 32).ToArray();
        using var runner = TestRunners.Cpu(config, weights, blockSize: 4, blocks: 4, threads: 1);
        runner.Bind(0, 0, 1);
        var plain = runner.Forward(ids);
        runner.SetInjection(0, vector, [0], 3, int.MaxValue);
        var injected = runner.Forward(ids);
        for (var i = 0; i < 3; i++) Assert.Equal(plain.LogitRow(i).ToArray(), injected.LogitRow(i).ToArray());
        for (var i = 3; i < 5; i++) Assert.NotEqual(plain.LogitRow(i).ToArray(), injected.LogitRow(i).ToArray());
        // Layer 0's router sees the stream before the add; layer 1's sees it after.
        Assert.Equal(plain.EntropyRow(4)[0], injected.EntropyRow(4)[0]);
        Assert.NotEqual(plain.EntropyRow(4)[1], injected.EntropyRow(4)[1]);
    }

    /// <summary>
    /// The router probe inside the step: every row's router probabilities (eager) and its probe sum Σ_l Σ_e w[l, e]·p[l, e]
    /// equal the scalar oracle's, and a sampling step reports its last row's sum, for shapes of 3 to 6 experts.
    /// </summary>
    [Theory]
    [MemberData(nameof(Shapes))]
    public void RouterProbeSumsMatchTheScalarOracle(int hidden, int layers, int heads, int kvHeads, int headDim, int experts, int topK, int? window, DType dtype)
    {
        var config = Config(hidden, layers, heads, kvHeads, headDim, experts, topK, window);
        using var checkpoint = Checkpoint.CreateDummy(config, dtype, seed: 5);
        var weights = MixtralWeights.Resolve(checkpoint, config);
        var rng = new SplitMix64(9);
        var probe = Enumerable.Range(0, layers * experts).Select(_ => (float)(3 * rng.NextGaussian())).ToArray();
        int[] ids = [1, 5, 9, 33, 2, 96, 40, 40, 7, 12, 0];
        var oracle = ScalarOracle.RouterProbabilities(config, weights, ids);
        double OracleSum(int position)
        {
            double z = 0;
            for (var l = 0; l < layers; l++)
                for (var e = 0; e < experts; e++) z += probe[l * experts + e] * oracle[position][l][e];
            return z;
        }

        using (var runner = TestRunners.Cpu(config, weights, blockSize: 4, blocks: 8, routerProbe: probe))
        {
            runner.Bind(0, 3, 0, 6);
            var output = runner.Forward(ids);
            for (var i = 0; i < ids.Length; i++)
            {
                for (var l = 0; l < layers; l++)
                    for (var e = 0; e < experts; e++)
                        Assert.True(Math.Abs(output.RouterProbsRow(i)[l * experts + e] - oracle[i][l][e]) < 1e-6, $"row {i} layer {l} expert {e}");
                Assert.True(Math.Abs(output.ProbeLogits[i] - OracleSum(i)) < 1e-4, $"row {i}: {output.ProbeLogits[i]} vs {OracleSum(i)}");
            }
        }

        // A sampling step of the whole prompt: the sequence's output is its last row's sum.
        using (var runner = TestRunners.Cpu(config, weights, blockSize: 4, blocks: 8, routerProbe: probe))
        {
            runner.Bind(0, 3, 0, 6);
            var s = runner.State;
            s.Sequences = 1;
            s.Rows = ids.Length;
            s.SeqSlot[0] = 0;
            s.QueryStart[0] = 0;
            s.QueryStart[1] = ids.Length;
            s.SeqFlags[0] = StepState.FlagSample;
            for (var j = 0; j < ids.Length; j++)
            {
                s.TokenIds[j] = ids[j];
                s.Positions[j] = j;
            }
            runner.Execute();
            Assert.Equal(SampleStatus.Ok, s.OutStatus[0]);
            Assert.True(Math.Abs(s.OutProbeLogit[0] - OracleSum(ids.Length - 1)) < 1e-4, $"{s.OutProbeLogit[0]} vs {OracleSum(ids.Length - 1)}");
        }
    }

    [Fact]
    public void DotMatchesTheScalarReference()
    {
        var rng = new SplitMix64(5);
        foreach (var n in new[] { 0, 1, 7, 8, 31, 64, 100, 1027 })
        {
            var a = Enumerable.Range(0, n).Select(_ => (float)rng.NextGaussian()).ToArray();
            var b = Enumerable.Range(0, n).Select(_ => (float)rng.NextGaussian()).ToArray();
            Assert.True(Math.Abs(Kernels.Dot(a, b) - Kernels.DotReference(a, b)) < 1e-4 * Math.Max(1, Math.Sqrt(n)), $"n={n}");
        }
    }
}
