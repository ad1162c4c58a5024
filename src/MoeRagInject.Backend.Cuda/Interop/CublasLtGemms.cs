using System.Globalization;
using System.Runtime.InteropServices;

namespace MoeRagInject.Backend.Cuda.Interop;

/// <summary>An algorithm cuBLASLt's heuristic offers for a shape: its estimate of the waves the grid takes, and its configuration.</summary>
internal readonly record struct CublasLtCandidate(CublasLtMatmulAlgo Algo, float Waves, string Description);

/// <summary>
/// Row-major C[m,n] = A[m,k]·B[n,k]ᵀ, bf16 operands with fp32 accumulation and C fp32 or bf16 (as
/// <see cref="CublasContext.GemmBf16"/>), through cuBLASLt, with the algorithm for each shape chosen once and kept. A
/// cublasGemmEx call asks cuBLAS's heuristic for every shape it has not seen, tens of microseconds on the host while the
/// GPU waits; a prefill's expert GEMMs have row counts that change with every prompt, so
/// <see cref="FirstRowsOfEachAlgorithm"/> asks for every row count in advance and a run then costs only its launch.
/// </summary>
/// <remarks>Not thread-safe: one backend's stream and step thread own it. Runs on the stream and workspace it was made with.</remarks>
internal sealed unsafe class CublasLtGemms : IDisposable
{
    private readonly CublasLtHandle _handle;
    private readonly CudaStream _stream;
    private readonly DeviceBuffer _workspace;
    private readonly CublasLtDescriptorHandle _matmul;
    private readonly CublasLtDescriptorHandle _preference;
    private readonly Dictionary<(int M, int N, int K, CudaDataType C), Plan> _plans = [];

    /// <summary>One shape's operand layouts and the algorithm chosen for it.</summary>
    private sealed class Plan(CublasLtDescriptorHandle weights, CublasLtDescriptorHandle inputs, CublasLtDescriptorHandle output,
        CublasLtMatmulAlgo algo) : IDisposable
    {
        public readonly CublasLtDescriptorHandle Weights = weights, Inputs = inputs, Output = output;
        public CublasLtMatmulAlgo Algo = algo;

        public void Dispose()
        {
            Weights.Dispose();
            Inputs.Dispose();
            Output.Dispose();
        }
    }

    internal CublasLtGemms(CublasLtHandle handle, CudaStream stream, DeviceBuffer workspace)
    {
        _handle = handle;
        _stream = stream;
        _workspace = workspace;
        nint matmul, preference;
        CudaCheck.Cublas(CublasLt.cublasLtMatmulDescCreate(&matmul, CublasComputeType.Compute32F, CudaDataType.R32F));
        _matmul = new CublasLtDescriptorHandle(matmul, CublasLtDescriptorHandle.Kind.Matmul);
        // The same column-major reading as CublasContext.GemmBf16: cuBLAS's (m', n', k') = (n, m, k), the weight buffer read
        // transposed as the first operand, the activations as they are as the second.
        var transposed = (int)CublasOperation.T;
        var plain = (int)CublasOperation.N;
        CudaCheck.Cublas(CublasLt.cublasLtMatmulDescSetAttribute(matmul, CublasLtMatmulDescAttribute.TransA, &transposed, sizeof(int)));
        CudaCheck.Cublas(CublasLt.cublasLtMatmulDescSetAttribute(matmul, CublasLtMatmulDescAttribute.TransB, &plain, sizeof(int)));
        CudaCheck.Cublas(CublasLt.cublasLtMatmulPreferenceCreate(&preference));
        _preference = new CublasLtDescriptorHandle(preference, CublasLtDescriptorHandle.Kind.Preference);
        var bytes = (ulong)workspace.ByteLength;
        CudaCheck.Cublas(CublasLt.cublasLtMatmulPreferenceSetAttribute(preference, CublasLtPreferenceAttribute.MaxWorkspaceBytes, &bytes, sizeof(ulong)));
    }

    /// <summary>
    /// For each distinct algorithm among the planned row counts 1..<paramref name="maxRows"/> of (n, k), the smallest row count
    /// that uses it: running those once loads every kernel the sizes need (CUDA loads a library's kernels at their first
    /// launch), so that no step pays a module load.
    /// </summary>
    public List<int> FirstRowsOfEachAlgorithm(int n, int k, CudaDataType cType, int maxRows)
    {
        var seen = new HashSet<string>(StringComparer.Ordinal);
        var rows = new List<int>();
        for (var m = 1; m <= maxRows; m++)
        {
            var algo = PlanOf(m, n, k, cType).Algo;
            if (seen.Add(Convert.ToHexString(MemoryMarshal.AsBytes(new ReadOnlySpan<CublasLtMatmulAlgo>(in algo))))) rows.Add(m);
        }
        return rows;
    }

    /// <summary>C[m,n] = A[m,k]·B[n,k]ᵀ with the shape's kept algorithm (chosen now if it has none); arguments are device addresses.</summary>
    public void GemmBf16(int m, int n, int k, ulong a, ulong b, ulong c, CudaDataType cType = CudaDataType.R32F)
    {
        var plan = PlanOf(m, n, k, cType);
        Run(plan, plan.Algo, a, b, c);
    }

