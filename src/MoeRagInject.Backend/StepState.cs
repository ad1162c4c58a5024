using MoeRagInject.Model;

namespace MoeRagInject.Backend;

/// <summary>What a runner was built for: the sizes of its fixed buffers and of its KV pool.</summary>
/// <param name="MaxSequences">Slots: requests that may hold per-request state (injection, sampling, block table) at once.</param>
/// <param name="MaxRows">Rows (tokens) one step computes at most.</param>
/// <param name="MaxBlocksPerSequence">Columns of the block tables: the context length in blocks.</param>
/// <param name="NumKvBlocks">Blocks in the KV pool.</param>
/// <param name="KvBytesPerToken">Bytes one position of KV cache takes over all layers.</param>
/// <param name="WeightBytes">Bytes the weights take on the device.</param>
public sealed record RunnerLimits(
    int MaxSequences, int MaxRows, int MaxBlocksPerSequence, int BlockSize, int NumKvBlocks, long KvBytesPerToken, long WeightBytes)
{
    public int ContextLength => MaxBlocksPerSequence * BlockSize;
    public long KvTokens => (long)NumKvBlocks * BlockSize;
}

/// <summary>A request's sampling parameters as the runner applies them (sglang's, in its order).</summary>
public sealed record SlotSampling
{
    /// <summary>0 means greedy.</summary>
    public float Temperature { get; init; } = 1;
    public float TopP { get; init; } = 1;
    /// <summary>≤ 0 means all tokens.</summary>
    public int TopK { get; init; } = -1;
    public float MinP { get; init; }
    public float RepetitionPenalty { get; init; } = 1;
    public float FrequencyPenalty { get; init; }
    public float PresencePenalty { get; init; }
    /// <summary>Token ids masked while the sequence's flag <see cref="StepState.FlagSuppressStops"/> is set (min_new_tokens).</summary>
    public IReadOnlyList<int> SuppressedIds { get; init; } = [];

    public static SlotSampling Greedy { get; } = new() { Temperature = 0 };

    public bool IsGreedy => Temperature == 0 || TopK == 1;
    public bool HasPenalties => RepetitionPenalty != 1 || FrequencyPenalty != 0 || PresencePenalty != 0;
}

/// <summary>Per-slot penalty state: the prompt's tokens (repetition penalty) and the counts of accepted output tokens.</summary>
public sealed class SlotPenalties
{
    public HashSet<int> PromptTokens { get; } = [];
    public Dictionary<int, int> OutputCounts { get; } = [];

    public void Reset(ReadOnlySpan<int> prompt)
    {
        PromptTokens.Clear();
        foreach (var id in prompt) PromptTokens.Add(id);
        OutputCounts.Clear();
    }
}

/// <summary>Outcome of sampling one sequence in a step.</summary>
public enum SampleStatus : byte
{
    Ok = 0,
    /// <summary>The sequence produced no token this step (a prefill chunk short of its end).</summary>
    NoToken = 1,
    /// <summary>Its logits held NaN or +∞ (a broken injection, or a model fault): no token was sampled.</summary>
    NonFinite = 2,
    /// <summary>The sampler failed for this sequence alone.</summary>
    SamplerFailed = 3,
}

/// <summary>
/// The runner's persistent step inputs and outputs as flat host arrays, sized once from <see cref="RunnerLimits"/>: nothing
/// is allocated per step. Per-row arrays cover the step's rows, per-sequence arrays its sequences (in step order), per-slot
/// arrays every slot (state that lives as long as the request: block table, injection, sampling). A GPU backend mirrors
/// each array in a device buffer of the same shape (<see cref="IStepBuffers"/>).
/// </summary>
public sealed class StepState
{
    /// <summary>Sequence flag: mask the slot's <see cref="SlotSampling.SuppressedIds"/> (min_new_tokens not yet reached).</summary>
    public const byte FlagSuppressStops = 1;
    /// <summary>Sequence flag: report the sampled token's log-probability.</summary>
    public const byte FlagLogprob = 2;
    /// <summary>Sequence flag: report the entropy of the output distribution.</summary>
    public const byte FlagOutputEntropy = 4;
    /// <summary>Sequence flag: make the sampler fail for this sequence (fault-isolation tests).</summary>
    public const byte FlagFailSampling = 8;
    /// <summary>Sequence flag: the step ends at the sequence's last known token, so it samples the next one.</summary>
    public const byte FlagSample = 16;
    /// <summary>Sequence flag: report the <see cref="MaxTopLogprobs"/> most likely tokens and their log-probabilities.</summary>
    public const byte FlagTopLogprobs = 32;

