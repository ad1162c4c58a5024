using MoeRagInject.Model;

namespace MoeRagInject.Backend;

/// <summary>
/// A tensor that lives where its backend computes: a weight (in the element type the backend keeps) or an activation
/// buffer of fixed size [rows, columns], allocated once by the runner and reused by every step.
/// </summary>
public abstract class DeviceTensor : IDisposable
{
    public abstract int Rows { get; }
    public abstract int Columns { get; }

    public void Dispose()
    {
        Dispose(disposing: true);
        GC.SuppressFinalize(this);
    }

    protected virtual void Dispose(bool disposing)
    {
    }
}

/// <summary>All experts of one MoE layer stacked as [E, …], so that expert ids read from device memory select the weights.</summary>
public abstract class ExpertStack : IDisposable
{
    public abstract int Count { get; }
    public abstract int Hidden { get; }
    public abstract int Intermediate { get; }

    public void Dispose()
    {
        Dispose(disposing: true);
        GC.SuppressFinalize(this);
    }

    protected virtual void Dispose(bool disposing)
    {
    }
}

/// <summary>The KV cache of every layer, in blocks of <see cref="BlockSize"/> positions (paged: a slot's block table maps positions to blocks).</summary>
public interface IKvCache : IDisposable
{
    int NumBlocks { get; }
    int BlockSize { get; }
}

/// <summary>
/// The device copy of a <see cref="StepState"/>. On the CPU the host arrays are the device arrays; a GPU backend keeps
/// fixed device buffers at fixed addresses (what a captured graph reads and writes) and moves the host arrays in and out
/// of them in one copy each way per step.
/// </summary>
public interface IStepBuffers : IDisposable
{
    StepState Host { get; }

    /// <summary>Copies the step's inputs (and whatever per-slot state changed since the last step) to the device.</summary>
    void Upload();

    /// <summary>Copies the step's results (tokens, logprobs, entropies, status) back into <see cref="Host"/>.</summary>
    void Download();

    /// <summary>
    /// Copies every row's router entropies, router probabilities and probe sums into <see cref="StepState.RowEntropies"/>,
    /// <see cref="StepState.RowRouterProbs"/> and <see cref="StepState.RowProbeLogits"/> (eager diagnostics only).
    /// </summary>
    void DownloadRowEntropies();

    /// <summary>The slot's injection or sampling state changed on the host; the next <see cref="Upload"/> copies it.</summary>
    void SlotChanged(int slot);

    /// <summary>A new request took the slot: its sampling state and penalty counts start afresh at the next <see cref="Upload"/>.</summary>
    void SlotBound(int slot);

    /// <summary>Entries [first, first + count) of the slot's block table changed on the host; the next <see cref="Upload"/> applies them.</summary>
    void BlocksChanged(int slot, int first, int count);

    /// <summary>An output token of the slot was accepted (its penalty count grows); the next <see cref="Upload"/> applies it.</summary>
    void TokenAccepted(int slot, int token);
}

/// <summary>
/// The compute operations the model is written against. The model code never knows which backend runs it; the CPU backend
/// runs them with SIMD kernels, a GPU backend enqueues kernels on its stream (so that a step can be captured as a graph).
/// <para>
/// Activations: <c>hidden</c> is the fp32 residual stream [rows, hidden]; other activations are in whatever precision the
/// backend computes in. Every op takes the number of rows to compute explicitly: a graph replays a fixed row count, and rows
/// past the real batch (padding) are computed harmlessly and never written into the KV cache (their KV slot is −1).
/// </para>
/// </summary>
public interface IBackend : IDisposable
{
    /// <summary>"cpu", "cuda".</summary>
    string Name { get; }

    /// <summary>What the backend runs on, for logs and /get_model_info: "cpu (16 threads)", "cuda:0 NVIDIA H200 (sm_90, 140 GB)".</summary>
    string Description { get; }

    /// <summary>Bytes the backend may use for weights and KV cache (host memory available, or free device memory).</summary>
    long AvailableMemoryBytes { get; }

    /// <summary>Bytes per element of weights as this backend stores a tensor of <paramref name="dtype"/>.</summary>
    int WeightBytesPerElement(DType dtype);

