using MoeRagInject.Backend;
using MoeRagInject.Model;

namespace MoeRagInject.Engine;

/// <summary>Logits of the step's logit rows and the router entropy of every row at every MoE layer.</summary>
public sealed record StepOutput(float[] Logits, int VocabSize, float[] Entropies, int Layers)
{
    /// <summary>Residual stream after each captured layer (<c>l_out-l</c>) at the logit rows: [logitRow, capturedLayer, hidden]; null unless asked.</summary>
    public float[]? Hidden { get; init; }

    public ReadOnlySpan<float> LogitRow(int i) => Logits.AsSpan(i * VocabSize, VocabSize);
    public ReadOnlySpan<float> EntropyRow(int row) => Entropies.AsSpan(row * Layers, Layers);
}

/// <summary>
/// The Mixtral forward pass written against <see cref="IBackend"/>. Per layer:
/// h += o_proj(attn(rope(q), rope(k), v)) of rmsnorm(h); the router records entropy (hook point <c>router_logits-l</c>);
/// h += moe(rmsnorm(h)); then the injection add (hook point <c>l_out-l</c>), always present, zero-scaled when off.
/// </summary>
public sealed class MixtralModel : IDisposable
{
    private readonly IBackend _backend;
    private readonly DeviceTensor _embedding, _finalNorm, _lmHead;
    private readonly LayerTensors[] _layers;

    private sealed record LayerTensors(DeviceTensor InputNorm, DeviceTensor Q, DeviceTensor K, DeviceTensor V, DeviceTensor O,
        DeviceTensor PostNorm, DeviceTensor Router, ExpertTensors[] Experts);

    public MixtralModel(IBackend backend, ModelConfig config, MixtralWeights weights)
    {
        _backend = backend;
        Config = config;
        Weights = weights;
        _embedding = backend.UploadWeight(weights.Embedding);
        _finalNorm = backend.UploadWeight(weights.FinalNorm);
        _lmHead = backend.UploadWeight(weights.LmHead);
        _layers = weights.Layers.Select(l => new LayerTensors(
            backend.UploadWeight(l.InputNorm), backend.UploadWeight(l.QProj), backend.UploadWeight(l.KProj),
            backend.UploadWeight(l.VProj), backend.UploadWeight(l.OProj), backend.UploadWeight(l.PostAttentionNorm),
            backend.UploadWeight(l.Router),
            l.Experts.Select(e => new ExpertTensors(backend.UploadWeight(e.Gate), backend.UploadWeight(e.Up), backend.UploadWeight(e.Down))).ToArray()))
            .ToArray();
    }

    public ModelConfig Config { get; }
    public MixtralWeights Weights { get; }
    public IBackend Backend => _backend;

    public IKvCache CreateKvCache(int numBlocks, int blockSize) =>
        _backend.CreateKvCache(Config.NumLayers, numBlocks, blockSize, Config.NumKvHeads, Config.HeadDim);

    /// <param name="captureLayers">Layers whose output residual stream is returned at the logit rows (for calibration).</param>
    public StepOutput Forward(StepBatch batch, IKvCache cache, int[]? captureLayers = null)
    {
        var c = Config;
        var rows = batch.RowCount;
        int qWidth = c.NumHeads * c.HeadDim, kvWidth = c.NumKvHeads * c.HeadDim;
        using var step = _backend.BeginStep(batch, c.NumLayers, c.NumExpertsPerToken);
        using var hidden = _backend.Allocate(rows, c.HiddenSize);
        using var normed = _backend.Allocate(rows, c.HiddenSize);
        using var q = _backend.Allocate(rows, qWidth);
        using var k = _backend.Allocate(rows, kvWidth);
        using var v = _backend.Allocate(rows, kvWidth);
        using var attention = _backend.Allocate(rows, qWidth);
        using var projected = _backend.Allocate(rows, c.HiddenSize);

        var logitRows = batch.LogitRows.Length;
        using var gathered = _backend.Allocate(logitRows, c.HiddenSize);
        float[]? captured = captureLayers is null ? null : new float[logitRows * captureLayers.Length * c.HiddenSize];
        var rowScratch = captureLayers is null ? null : new float[logitRows * c.HiddenSize];

        _backend.Embed(_embedding, step, hidden);
        for (var l = 0; l < _layers.Length; l++)
        {
            var layer = _layers[l];
            _backend.RmsNorm(hidden, layer.InputNorm, c.RmsNormEps, normed, rows);
            _backend.Linear(normed, layer.Q, q, rows);
            _backend.Linear(normed, layer.K, k, rows);
            _backend.Linear(normed, layer.V, v, rows);
            _backend.Rotary(q, c.NumHeads, c.HeadDim, c.RopeTheta, step);
            _backend.Rotary(k, c.NumKvHeads, c.HeadDim, c.RopeTheta, step);
            _backend.Attention(q, k, v, cache, l, c.NumHeads, c.NumKvHeads, c.HeadDim, c.SlidingWindow, step, attention);
            _backend.Linear(attention, layer.O, projected, rows);
            _backend.Add(hidden, projected, rows);

            _backend.RmsNorm(hidden, layer.PostNorm, c.RmsNormEps, normed, rows);
            _backend.Route(normed, layer.Router, l, step);
            _backend.MoeExperts(normed, layer.Experts, step, projected);
            _backend.Add(hidden, projected, rows);
            _backend.AddInjection(hidden, l, step);

            var slot = captureLayers is null ? -1 : Array.IndexOf(captureLayers, l);
            if (slot >= 0)
            {
                _backend.GatherRows(hidden, step, gathered);
                _backend.Download(gathered, logitRows, rowScratch!);
                for (var r = 0; r < logitRows; r++)
                    rowScratch!.AsSpan(r * c.HiddenSize, c.HiddenSize)
                        .CopyTo(captured.AsSpan((r * captureLayers!.Length + slot) * c.HiddenSize, c.HiddenSize));
            }
        }

        using var finalNormed = _backend.Allocate(logitRows, c.HiddenSize);
        using var logits = _backend.Allocate(logitRows, c.VocabSize);
        _backend.GatherRows(hidden, step, gathered);
        _backend.RmsNorm(gathered, _finalNorm, c.RmsNormEps, finalNormed, logitRows);
        _backend.Linear(finalNormed, _lmHead, logits, logitRows);

        var output = new StepOutput(new float[logitRows * c.VocabSize], c.VocabSize, new float[rows * c.NumLayers], c.NumLayers) { Hidden = captured };
        _backend.Download(logits, logitRows, output.Logits);
        step.ReadEntropies(output.Entropies);
        return output;
    }

    public void Dispose()
    {
        _embedding.Dispose();
        _finalNorm.Dispose();
        _lmHead.Dispose();
        foreach (var l in _layers)
        {
            foreach (var t in new[] { l.InputNorm, l.Q, l.K, l.V, l.O, l.PostNorm, l.Router }) t.Dispose();
            foreach (var e in l.Experts)
            {
                e.Gate.Dispose();
                e.Up.Dispose();
                e.Down.Dispose();
            }
        }
    }
}
