using System.Globalization;
using MoeRagInject.Backend.Cuda.Interop;
using MoeRagInject.Model;

namespace MoeRagInject.Backend.Cuda;

/// <summary>
/// Times the GEMM-heavy ops of one layer at a model's shape, on dummy weights generated on the GPU: the MoE block by path
/// and tensor-core tile, and the projections (fused QKV, output, LM head) by path, per row count, with the rows routed
/// by the layer's router. Each figure is the mean of 20 timed repetitions after 3 warm-ups, timed with events. It is how
/// the backend's paths and tiles are chosen (check-device --groups gemm-bench), not a check. MOE_RAG_INJECT_GEMM_BENCH=wgmma
/// times only the MoE block's Hopper kernels (wgmma and TMA; a short run), MOE_RAG_INJECT_GEMM_BENCH_ROWS (say 8,64,256)
/// replaces the row counts.
/// </summary>
public static class CudaGemmBench
{
    /// <param name="deterministic">Time the --deterministic backend's kernels only (split k, tensor cores at every row count).</param>
    public static void Run(int ordinal, ModelConfig config, IReadOnlyList<int> rowCounts, bool deterministic, Action<string> report)
    {
        var wgmmaOnly = Environment.GetEnvironmentVariable("MOE_RAG_INJECT_GEMM_BENCH") == "wgmma";
        if (Environment.GetEnvironmentVariable("MOE_RAG_INJECT_GEMM_BENCH_ROWS") is { Length: > 0 } forcedRows)
            rowCounts = [.. forcedRows.Split(',').Select(r => int.Parse(r, CultureInfo.InvariantCulture))];
        if (wgmmaOnly && deterministic) return;
        if (Environment.GetEnvironmentVariable("MOE_RAG_INJECT_GEMM_BENCH") == "linear")
        {
            if (!deterministic) RunProjections(ordinal, config, rowCounts, report);
            return;
        }
        using var backend = (CudaBackend)CudaRunnerFactory.OpenBackend(ordinal, deterministic, report);
        backend.BoxExperts = false;  // row-major experts; the boxed layout is measured on copies (BoxedAgainstRowMajor)
        using var shapes = Checkpoint.CreateShapes(config);
        backend.UseDummyWeights(config, seed: 1);
        var weights = MixtralWeights.Resolve(shapes, config);
        var layer = weights.Layers[0];
        var maxRows = rowCounts.Max();
        using var experts = backend.UploadExperts(layer.Experts);
        using var router = backend.UploadWeight(layer.Router);
        using var qkv = backend.UploadWeight(layer.QProj, layer.KProj, layer.VProj);
        using var oProj = backend.UploadWeight(layer.OProj);
        using var lmHead = backend.UploadWeight(weights.LmHead);
        using var x = backend.Allocate(maxRows, config.HiddenSize, ActivationKind.GemmInput);
        var rng = new Random(1);
        backend.Upload([.. Enumerable.Range(0, maxRows * config.HiddenSize).Select(_ => (float)(rng.NextDouble() * 2 - 1))], x);
        using var y = backend.Allocate(maxRows, Math.Max(config.VocabSize, 3 * config.HiddenSize));

        var state = new StepState(new RunnerLimits(4, maxRows, 1, 16, 1, 0, 0), config);
        state.SeqSlot[0] = 0;  // every row belongs to one live sequence: routed, never padding
        state.Sequences = 1;
        using var step = backend.CreateStepBuffers(state);
        step.Upload();
        using var start = backend.Device.CreateEvent(timing: true);
        using var end = backend.Device.CreateEvent(timing: true);
        double Time(Action op)
        {
            for (var i = 0; i < 3; i++) op();
            start.Record(backend.Stream);
            for (var i = 0; i < 20; i++) op();
            end.Record(backend.Stream);
            end.Synchronize();
            return CudaEvent.ElapsedMilliseconds(start, end) / 20;
        }
        string Line(FormattableString s) => s.ToString(CultureInfo.InvariantCulture);

        long h = config.HiddenSize, inter = config.IntermediateSize, k = config.NumExpertsPerToken;
        foreach (var rows in rowCounts)
        {
            backend.Route(x, router, 0, (int)k, step, rows);
            var ids = new int[rows * k];
            ((CudaStepBuffers)step).TopIds.Download<int>(ids, backend.Stream);
            var touched = ids.Distinct().Count();
            double bytes = touched * 3.0 * h * inter * 2, flops = rows * k * 3.0 * h * inter * 2;
            void Moe(string label)
            {
                var ms = Time(() => backend.MoeExperts(x, experts, (int)k, step, y, rows));
                report(Line($"moe    rows {rows,5} ({touched} experts)  {label,-22} {ms,8:F3} ms  {bytes / ms / 1e9,6:F2} TB/s  {flops / ms / 1e9,6:F0} TFLOP/s"));
            }
            if (deterministic)
            {
                Moe("deterministic");
                foreach (var (name, weight) in new[] { ("qkv", qkv), ("o_proj", oProj), ("lm_head", lmHead) })
                {
                    var ms = Time(() => backend.Linear(x, weight, y, rows));
                    report(Line($"linear rows {rows,5} {name,-8} {"deterministic",-22} {ms,8:F3} ms  {(double)weight.Rows * weight.Columns * 2 / ms / 1e9,6:F2} TB/s"));
                }
                continue;
            }
            backend.MoePathForced = CudaBackend.MoePath.Cublas;
            Moe("cuBLAS per expert");
            if (!wgmmaOnly)
            {
                if (rows * k <= 16) { backend.MoePathForced = CudaBackend.MoePath.Small; Moe("small"); }
                if (rows <= CudaBackend.DenseMaxRows) { backend.MoePathForced = CudaBackend.MoePath.Dense; Moe("dense cuBLAS"); }
                backend.MoePathForced = CudaBackend.MoePath.Tensor;
                Moe("tensor (chosen tile)");
                foreach (var tile in CudaBackend.GemmTile.All)
                    foreach (var columns in new[] { 64, 128 })
                    {
                        if (tile.Rows > 2 * Math.Max(16, rows * k / Math.Min(config.NumExperts, rows * k))) continue;  // all padding
                        backend.GemmTileForced = tile with { Columns = columns };
                        Moe($"tensor {tile.WarpsM}x{tile.Mi} bn{columns}");
                    }
                backend.GemmTileForced = null;
            }
            if (backend.Description.Contains("sm_90a", StringComparison.Ordinal))
            {
                backend.MoePathForced = CudaBackend.MoePath.Wgmma;
                Moe("wgmma (chosen N)");
                foreach (var n in new[] { 16, 32, 64, 128, 256 })
                {
                    if (n > 4 * Math.Max(16, rows * k / Math.Min(config.NumExperts, rows * k))) continue;  // mostly padding
                    backend.WgmmaNForced = n;
                    backend.WgmmaMForced = 64;
                    Moe($"wgmma n{n}");
                    if (n < 64) continue;
                    backend.WgmmaMForced = 128;
                    Moe($"wgmma n{n} m128");
                }
                backend.WgmmaNForced = null;
                backend.WgmmaMForced = null;
                if (rows >= 2)
                {
                    backend.MoePathForced = CudaBackend.MoePath.Tma;
                    Moe("tma (chosen N)");
                    foreach (var n in new[] { 16, 32, 64, 96, 128, 256 })
                    {
                        if (n > 4 * Math.Max(32, rows * k / config.NumExperts)) continue;  // mostly padding
                        backend.TmaNForced = n;
                        if (n is 32 or 64 or 96 or 128 && h % 256 == 0)
                            foreach (var wide in new[] { false, true })
                            {
                                backend.TmaDownWideForced = wide;
                                Moe($"tma n{n} down {(wide ? "wide" : "narrow")}");
                            }
                        else
                            Moe($"tma n{n}");
                        backend.TmaDownWideForced = null;
                    }
                    backend.TmaNForced = null;
                    BoxedAgainstRowMajor("tma");
                }
                if (rows > CudaBackend.TmaMaxRows)
                {
                    // Prefill chunks: the token-major TMA kernels against cuBLAS per expert (bf16 in between, as a bf16
                    // Linear rounds; the kernels keep gate and up in fp32 for silu · mul), then on boxed weights.
                    backend.MoePathForced = CudaBackend.MoePath.Cublas;
                    var reference = new float[rows * y.Columns];
                    backend.MoeExperts(x, experts, (int)k, step, y, rows);
                    backend.Download(y, rows, reference);
                    backend.MoePathForced = CudaBackend.MoePath.TmaTokens;
                    Moe("tma tokens");
                    var tokens = new float[rows * y.Columns];
                    backend.MoeExperts(x, experts, (int)k, step, y, rows);
                    backend.Download(y, rows, tokens);
                    double error = 0, norm = 0;
                    for (var j = 0; j < rows * (int)h; j++)
                    {
                        error += (tokens[j] - reference[j]) * (double)(tokens[j] - reference[j]);
                        norm += reference[j] * (double)reference[j];
                    }
                    report(Line($"moe    rows {rows,5} tma tokens against cuBLAS per expert: normalised squared error {error / norm:E2}"));
                    foreach (var name in new[] { "moe_tma_tokens_gate_up", "moe_tma_tokens_down" })
                    {
                        var (registers, local) = backend.KernelResources(name);
                        report(Line($"kernel {name}: {registers} registers, {local} bytes of local memory a thread"));
                    }
                    BoxedAgainstRowMajor("tma tokens");
                }
            }
            backend.MoePathForced = null;
            if (wgmmaOnly) continue;

            // The forced path's kernels (moe_tma or moe_tma_tokens) on the same weights in the boxed layout (contiguous
            // pre-swizzled 16 KB boxes read by bulk copies) against the row-major ones read through the tensor map: the same
            // products in the same order, so the outputs must agree in every bit.
            void BoxedAgainstRowMajor(string label)
            {
                var width = y.Columns;
                var rowMajor = new float[rows * width];
                var boxedOut = new float[rows * width];
                backend.MoeExperts(x, experts, (int)k, step, y, rows);
                backend.Download(y, rows, rowMajor);
                backend.BoxCopy(experts);
                try
                {
                    Moe($"{label} boxed");
                    backend.MoeExperts(x, experts, (int)k, step, y, rows);
                    backend.Download(y, rows, boxedOut);
                    var differing = 0;
                    for (var j = 0; j < rowMajor.Length; j++)
                        if (BitConverter.SingleToInt32Bits(rowMajor[j]) != BitConverter.SingleToInt32Bits(boxedOut[j])) differing++;
                    report(Line($"moe    rows {rows,5} {label} boxed against row-major: {differing} of {rowMajor.Length} outputs differ"));
                }
                finally
                {
                    ((CudaExpertStack)experts).Boxed?.GateUp.Dispose();
                    ((CudaExpertStack)experts).Boxed?.Down.Dispose();
                    ((CudaExpertStack)experts).Boxed = null;
                }
            }

            foreach (var (name, weight) in new[] { ("qkv", qkv), ("o_proj", oProj), ("lm_head", lmHead) })
            {
                double wBytes = (double)weight.Rows * weight.Columns * 2, wFlops = 2.0 * rows * weight.Rows * weight.Columns;
                void Linear(string label)
                {
                    var ms = Time(() => backend.Linear(x, weight, y, rows));
                    report(Line($"linear rows {rows,5} {name,-8} {label,-22} {ms,8:F3} ms  {wBytes / ms / 1e9,6:F2} TB/s  {wFlops / ms / 1e9,6:F0} TFLOP/s"));
                }
                if (rows <= 16) { backend.LinearPathForced = CudaBackend.LinearPath.Gemv; Linear("gemv"); }
                backend.LinearPathForced = CudaBackend.LinearPath.Cublas;
                Linear("cuBLAS");
                backend.LinearPathForced = CudaBackend.LinearPath.Tensor;
                Linear("tensor (chosen tile)");
                backend.LinearPathForced = CudaBackend.LinearPath.Wgmma;
                Linear("wgmma");
                backend.LinearPathForced = null;
            }
        }
    }

