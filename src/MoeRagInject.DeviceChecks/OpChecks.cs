using MoeRagInject.Backend;
using MoeRagInject.Backend.Cpu;
using MoeRagInject.Model;

namespace MoeRagInject.DeviceChecks;

/// <summary>One check's outcome: the error measured, the tolerance it is held to, and whether it passed.</summary>
public sealed record CheckResult(string Group, string Name, bool Passed, double Error, double Tolerance, string Detail = "")
{
    public override string ToString() =>
        FormattableString.Invariant($"{(Passed ? "ok  " : "FAIL")} {Group,-8} {Name,-44} error {Error,10:E2} (tolerance {Tolerance:E1}) {Detail}");
}

/// <summary>
/// Each op of a device backend against the CPU backend on fresh random inputs, as ggml's test-backend-ops does: the same
/// weights and inputs on both (activations the device keeps in bf16 are rounded to bf16 first, so both see the same numbers),
/// normalised mean squared error of the outputs with a tolerance per op, every output checked finite, and poisoned guard
/// rows after every output that must still be poisoned afterwards.
/// </summary>
public sealed class OpChecks : IDisposable
{
    private const int Guard = 2;
    private const int DefaultIntermediate = 384;
    private readonly IBackend _device;
    private readonly CpuBackend _cpu = new(Environment.ProcessorCount);
    private readonly ModelConfig _config;
    private readonly Checkpoint _checkpoint;
    private readonly MixtralWeights _weights;
    private readonly Random _rng;
    private readonly List<CheckResult> _results = [];
    private readonly int _seed;
    private readonly Action<CheckResult>? _report;

    /// <param name="report">Told of each result as it is measured.</param>
    /// <param name="hiddenSize">The check model's hidden size (the row ops' width); its other dimensions stay small.</param>
    /// <param name="intermediateSize">The experts' intermediate size.</param>
    public OpChecks(IBackend device, int seed, Action<CheckResult>? report = null, int hiddenSize = 256, int intermediateSize = DefaultIntermediate)
    {
        _report = report;
        _device = device;
        _seed = seed;
        _rng = new Random(seed);
        _config = new ModelConfig
        {
            ModelType = "mixtral", VocabSize = 512, HiddenSize = hiddenSize, IntermediateSize = intermediateSize, NumLayers = 2, NumHeads = 8, NumKvHeads = 2,
            HeadDim = 32, NumExperts = 8, NumExpertsPerToken = 2, MaxPositionEmbeddings = 512, RmsNormEps = 1e-5f, RopeTheta = 10000f,
        };
        _checkpoint = Checkpoint.CreateDummy(_config, DType.BF16, (ulong)seed);
        _weights = MixtralWeights.Resolve(_checkpoint, _config);
    }