    /// <summary>Most alternatives a step reports per token (OpenAI's cap on top_logprobs); a request takes the first k of them.</summary>
    public const int MaxTopLogprobs = 20;

    public StepState(RunnerLimits limits, ModelConfig config)
    {
        Limits = limits;
        Config = config;
        var hiddenSize = config.HiddenSize;
        var layers = config.NumLayers;
        int rows = limits.MaxRows, seqs = limits.MaxSequences;
        TokenIds = new int[rows];
        Positions = new int[rows];
        KvSlots = new int[rows];
        RowSequence = new int[rows];
        SeqSlot = new int[seqs];
        QueryStart = new int[seqs + 1];
        ContextLength = new int[seqs];
        Uniform = new float[seqs];
        SeqFlags = new byte[seqs];
        BlockTables = new int[seqs * limits.MaxBlocksPerSequence];
        InjectionVectors = new float[seqs * hiddenSize];
        InjectionScales = new float[seqs * layers];
        InjectionStart = new int[seqs];
        InjectionEnd = new int[seqs];
        Sampling = new SlotSampling[seqs];
        Penalties = new SlotPenalties[seqs];
        for (var s = 0; s < seqs; s++)
        {
            Sampling[s] = SlotSampling.Greedy;
            Penalties[s] = new SlotPenalties();
        }
        RowEntropies = new float[rows * layers];
        RowRouterProbs = new float[rows * layers * config.NumExperts];
        RowProbeLogits = new float[rows];
        OutTokens = new int[seqs];
        OutLogprobs = new float[seqs];
        OutOutputEntropy = new float[seqs];
        OutRouterEntropy = new float[seqs * layers];
        OutProbeLogit = new float[seqs];
        OutStatus = new SampleStatus[seqs];
        OutTopIds = new int[seqs * MaxTopLogprobs];
        OutTopLogprobs = new float[seqs * MaxTopLogprobs];
    }

    public RunnerLimits Limits { get; }
    public ModelConfig Config { get; }
    public int HiddenSize => Config.HiddenSize;
    public int Layers => Config.NumLayers;
    public int VocabSize => Config.VocabSize;
    public int ExpertsPerToken => Config.NumExpertsPerToken;
    public int Experts => Config.NumExperts;

    /// <summary>Rows and sequences of the current step.</summary>
    public int Rows { get; set; }
    public int Sequences { get; set; }

    // Per row.
    public int[] TokenIds { get; }
    public int[] Positions { get; }
    /// <summary>Where the row's keys and values go: block × blockSize + offset; −1 for padding rows (nothing is written).</summary>
    public int[] KvSlots { get; }
    /// <summary>Index into the per-sequence arrays of each row's sequence.</summary>
    public int[] RowSequence { get; }

    // Per sequence of the step.
    /// <summary>The sequence's slot (index into the per-slot arrays); −1 for padding.</summary>
    public int[] SeqSlot { get; }
    /// <summary>[Sequences + 1] cumulative row starts: the sequence's rows are QueryStart[i] .. QueryStart[i + 1].</summary>
    public int[] QueryStart { get; }
    /// <summary>Positions visible to the sequence's last row plus one (its first row's position + its row count).</summary>
    public int[] ContextLength { get; }
    /// <summary>The sequence's U[0, 1) draw for sampling (from its own seeded generator).</summary>
    public float[] Uniform { get; }
    public byte[] SeqFlags { get; }