    /// <summary>Bytes one position of KV cache takes at one layer (keys and values of every KV head).</summary>
    long KvBytesPerTokenPerLayer(int kvHeads, int headDim);

    /// <summary>A weight [Σ rows, columns]: the parts' rows one after another (fused q/k/v projections, say).</summary>
    DeviceTensor UploadWeight(params TensorView[] parts);

    /// <summary>One layer's experts, stacked.</summary>
    ExpertStack UploadExperts(IReadOnlyList<ExpertWeights> experts);

    /// <summary>An activation buffer of <paramref name="rows"/> × <paramref name="columns"/> (contents undefined).</summary>
    /// <param name="kind">What it holds: a GPU keeps GEMM inputs in bf16, everything else in fp32; the CPU keeps all in fp32.</param>
    DeviceTensor Allocate(int rows, int columns, ActivationKind kind = ActivationKind.Float32);

    /// <summary>Bytes of activations and scratch a runner of these sizes needs besides weights and KV cache.</summary>
    long WorkspaceBytes(ModelConfig config, int maxRows, int maxSequences);

    IKvCache CreateKvCache(int layers, int numBlocks, int blockSize, int kvHeads, int headDim);

    /// <summary>The device side of the runner's step state, allocated once.</summary>
    IStepBuffers CreateStepBuffers(StepState host);

    /// <summary>Copies the first <paramref name="rows"/> rows of an activation to the host (eager diagnostics and tests).</summary>
    void Download(DeviceTensor source, int rows, Span<float> destination);

    /// <summary>Writes host values into an activation's first rows (rounded to bf16 where the backend keeps it so; tests).</summary>
    void Upload(ReadOnlySpan<float> source, DeviceTensor destination);

    /// <summary>hidden[r] = table[tokenIds[r]].</summary>
    void Embed(DeviceTensor table, IStepBuffers step, DeviceTensor hidden, int rows);

    /// <summary>output[r] = weight ⊙ x[r] / sqrt(mean(x[r]²) + eps).</summary>
    void RmsNorm(DeviceTensor x, DeviceTensor weight, float eps, DeviceTensor output, int rows);

    /// <summary>residual[r] += delta[r]; output[r] = rmsnorm(residual[r]) with <paramref name="weight"/>.</summary>
    void AddRmsNorm(DeviceTensor residual, DeviceTensor delta, DeviceTensor weight, float eps, DeviceTensor output, int rows);

    /// <summary>output[r] = W · x[r] (W is [out, in], as PyTorch stores Linear weights).</summary>
    void Linear(DeviceTensor x, DeviceTensor weight, DeviceTensor output, int rows);

    /// <summary>
    /// qkv[r] holds q (heads × headDim), then k and v (kvHeads × headDim each). Rotates q and k in place (the rotate-half
    /// RoPE of Llama/Mixtral, at each row's position) and writes k and v into the cache at each row's KV slot.
    /// </summary>
    void RotaryAndCacheWrite(DeviceTensor qkv, IKvCache cache, int layer, AttentionShape shape, IStepBuffers step, int rows);

    /// <summary>
    /// output[r] = attention of row r's query over its sequence's cached keys and values: causal, grouped-query (query head h
    /// reads KV head h / (heads / kvHeads)), keys at positions &gt; p − window when a window is set.
    /// </summary>
    void Attention(DeviceTensor qkv, IKvCache cache, int layer, AttentionShape shape, IStepBuffers step, DeviceTensor output, int rows);

    /// <summary>
    /// The router: softmax over all experts of W·x[r] in fp32, its entropy −Σ p ln p recorded for (row, layer) (hook point
    /// <c>router_logits-l</c>), the top-k experts and their probabilities renormalised over the k, kept for <see cref="MoeExperts"/>.
    /// </summary>
    void Route(DeviceTensor x, DeviceTensor routerWeight, int layer, int topK, IStepBuffers step, int rows);

    /// <summary>
    /// <see cref="AddRmsNorm"/>, then <see cref="Route"/> on its output: the post-attention norm and the router of a layer,
    /// fused where the backend can (the same results as the two ops).
    /// </summary>
    void AddRmsNormRoute(DeviceTensor residual, DeviceTensor delta, DeviceTensor weight, float eps, DeviceTensor output,
        DeviceTensor routerWeight, int layer, int topK, IStepBuffers step, int rows);