    /// <summary>As <see cref="GemmBf16(int, int, int, ulong, ulong, ulong, CudaDataType)"/>, with <paramref name="algo"/> (one of the shape's <see cref="Candidates"/>) instead of the kept algorithm.</summary>
    public void GemmBf16(int m, int n, int k, ulong a, ulong b, ulong c, CudaDataType cType, CublasLtMatmulAlgo algo) =>
        Run(PlanOf(m, n, k, cType), algo, a, b, c);

    private void Run(Plan plan, CublasLtMatmulAlgo algo, ulong a, ulong b, ulong c)
    {
        float alpha = 1f, beta = 0f;
        CudaCheck.Cublas(CublasLt.cublasLtMatmul(Handle, Raw(_matmul), &alpha,
            (void*)b, Raw(plan.Weights), (void*)a, Raw(plan.Inputs), &beta,
            (void*)c, Raw(plan.Output), (void*)c, Raw(plan.Output), &algo,
            (void*)_workspace.Pointer, (nuint)_workspace.ByteLength, _stream.Handle));
    }

    /// <summary>
    /// Up to <paramref name="count"/> algorithms cuBLASLt's heuristic offers for the shape within the workspace, its own choice
    /// (the one <see cref="GemmBf16(int, int, int, ulong, ulong, ulong, CudaDataType)"/> keeps) first.
    /// </summary>
    public IReadOnlyList<CublasLtCandidate> Candidates(int m, int n, int k, CudaDataType cType, int count)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(count);
        var plan = PlanOf(m, n, k, cType);
        var results = new CublasLtHeuristicResult[count];
        int returned;
        fixed (CublasLtHeuristicResult* first = results)
            CudaCheck.Cublas(CublasLt.cublasLtMatmulAlgoGetHeuristic(Handle, Raw(_matmul), Raw(plan.Weights), Raw(plan.Inputs), Raw(plan.Output),
                Raw(plan.Output), Raw(_preference), count, first, &returned));
        return [.. results.Take(returned).Where(r => r.State == CublasStatus.Success).Select(r => new CublasLtCandidate(r.Algo, r.WavesCount, Describe(r.Algo)))];
    }

    /// <summary>An algorithm's configuration in cuBLASLt's own numbering: algorithm id, tile, split-k, stages, cluster shape.</summary>
    private static string Describe(CublasLtMatmulAlgo algo) => string.Create(CultureInfo.InvariantCulture,
        $"id {Config(algo, CublasLtAlgoConfigAttribute.Id, 4)} tile {Config(algo, CublasLtAlgoConfigAttribute.TileId, 4)} split-k {Config(algo, CublasLtAlgoConfigAttribute.SplitKNum, 4)} stages {Config(algo, CublasLtAlgoConfigAttribute.StagesId, 4)} cluster {Config(algo, CublasLtAlgoConfigAttribute.ClusterShapeId, 2)}");

    /// <summary>One configuration attribute of <paramref name="size"/> bytes (uint.MaxValue where cuBLASLt does not say).</summary>
    private static uint Config(CublasLtMatmulAlgo algo, CublasLtAlgoConfigAttribute attribute, nuint size)
    {
        uint value = 0;
        nuint written;
        return CublasLt.cublasLtMatmulAlgoConfigGetAttribute(&algo, attribute, &value, size, &written) == CublasStatus.Success ? value : uint.MaxValue;
    }

    private Plan PlanOf(int m, int n, int k, CudaDataType cType)
    {
        if (_plans.TryGetValue((m, n, k, cType), out var plan)) return plan;
        if (cType is not (CudaDataType.R32F or CudaDataType.R16BF)) throw new ArgumentOutOfRangeException(nameof(cType), cType, "C must be fp32 or bf16");
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(m);
        var weights = Layout(CudaDataType.R16BF, k, n, k);
        var inputs = Layout(CudaDataType.R16BF, k, m, k);
        var output = Layout(cType, n, m, n);
        CublasLtHeuristicResult result;
        int returned;
        CudaCheck.Cublas(CublasLt.cublasLtMatmulAlgoGetHeuristic(Handle, Raw(_matmul), Raw(weights), Raw(inputs), Raw(output), Raw(output),
            Raw(_preference), 1, &result, &returned));
        if (returned < 1 || result.State != CublasStatus.Success)
        {
            weights.Dispose();
            inputs.Dispose();
            output.Dispose();
            throw new InvalidOperationException($"cuBLASLt offers no algorithm for a bf16 GEMM of {m}×{k} by {n}×{k} into {cType} " +
                $"within a {_workspace.ByteLength >> 20} MiB workspace (state {result.State})");
        }

        plan = new Plan(weights, inputs, output, result.Algo);
        _plans.Add((m, n, k, cType), plan);
        return plan;
    }

    private static CublasLtDescriptorHandle Layout(CudaDataType type, int rows, int cols, int ld)
    {
        nint layout;
        CudaCheck.Cublas(CublasLt.cublasLtMatrixLayoutCreate(&layout, type, (ulong)rows, (ulong)cols, ld));
        return new CublasLtDescriptorHandle(layout, CublasLtDescriptorHandle.Kind.Layout);
    }

    private static nint Raw(CublasLtDescriptorHandle descriptor) => descriptor.DangerousGetHandle();

    private nint Handle
    {
        get
        {
            ObjectDisposedException.ThrowIf(_handle.IsClosed, this);
            return _handle.DangerousGetHandle();
        }
    }

    public void Dispose()
    {
        foreach (var plan in _plans.Values) plan.Dispose();
        _plans.Clear();
        _preference.Dispose();
        _matmul.Dispose();
        _handle.Dispose();
    }
}
