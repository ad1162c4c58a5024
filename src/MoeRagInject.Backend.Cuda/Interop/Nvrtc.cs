using System.Runtime.InteropServices;

namespace MoeRagInject.Backend.Cuda.Interop;

/// <summary>nvrtcResult, from nvrtc.h of CUDA 12.6 and 13.0 (13.0 adds 13 to 17, for precompiled headers and cancellation).</summary>
internal enum NvrtcResult
{
    Success = 0, OutOfMemory = 1, ProgramCreationFailure = 2, InvalidInput = 3, InvalidProgram = 4, InvalidOption = 5,
    Compilation = 6, BuiltinOperationFailure = 7, NoNameExpressionsAfterCompilation = 8,
    NoLoweredNamesBeforeCompilation = 9, NameExpressionNotValid = 10, InternalError = 11, TimeFileWriteFailed = 12,
}

/// <summary>Raw NVRTC imports (libnvrtc.so.13 or .12); strings are NUL-terminated UTF-8, nvrtcProgram an opaque pointer.</summary>
internal static unsafe partial class Nvrtc
{
    private const string Lib = "nvrtc";

    static Nvrtc() => CudaLibraries.InstallResolver();

    [LibraryImport(Lib)] internal static partial NvrtcResult nvrtcVersion(int* major, int* minor);
    [LibraryImport(Lib)] internal static partial byte* nvrtcGetErrorString(NvrtcResult result);

    [LibraryImport(Lib)]
    internal static partial NvrtcResult nvrtcCreateProgram(nint* prog, byte* src, byte* name, int numHeaders, byte** headers, byte** includeNames);
    [LibraryImport(Lib)] internal static partial NvrtcResult nvrtcDestroyProgram(nint* prog);
    [LibraryImport(Lib)] internal static partial NvrtcResult nvrtcCompileProgram(nint prog, int numOptions, byte** options);

    // Sizes of the log and of PTX include the trailing NUL; a cubin's is its byte length.
    [LibraryImport(Lib)] internal static partial NvrtcResult nvrtcGetProgramLogSize(nint prog, nuint* logSizeRet);
    [LibraryImport(Lib)] internal static partial NvrtcResult nvrtcGetProgramLog(nint prog, byte* log);
    [LibraryImport(Lib)] internal static partial NvrtcResult nvrtcGetPTXSize(nint prog, nuint* ptxSizeRet);
    [LibraryImport(Lib)] internal static partial NvrtcResult nvrtcGetPTX(nint prog, byte* ptx);
    [LibraryImport(Lib)] internal static partial NvrtcResult nvrtcGetCUBINSize(nint prog, nuint* cubinSizeRet);
    [LibraryImport(Lib)] internal static partial NvrtcResult nvrtcGetCUBIN(nint prog, byte* cubin);
}
