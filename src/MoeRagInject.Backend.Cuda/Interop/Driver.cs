using System.Runtime.InteropServices;

namespace MoeRagInject.Backend.Cuda.Interop;

// Signatures and values from cuda.h of CUDA 12.6 and 13.0 (identical for everything declared here unless noted).
// CUdeviceptr is unsigned long long (64-bit builds), CUdevice is int, every other handle an opaque pointer.
// Entry points are the exported symbols the header's #defines select, without the _ptds/_ptsz per-thread-default-stream
// variants: this layer never uses the NULL stream.

/// <summary>CUresult: the status every driver call returns. Only the values this layer tests for or that are common are named.</summary>
internal enum CUresult
{
    Success = 0, InvalidValue = 1, OutOfMemory = 2, NotInitialized = 3, Deinitialized = 4, StubLibrary = 34,
    NoDevice = 100, InvalidDevice = 101, InvalidImage = 200, InvalidContext = 201, NoBinaryForGpu = 209,
    InvalidPtx = 218, UnsupportedPtxVersion = 222, InvalidHandle = 400, NotFound = 500, NotReady = 600,
    IllegalAddress = 700, LaunchOutOfResources = 701, LaunchFailed = 719, NotSupported = 801,
    StreamCaptureUnsupported = 900, StreamCaptureInvalidated = 901, StreamCaptureWrongThread = 908, Unknown = 999,
}

/// <summary>CUdevice_attribute values used here.</summary>
internal enum CUdeviceAttribute
{
    MaxThreadsPerBlock = 1,
    WarpSize = 10,
    MultiprocessorCount = 16,
    L2CacheSize = 38,
    ComputeCapabilityMajor = 75,
    ComputeCapabilityMinor = 76,
    MaxSharedMemoryPerBlockOptin = 97,
}

/// <summary>CUfunction_attribute values used here.</summary>
internal enum CUfunctionAttribute
{
    /// <summary>CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: must be raised before a launch asks for more than 48 KiB.</summary>
    MaxDynamicSharedSizeBytes = 8,

    /// <summary>CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES: local memory a thread (spilled registers among it).</summary>
    LocalSizeBytes = 3,

    /// <summary>CU_FUNC_ATTRIBUTE_NUM_REGS: registers a thread.</summary>
    NumRegs = 4,
}

/// <summary>CUstreamCaptureMode: which potentially unsafe API calls other threads may make while a stream captures.</summary>
internal enum CUstreamCaptureMode
{
    Global = 0,
    ThreadLocal = 1,
    Relaxed = 2,
}

/// <summary>CUlaunchAttributeID values used here.</summary>
internal enum CUlaunchAttributeID
{
    /// <summary>
    /// CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION: the grid may start before the previous kernel in the stream
    /// has finished, once that kernel's blocks have all triggered (griddepcontrol.launch_dependents) or exited; the
    /// grid itself waits for the previous one with griddepcontrol.wait.
    /// </summary>
    ProgrammaticStreamSerialization = 6,
}

/// <summary>CUlaunchAttribute: an id, padding to 8 bytes, and a 64-byte union of which only the first int is used here.</summary>
[StructLayout(LayoutKind.Explicit, Size = 72)]
internal struct CUlaunchAttribute
{
    [FieldOffset(0)] public CUlaunchAttributeID Id;
    [FieldOffset(8)] public int Value;
}

/// <summary>CUlaunchConfig of cuLaunchKernelEx (CUDA 11.8 and later).</summary>
[StructLayout(LayoutKind.Sequential)]
internal unsafe struct CUlaunchConfig
{
    public uint GridDimX, GridDimY, GridDimZ;
    public uint BlockDimX, BlockDimY, BlockDimZ;
    public uint SharedMemBytes;
    public nint Stream;
    public CUlaunchAttribute* Attributes;
    public uint AttributeCount;
}

/// <summary>Raw CUDA driver API imports (libcuda.so.1).</summary>
internal static unsafe partial class Driver
{
    private const string Lib = "cuda";

