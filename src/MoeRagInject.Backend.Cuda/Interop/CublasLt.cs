using System.Runtime.InteropServices;

namespace MoeRagInject.Backend.Cuda.Interop;

// Values and layouts from cublasLt.h of CUDA 12.6 and 13.0 (identical for everything declared here).

/// <summary>cublasLtMatmulDescAttributes_t values used here.</summary>
internal enum CublasLtMatmulDescAttribute
{
    TransA = 3,
    TransB = 4,
}

/// <summary>cublasLtMatmulPreferenceAttributes_t values used here.</summary>
internal enum CublasLtPreferenceAttribute
{
    MaxWorkspaceBytes = 1,
}

/// <summary>cublasLtMatmulAlgoConfigAttributes_t values used here (each a uint32 but the cluster shape, a uint16).</summary>
internal enum CublasLtAlgoConfigAttribute
{
    Id = 0,
    TileId = 1,
    SplitKNum = 2,
    StagesId = 6,
    ClusterShapeId = 8,
}

/// <summary>cublasLtMatmulAlgo_t: an opaque 64-byte description of one kernel and its configuration.</summary>
[StructLayout(LayoutKind.Sequential, Size = 64)]
internal struct CublasLtMatmulAlgo
{
    private ulong _0, _1, _2, _3, _4, _5, _6, _7;
}

/// <summary>cublasLtMatmulHeuristicResult_t.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct CublasLtHeuristicResult
{
    public CublasLtMatmulAlgo Algo;
    public nuint WorkspaceSize;
    public CublasStatus State;
    public float WavesCount;
    private int _reserved0, _reserved1, _reserved2, _reserved3;
}

/// <summary>Raw cuBLASLt imports (libcublasLt.so.13 or .12).</summary>
internal static unsafe partial class CublasLt
{
    private const string Lib = "cublasLt";

    static CublasLt() => CudaLibraries.InstallResolver();

    [LibraryImport(Lib)] internal static partial CublasStatus cublasLtCreate(nint* handle);
    [LibraryImport(Lib)] internal static partial CublasStatus cublasLtDestroy(nint handle);
    [LibraryImport(Lib)] internal static partial CublasStatus cublasLtMatmulDescCreate(nint* desc, CublasComputeType computeType, CudaDataType scaleType);
    [LibraryImport(Lib)] internal static partial CublasStatus cublasLtMatmulDescDestroy(nint desc);
    [LibraryImport(Lib)] internal static partial CublasStatus cublasLtMatmulDescSetAttribute(nint desc, CublasLtMatmulDescAttribute attribute, void* value, nuint size);
    [LibraryImport(Lib)] internal static partial CublasStatus cublasLtMatrixLayoutCreate(nint* layout, CudaDataType type, ulong rows, ulong cols, long ld);
    [LibraryImport(Lib)] internal static partial CublasStatus cublasLtMatrixLayoutDestroy(nint layout);
    [LibraryImport(Lib)] internal static partial CublasStatus cublasLtMatmulPreferenceCreate(nint* preference);
    [LibraryImport(Lib)] internal static partial CublasStatus cublasLtMatmulPreferenceDestroy(nint preference);
    [LibraryImport(Lib)] internal static partial CublasStatus cublasLtMatmulPreferenceSetAttribute(nint preference, CublasLtPreferenceAttribute attribute, void* value, nuint size);

    [LibraryImport(Lib)]
    internal static partial CublasStatus cublasLtMatmulAlgoConfigGetAttribute(CublasLtMatmulAlgo* algo, CublasLtAlgoConfigAttribute attribute, void* buffer,
        nuint size, nuint* written);

    [LibraryImport(Lib)]
    internal static partial CublasStatus cublasLtMatmulAlgoGetHeuristic(nint handle, nint desc, nint aLayout, nint bLayout, nint cLayout, nint dLayout,
        nint preference, int requested, CublasLtHeuristicResult* results, int* returned);

    [LibraryImport(Lib)]
    internal static partial CublasStatus cublasLtMatmul(nint handle, nint desc, void* alpha, void* a, nint aLayout, void* b, nint bLayout, void* beta,
        void* c, nint cLayout, void* d, nint dLayout, CublasLtMatmulAlgo* algo, void* workspace, nuint workspaceSize, nint stream);
}
