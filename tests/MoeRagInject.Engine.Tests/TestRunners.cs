using MoeRagInject.Backend.Cpu;
using MoeRagInject.Backend;
using MoeRagInject.Model;

namespace MoeRagInject.Engine.Tests;

/// <summary>CPU model runners for the forward-pass tests: a few slots over a small KV pool.</summary>
internal static class TestRunners
{
    public static ModelRunner Cpu(ModelConfig config, MixtralWeights weights, int slots = 4, int blockSize = 16, int blocks = 64,
        int threads = 2, IReadOnlyList<float>? routerProbe = null)
    {
        var backend = new CpuBackend(threads);
        var limits = ModelRunner.Plan(backend, config, 0, new RunnerOptions
        {
            MaxSequences = slots,
            MaxRows = 512,
            ContextLength = blocks * blockSize,
            BlockSize = blockSize,
            KvCacheTokens = blocks * blockSize,
        });
        return new ModelRunner(backend, config, weights, limits, options: new RunnerOptions { RouterProbe = routerProbe });
    }

    /// <summary>Gives slot <paramref name="slot"/> the blocks 0, 1, 2, … of the pool (or those named), greedy sampling and no injection.</summary>
    public static void Bind(this IModelRunner runner, int slot, params int[] blocks)
    {
        runner.BindSlot(slot, SlotSampling.Greedy, []);
        runner.SetBlocks(slot, 0, blocks.Length > 0 ? blocks : Enumerable.Range(0, runner.Limits.MaxBlocksPerSequence).ToArray());
    }

    /// <summary>One eager step of one sequence in slot 0.</summary>
    public static EagerResult Forward(this IModelRunner runner, IReadOnlyList<int> ids, int start = 0, bool allLogits = true) =>
        runner.ForwardEager([new EagerSequence(0, ids, start, allLogits)]);
}