    /// <summary>
    /// The router probe, right after <see cref="Route"/> of the same layer and input: row r's softmax over all experts p (as
    /// Route computes it) is recorded at (row, layer) in <see cref="StepState.RowRouterProbs"/>, and Σ_e probe[layer, e]·p_e is
    /// added to the row's <see cref="StepState.RowProbeLogits"/> (set at layer 0). At the model's last layer each sequence's
    /// last row also writes its sum to <see cref="StepState.OutProbeLogit"/>. Padding rows get 0. <paramref name="probe"/> is an
    /// fp32 activation [layers, experts] holding the weights, at a fixed address (what a captured graph reads).
    /// </summary>
    void RouterProbe(DeviceTensor x, DeviceTensor routerWeight, DeviceTensor probe, int layer, IStepBuffers step, int rows);

    /// <summary>output[r] = Σ_k w_k · Down_e(silu(Gate_e x[r]) ⊙ Up_e x[r]) over the experts routed by the last <see cref="Route"/>.</summary>
    void MoeExperts(DeviceTensor x, ExpertStack experts, int topK, IStepBuffers step, DeviceTensor output, int rows);

    /// <summary>
    /// x[r] += scale[slot(r), layer] · vector[slot(r)] for rows at positions in [start, end) of their slot's injection. The
    /// model adds it to the MoE output just before the residual add, so it lands in the residual stream after layer l (hook
    /// point <c>l_out-l</c>). Always run after every layer: a zero scale turns it off, so injecting never changes what runs.
    /// </summary>
    void AddInjection(DeviceTensor x, int layer, IStepBuffers step, int rows);

    /// <summary>
    /// The end of layer <paramref name="layer"/>: <see cref="AddInjection"/> on <paramref name="delta"/>, then
    /// <see cref="AddRmsNorm"/>, with the same result (residual[r] += fma(scale, vector, delta[r])) in one pass where the
    /// backend fuses them. <paramref name="delta"/> is not used afterwards and may or may not hold the injected sum.
    /// </summary>
    void AddInjectionRmsNorm(DeviceTensor residual, DeviceTensor delta, int layer, IStepBuffers step, DeviceTensor weight, float eps,
        DeviceTensor output, int rows);

    /// <summary>output[i] = x[last row of sequence i] for the step's first <paramref name="count"/> sequences.</summary>
    void GatherLastRows(DeviceTensor x, IStepBuffers step, DeviceTensor output, int count);

    /// <summary>output[i] = x[i] for every row (the eager path's "all rows are logit rows").</summary>
    void Copy(DeviceTensor x, DeviceTensor output, int rows);

    /// <summary>
    /// Samples one token per sequence from its logits row: penalties, temperature (0 = greedy), top-k, top-p and min-p from
    /// the sequence's slot, drawn with the step's uniform for it; writes the token, its log-probability, the output
    /// distribution's entropy, the router entropies of its sampling row, and a status (non-finite logits are reported, not sampled).
    /// </summary>
    void Sample(DeviceTensor logits, IStepBuffers step, int count);
}

/// <summary>What an activation buffer holds, so that a backend can choose its precision.</summary>
public enum ActivationKind
{
    /// <summary>The residual stream, GEMM outputs, logits: fp32 everywhere.</summary>
    Float32,
    /// <summary>The input of a projection (normed activations, attention output): bf16 on a GPU.</summary>
    GemmInput,
}

/// <summary>A backend that can record a step's ops once and replay them (CUDA graphs).</summary>
public interface IGraphCapable
{
    /// <summary>Whether a step of <paramref name="rows"/> decode rows runs only capturable ops (no host synchronisation).</summary>
    bool CanCapture(int rows);

    /// <summary>Records what <paramref name="enqueue"/> enqueues, without running it, as a replayable graph.</summary>
    IDisposable Capture(Action enqueue);

    void Replay(IDisposable graph);
}

/// <summary>The attention geometry of a model, passed to the attention ops.</summary>
public readonly record struct AttentionShape(int Heads, int KvHeads, int HeadDim, float RopeTheta, int? SlidingWindow)
{
    public int QWidth => Heads * HeadDim;
    public int KvWidth => KvHeads * HeadDim;
    public int QkvWidth => QWidth + 2 * KvWidth;
}
