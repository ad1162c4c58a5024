using System.Diagnostics.CodeAnalysis;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using CublasApi = MoeRagInject.Backend.Cuda.Interop.Cublas;
using DriverApi = MoeRagInject.Backend.Cuda.Interop.Driver;
using NvrtcApi = MoeRagInject.Backend.Cuda.Interop.Nvrtc;

namespace MoeRagInject.Backend.Cuda.Interop;

/// <summary>A CUDA driver, NVRTC or cuBLAS call returned a failure status.</summary>
public sealed class CudaException : Exception
{
    internal CudaException(string library, int status, string? statusName, string? call, string? detail)
        : base($"{OneLine(call) ?? library + " call"} failed: {statusName ?? "status"} ({status}){(string.IsNullOrEmpty(detail) ? "" : ": " + detail)}")
    {
        Library = library;
        Status = status;
        StatusName = statusName;
        Call = call;
    }

    /// <summary>"CUDA driver", "NVRTC" or "cuBLAS".</summary>
    public string Library { get; }

    /// <summary>The numeric status (CUresult, nvrtcResult or cublasStatus_t).</summary>
    public int Status { get; }

    /// <summary>The status's native name, such as CUDA_ERROR_OUT_OF_MEMORY, when the library could say.</summary>
    public string? StatusName { get; }

    /// <summary>The source text of the failing call.</summary>
    public string? Call { get; }

    private static string? OneLine(string? text) =>
        text is null ? null : string.Join(' ', text.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries));
}

/// <summary>Status checks that turn a failure into a <see cref="CudaException"/> carrying the failing call's text.</summary>
internal static unsafe class CudaCheck
{
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Driver(CUresult result, [CallerArgumentExpression(nameof(result))] string? call = null)
    {
        if (result != CUresult.Success) ThrowDriver(result, call);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Nvrtc(NvrtcResult result, [CallerArgumentExpression(nameof(result))] string? call = null)
    {
        if (result != NvrtcResult.Success) ThrowNvrtc(result, call, null);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Cublas(CublasStatus status, [CallerArgumentExpression(nameof(status))] string? call = null)
    {
        if (status != CublasStatus.Success) ThrowCublas(status, call);
    }

    [DoesNotReturn, MethodImpl(MethodImplOptions.NoInlining)]
    private static void ThrowDriver(CUresult result, string? call) =>
        throw new CudaException("CUDA driver", (int)result, DriverErrorName(result), call, Lookup(() =>
        {
            byte* text;
            return DriverApi.cuGetErrorString(result, &text) == CUresult.Success ? (nint)text : 0;
        }));

    [DoesNotReturn, MethodImpl(MethodImplOptions.NoInlining)]
    internal static void ThrowNvrtc(NvrtcResult result, string? call, string? log) =>
        throw new CudaException("NVRTC", (int)result, Lookup(() => (nint)NvrtcApi.nvrtcGetErrorString(result)), call, log);

    [DoesNotReturn, MethodImpl(MethodImplOptions.NoInlining)]
    private static void ThrowCublas(CublasStatus status, string? call) =>
        throw new CudaException("cuBLAS", (int)status, Lookup(() => (nint)CublasApi.cublasGetStatusName(status)), call,
            Lookup(() => (nint)CublasApi.cublasGetStatusString(status)));

    /// <summary>CUDA_ERROR_... for a driver status, or null when the driver does not know it or cannot be called.</summary>
    internal static string? DriverErrorName(CUresult result) => Lookup(() =>
    {
        byte* name;
        return DriverApi.cuGetErrorName(result, &name) == CUresult.Success ? (nint)name : 0;
    });

    // Naming a status must never hide the failure being reported (a missing library, or an older one without the entry point).
    private static string? Lookup(Func<nint> text)
    {
        try
        {
            return Marshal.PtrToStringUTF8(text());
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            return null;
        }
    }
}
