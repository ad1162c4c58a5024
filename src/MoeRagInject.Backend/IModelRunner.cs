using MoeRagInject.Model;

namespace MoeRagInject.Backend;

/// <summary>
/// Owns the device side of serving one model: weights, KV pool, the fixed step buffers and the per-slot state, and runs
/// steps. The engine fills <see cref="State"/>'s inputs (rows, sequences, sampling rows, draws), calls <see cref="Execute"/>,
/// and reads back only what it needs: a token per sampling sequence, the router entropies of its row, and a logprob or
/// output entropy when asked. Per-request state is set and cleared by slot, never copied per step.
/// </summary>
public interface IModelRunner : IDisposable
{
    /// <summary>What the runner computes on, as reported by /get_model_info: "cpu (16 threads)", "cuda:0 NVIDIA H200 …", "null".</summary>
    string Device { get; }

    ModelConfig Config { get; }

    RunnerLimits Limits { get; }

    StepState State { get; }

    /// <summary>Gives <paramref name="slot"/> to a new request: its sampling parameters and the prompt for the repetition penalty; clears its injection and counts.</summary>
    void BindSlot(int slot, SlotSampling sampling, ReadOnlySpan<int> promptIds);

    /// <summary>Writes KV block ids into the slot's block table from entry <paramref name="firstIndex"/> on.</summary>
    void SetBlocks(int slot, int firstIndex, ReadOnlySpan<int> blocks);

    /// <summary>
    /// Adds <paramref name="vector"/> (already scaled) after <paramref name="layers"/> at positions [start, end) of the slot's
    /// sequence. With K vectors of the hidden size one after the other (a projector with one vector an answer position),
    /// vector p − <paramref name="answerBase"/> at position p, none from answerBase + K on; each step then holds at most one
    /// row of the slot at those positions (decode rows), and the runner writes that row's vector into the slot's injection.
    /// </summary>
    void SetInjection(int slot, ReadOnlySpan<float> vector, IReadOnlyList<int> layers, int start, int end, int answerBase = -1);

    void ClearInjection(int slot);

    /// <summary>An output token of the slot was accepted by the engine (frequency and presence penalties count it).</summary>
    void AcceptToken(int slot, int token);

    /// <summary>Runs the step that <see cref="State"/>'s inputs describe and fills its outputs.</summary>
    void Execute();

    /// <summary>
    /// Eager diagnostics (never graphed): runs the sequences as one step and returns the logits of their logit rows (every
    /// row of an <see cref="EagerSequence.AllLogits"/> sequence, else its last), every row's router entropies, and the
    /// residual stream after <paramref name="captureLayers"/> (hook point <c>l_out-l</c>) at the logit rows.
    /// </summary>
    EagerResult ForwardEager(IReadOnlyList<EagerSequence> sequences, IReadOnlyList<int>? captureLayers = null);
}

/// <summary>One sequence of an eager step: tokens at positions StartPosition.. of the slot's sequence.</summary>
public sealed record EagerSequence(int Slot, IReadOnlyList<int> TokenIds, int StartPosition, bool AllLogits = false);

/// <summary>Result of <see cref="IModelRunner.ForwardEager"/>.</summary>
/// <param name="Logits">[logitRow, vocab].</param>
/// <param name="RowEntropies">[row, layer] for every row of the step.</param>
/// <param name="Captured">[logitRow, captured layer, hidden], or null.</param>
public sealed record EagerResult(float[] Logits, int VocabSize, float[] RowEntropies, int Layers, float[]? Captured)
{
    public int Experts { get; init; }
    /// <summary>[row, layer, expert]: the router's softmax over all experts of every row of the step.</summary>
    public float[] RouterProbs { get; init; } = [];
    /// <summary>[row]: the router probe's per-token sum Σ w·p (0 everywhere when the runner has no probe).</summary>
    public float[] ProbeLogits { get; init; } = [];

    public ReadOnlySpan<float> LogitRow(int i) => Logits.AsSpan(i * VocabSize, VocabSize);
    public ReadOnlySpan<float> EntropyRow(int row) => RowEntropies.AsSpan(row * Layers, Layers);
    /// <summary>Row <paramref name="row"/>'s router probabilities, [layer, expert].</summary>
    public ReadOnlySpan<float> RouterProbsRow(int row) => RouterProbs.AsSpan(row * Layers * Experts, Layers * Experts);
}

