using MoeRagInject.Model;

namespace MoeRagInject.Backend;

/// <summary>The activation buffers of one runner, sized for its largest step and allocated once.</summary>
public sealed class ForwardBuffers : IDisposable
{
    public ForwardBuffers(IBackend backend, ModelConfig c, int maxRows, int maxSequences)
    {
        var shape = MixtralModel.ShapeOf(c);
        Hidden = backend.Allocate(maxRows, c.HiddenSize);
        Normed = backend.Allocate(maxRows, c.HiddenSize, ActivationKind.GemmInput);
        Qkv = backend.Allocate(maxRows, shape.QkvWidth);
        Attention = backend.Allocate(maxRows, shape.QWidth, ActivationKind.GemmInput);
        Delta = backend.Allocate(maxRows, c.HiddenSize);
        Gathered = backend.Allocate(maxSequences, c.HiddenSize, ActivationKind.GemmInput);
        Logits = backend.Allocate(maxSequences, c.VocabSize);
    }

    /// <summary>The fp32 residual stream [rows, hidden].</summary>
    public DeviceTensor Hidden { get; }
    /// <summary>The input of the next projection: rmsnorm of the residual stream [rows, hidden].</summary>
    public DeviceTensor Normed { get; }
    public DeviceTensor Qkv { get; }
    public DeviceTensor Attention { get; }
    /// <summary>What a sub-layer adds to the residual stream (attention output projection, then MoE output plus injection).</summary>
    public DeviceTensor Delta { get; }
    /// <summary>The final-normed last row of each sequence [sequences, hidden].</summary>
    public DeviceTensor Gathered { get; }
    public DeviceTensor Logits { get; }

    public void Dispose()
    {
        foreach (var t in new[] { Hidden, Normed, Qkv, Attention, Delta, Gathered, Logits }) t.Dispose();
    }
}

/// <summary>
/// The Mixtral forward pass written against <see cref="IBackend"/>. Per layer l:
/// h += o_proj(attn(rope(q), rope(k), v)) of rmsnorm(h); the router records entropy (hook point <c>router_logits-l</c>), and
/// the router probe, when the step runs it, its probabilities and their weighted sum;
/// h += moe(rmsnorm(h)) + the injection (hook point <c>l_out-l</c>), always present, zero-scaled when off.
/// q, k and v come from one fused projection, and each residual add is fused with the norm that follows it.
/// </summary>
public sealed class MixtralModel : IDisposable
{
    private readonly IBackend _backend;
    private readonly DeviceTensor _embedding, _finalNorm, _lmHead;
    private readonly LayerTensors[] _layers;

    private sealed record LayerTensors(DeviceTensor InputNorm, DeviceTensor Qkv, DeviceTensor O, DeviceTensor PostNorm,
        DeviceTensor Router, ExpertStack Experts);

    public MixtralModel(IBackend backend, ModelConfig config, MixtralWeights weights, Action<string>? progress = null)
    {
        _backend = backend;
        Config = config;
        Shape = ShapeOf(config);
        _embedding = backend.UploadWeight(weights.Embedding);
        _finalNorm = backend.UploadWeight(weights.FinalNorm);
        _lmHead = backend.UploadWeight(weights.LmHead);
        _layers = new LayerTensors[weights.Layers.Length];
        for (var l = 0; l < _layers.Length; l++)
        {
            var w = weights.Layers[l];
            _layers[l] = new LayerTensors(backend.UploadWeight(w.InputNorm), backend.UploadWeight(w.QProj, w.KProj, w.VProj),
                backend.UploadWeight(w.OProj), backend.UploadWeight(w.PostAttentionNorm), backend.UploadWeight(w.Router),
                backend.UploadExperts(w.Experts));
            progress?.Invoke($"layer {l + 1}/{_layers.Length} on {backend.Name}");
        }
    }

    public ModelConfig Config { get; }
    public AttentionShape Shape { get; }
    public DeviceTensor LmHead => _lmHead;

    public static AttentionShape ShapeOf(ModelConfig c) => new(c.NumHeads, c.NumKvHeads, c.HeadDim, c.RopeTheta, c.SlidingWindow);

    /// <summary>
    /// Runs every layer over the step's first <paramref name="rows"/> rows. Afterwards <see cref="ForwardBuffers.Normed"/>
    /// holds the final-normed residual stream and <see cref="ForwardBuffers.Hidden"/> the residual stream itself.
    /// </summary>
    /// <param name="probe">The router probe's weights [layer, expert] when the step runs the probe after each router.</param>
    /// <param name="afterLayer">Eager-only observer of the residual stream after each layer (<c>l_out-l</c>).</param>
    public void Layers(ForwardBuffers b, IKvCache cache, IStepBuffers step, int rows, DeviceTensor? probe = null,
        Action<int, DeviceTensor>? afterLayer = null)
    {
        var c = Config;
        var eps = c.RmsNormEps;
        _backend.Embed(_embedding, step, b.Hidden, rows);
        _backend.RmsNorm(b.Hidden, _layers[0].InputNorm, eps, b.Normed, rows);
        for (var l = 0; l < _layers.Length; l++)
        {
            var layer = _layers[l];
            _backend.Linear(b.Normed, layer.Qkv, b.Qkv, rows);
            _backend.RotaryAndCacheWrite(b.Qkv, cache, l, Shape, step, rows);
            _backend.Attention(b.Qkv, cache, l, Shape, step, b.Attention, rows);
            _backend.Linear(b.Attention, layer.O, b.Delta, rows);
            _backend.AddRmsNormRoute(b.Hidden, b.Delta, layer.PostNorm, eps, b.Normed, layer.Router, l, c.NumExpertsPerToken, step, rows);
            if (probe is not null) _backend.RouterProbe(b.Normed, layer.Router, probe, l, step, rows);
            _backend.MoeExperts(b.Normed, layer.Experts, c.NumExpertsPerToken, step, b.Delta, rows);
            var nextNorm = l + 1 < _layers.Length ? _layers[l + 1].InputNorm : _finalNorm;
            _backend.AddInjectionRmsNorm(b.Hidden, b.Delta, l, step, nextNorm, eps, b.Normed, rows);
            afterLayer?.Invoke(l, b.Hidden);
        }
    }

    /// <summary>The whole step: layers, then logits of each sequence's last row, then one sampled token per sampling sequence.</summary>
    public void Step(ForwardBuffers b, IKvCache cache, IStepBuffers step, int rows, int sequences, DeviceTensor? probe = null)
    {
        Layers(b, cache, step, rows, probe);
        _backend.GatherLastRows(b.Normed, step, b.Gathered, sequences);
        _backend.Linear(b.Gathered, _lmHead, b.Logits, sequences);
        _backend.Sample(b.Logits, step, sequences);
    }

    public void Dispose()
    {
        _embedding.Dispose();
        _finalNorm.Dispose();
        _lmHead.Dispose();
        foreach (var l in _layers)
        {
            foreach (var t in new[] { l.InputNorm, l.Qkv, l.O, l.PostNorm, l.Router }) t.Dispose();
            l.Experts.Dispose();
        }
    }
}
