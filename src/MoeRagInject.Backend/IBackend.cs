using MoeRagInject.Model;

namespace MoeRagInject.Backend;

/// <summary>
/// A tensor that lives where its backend computes. Activations are fp32 row-major [rows, columns];
/// weights keep the checkpoint's element type.
/// </summary>
public abstract class DeviceTensor : IDisposable
{
    public abstract int Rows { get; }
    public abstract int Columns { get; }
    public virtual void Dispose() => GC.SuppressFinalize(this);
}

/// <summary>The KV cache of every layer, in blocks of <see cref="BlockSize"/> positions (paged: a sequence's block table maps positions to blocks).</summary>
public interface IKvCache : IDisposable
{
    int NumBlocks { get; }
    int BlockSize { get; }
}

/// <summary>One expert's weights as uploaded to the backend.</summary>
public sealed record ExpertTensors(DeviceTensor Gate, DeviceTensor Up, DeviceTensor Down);

/// <summary>
/// The per-step inputs and outputs that the backend keeps next to the activations: token ids, positions, block
/// tables, routing scratch, injection vectors and scales, and the router entropies it records.
/// A CUDA backend keeps these in fixed device buffers so that a captured graph reads and writes them.
/// </summary>
public interface IStepContext : IDisposable
{
    StepBatch Batch { get; }

    /// <summary>Router entropy (nats) of row r at MoE layer l, at [r * layers + l]; valid after the forward pass.</summary>
    void ReadEntropies(Span<float> destination);
}

/// <summary>
/// The compute operations the model is written against. The model code never knows which backend runs it;
/// a CUDA backend implements the same operations with kernels and cuBLAS.
/// </summary>
public interface IBackend : IDisposable
{
    string Name { get; }

    DeviceTensor UploadWeight(TensorView weight);

    /// <summary>fp32 scratch of <paramref name="rows"/> × <paramref name="columns"/> (contents undefined).</summary>
    DeviceTensor Allocate(int rows, int columns);

    IKvCache CreateKvCache(int layers, int numBlocks, int blockSize, int kvHeads, int headDim);

    /// <summary>Uploads the step's metadata; <paramref name="layers"/> and <paramref name="topK"/> size the routing and entropy buffers.</summary>
    IStepContext BeginStep(StepBatch batch, int layers, int topK);

    void Download(DeviceTensor source, int rows, Span<float> destination);

    /// <summary>output[r] = table[tokenIds[r]].</summary>
    void Embed(DeviceTensor table, IStepContext step, DeviceTensor output);

    /// <summary>output[r] = weight ⊙ x[r] / sqrt(mean(x[r]²) + eps), for the first <paramref name="rows"/> rows.</summary>
    void RmsNorm(DeviceTensor x, DeviceTensor weight, float eps, DeviceTensor output, int rows);

    /// <summary>output[r] = W · x[r] (W is [out, in], as PyTorch stores Linear weights).</summary>
    void Linear(DeviceTensor x, DeviceTensor weight, DeviceTensor output, int rows);

    /// <summary>Rotary embedding (the rotate-half convention of Llama/Mixtral) on every head of x, at each row's position.</summary>
    void Rotary(DeviceTensor x, int heads, int headDim, float theta, IStepContext step);

    /// <summary>
    /// Writes k and v of every row into the cache at its position, then attends: causal, grouped-query
    /// (query head h reads KV head h / (heads / kvHeads)), keys with position &gt; p − window when a window is set.
    /// </summary>
    void Attention(DeviceTensor q, DeviceTensor k, DeviceTensor v, IKvCache cache, int layer, int heads, int kvHeads, int headDim,
        int? slidingWindow, IStepContext step, DeviceTensor output);

    /// <summary>
    /// The router: softmax over all experts of W·x, the entropy −Σ p ln p recorded for (row, layer), the top-k experts
    /// and their probabilities renormalised over the k, kept in the step for <see cref="MoeExperts"/>.
    /// </summary>
    void Route(DeviceTensor x, DeviceTensor routerWeight, int layer, IStepContext step);

    /// <summary>output[r] = Σ_k w_k · Down_e(silu(Gate_e x) ⊙ Up_e x) over the experts routed by the last <see cref="Route"/>.</summary>
    void MoeExperts(DeviceTensor x, IReadOnlyList<ExpertTensors> experts, IStepContext step, DeviceTensor output);

    /// <summary>a[r] += b[r] for the first rows.</summary>
    void Add(DeviceTensor a, DeviceTensor b, int rows);

    /// <summary>
    /// hidden[r] += scale[seq(r), layer] · vector[seq(r)] for rows at positions ≥ the sequence's injection start.
    /// Always called after every layer: a zero scale turns it off, so injecting never changes what runs.
    /// </summary>
    void AddInjection(DeviceTensor hidden, int layer, IStepContext step);

    /// <summary>output[i] = hidden[step.Batch.LogitRows[i]]: gathers the rows whose logits are needed.</summary>
    void GatherRows(DeviceTensor hidden, IStepContext step, DeviceTensor output);
}