/// <summary>How a runner is sized; the runner decides its <see cref="RunnerLimits"/> from these and its device.</summary>
public sealed record RunnerOptions
{
    /// <summary>Slots: requests running at once (--max-running-requests).</summary>
    public int MaxSequences { get; init; } = 16;
    /// <summary>Rows (tokens) a step may compute: the per-step token budget of chunked prefill.</summary>
    public int MaxRows { get; init; } = 2048;
    public int ContextLength { get; init; } = 4096;
    public int BlockSize { get; init; } = 16;
    /// <summary>KV pool size in tokens; null sizes it from the device's memory.</summary>
    public long? KvCacheTokens { get; init; }
    /// <summary>Share of the device's memory that weights plus KV pool may take (--mem-fraction-static).</summary>
    public double MemFractionStatic { get; init; } = 0.9;
    /// <summary>Largest decode batch replayed from a captured graph (--cuda-graph-max-bs).</summary>
    public int CudaGraphMaxBatchSize { get; init; } = 256;
    public bool DisableCudaGraph { get; init; }
    /// <summary>Batch-invariant kernels: a request's tokens do not depend on what runs beside it.</summary>
    public bool Deterministic { get; init; }
    /// <summary>
    /// The router probe's weights [layer, expert] (--trigger-signal router-probe): when set, every step computes each row's
    /// probe sum right after the routers (<see cref="IBackend.RouterProbe"/>) and reports the sampling rows' in
    /// <see cref="StepState.OutProbeLogit"/>; null leaves the probe out of the steps (eager diagnostics still record probabilities).
    /// </summary>
    public IReadOnlyList<float>? RouterProbe { get; init; }
    /// <summary>How the experts' weights lie in device memory (--expert-layout).</summary>
    public ExpertLayout ExpertLayout { get; init; }
}

/// <summary>
/// --expert-layout: the experts' weights row-major as the checkpoint holds them, or in the boxed layout (Hopper GPUs: each
/// 128-row × 64-column tile contiguous and pre-swizzled, read by plain bulk copies), which shortens decode steps and
/// lengthens prefill (docs/performance.md, session 29).
/// </summary>
public enum ExpertLayout { RowMajor, Boxed }

/// <summary>Where a runner's weights come from.</summary>
public abstract record WeightSource;

/// <summary>The tensors of a checkpoint folder (memory-mapped), resolved into the Mixtral layout.</summary>
public sealed record CheckpointWeights(MixtralWeights Weights, long TotalBytes, DType DType) : WeightSource;

/// <summary>Random weights of the config's shapes (benchmarks): uniform with standard deviation 0.02, norms 1, from a seed.</summary>
public sealed record DummyWeights(ulong Seed) : WeightSource;

/// <summary>Builds a runner on one kind of device: what --device chooses.</summary>
public interface IRunnerFactory
{
    /// <summary>The --device value this factory answers to: "cpu", "cuda", "null".</summary>
    string Device { get; }

    /// <summary>
    /// Checks that the weights and the smallest useful KV pool (one full context) fit the device before anything is
    /// loaded (an <see cref="InsufficientMemoryException"/> names both), then loads or generates the weights, reporting
    /// progress, and sizes the KV pool.
    /// </summary>
    IModelRunner Create(ModelConfig config, WeightSource weights, RunnerOptions options, Action<string>? progress = null);

    /// <summary>The prefill chunk (--chunked-prefill-size) when none is given: 2,048 tokens unless the device says otherwise.</summary>
    int DefaultChunkedPrefillSize => 2048;
}

/// <summary>Memory arithmetic every runner shares: what the weights and KV cache of a config take.</summary>
public static class MemoryPlan
{
    /// <summary>Elements of every weight of the Mixtral layout (embedding, attention, router, experts, norms, LM head).</summary>
    public static long WeightElements(ModelConfig c)
    {
        long h = c.HiddenSize, q = (long)c.NumHeads * c.HeadDim, kv = (long)c.NumKvHeads * c.HeadDim;
        var perLayer = 2 * h + h * q + 2 * h * kv + q * h + (long)c.NumExperts * h + (long)c.NumExperts * 3 * h * c.IntermediateSize;
        var lmHead = c.TieWordEmbeddings ? 0 : (long)c.VocabSize * h;
        return (long)c.VocabSize * h + c.NumLayers * perLayer + h + lmHead;
    }

    /// <summary>Throws when the weights plus one context of KV cache exceed what the device has.</summary>
    public static void EnsureFits(string device, long weightBytes, long kvBytesPerToken, int contextLength, long availableBytes)
    {
        var kv = kvBytesPerToken * contextLength;
        if (weightBytes + kv > availableBytes)
            throw new InsufficientMemoryException(string.Create(System.Globalization.CultureInfo.InvariantCulture,
                $"the model does not fit {device}: its weights need {Gb(weightBytes)} and one context of KV cache ({contextLength} tokens) {Gb(kv)}, {Gb(weightBytes + kv)} in all, but {Gb(availableBytes)} is available"));
    }

    public static string Gb(long bytes) => string.Create(System.Globalization.CultureInfo.InvariantCulture, $"{bytes / 1e9:F2} GB");
}