    internal const uint CU_STREAM_NON_BLOCKING = 0x1;
    internal const uint CU_EVENT_DEFAULT = 0x0;
    internal const uint CU_EVENT_DISABLE_TIMING = 0x2;
    internal const uint CU_MEMHOSTALLOC_PORTABLE = 0x01;

    static Driver() => CudaLibraries.InstallResolver();

    [LibraryImport(Lib)] internal static partial CUresult cuInit(uint flags);
    [LibraryImport(Lib)] internal static partial CUresult cuDriverGetVersion(int* driverVersion);
    [LibraryImport(Lib)] internal static partial CUresult cuGetErrorName(CUresult error, byte** pStr);
    [LibraryImport(Lib)] internal static partial CUresult cuGetErrorString(CUresult error, byte** pStr);

    [LibraryImport(Lib)] internal static partial CUresult cuDeviceGet(int* device, int ordinal);
    [LibraryImport(Lib)] internal static partial CUresult cuDeviceGetCount(int* count);
    [LibraryImport(Lib)] internal static partial CUresult cuDeviceGetName(byte* name, int len, int dev);
    [LibraryImport(Lib)] internal static partial CUresult cuDeviceGetAttribute(int* pi, CUdeviceAttribute attrib, int dev);
    [LibraryImport(Lib)] internal static partial CUresult cuDeviceTotalMem_v2(nuint* bytes, int dev);

    [LibraryImport(Lib)] internal static partial CUresult cuDevicePrimaryCtxRetain(nint* pctx, int dev);
    [LibraryImport(Lib)] internal static partial CUresult cuDevicePrimaryCtxRelease_v2(int dev);
    // Unused by this layer, which shares the primary context with cuBLAS (the runtime uses it). CUDA 13's header maps
    // cuCtxCreate to cuCtxCreate_v4; the _v2 symbol stays exported.
    [LibraryImport(Lib)] internal static partial CUresult cuCtxCreate_v2(nint* pctx, uint flags, int dev);
    [LibraryImport(Lib)] internal static partial CUresult cuCtxSetCurrent(nint ctx);
    [LibraryImport(Lib)] internal static partial CUresult cuCtxPushCurrent_v2(nint ctx);
    [LibraryImport(Lib)] internal static partial CUresult cuCtxPopCurrent_v2(nint* pctx);
    [LibraryImport(Lib)] internal static partial CUresult cuCtxSynchronize();

    [LibraryImport(Lib)] internal static partial CUresult cuMemGetInfo_v2(nuint* free, nuint* total);
    [LibraryImport(Lib)] internal static partial CUresult cuMemAlloc_v2(ulong* dptr, nuint bytesize);
    [LibraryImport(Lib)] internal static partial CUresult cuMemFree_v2(ulong dptr);
    [LibraryImport(Lib)] internal static partial CUresult cuMemHostAlloc(void** pp, nuint bytesize, uint flags);
    [LibraryImport(Lib)] internal static partial CUresult cuMemFreeHost(void* p);
    [LibraryImport(Lib)] internal static partial CUresult cuMemcpyHtoDAsync_v2(ulong dstDevice, void* srcHost, nuint byteCount, nint hStream);
    [LibraryImport(Lib)] internal static partial CUresult cuMemcpyDtoHAsync_v2(void* dstHost, ulong srcDevice, nuint byteCount, nint hStream);
    [LibraryImport(Lib)] internal static partial CUresult cuMemcpyDtoDAsync_v2(ulong dstDevice, ulong srcDevice, nuint byteCount, nint hStream);
    [LibraryImport(Lib)] internal static partial CUresult cuMemsetD8Async(ulong dstDevice, byte uc, nuint n, nint hStream);
    [LibraryImport(Lib)] internal static partial CUresult cuMemsetD32Async(ulong dstDevice, uint ui, nuint n, nint hStream);

