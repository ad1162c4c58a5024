using System.Runtime.InteropServices;

namespace MoeRagInject.Backend.Cuda.Interop;

// Values from cublas_api.h and library_types.h of CUDA 12.6 and 13.0 (identical for everything declared here).

/// <summary>cublasStatus_t.</summary>
internal enum CublasStatus
{
    Success = 0, NotInitialized = 1, AllocFailed = 3, InvalidValue = 7, ArchMismatch = 8, MappingError = 11,
    ExecutionFailed = 13, InternalError = 14, NotSupported = 15, LicenseError = 16,
}

/// <summary>cublasOperation_t: how an operand is read (column-major).</summary>
internal enum CublasOperation
{
    N = 0,
    T = 1,
    C = 2,
}

/// <summary>cublasMath_t; <see cref="DisallowReducedPrecisionReduction"/> is a flag to OR in.</summary>
internal enum CublasMath
{
    Default = 0,
    Pedantic = 2,
    Tf32TensorOp = 3,
    DisallowReducedPrecisionReduction = 16,
}

/// <summary>cublasComputeType_t values used here.</summary>
internal enum CublasComputeType
{
    Compute16F = 64,
    Compute32F = 68,
    Compute32FFast16BF = 75,
    Compute32FFastTf32 = 77,
}

/// <summary>cublasGemmAlgo_t: only the heuristic choice is used here.</summary>
internal enum CublasGemmAlgo
{
    Default = -1,
}

/// <summary>cudaDataType_t element types used here.</summary>
internal enum CudaDataType
{
    R32F = 0,
    R16F = 2,
    R16BF = 14,
}

/// <summary>Raw cuBLAS v2 imports (libcublas.so.13 or .12), by the exported names cublas_v2.h maps the API to.</summary>
internal static unsafe partial class Cublas
{
    private const string Lib = "cublas";

    static Cublas() => CudaLibraries.InstallResolver();

    [LibraryImport(Lib)] internal static partial CublasStatus cublasCreate_v2(nint* handle);
    [LibraryImport(Lib)] internal static partial CublasStatus cublasDestroy_v2(nint handle);
    [LibraryImport(Lib)] internal static partial CublasStatus cublasGetVersion_v2(nint handle, int* version);
    [LibraryImport(Lib)] internal static partial CublasStatus cublasSetStream_v2(nint handle, nint streamId);
    [LibraryImport(Lib)] internal static partial CublasStatus cublasSetWorkspace_v2(nint handle, void* workspace, nuint workspaceSizeInBytes);
    [LibraryImport(Lib)] internal static partial CublasStatus cublasSetMathMode(nint handle, CublasMath mode);
    [LibraryImport(Lib)] internal static partial byte* cublasGetStatusName(CublasStatus status);
    [LibraryImport(Lib)] internal static partial byte* cublasGetStatusString(CublasStatus status);

    [LibraryImport(Lib)]
    internal static partial CublasStatus cublasGemmEx(nint handle, CublasOperation transa, CublasOperation transb,
        int m, int n, int k, void* alpha,
        void* a, CudaDataType aType, int lda,
        void* b, CudaDataType bType, int ldb, void* beta,
        void* c, CudaDataType cType, int ldc,
        CublasComputeType computeType, CublasGemmAlgo algo);

    [LibraryImport(Lib)]
    internal static partial CublasStatus cublasGemmStridedBatchedEx(nint handle, CublasOperation transa, CublasOperation transb,
        int m, int n, int k, void* alpha,
        void* a, CudaDataType aType, int lda, long strideA,
        void* b, CudaDataType bType, int ldb, long strideB, void* beta,
        void* c, CudaDataType cType, int ldc, long strideC, int batchCount,
        CublasComputeType computeType, CublasGemmAlgo algo);
}