    public IReadOnlyList<CheckResult> Run()
    {
        Check("embed", [1, 7, 64], EmbedCase);
        RunRowOps();
        Check("linear", [1, 5, 8, 20, 37, 130, 256, 300], LinearCase);
        Check("attention", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], AttentionCase);
        // On Hopper: 8 and 16 rows take the TMA kernels with 16-row tiles, 40 with 32-row tiles, 100 with 64-row tiles, 200
        // with 96-row tiles; 300 and 1,000 cuBLAS.
        Check("moe", [1, 8, 16, 40, 100, 200, 300, 1000], MoeCase);
        Check("sample", [0, 1, 2, 3], SampleCase);
        // The row ops again at Mixtral's width, where each thread of a norm block holds several chunks of its row.
        using (var wide = new OpChecks(_device, _seed + 1, _report, hiddenSize: 4096))
            _results.AddRange(wide.RunRowOps());
        // Experts of 512 × 512: on Hopper the TMA kernels then walk several feature tiles of every row tile in both products
        // (4 of gate-up, 2 of the wide down), where 256 × 384 has 3 and 1.
        using (var square = new OpChecks(_device, _seed + 2, _report, hiddenSize: 512, intermediateSize: 512))
        {
            square.Check("moe", [8, 16, 40, 100, 200], square.MoeCase);
            _results.AddRange(square._results);
        }
        return _results;
    }

    /// <summary>
    /// The ops that take a row a block (the norms, the router, the probe, the injection) at 1 to 200 rows: 200 is more than an
    /// H200's 132 multiprocessors, where the CUDA backend's norm and router blocks have 256 threads instead of 1,024.
    /// </summary>
    private IReadOnlyList<CheckResult> RunRowOps()
    {
        Check("rms_norm", [1, 33, 200], RmsNormCase);
        Check("add_rms_norm", [1, 33, 200], AddRmsNormCase);
        Check("route", [1, 40, 200], RouteCase);
        Check("add_rms_norm_route", [1, 40, 200], AddRmsNormRouteCase);
        Check("router_probe", [1, 40, 0, 200], RouterProbeCase);
        Check("injection", [3, 200], InjectionCase);
        return _results;
    }

    /// <summary>
    /// For a backend that promises batch invariance (--deterministic): the GEMM ops against the CPU backend, and each row's
    /// outputs bit for bit the same whether it is computed alone, with a few rows, or among hundreds.
    /// </summary>
    public IReadOnlyList<CheckResult> RunBatchInvariance()
    {
        Check("linear", [1, 37, 130], LinearCase);
        Check("moe", [1, 16, 100, 1000], MoeCase);
        Check("attention", [0, 3, 4, 5, 7], AttentionCase);
        return RunInvariance();
    }

    /// <summary>
    /// The MoE block alone at row counts that take each path (one row, the TMA kernels' tile widths, prefill chunks), each
    /// check's name ending in <paramref name="label"/>: for a backend set up another way (the CUDA backend with its
    /// experts in the boxed layout).
    /// </summary>
    public IReadOnlyList<CheckResult> RunMoe(string label)
    {
        _moeLabel = label;
        Check("moe", [1, 8, 40, 100, 200, 300, 1000], MoeCase);
        return _results;
    }

    private string _moeLabel = "";

    /// <summary>Only the bit-for-bit checks of <see cref="RunBatchInvariance"/>: for the CPU backend, which the others compare against.</summary>
    public IReadOnlyList<CheckResult> RunInvariance()
    {
        Check("invariance", [0], _ => InvarianceCase());
        Check("attention invariance", [0], _ => AttentionInvarianceCase());
        return _results;
    }

    private void Check(string op, int[] variants, Action<int> run)
    {
        foreach (var variant in variants)
        {
            try
            {
                run(variant);
            }
            catch (Exception e)
            {
                Add(new CheckResult("op", $"{op} [{variant}]", false, double.NaN, 0, $"{e.GetType().Name}: {e.Message}"));
            }
        }
    }

    // ---- Cases.

    private void EmbedCase(int rows)
    {
        using var pair = new StepPair(this, Scenario.Decode(rows, _config.VocabSize, _rng));
        using var table = Pair.Weight(this, _weights.Embedding);
        using var outputs = Pair.Activation(this, rows + Guard, _config.HiddenSize, ActivationKind.Float32);
        outputs.Poison();
        _cpu.Embed(table.Cpu, pair.Cpu, outputs.Cpu, rows);
        _device.Embed(table.Device, pair.Device, outputs.Device, rows);
        Compare($"embed rows={rows}", outputs, rows, 0);
    }

    private void RmsNormCase(int rows)
    {
        using var x = Pair.Activation(this, rows, _config.HiddenSize, ActivationKind.Float32);
        x.Fill(_rng, 2f);
        using var w = Pair.Weight(this, _weights.Layers[0].InputNorm);
        using var y = Pair.Activation(this, rows + Guard, _config.HiddenSize, ActivationKind.GemmInput);
        y.Poison();
        _cpu.RmsNorm(x.Cpu, w.Cpu, 1e-5f, y.Cpu, rows);
        _device.RmsNorm(x.Device, w.Device, 1e-5f, y.Device, rows);
        Compare($"rms_norm rows={rows}", y, rows, 1e-5);
    }

    private void AddRmsNormCase(int rows)
    {
        NormCase("add_rms_norm", rows, _weights.Layers[0].PostAttentionNorm,
            (b, residual, delta, w, output) => b.AddRmsNorm(residual, delta, w, 1e-5f, output, rows),
            (b, residual, delta, w, output) => b.AddRmsNorm(residual, delta, w, 1e-5f, output, rows)).Dispose();
    }

    private delegate void NormOp(IBackend backend, DeviceTensor residual, DeviceTensor delta, DeviceTensor weight, DeviceTensor output);

    /// <summary>
    /// A norm op on both backends: random residual rows, <paramref name="delta"/> (random rows when null) and the norm
    /// weight, an output whose guard rows are poisoned; <paramref name="cpu"/> and <paramref name="device"/> run the op,
    /// then the normed rows and the updated residual are compared. Returns the output (the caller disposes it).
    /// </summary>
    private Pair.Tensor NormCase(string name, int rows, TensorView weight, NormOp cpu, NormOp device, Pair.Tensor? delta = null)
    {
        using var residual = Pair.Activation(this, rows, _config.HiddenSize, ActivationKind.Float32);
        residual.Fill(_rng, 1f);
        using var ownDelta = delta is null ? Pair.Activation(this, rows, _config.HiddenSize, ActivationKind.Float32) : null;
        ownDelta?.Fill(_rng, 1f);
        var d = delta ?? ownDelta!;
        using var w = Pair.Weight(this, weight);
        var y = Pair.Activation(this, rows + Guard, _config.HiddenSize, ActivationKind.GemmInput);
        y.Poison();
        cpu(_cpu, residual.Cpu, d.Cpu, w.Cpu, y.Cpu);
        device(_device, residual.Device, d.Device, w.Device, y.Device);
        Compare($"{name} rows={rows} (normed)", y, rows, 1e-5);
        Compare($"{name} rows={rows} (residual)", residual, rows, 1e-12, guardRows: 0);
        return y;
    }

    private void LinearCase(int rows)
    {
        var layer = _weights.Layers[0];
        using var w = Pair.Weight(this, layer.QProj, layer.KProj, layer.VProj);
        using var x = Pair.Activation(this, rows, _config.HiddenSize, ActivationKind.GemmInput);
        x.Fill(_rng, 1f);
        using var y = Pair.Activation(this, rows + Guard, w.Cpu.Rows, ActivationKind.Float32);
        y.Poison();
        _cpu.Linear(x.Cpu, w.Cpu, y.Cpu, rows);
        _device.Linear(x.Device, w.Device, y.Device, rows);
        Compare($"linear (fused qkv) rows={rows}", y, rows, 1e-5);
    }

    /// <summary>
    /// Rope and KV write, then attention, over scattered paged blocks: a prefill, decodes, and both mixed; GQA 4:1; sliding
    /// windows (variants 2, 6, 7); Mixtral-8x7B's heads (3, 4, 5); long prompts over many key tiles (4, 6: the flash-style
    /// kernel) and decodes at long contexts (5, 7: keys split over blocks); one and two query heads per KV head (8-11); and
    /// prompts at head_dim 128 (12-14: on Hopper the warpgroup kernel): a long chunk among decode rows and short chunks with
    /// a sliding window (both prompt kernels in one step), long prompts with two and with one query head per KV head.
    /// </summary>
    private void AttentionCase(int variant)
    {
        var mixtralHeads = new AttentionShape(32, 8, 128, 1e6f, null);  // the kernel variants for head_dim 128
        var shape = variant switch
        {
            3 or 4 or 5 => mixtralHeads,
            12 => mixtralHeads with { SlidingWindow = 100 },
            13 => new AttentionShape(8, 4, 128, 1e6f, null),
            14 => new AttentionShape(4, 4, 128, 1e6f, null),
            8 or 10 => new AttentionShape(4, 4, 32, 1e4f, null),
            9 or 11 => new AttentionShape(8, 4, 32, 1e4f, null),
            2 => MixtralModel.ShapeOf(_config) with { SlidingWindow = 7 },
            6 => MixtralModel.ShapeOf(_config) with { SlidingWindow = 37 },
            7 => MixtralModel.ShapeOf(_config) with { SlidingWindow = 100 },
            _ => MixtralModel.ShapeOf(_config) with { SlidingWindow = null },
        };
        var scenario = variant switch
        {
            0 => Scenario.Prefill([19, 5, 33], _config.VocabSize, _rng),
            4 or 6 or 8 or 9 or 13 or 14 => Scenario.LongPrefill(_config.VocabSize, _rng),
            12 => Scenario.LongMixed(_config.VocabSize, _rng),
            5 or 7 or 10 or 11 => Scenario.LongDecode(_config.VocabSize, _rng),
            _ => Scenario.Mixed(_config.VocabSize, _rng),
        };
        using var pair = new StepPair(this, scenario);
        using var cpuCache = _cpu.CreateKvCache(_config.NumLayers, pair.Limits.NumKvBlocks, pair.Limits.BlockSize, shape.KvHeads, shape.HeadDim);
        using var deviceCache = _device.CreateKvCache(_config.NumLayers, pair.Limits.NumKvBlocks, pair.Limits.BlockSize, shape.KvHeads, shape.HeadDim);
        var rows = scenario.Rows;
        // Earlier positions of each sequence first (a prefill of its history), then this step's rows.
        using var history = new StepPair(this, scenario.History(_rng));
        using var hq = Pair.Activation(this, Math.Max(1, history.State.Rows), shape.QkvWidth, ActivationKind.Float32);
        hq.Fill(_rng, 1f);
        foreach (var layer in new[] { 1 })
        {
            if (history.State.Rows > 0)
            {
                _cpu.RotaryAndCacheWrite(hq.Cpu, cpuCache, layer, shape, history.Cpu, history.State.Rows);
                _device.RotaryAndCacheWrite(hq.Device, deviceCache, layer, shape, history.Device, history.State.Rows);
            }
            using var qkv = Pair.Activation(this, rows, shape.QkvWidth, ActivationKind.Float32);
            qkv.Fill(_rng, 1f);
            _cpu.RotaryAndCacheWrite(qkv.Cpu, cpuCache, layer, shape, pair.Cpu, rows);
            _device.RotaryAndCacheWrite(qkv.Device, deviceCache, layer, shape, pair.Device, rows);
            Compare($"rope qkv ({scenario.Name}, head_dim {shape.HeadDim})", qkv, rows, 1e-10, guardRows: 0);
            using var output = Pair.Activation(this, rows + Guard, shape.QWidth, ActivationKind.GemmInput);
            output.Poison();
            _cpu.Attention(qkv.Cpu, cpuCache, layer, shape, pair.Cpu, output.Cpu, rows);
            _device.Attention(qkv.Device, deviceCache, layer, shape, pair.Device, output.Device, rows);
            Compare($"attention ({scenario.Name}{(shape.SlidingWindow is { } w ? $", window {w}" : "")}, {shape.Heads}/{shape.KvHeads} heads of {shape.HeadDim})", output, rows, 1e-4);
        }
    }

    private void RouteCase(int rows)
    {
        using var pair = new StepPair(this, Scenario.Decode(rows, _config.VocabSize, _rng));
        using var router = Pair.Weight(this, _weights.Layers[1].Router);
        using var x = Pair.Activation(this, rows, _config.HiddenSize, ActivationKind.GemmInput);
        x.Fill(_rng, 20f);
        _cpu.Route(x.Cpu, router.Cpu, 1, _config.NumExpertsPerToken, pair.Cpu, rows);
        _device.Route(x.Device, router.Device, 1, _config.NumExpertsPerToken, pair.Device, rows);
        pair.Device.DownloadRowEntropies();
        var cpu = pair.Cpu.Host.RowEntropies;
        var device = pair.DeviceState.RowEntropies;
        double worst = 0;
        var finite = true;
        for (var r = 0; r < rows; r++)
        {
            var a = cpu[r * _config.NumLayers + 1];
            var b = device[r * _config.NumLayers + 1];
            finite &= float.IsFinite(b);
            worst = Math.Max(worst, Math.Abs(a - b));
        }
        Add(new CheckResult("op", $"route entropy rows={rows}", finite && worst < 1e-4, worst, 1e-4, "max |Δ| nats"));
    }

    /// <summary>
    /// The fused post-attention norm and router on the device against the two ops on the CPU: the normed rows and the
    /// residual, then the router's entropies against the CPU's router run on the device's own normed rows (where the two
    /// backends round a normed value to different bf16 neighbours, the router's inputs would differ by that).
    /// </summary>
    private void AddRmsNormRouteCase(int rows)
    {
        using var pair = new StepPair(this, Scenario.Decode(rows, _config.VocabSize, _rng));
        using var router = Pair.Weight(this, _weights.Layers[1].Router);
        using var y = NormCase("add_rms_norm_route", rows, _weights.Layers[1].PostAttentionNorm,
            (b, residual, delta, w, output) => b.AddRmsNorm(residual, delta, w, 1e-5f, output, rows),
            (b, residual, delta, w, output) =>
                b.AddRmsNormRoute(residual, delta, w, 1e-5f, output, router.Device, 1, _config.NumExpertsPerToken, pair.Device, rows));
        var normed = new float[(rows + Guard) * _config.HiddenSize];
        _device.Download(y.Device, rows + Guard, normed);
        _cpu.Upload(normed, y.Cpu);
        _cpu.Route(y.Cpu, router.Cpu, 1, _config.NumExpertsPerToken, pair.Cpu, rows);
        pair.Device.DownloadRowEntropies();
        double worst = 0;
        var finite = true;
        for (var r = 0; r < rows; r++)
        {
            var b = pair.DeviceState.RowEntropies[r * _config.NumLayers + 1];
            finite &= float.IsFinite(b);
            worst = Math.Max(worst, Math.Abs(pair.Cpu.Host.RowEntropies[r * _config.NumLayers + 1] - b));
        }
        Add(new CheckResult("op", $"add_rms_norm_route entropy rows={rows}", finite && worst < 1e-4, worst, 1e-4, "max |Δ| nats"));
    }

    /// <summary>
    /// The router probe after the router at both layers (the last writes each sequence's sum): decode rows with a padding
    /// sequence among them (variant 40), and a step of prefills and decodes (variant 0) whose sums come from each sequence's
    /// last row. Probabilities of real rows, every row's sum and every sequence's output against the CPU backend.
    /// </summary>
    private void RouterProbeCase(int variant)
    {
        var scenario = variant == 0 ? Scenario.Mixed(_config.VocabSize, _rng) : Scenario.Decode(variant, _config.VocabSize, _rng);
        using var pair = new StepPair(this, scenario);
        var rows = scenario.Rows;
        var sequences = pair.State.Sequences;
        var padding = variant == 40 ? 3 : -1;
        if (padding >= 0)
        {
            pair.State.SeqSlot[padding] = -1;
            pair.DeviceState.SeqSlot[padding] = -1;
            pair.Device.Upload();
        }
        int layers = _config.NumLayers, experts = _config.NumExperts;
        var weights = Enumerable.Range(0, layers * experts).Select(_ => (float)(_rng.NextDouble() * 4 - 2)).ToArray();
        using var probe = Pair.Activation(this, layers, experts, ActivationKind.Float32);
        _cpu.Upload(weights, probe.Cpu);
        _device.Upload(weights, probe.Device);
        using var x = Pair.Activation(this, rows, _config.HiddenSize, ActivationKind.GemmInput);
        x.Fill(_rng, 20f);
        for (var l = 0; l < layers; l++)
        {
            using var router = Pair.Weight(this, _weights.Layers[l].Router);
            _cpu.Route(x.Cpu, router.Cpu, l, _config.NumExpertsPerToken, pair.Cpu, rows);
            _device.Route(x.Device, router.Device, l, _config.NumExpertsPerToken, pair.Device, rows);
            _cpu.RouterProbe(x.Cpu, router.Cpu, probe.Cpu, l, pair.Cpu, rows);
            _device.RouterProbe(x.Device, router.Device, probe.Device, l, pair.Device, rows);
        }
        pair.Device.DownloadRowEntropies();
        pair.Device.Download();
        var a = pair.Cpu.Host;
        var b = pair.DeviceState;
        double worstProb = 0, worstSum = 0;
        var finite = true;
        for (var r = 0; r < rows; r++)
        {
            finite &= float.IsFinite(b.RowProbeLogits[r]);
            worstSum = Math.Max(worstSum, Math.Abs(a.RowProbeLogits[r] - b.RowProbeLogits[r]));
            if (a.SeqSlot[a.RowSequence[r]] < 0) continue;
            for (var i = 0; i < layers * experts; i++)
            {
                finite &= float.IsFinite(b.RouterProbsOf(r)[i]);
                worstProb = Math.Max(worstProb, Math.Abs(a.RouterProbsOf(r)[i] - b.RouterProbsOf(r)[i]));
            }
        }
        for (var i = 0; i < sequences; i++)
        {
            finite &= float.IsFinite(b.OutProbeLogit[i]);
            worstSum = Math.Max(worstSum, Math.Abs(a.OutProbeLogit[i] - b.OutProbeLogit[i]));
            // Each sequence's output is its last row's sum.
            worstSum = Math.Max(worstSum, Math.Abs(b.OutProbeLogit[i] - b.RowProbeLogits[b.QueryStart[i + 1] - 1]));
        }
        if (padding >= 0) worstSum = Math.Max(worstSum, Math.Abs(b.RowProbeLogits[padding]));
        var name = $"router_probe ({scenario.Name}{(padding >= 0 ? ", one padding sequence" : "")}) rows={rows}";
        Add(new CheckResult("op", name + " probabilities", finite && worstProb < 1e-5, worstProb, 1e-5, "max |Δ|"));
        Add(new CheckResult("op", name + " sums", finite && worstSum < 1e-4, worstSum, 1e-4, "max |Δ| of row sums and sequence outputs"));
    }

    /// <summary>The MoE block at row counts that take each device path (few routed slots, dense, grouped).</summary>
    private void MoeCase(int rows)
    {
        using var pair = new StepPair(this, Scenario.Decode(rows, _config.VocabSize, _rng));
        var layer = _weights.Layers[0];
        using var router = Pair.Weight(this, layer.Router);
        var cpuExperts = _cpu.UploadExperts(layer.Experts);
        using var deviceExperts = _device.UploadExperts(layer.Experts);
        using var x = Pair.Activation(this, rows, _config.HiddenSize, ActivationKind.GemmInput);
        x.Fill(_rng, 20f);
        using var y = Pair.Activation(this, rows + Guard, _config.HiddenSize, ActivationKind.Float32);
        y.Poison();
        _cpu.Route(x.Cpu, router.Cpu, 0, _config.NumExpertsPerToken, pair.Cpu, rows);
        _device.Route(x.Device, router.Device, 0, _config.NumExpertsPerToken, pair.Device, rows);
        _cpu.MoeExperts(x.Cpu, cpuExperts, _config.NumExpertsPerToken, pair.Cpu, y.Cpu, rows);
        _device.MoeExperts(x.Device, deviceExperts, _config.NumExpertsPerToken, pair.Device, y.Device, rows);
        Compare((_config.IntermediateSize == DefaultIntermediate ? $"moe rows={rows}" : $"moe rows={rows}, intermediate {_config.IntermediateSize}") + _moeLabel,
            y, rows, 1e-4);
    }

    /// <summary>The first rows of a 700-row batch through linear (QKV and down-sized) and MoE, then the same rows as 1 and 5 rows.</summary>
    private void InvarianceCase()
    {
        const int Rows = 700;
        var layer = _weights.Layers[0];
        using var x = Pair.Activation(this, Rows, _config.HiddenSize, ActivationKind.GemmInput);
        x.Fill(_rng, 20f);
        using var qkv = Pair.Weight(this, layer.QProj, layer.KProj, layer.VProj);
        using var router = Pair.Weight(this, layer.Router);
        using var experts = _device.UploadExperts(layer.Experts);
        float[] Outputs(int rows, bool moe)
        {
            using var step = new StepPair(this, Scenario.Decode(rows, _config.VocabSize, new Random(7)));
            using var y = _device.Allocate(rows, moe ? _config.HiddenSize : qkv.Device.Rows);
            if (moe)
            {
                _device.Route(x.Device, router.Device, 0, _config.NumExpertsPerToken, step.Device, rows);
                _device.MoeExperts(x.Device, experts, _config.NumExpertsPerToken, step.Device, y, rows);
            }
            else
                _device.Linear(x.Device, qkv.Device, y, rows);
            var values = new float[rows * y.Columns];
            _device.Download(y, rows, values);
            return values;
        }
        foreach (var moe in new[] { false, true })
        {
            var all = Outputs(Rows, moe);
            var differing = 0;
            foreach (var few in new[] { 1, 5 })
            {
                var part = Outputs(few, moe);
                for (var i = 0; i < part.Length; i++)
                    if (BitConverter.SingleToUInt32Bits(part[i]) != BitConverter.SingleToUInt32Bits(all[i])) differing++;
            }
            Add(new CheckResult("op", $"{(moe ? "moe" : "linear")} batch invariance (rows of 700 == alone, x5)", differing == 0, differing, 0,
                "outputs differing in any bit"));
        }
    }

    /// <summary>
    /// Attention rows of one sequence computed among a step of prompt chunks and decode rows, then alone as its own prompt
    /// chunk, then its last row alone as a decode row: the same bits each time (Mixtral's heads: 32 query, 8 KV, head_dim 128).
    /// </summary>
    private void AttentionInvarianceCase()
    {
        var shape = new AttentionShape(32, 8, 128, 1e6f, null);
        var mixed = Scenario.Mixed(_config.VocabSize, _rng);  // sequence 1: 9 prompt rows from position 0, rows 1..9 of the step
        const int First = 1, Length = 9, Slot = 1;
        using var pair = new StepPair(this, mixed);
        using var cache = _device.CreateKvCache(_config.NumLayers, pair.Limits.NumKvBlocks, pair.Limits.BlockSize, shape.KvHeads, shape.HeadDim);
        using (var history = new StepPair(this, mixed.History(_rng)))
        using (var hq = _device.Allocate(history.State.Rows, shape.QkvWidth))
        {
            _device.Upload(RandomValues(history.State.Rows * shape.QkvWidth), hq);
            _device.RotaryAndCacheWrite(hq, cache, 0, shape, history.Device, history.State.Rows);
        }
        using var qkv = _device.Allocate(mixed.Rows, shape.QkvWidth);
        _device.Upload(RandomValues(mixed.Rows * shape.QkvWidth), qkv);
        _device.RotaryAndCacheWrite(qkv, cache, 0, shape, pair.Device, mixed.Rows);
        var rotated = new float[mixed.Rows * shape.QkvWidth];
        _device.Download(qkv, mixed.Rows, rotated);
        var all = Attend(pair.Device, qkv, mixed.Rows);

        var tokens = mixed.Tokens[First..(First + Length)];
        var differing = 0;
        foreach (var (alone, from) in new[]
                 {
                     (mixed with { Name = "alone", Slots = [Slot], Starts = [0], Lengths = [Length], Tokens = tokens }, 0),
                     (mixed with { Name = "decode", Slots = [Slot], Starts = [Length - 1], Lengths = [1], Tokens = tokens[^1..] }, Length - 1),
                 })
        {
            var rows = alone.Rows;
            using var step = new StepPair(this, alone);
            using var q = _device.Allocate(rows, shape.QkvWidth);
            _device.Upload(rotated.AsSpan((First + from) * shape.QkvWidth, rows * shape.QkvWidth), q);
            var part = Attend(step.Device, q, rows);
            for (var i = 0; i < part.Length; i++)
                if (BitConverter.SingleToUInt32Bits(part[i]) != BitConverter.SingleToUInt32Bits(all[(First + from) * shape.QWidth + i])) differing++;
        }
        Add(new CheckResult("op", "attention batch invariance (a prompt's rows among others == alone, its last row == as a decode row)",
            differing == 0, differing, 0, "outputs differing in any bit"));

        float[] Attend(IStepBuffers step, DeviceTensor input, int rows)
        {
            using var output = _device.Allocate(rows, shape.QWidth, ActivationKind.GemmInput);
            _device.Attention(input, cache, 0, shape, step, output, rows);
            var values = new float[rows * shape.QWidth];
            _device.Download(output, rows, values);
            return values;
        }

        float[] RandomValues(int count) => [.. Enumerable.Range(0, count).Select(_ => (float)(_rng.NextDouble() * 2 - 1))];
    }

    private void InjectionCase(int rows)
    {
        var scenario = Scenario.Decode(rows, _config.VocabSize, _rng);
        using var pair = new StepPair(this, scenario);
        var vector = Enumerable.Range(0, _config.HiddenSize).Select(_ => (float)(_rng.NextDouble() - 0.5)).ToArray();
        // Slot of row 1 injects at layer 1 from its position on; the others not.
        var slot = scenario.Slots[1];
        foreach (var state in new[] { pair.Cpu.Host, pair.DeviceState })
        {
            vector.CopyTo(state.InjectionVector(slot));
            state.InjectionScale(slot)[1] = 1f;
            state.InjectionStart[slot] = 0;
            state.InjectionEnd[slot] = int.MaxValue;
        }
        pair.Device.SlotChanged(slot);
        pair.Device.Upload();
        using var x = Pair.Activation(this, rows, _config.HiddenSize, ActivationKind.Float32);
        x.Fill(_rng, 1f);
        // The fused end of a layer on the device against the two ops on the CPU.
        NormCase("add_injection_rms_norm", rows, _weights.Layers[0].PostAttentionNorm,
            (b, residual, delta, w, output) => b.AddInjectionRmsNorm(residual, delta, 1, pair.Cpu, w, 1e-5f, output, rows),
            (b, residual, delta, w, output) => b.AddInjectionRmsNorm(residual, delta, 1, pair.Device, w, 1e-5f, output, rows), delta: x).Dispose();
        x.Fill(_rng, 1f);
        _cpu.AddInjection(x.Cpu, 1, pair.Cpu, rows);
        _device.AddInjection(x.Device, 1, pair.Device, rows);
        Compare($"add_injection rows={rows}", x, rows, 1e-12, guardRows: 0);
    }

    /// <summary>Sampling: greedy tokens, log-probabilities and entropies as the host computes them; non-finite logits and an injected failure reported; a top-p that keeps one token.</summary>
    private void SampleCase(int variant)
    {
        const int rows = 6;
        var scenario = Scenario.Decode(rows, _config.VocabSize, _rng);
        using var pair = new StepPair(this, scenario);
        var sampling = variant == 3 ? new SlotSampling { Temperature = 0.7f, TopP = 1e-6f } : SlotSampling.Greedy;
        if (variant == 2) sampling = SlotSampling.Greedy with { RepetitionPenalty = 1.3f, FrequencyPenalty = 0.5f, PresencePenalty = 0.25f };
        foreach (var (state, buffers) in new[] { (pair.Cpu.Host, (IStepBuffers)pair.Cpu), (pair.DeviceState, pair.Device) })
        {
            for (var i = 0; i < rows; i++)
            {
                var slot = scenario.Slots[i];
                state.Sampling[slot] = sampling;
                state.Penalties[slot].Reset([3, 9, 27]);
                state.SeqFlags[i] = StepState.FlagSample | StepState.FlagLogprob | StepState.FlagOutputEntropy;
                state.Uniform[i] = (float)_rng.NextDouble();
                buffers.SlotBound(slot);
            }
            if (variant == 1)
            {
                state.SeqFlags[2] |= StepState.FlagFailSampling;
            }
            for (var l = 0; l < rows * state.Layers; l++) state.RowEntropies[l] = 1f;
        }
        pair.Device.Upload();
        using var logits = Pair.Activation(this, rows, _config.VocabSize, ActivationKind.Float32);
        logits.Fill(_rng, 4f);
        if (variant == 1) logits.Set(4, 17, float.NaN);
        // The router entropies the sampler copies come from the route kernel; give both the same ones.
        using var x = Pair.Activation(this, rows, _config.HiddenSize, ActivationKind.GemmInput);
        x.Fill(_rng, 20f);
        using var router = Pair.Weight(this, _weights.Layers[0].Router);
        for (var l = 0; l < _config.NumLayers; l++)
        {
            _cpu.Route(x.Cpu, router.Cpu, l, _config.NumExpertsPerToken, pair.Cpu, rows);
            _device.Route(x.Device, router.Device, l, _config.NumExpertsPerToken, pair.Device, rows);
        }
        _cpu.Sample(logits.Cpu, pair.Cpu, rows);
        _device.Sample(logits.Device, pair.Device, rows);
        pair.Device.Download();
        var a = pair.Cpu.Host;
        var b = pair.DeviceState;
        var mismatches = new List<string>();
        double worst = 0;
        for (var i = 0; i < rows; i++)
        {
            if (a.OutStatus[i] != b.OutStatus[i]) mismatches.Add($"seq {i} status {a.OutStatus[i]} vs {b.OutStatus[i]}");
            if (a.OutStatus[i] != SampleStatus.Ok) continue;
            if (a.OutTokens[i] != b.OutTokens[i]) mismatches.Add($"seq {i} token {a.OutTokens[i]} vs {b.OutTokens[i]}");
            worst = Math.Max(worst, Math.Abs(a.OutLogprobs[i] - b.OutLogprobs[i]));
            worst = Math.Max(worst, Math.Abs(a.OutOutputEntropy[i] - b.OutOutputEntropy[i]));
            for (var l = 0; l < a.Layers; l++) worst = Math.Max(worst, Math.Abs(a.RouterEntropyOf(i)[l] - b.RouterEntropyOf(i)[l]));
        }
        var expected = variant == 1 ? "NaN row → NonFinite, injected failure → SamplerFailed" : variant == 2 ? "penalties" : variant == 3 ? "top-p keeps one" : "greedy";
        Add(new CheckResult("op", $"sample ({expected})", mismatches.Count == 0 && worst < 1e-3, worst, 1e-3, string.Join("; ", mismatches)));
    }

    private void Add(CheckResult result)
    {
        if (_config.HiddenSize != 256) result = result with { Name = $"{result.Name} (hidden {_config.HiddenSize})" };
        _results.Add(result);
        _report?.Invoke(result);
    }

    private void Compare(string name, Pair.Tensor tensor, int rows, double tolerance, int guardRows = Guard)
    {
        var columns = tensor.Cpu.Columns;
        var expected = new float[rows * columns];
        _cpu.Download(tensor.Cpu, rows, expected);
        var all = new float[(rows + guardRows) * columns];
        _device.Download(tensor.Device, rows + guardRows, all);
        double num = 0, den = 0;
        var nonFinite = 0;
        for (var i = 0; i < expected.Length; i++)
        {
            if (!float.IsFinite(all[i])) nonFinite++;
            num += ((double)all[i] - expected[i]) * ((double)all[i] - expected[i]);
            den += (double)expected[i] * expected[i];
        }
        var guardsTouched = 0;
        for (var i = expected.Length; i < all.Length; i++)
            if (!float.IsNaN(all[i])) guardsTouched++;
        var nmse = num / Math.Max(den, 1e-30);
        var passed = nonFinite == 0 && guardsTouched == 0 && nmse <= tolerance;
        Add(new CheckResult("op", name, passed, nmse, tolerance,
            nonFinite > 0 ? $"{nonFinite} non-finite outputs" : guardsTouched > 0 ? $"{guardsTouched} guard values overwritten" : "nmse"));
    }

    public void Dispose()
    {
        _cpu.Dispose();
        _checkpoint.Dispose();
    }

    /// <summary>The same tensor on both backends.</summary>
    private static class Pair
    {
        public sealed class Tensor(OpChecks owner, DeviceTensor cpu, DeviceTensor device, bool bf16) : IDisposable
        {
            public DeviceTensor Cpu { get; } = cpu;
            public DeviceTensor Device { get; } = device;

            /// <summary>Random values in [−scale, scale), rounded to bf16 when the device keeps bf16, written to both.</summary>
            public void Fill(Random rng, float scale)
            {
                var values = new float[Cpu.Rows * Cpu.Columns];
                for (var i = 0; i < values.Length; i++)
                {
                    var v = (float)((rng.NextDouble() * 2 - 1) * scale);
                    values[i] = bf16 ? BitConverter.UInt32BitsToSingle((uint)HalfConversion.FloatToBFloat16(v) << 16) : v;
                }
                owner._cpu.Upload(values, Cpu);
                owner._device.Upload(values, Device);
            }

            public void Set(int row, int column, float value)
            {
                var values = new float[Cpu.Rows * Cpu.Columns];
                owner._cpu.Download(Cpu, Cpu.Rows, values);
                values[row * Cpu.Columns + column] = value;
                owner._cpu.Upload(values, Cpu);
                owner._device.Upload(values, Device);
            }

            /// <summary>NaN everywhere, so unwritten outputs and overwritten guards show.</summary>
            public void Poison()
            {
                var values = new float[Cpu.Rows * Cpu.Columns];
                Array.Fill(values, float.NaN);
                owner._cpu.Upload(values, Cpu);
                owner._device.Upload(values, Device);
            }

            public void Dispose()
            {
                Cpu.Dispose();
                Device.Dispose();
            }
        }

        public static Tensor Activation(OpChecks owner, int rows, int columns, ActivationKind kind) =>
            new(owner, owner._cpu.Allocate(rows, columns, kind), owner._device.Allocate(rows, columns, kind), kind == ActivationKind.GemmInput);

        /// <summary>A weight on both; its values are the checkpoint's bf16 values on both.</summary>
        public static Tensor Weight(OpChecks owner, params TensorView[] parts) =>
            new(owner, owner._cpu.UploadWeight(parts), owner._device.UploadWeight(parts), bf16: true);
    }

    /// <summary>Step inputs on both backends: the same scenario written into a StepState each, the device's uploaded.</summary>
    private sealed class StepPair : IDisposable
    {
        public StepPair(OpChecks owner, Scenario scenario)
        {
            Limits = new RunnerLimits(1024, 2048, Scenario.MaxBlocksPerSequence, 4, Scenario.KvBlocks, 0, 0);
            State = new StepState(Limits, owner._config);
            DeviceState = new StepState(Limits, owner._config);
            scenario.WriteTo(State);
            scenario.WriteTo(DeviceState);
            Cpu = owner._cpu.CreateStepBuffers(State);
            Device = owner._device.CreateStepBuffers(DeviceState);
            foreach (var slot in scenario.Slots.Distinct()) Device.BlocksChanged(slot, 0, Limits.MaxBlocksPerSequence);
            Device.Upload();
        }

        public RunnerLimits Limits { get; }
        public StepState State { get; }
        public StepState DeviceState { get; }
        public IStepBuffers Cpu { get; }
        public IStepBuffers Device { get; }

        public void Dispose()
        {
            Cpu.Dispose();
            Device.Dispose();
        }
    }

    /// <summary>Sequences in slots with scattered blocks of 4 positions, and the rows of one step over them.</summary>
    private sealed record Scenario(string Name, int[] Slots, int[] Starts, int[] Lengths, int[] Tokens, int[][] Tables)
    {
        public const int MaxBlocksPerSequence = 256, KvBlocks = 2048;

        public int Rows => Lengths.Sum();

        /// <summary>Each sequence's table: its own blocks of the pool in random order, then zeros.</summary>
        private static int[][] RandomTables(int sequences, Random rng, int blocksEach = 8)
        {
            var blocks = Enumerable.Range(0, KvBlocks).OrderBy(_ => rng.Next()).ToArray();
            return Enumerable.Range(0, sequences)
                .Select(s => blocks.Skip(s * blocksEach).Take(blocksEach).Concat(Enumerable.Repeat(0, MaxBlocksPerSequence - blocksEach)).ToArray()).ToArray();
        }

        private static int[] RandomTokens(int n, int vocab, Random rng) => Enumerable.Range(0, n).Select(_ => rng.Next(vocab)).ToArray();

        public static Scenario Decode(int rows, int vocab, Random rng) =>
            new("decode", [.. Enumerable.Range(0, rows).Select(i => i % 16)], [.. Enumerable.Range(0, rows).Select(i => 3 + (i * 5) % 25)],
                [.. Enumerable.Repeat(1, rows)], RandomTokens(rows, vocab, rng), RandomTables(16, rng));

        public static Scenario Prefill(int[] lengths, int vocab, Random rng) =>
            new("prefill", [.. Enumerable.Range(0, lengths.Length)], new int[lengths.Length], lengths, RandomTokens(lengths.Sum(), vocab, rng),
                RandomTables(16, rng));

        public static Scenario Mixed(int vocab, Random rng) =>
            new("mixed prefill and decode", [0, 1, 2, 3], [10, 0, 25, 4], [1, 9, 1, 6], RandomTokens(17, vocab, rng), RandomTables(16, rng));

        /// <summary>Prompts of hundreds of rows, one continuing after 150 earlier positions (a later chunk).</summary>
        public static Scenario LongPrefill(int vocab, Random rng) =>
            new("long prefill", [0, 1, 2], [0, 150, 0], [300, 200, 77], RandomTokens(577, vocab, rng), RandomTables(8, rng, 128));

        /// <summary>A long prompt chunk after 150 earlier positions beside decode rows and shorter chunks in one step.</summary>
        public static Scenario LongMixed(int vocab, Random rng) =>
            new("long prefill among decodes", [0, 1, 2, 3, 4], [150, 600, 0, 40, 7], [200, 1, 20, 70, 1], RandomTokens(292, vocab, rng), RandomTables(8, rng, 256));

        /// <summary>One new row for each of six sequences at contexts from 2 to 1,001.</summary>
        public static Scenario LongDecode(int vocab, Random rng) =>
            new("long decode", [0, 1, 2, 3, 4, 5], [1000, 517, 3, 64, 200, 1], [1, 1, 1, 1, 1, 1], RandomTokens(6, vocab, rng), RandomTables(8, rng, 256));

        /// <summary>The positions before each sequence's rows, as one prefill step (so the cache holds them).</summary>
        public Scenario History(Random rng) =>
            new("history", Slots, new int[Slots.Length], Starts, RandomTokens(Starts.Sum(), 512, rng), Tables);

        public void WriteTo(StepState state)
        {
            var row = 0;
            var sequences = 0;
            for (var i = 0; i < Slots.Length; i++)
            {
                if (Lengths[i] == 0) continue;
                var slot = Slots[i];
                Tables[slot].CopyTo(state.BlockTable(slot));
                state.SeqSlot[sequences] = slot;
                state.QueryStart[sequences] = row;
                state.SeqFlags[sequences] = StepState.FlagSample;
                for (var j = 0; j < Lengths[i]; j++)
                {
                    state.TokenIds[row] = Tokens[row];
                    state.Positions[row] = Starts[i] + j;
                    state.RowSequence[row] = sequences;
                    state.KvSlots[row] = state.KvSlotOf(slot, Starts[i] + j);
                    row++;
                }
                state.ContextLength[sequences] = Starts[i] + Lengths[i];
                sequences++;
            }
            state.Rows = row;
            state.Sequences = sequences;
            state.QueryStart[sequences] = row;
        }
    }
}