    [LibraryImport(Lib)] internal static partial CUresult cuModuleLoadData(nint* module, void* image);
    [LibraryImport(Lib)] internal static partial CUresult cuModuleUnload(nint hmod);
    [LibraryImport(Lib)] internal static partial CUresult cuModuleGetFunction(nint* hfunc, nint hmod, byte* name);
    [LibraryImport(Lib)] internal static partial CUresult cuFuncSetAttribute(nint hfunc, CUfunctionAttribute attrib, int value);
    [LibraryImport(Lib)] internal static partial CUresult cuFuncGetAttribute(out int value, CUfunctionAttribute attrib, nint hfunc);

    [LibraryImport(Lib)]
    internal static partial CUresult cuLaunchKernel(nint f, uint gridDimX, uint gridDimY, uint gridDimZ,
        uint blockDimX, uint blockDimY, uint blockDimZ, uint sharedMemBytes, nint hStream, void** kernelParams, void** extra);

    [LibraryImport(Lib)] internal static partial CUresult cuLaunchKernelEx(CUlaunchConfig* config, nint f, void** kernelParams, void** extra);

    // CUtensorMap (128 bytes, 64-aligned) of a tiled region, for the tensor-memory-access copies (compute capability 9.0+).
    // The enum parameters are ints here: data type 9 = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, interleave 0 = NONE, swizzle
    // 3 = CU_TENSOR_MAP_SWIZZLE_128B, L2 promotion 3 = CU_TENSOR_MAP_L2_PROMOTION_L2_256B, out-of-bounds fill 0 = zeros.
    [LibraryImport(Lib)]
    internal static partial CUresult cuTensorMapEncodeTiled(void* tensorMap, int dataType, uint rank, ulong globalAddress, ulong* globalDim,
        ulong* globalStrides, uint* boxDim, uint* elementStrides, int interleave, int swizzle, int l2Promotion, int oobFill);

    [LibraryImport(Lib)] internal static partial CUresult cuStreamCreate(nint* phStream, uint flags);
    [LibraryImport(Lib)] internal static partial CUresult cuStreamDestroy_v2(nint hStream);
    [LibraryImport(Lib)] internal static partial CUresult cuStreamSynchronize(nint hStream);
    [LibraryImport(Lib)] internal static partial CUresult cuStreamWaitEvent(nint hStream, nint hEvent, uint flags);
    [LibraryImport(Lib)] internal static partial CUresult cuStreamBeginCapture_v2(nint hStream, CUstreamCaptureMode mode);
    [LibraryImport(Lib)] internal static partial CUresult cuStreamEndCapture(nint hStream, nint* phGraph);

    // cuGraphInstantiate in both headers is a #define for this symbol.
    [LibraryImport(Lib)] internal static partial CUresult cuGraphInstantiateWithFlags(nint* phGraphExec, nint hGraph, ulong flags);
    [LibraryImport(Lib)] internal static partial CUresult cuGraphLaunch(nint hGraphExec, nint hStream);
    [LibraryImport(Lib)] internal static partial CUresult cuGraphDestroy(nint hGraph);
    [LibraryImport(Lib)] internal static partial CUresult cuGraphExecDestroy(nint hGraphExec);

    [LibraryImport(Lib)] internal static partial CUresult cuEventCreate(nint* phEvent, uint flags);
    [LibraryImport(Lib)] internal static partial CUresult cuEventDestroy_v2(nint hEvent);
    [LibraryImport(Lib)] internal static partial CUresult cuEventRecord(nint hEvent, nint hStream);
    [LibraryImport(Lib)] internal static partial CUresult cuEventSynchronize(nint hEvent);
    // CUDA 13's header maps cuEventElapsedTime to cuEventElapsedTime_v2 (same signature), which 12.6 lacks; the
    // unversioned symbol is exported by 12.x and 13.x drivers alike.
    [LibraryImport(Lib)] internal static partial CUresult cuEventElapsedTime(float* pMilliseconds, nint hStart, nint hEnd);
}
