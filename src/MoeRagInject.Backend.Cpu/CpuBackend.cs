using MoeRagInject.Backend.Cpu.Ops;
using MoeRagInject.Model;

namespace MoeRagInject.Backend.Cpu;

/// <summary>
/// The CPU backend: fp32 arithmetic over fp32/fp16/bf16 weights, SIMD kernels with a fixed summation order and
/// multithreading over output features, heads or experts. Every output element is computed by one thread in one
/// order, so results do not depend on the batch a request shares.
/// </summary>
public sealed class CpuBackend(int threads) : IBackend
{
    private readonly ParallelOptions _parallel = new() { MaxDegreeOfParallelism = Math.Max(1, threads) };

    public string Name => "cpu";

    public int Threads => _parallel.MaxDegreeOfParallelism;

    public DeviceTensor UploadWeight(TensorView weight) => new CpuWeight(weight);

    public DeviceTensor Allocate(int rows, int columns) => new CpuActivation(rows, columns);

    public IKvCache CreateKvCache(int layers, int numBlocks, int blockSize, int kvHeads, int headDim) =>
        new CpuKvCache(layers, numBlocks, blockSize, kvHeads, headDim);

    public IStepContext BeginStep(StepBatch batch, int layers, int topK) => new CpuStepContext(batch, layers, topK);

    public void Download(DeviceTensor source, int rows, Span<float> destination) =>
        source.Act().Data.AsSpan(0, rows * source.Columns).CopyTo(destination);

    public void Embed(DeviceTensor table, IStepContext step, DeviceTensor output) =>
        Embedding.Lookup(table.Weight(), step.Batch.TokenIds, output.Act());

    public void RmsNorm(DeviceTensor x, DeviceTensor weight, float eps, DeviceTensor output, int rows) =>
        Norm.RmsNorm(x.Act(), weight.Weight(), eps, output.Act(), rows);

    public void Linear(DeviceTensor x, DeviceTensor weight, DeviceTensor output, int rows) =>
        MatMul.Linear(x.Act(), weight.Weight(), output.Act(), rows, _parallel);

    public void Rotary(DeviceTensor x, int heads, int headDim, float theta, IStepContext step) =>
        Ops.Rotary.Apply(x.Act(), heads, headDim, theta, step.Batch.Positions, step.Batch.RowCount);

    public void Attention(DeviceTensor q, DeviceTensor k, DeviceTensor v, IKvCache cache, int layer, int heads, int kvHeads,
        int headDim, int? slidingWindow, IStepContext step, DeviceTensor output) =>
        Ops.Attention.Run(q.Act(), k.Act(), v.Act(), (CpuKvCache)cache, layer, heads, kvHeads, headDim, slidingWindow,
            step.Batch, output.Act(), _parallel);

    public void Route(DeviceTensor x, DeviceTensor routerWeight, int layer, IStepContext step) =>
        Moe.Route(x.Act(), routerWeight.Weight(), layer, (CpuStepContext)step);

    public void MoeExperts(DeviceTensor x, IReadOnlyList<ExpertTensors> experts, IStepContext step, DeviceTensor output) =>
        Moe.Experts(x.Act(), experts, (CpuStepContext)step, output.Act(), _parallel);

    public void Add(DeviceTensor a, DeviceTensor b, int rows)
    {
        var n = rows * a.Columns;
        System.Numerics.Tensors.TensorPrimitives.Add(a.Act().Data.AsSpan(0, n), b.Act().Data.AsSpan(0, n), a.Act().Data.AsSpan(0, n));
    }

    public void AddInjection(DeviceTensor hidden, int layer, IStepContext step)
    {
        var batch = step.Batch;
        var h = hidden.Act();
        for (var r = 0; r < batch.RowCount; r++)
        {
            var s = batch.RowSequence[r];
            var scale = batch.InjectionScales[s * batch.Layers + layer];
            if (scale == 0f || batch.Positions[r] < batch.InjectionStart[s]) continue;
            Kernels.AddScaled(h.Row(r), batch.InjectionVectors.AsSpan(s * batch.HiddenSize, batch.HiddenSize), scale);
        }
    }

    public void GatherRows(DeviceTensor hidden, IStepContext step, DeviceTensor output)
    {
        var rows = step.Batch.LogitRows;
        for (var i = 0; i < rows.Length; i++) hidden.Act().Row(rows[i]).CopyTo(output.Act().Row(i));
    }

    public void Dispose()
    {
    }
}