    // Per slot.
    /// <summary>[slot, MaxBlocksPerSequence]: KV blocks of the slot's sequence in position order.</summary>
    public int[] BlockTables { get; }
    /// <summary>[slot, hidden]: the vector added to the residual stream (already scaled by α).</summary>
    public float[] InjectionVectors { get; }
    /// <summary>[slot, layer]: 1 where the vector is added after that layer, else 0.</summary>
    public float[] InjectionScales { get; }
    /// <summary>[slot]: positions in [start, end) receive the injection.</summary>
    public int[] InjectionStart { get; }
    public int[] InjectionEnd { get; }
    public SlotSampling[] Sampling { get; }
    public SlotPenalties[] Penalties { get; }

    // Outputs.
    /// <summary>[row, layer]: router entropy of every row (device side; on the host after <see cref="IStepBuffers.DownloadRowEntropies"/>).</summary>
    public float[] RowEntropies { get; }
    /// <summary>
    /// [row, layer, expert]: every row's router softmax over all experts, as the router probe saw it (device side; on the host
    /// after <see cref="IStepBuffers.DownloadRowEntropies"/>; written in steps that run the probe, which eager steps always do).
    /// </summary>
    public float[] RowRouterProbs { get; }
    /// <summary>[row]: the router probe's per-token sum Σ_l Σ_e w[l, e]·p[l, e] (device side, as <see cref="RowRouterProbs"/>).</summary>
    public float[] RowProbeLogits { get; }
    /// <summary>[sequence]: the sampled token, or −1. Every sequence's last row is gathered for the LM head; only those flagged <see cref="FlagSample"/> sample.</summary>
    public int[] OutTokens { get; }
    public float[] OutLogprobs { get; }
    public float[] OutOutputEntropy { get; }
    /// <summary>[sequence, layer]: router entropies of the sequence's sampling row.</summary>
    public float[] OutRouterEntropy { get; }
    /// <summary>[sequence]: the router probe's per-token sum of the sequence's last row (0 when the runner has no probe).</summary>
    public float[] OutProbeLogit { get; }
    public SampleStatus[] OutStatus { get; }
    /// <summary>
    /// [sequence, <see cref="MaxTopLogprobs"/>]: for sequences flagged <see cref="FlagTopLogprobs"/>, the most likely token ids
    /// by logit (ties by lower id), −1 past the vocabulary, and their log-probabilities under the same distribution as
    /// <see cref="OutLogprobs"/> (log-softmax of the raw logits).
    /// </summary>
    public int[] OutTopIds { get; }
    public float[] OutTopLogprobs { get; }

    public Span<int> BlockTable(int slot) => BlockTables.AsSpan(slot * Limits.MaxBlocksPerSequence, Limits.MaxBlocksPerSequence);

    public Span<float> InjectionVector(int slot) => InjectionVectors.AsSpan(slot * HiddenSize, HiddenSize);

    public Span<float> InjectionScale(int slot) => InjectionScales.AsSpan(slot * Layers, Layers);

    public ReadOnlySpan<float> RouterEntropyOf(int sequence) => OutRouterEntropy.AsSpan(sequence * Layers, Layers);

    /// <summary>Row <paramref name="row"/>'s router probabilities at every layer, [layer, expert].</summary>
    public Span<float> RouterProbsOf(int row) => RowRouterProbs.AsSpan(row * Layers * Experts, Layers * Experts);

    public Span<int> TopIdsOf(int sequence) => OutTopIds.AsSpan(sequence * MaxTopLogprobs, MaxTopLogprobs);

    public Span<float> TopLogprobsOf(int sequence) => OutTopLogprobs.AsSpan(sequence * MaxTopLogprobs, MaxTopLogprobs);

    /// <summary>KV slot of <paramref name="position"/> in <paramref name="slot"/>'s block table.</summary>
    public int KvSlotOf(int slot, int position)
    {
        var bs = Limits.BlockSize;
        return BlockTables[slot * Limits.MaxBlocksPerSequence + position / bs] * bs + position % bs;
    }
}
