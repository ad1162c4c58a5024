using MoeRagInject.Backend.Cuda;
using MoeRagInject.Backend.Cuda.Interop;
using MoeRagInject.DeviceChecks;

namespace MoeRagInject.Backend.Cuda.Tests;

/// <summary>A test that needs an NVIDIA GPU: skipped, saying why, on machines without one (CI).</summary>
public sealed class CudaFactAttribute : FactAttribute
{
    public CudaFactAttribute()
    {
        if (!CudaRunnerFactory.IsAvailable(out var reason)) Skip = $"no CUDA device here, so the GPU tests did not run: {reason}";
    }
}

/// <summary>
/// The CUDA backend on a GPU: the same checks `moe-rag-inject check-device --device cuda` runs (the GPU machine has no .NET
/// SDK, so tools/gpu/run.sh runs them through the published CLI; here they run under `dotnet test` where a GPU is present).
/// </summary>
public sealed class CudaTests
{
    private static string Root
    {
        get
        {
            for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
                if (File.Exists(Path.Combine(dir.FullName, "MoeRagInject.slnx"))) return dir.FullName;
            throw new InvalidOperationException("repository root not found");
        }
    }

    private static string Demo => Path.Combine(Root, "assets", "models", "moe-wordnet-demo");

    private static void AssertAll(IEnumerable<CheckResult> results)
    {
        var list = results.ToList();
        Assert.NotEmpty(list);
        Assert.True(list.All(r => r.Passed), string.Join("\n", list.Where(r => !r.Passed)));
    }

    [CudaFact]
    public void EveryOpMatchesTheCpuBackend()
    {
        using var backend = CudaRunnerFactory.OpenBackend(0, deterministic: false);
        using var checks = new OpChecks(backend, seed: 7);
        AssertAll(checks.Run());
    }

    [CudaFact]
    public void DeterministicGemmsMatchTheCpuBackendAndAreBatchInvariant()
    {
        using var backend = CudaRunnerFactory.OpenBackend(0, deterministic: true);
        using var checks = new OpChecks(backend, seed: 8);
        AssertAll(checks.RunBatchInvariance());
    }

    /// <summary>The invariance checks on the CPU backend (which every backend's ops are compared against): runs everywhere.</summary>
    [Fact]
    public void TheCpuBackendIsBatchInvariant()
    {
        using var backend = new MoeRagInject.Backend.Cpu.CpuBackend(2);
        using var checks = new OpChecks(backend, seed: 9);
        AssertAll(checks.RunInvariance());
    }

    [CudaFact]
    public void GraphReplayEqualsOpByOpSteps() => AssertAll([ModelChecks.GraphReplay(new CudaRunnerFactory(), Demo)]);

    [CudaFact]
    public void ReferenceCheckpointsMatchTransformers() =>
        AssertAll(ModelChecks.Run(new CudaRunnerFactory(), Path.Combine(Root, "tests", "data", "reference"), Demo));

    [CudaFact]
    public void ReferenceCheckpointsMatchTransformersWithDeterministicKernels() =>
        AssertAll(ModelChecks.Run(new CudaRunnerFactory(), Path.Combine(Root, "tests", "data", "reference"), Demo, deterministic: true));

    [CudaFact]
    public async Task BatchSafetyWithGraphsAndInjections() =>
        AssertAll(await EngineChecks.RunAsync(new CudaRunnerFactory(), Demo, Path.Combine(Root, "assets", "corpus", "wordnet", "wordnet-demo.jsonl.gz"),
            Directory.CreateTempSubdirectory("moe-rag-cuda-tests-").FullName, Path.Combine(Root, "tests", "data", "reference", "demo-injection")));
}

/// <summary>What runs without a GPU: the kernel program assembled from its sources, and a clear answer when CUDA is missing.</summary>
public sealed class CudaWithoutGpuTests
{
    [Fact]
    public void TheKernelProgramHoldsEveryKernelFile()
    {
        var source = CudaKernels.Source();
        foreach (var file in new[] { "common.cuh", "attention.cu", "embedding.cu", "linear.cu", "misc.cu", "moe.cu", "norm.cu", "rotary.cu", "sample.cu" })
            Assert.Contains($"// ---- kernels/{file}", source);
        // common.cuh comes first: every kernel file uses its helpers.
        Assert.StartsWith("// ---- kernels/common.cuh", source);
        foreach (var kernel in new[] { "embed", "rms_norm", "add_rms_norm", "rope_kv_write", "attention_impl", "route", "moe_small_gate_up_impl",
                     "moe_combine_dense", "moe_align", "sample", "add_injection", "linear_rows_impl", "fill_dummy" })
            Assert.Contains(kernel, source);
    }

    [Fact]
    public void AKernelFileInTheOverrideFolderReplacesTheEmbeddedOne()
    {
        var folder = Directory.CreateTempSubdirectory("moe-rag-inject-kernels-");
        try
        {
            var embedded = CudaKernels.Source(null);
            Assert.Equal(embedded, CudaKernels.Source(folder.FullName));  // an empty folder replaces nothing
            File.WriteAllText(Path.Combine(folder.FullName, "misc.cu"), "// an older misc.cu\n");
            var replaced = CudaKernels.Source(folder.FullName);
            Assert.Contains("// ---- kernels/misc.cu\n// an older misc.cu\n", replaced);
            Assert.DoesNotContain("gather_last_rows", replaced);  // a kernel of the embedded misc.cu
            Assert.Contains("gather_last_rows", embedded);
            // Every other file as embedded, in the same order.
            var start = embedded.IndexOf("// ---- kernels/misc.cu", StringComparison.Ordinal);
            var end = embedded.IndexOf("// ---- kernels/", start + 1, StringComparison.Ordinal);
            Assert.Equal(embedded[..start] + "// ---- kernels/misc.cu\n// an older misc.cu\n\n" + embedded[end..], replaced);
        }
        finally
        {
            folder.Delete(recursive: true);
        }
    }

