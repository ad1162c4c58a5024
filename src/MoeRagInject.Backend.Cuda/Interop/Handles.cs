using System.Runtime.InteropServices;

namespace MoeRagInject.Backend.Cuda.Interop;

/// <summary>One retained reference on a device's primary context (the context the CUDA runtime, and so cuBLAS, uses).</summary>
internal sealed class CudaContextHandle : SafeHandle
{
    internal CudaContextHandle(nint context, int device) : base(0, ownsHandle: true)
    {
        SetHandle(context);
        Device = device;
    }

    /// <summary>The CUdevice whose primary context this is.</summary>
    public int Device { get; }

    public override bool IsInvalid => handle == 0;

    protected override bool ReleaseHandle() => ContextBoundHandle.Released(Driver.cuDevicePrimaryCtxRelease_v2(Device));
}

/// <summary>
/// A resource that lives in a context. It holds a reference on the context's handle, so the context is released only after
/// every resource in it, and makes the context current around its own release, which may run on the finalizer thread.
/// </summary>
internal abstract unsafe class ContextBoundHandle : SafeHandle
{
    private readonly CudaContextHandle _context;

    protected ContextBoundHandle(nint value, CudaContextHandle context) : base(0, ownsHandle: true)
    {
        var added = false;
        context.DangerousAddRef(ref added);
        _context = context;
        SetHandle(value);
    }

    public override bool IsInvalid => handle == 0;

    protected sealed override bool ReleaseHandle()
    {
        var pushed = Driver.cuCtxPushCurrent_v2(_context.DangerousGetHandle()) == CUresult.Success;
        var released = Release(handle);
        if (pushed)
        {
            nint popped;
            Driver.cuCtxPopCurrent_v2(&popped);
        }
        _context.DangerousRelease();
        return released;
    }

    /// <summary>Frees the native resource; the context is current. Must not throw.</summary>
    protected abstract bool Release(nint value);

    // At process exit the driver may already be torn down, which frees everything anyway.
    internal static bool Released(CUresult result) => result is CUresult.Success or CUresult.Deinitialized;
}

/// <summary>A CUstream.</summary>
internal sealed class CudaStreamHandle(nint stream, CudaContextHandle context) : ContextBoundHandle(stream, context)
{
    protected override bool Release(nint value) => Released(Driver.cuStreamDestroy_v2(value));
}

/// <summary>A CUevent.</summary>
internal sealed class CudaEventHandle(nint cudaEvent, CudaContextHandle context) : ContextBoundHandle(cudaEvent, context)
{
    protected override bool Release(nint value) => Released(Driver.cuEventDestroy_v2(value));
}

/// <summary>A CUmodule; its CUfunctions are valid only while it is loaded.</summary>
internal sealed class CudaModuleHandle(nint module, CudaContextHandle context) : ContextBoundHandle(module, context)
{
    protected override bool Release(nint value) => Released(Driver.cuModuleUnload(value));
}

/// <summary>A CUgraph (a captured, not yet instantiated, graph).</summary>
internal sealed class CudaGraphHandle(nint graph, CudaContextHandle context) : ContextBoundHandle(graph, context)
{
    protected override bool Release(nint value) => Released(Driver.cuGraphDestroy(value));
}

/// <summary>A CUgraphExec (an instantiated graph, launchable on a stream).</summary>
internal sealed class CudaGraphExecHandle(nint graphExec, CudaContextHandle context) : ContextBoundHandle(graphExec, context)
{
    protected override bool Release(nint value) => Released(Driver.cuGraphExecDestroy(value));
}

/// <summary>A cublasHandle_t, created in (and destroyed with current) the primary context.</summary>
internal sealed class CublasHandle(nint cublas, CudaContextHandle context) : ContextBoundHandle(cublas, context)
{
    protected override bool Release(nint value) => Cublas.cublasDestroy_v2(value) == CublasStatus.Success;
}

/// <summary>A cublasLtHandle_t, created in (and destroyed with current) the primary context.</summary>
internal sealed class CublasLtHandle(nint cublasLt, CudaContextHandle context) : ContextBoundHandle(cublasLt, context)
{
    protected override bool Release(nint value) => CublasLt.cublasLtDestroy(value) == CublasStatus.Success;
}

/// <summary>A cuBLASLt descriptor: host memory only, bound to no context.</summary>
internal sealed class CublasLtDescriptorHandle : SafeHandle
{
    internal enum Kind { Matmul, Layout, Preference }

    private readonly Kind _kind;

    internal CublasLtDescriptorHandle(nint value, Kind kind) : base(0, ownsHandle: true)
    {
        _kind = kind;
        SetHandle(value);
    }

    public override bool IsInvalid => handle == 0;

    protected override bool ReleaseHandle() => (_kind switch
    {
        Kind.Matmul => CublasLt.cublasLtMatmulDescDestroy(handle),
        Kind.Layout => CublasLt.cublasLtMatrixLayoutDestroy(handle),
        _ => CublasLt.cublasLtMatmulPreferenceDestroy(handle),
    }) == CublasStatus.Success;
}

/// <summary>A cuMemAlloc allocation: its CUdeviceptr and byte length.</summary>
internal sealed class DeviceMemoryHandle(ulong address, long byteLength, CudaContextHandle context)
    : ContextBoundHandle((nint)(nuint)address, context)
{
    public ulong Address => (nuint)handle;
    public long ByteLength { get; } = byteLength;

    protected override bool Release(nint value) => Released(Driver.cuMemFree_v2((nuint)value));
}

/// <summary>A page-locked host allocation from cuMemHostAlloc.</summary>
internal sealed unsafe class PinnedHostMemoryHandle(void* pointer, long byteLength, CudaContextHandle context)
    : ContextBoundHandle((nint)pointer, context)
{
    public void* Pointer => (void*)handle;
    public long ByteLength { get; } = byteLength;

    protected override bool Release(nint value) => Released(Driver.cuMemFreeHost((void*)value));
}

/// <summary>An nvrtcProgram. Needs no context.</summary>
internal sealed unsafe class NvrtcProgramHandle : SafeHandle
{
    internal NvrtcProgramHandle(nint program) : base(0, ownsHandle: true) => SetHandle(program);

    public override bool IsInvalid => handle == 0;

    protected override bool ReleaseHandle()
    {
        var program = handle;
        return Nvrtc.nvrtcDestroyProgram(&program) == NvrtcResult.Success;
    }
}