    /// <summary>
    /// MOE_RAG_INJECT_GEMM_BENCH=linear: the projections (fused QKV, output, LM head) through cublasGemmEx, as a step runs them,
    /// against every algorithm cuBLASLt's heuristic offers for the shape, each timed over as many copies of the weight as the
    /// model has layers (the LM head: one), so that, as in a decode step whose expert GEMMs have evicted them from L2, the
    /// weights come from DRAM. Reports each algorithm's µs a GEMM and the fastest one's output against cublasGemmEx's.
    /// </summary>
    private static void RunProjections(int ordinal, ModelConfig config, IReadOnlyList<int> rowCounts, Action<string> report)
    {
        using var backend = (CudaBackend)CudaRunnerFactory.OpenBackend(ordinal, deterministic: false, report);
        using var shapes = Checkpoint.CreateShapes(config);
        backend.UseDummyWeights(config, seed: 1);
        var weights = MixtralWeights.Resolve(shapes, config);
        var layer = weights.Layers[0];
        var maxRows = rowCounts.Max();
        var layers = config.NumLayers;
        var projections = new (string Name, DeviceTensor[] Copies)[]
        {
            ("qkv", [.. Enumerable.Range(0, layers).Select(_ => backend.UploadWeight(layer.QProj, layer.KProj, layer.VProj))]),
            ("o_proj", [.. Enumerable.Range(0, layers).Select(_ => backend.UploadWeight(layer.OProj))]),
            ("lm_head", [backend.UploadWeight(weights.LmHead)]),
        };
        var widest = projections.Max(p => p.Copies[0].Columns);
        using var x = backend.Allocate(maxRows, widest, ActivationKind.GemmInput);
        var rng = new Random(1);
        backend.Upload([.. Enumerable.Range(0, maxRows * widest).Select(_ => (float)(rng.NextDouble() * 2 - 1))], x);
        using var y = backend.Allocate(maxRows, projections.Max(p => p.Copies[0].Rows));
        using var start = backend.Device.CreateEvent(timing: true);
        using var end = backend.Device.CreateEvent(timing: true);
        var pointer = (ulong)((CudaTensor)x).Pointer;
        var output = ((CudaTensor)y).Pointer;
        try
        {
            foreach (var rows in rowCounts)
                foreach (var (name, copies) in projections)
                {
                    int n = copies[0].Rows, k = copies[0].Columns;
                    // µs a GEMM: 2 passes over the copies to warm up, then 10 timed.
                    double Time(Action<DeviceTensor> gemm)
                    {
                        for (var pass = 0; pass < 12; pass++)
                        {
                            if (pass == 2) start.Record(backend.Stream);
                            foreach (var w in copies) gemm(w);
                        }
                        end.Record(backend.Stream);
                        end.Synchronize();
                        return CudaEvent.ElapsedMilliseconds(start, end) * 1e3 / (10.0 * copies.Length);
                    }
                    string Figures(double us) => string.Create(CultureInfo.InvariantCulture,
                        $"{us,8:F1} µs  {(double)n * k * 2 / us / 1e6,5:F2} TB/s  {2.0 * rows * n * k / us / 1e6,5:F0} TFLOP/s");
                    backend.LinearPathForced = CudaBackend.LinearPath.Cublas;
                    var gemmEx = Time(w => backend.Linear(x, w, y, rows));
                    backend.LinearPathForced = null;
                    // y holds [rows, n] from its start (the GEMM's own row length); Download takes whole rows of y's width.
                    var reference = new float[rows * y.Columns];
                    backend.Linear(x, copies[0], y, rows);
                    backend.Download(y, rows, reference);
                    report($"linear rows {rows,4} {name,-8} cublasGemmEx                {Figures(gemmEx)}");
                    var candidates = backend.LtGemms.Candidates(rows, n, k, CudaDataType.R32F, 32);
                    var best = (Index: -1, Us: double.MaxValue);
                    for (var i = 0; i < candidates.Count; i++)
                    {
                        var algo = candidates[i].Algo;
                        var us = Time(w => backend.LtGemms.GemmBf16(rows, n, k, pointer, ((CudaTensor)w).Pointer, output, CudaDataType.R32F, algo));
                        if (us < best.Us) best = (i, us);
                        report(string.Create(CultureInfo.InvariantCulture,
                            $"linear rows {rows,4} {name,-8} cuBLASLt #{i,-2} waves {candidates[i].Waves,5:F2} {Figures(us)}  {candidates[i].Description}"));
                    }
                    if (best.Index < 0) continue;
                    var chosen = candidates[best.Index].Algo;
                    backend.LtGemms.GemmBf16(rows, n, k, pointer, ((CudaTensor)copies[0]).Pointer, output, CudaDataType.R32F, chosen);
                    var fastest = new float[rows * y.Columns];
                    backend.Download(y, rows, fastest);
                    double error = 0, norm = 0;
                    for (var j = 0; j < rows * n; j++)
                    {
                        error += (fastest[j] - reference[j]) * (double)(fastest[j] - reference[j]);
                        norm += reference[j] * (double)reference[j];
                    }
                    report(string.Create(CultureInfo.InvariantCulture,
                        $"linear rows {rows,4} {name,-8} fastest: cuBLASLt #{best.Index} of {candidates.Count}, {best.Us:F1} against {gemmEx:F1} µs ({best.Us / gemmEx - 1:+0.0%;-0.0%}), normalised squared error against cublasGemmEx {error / Math.Max(norm, 1e-30):E2}"));
                }
        }
        finally
        {
            foreach (var (_, copies) in projections)
                foreach (var w in copies) w.Dispose();
        }
    }
}