    /// <summary>
    /// ptxas's advice on serialised wgmma names the kernels check-device then fails on: the first line as NVRTC 13.0 gave it
    /// on an H200 in session 28 for moe_tma_tokens_down, verbatim, among its other messages; the C7515 line written in the
    /// same form with another of ptxas's reasons; the C7520 line verbatim as it named 5026f81's moe_tma_gate_up_n32 on an
    /// H200 in session 29 (the kernels that session 28 found serialised, compiled without -v); a kernel named twice is
    /// listed once.
    /// </summary>
    [Fact]
    public void PtxasAdviceOnSerialisedWgmmaNamesTheKernels()
    {
        const string messages = """
            ptxas info    : (C7514) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma instructions reading accumulator registers of  a wgmma between start and end of the pipeline stage in the function 'moe_tma_tokens_down'
            ptxas info    : 196 bytes gmem
            ptxas info    : Compiling entry function 'sample' for 'sm_90a'
            ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem
            ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to the presence of Extern calls in the function 'moe_tma_gate_up_n128'
            ptxas info    : (C7514) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma instructions reading accumulator registers of  a wgmma between start and end of the pipeline stage in the function 'moe_tma_tokens_down'
            ptxas info    : (C7520) Potential Performance Loss: wgmma.mma_async instructions are serialized due to program dependence on compiler-inserted WG.AR in divergent path in the function 'moe_tma_gate_up_n32'
            """;
        Assert.Equal(["moe_tma_tokens_down", "moe_tma_gate_up_n128", "moe_tma_gate_up_n32"], CudaKernels.SerialisedWgmma(messages));
        Assert.Empty(CudaKernels.SerialisedWgmma(""));
        Assert.Empty(CudaKernels.SerialisedWgmma("ptxas info    : Compiling entry function 'moe_tma_tokens_down' for 'sm_90a'\n"));
    }

    /// <summary>
    /// Kernels are launched with programmatic dependent launch on Hopper: one that touched memory before kernel_prologue's
    /// griddepcontrol.wait would race with the kernel before it. So every kernel's body must begin with the prologue.
    /// </summary>
    [Fact]
    public void EveryKernelBeginsWithThePrologue()
    {
        var source = CudaKernels.Source();
        var kernels = 0;
        for (var at = source.IndexOf("__global__", StringComparison.Ordinal); at >= 0;
             at = source.IndexOf("__global__", at + 1, StringComparison.Ordinal))
        {
            var body = source.IndexOf('{', at);
            var parenthesis = source.IndexOf('(', at);
            var name = source[source.LastIndexOf(' ', parenthesis - 1, parenthesis - at)..parenthesis].Trim();
            if (name.StartsWith("__launch_bounds__", StringComparison.Ordinal))
            {
                var afterBounds = source.IndexOf(')', parenthesis) + 1;
                parenthesis = source.IndexOf('(', afterBounds);
                name = source[afterBounds..parenthesis].Trim();
            }
            var first = source[(body + 1)..].TrimStart(' ', '\t', '\r', '\n', '\\');
            Assert.True(first.StartsWith("kernel_prologue();", StringComparison.Ordinal),
                $"kernel {name} does not begin with kernel_prologue(): {first[..Math.Min(60, first.Length)]}");
            kernels++;
        }
        Assert.True(kernels >= 30, $"found only {kernels} kernels");
    }

    /// <summary>The CUtensorMapL2promotion values the driver defines (0 to 3), and a clear error for anything else.</summary>
    [Fact]
    public void TheTensorMapPromotionKnobTakesTheDriversFourValues()
    {
        Assert.Equal(L2Promotion.None, CudaBackend.ParsePromotion(null));
        Assert.Equal(3, (int)CudaBackend.ParsePromotion("256"));
        Assert.Equal(2, (int)CudaBackend.ParsePromotion("128"));
        Assert.Equal(1, (int)CudaBackend.ParsePromotion("64"));
        Assert.Equal(0, (int)CudaBackend.ParsePromotion("none"));
        var error = Assert.Throws<ArgumentException>(() => CudaBackend.ParsePromotion("32"));
        Assert.Contains("MOE_RAG_INJECT_TMA_PROMOTION is '32'", error.Message);
    }

    [Fact]
    public void MissingCudaIsReportedWithTheReason()
    {
        if (CudaLibraries.TryProbe(out var reason))
        {
            Assert.Empty(reason);
            return;
        }
        Assert.False(string.IsNullOrWhiteSpace(reason));
        Assert.Contains("CUDA", reason, StringComparison.OrdinalIgnoreCase);
        var error = Assert.Throws<InvalidOperationException>(() => new CudaRunnerFactory().Create(
            new Model.ModelConfig
            {
                ModelType = "mixtral", VocabSize = 300, HiddenSize = 64, IntermediateSize = 64, NumLayers = 1, NumHeads = 2, NumKvHeads = 1, HeadDim = 32,
                NumExperts = 2, NumExpertsPerToken = 1, MaxPositionEmbeddings = 64, RmsNormEps = 1e-5f, RopeTheta = 10000f,
            }, new DummyWeights(0), new RunnerOptions()));
        Assert.Contains("--device cuda", error.Message);
    }
}
