using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Text;

namespace MoeRagInject.Backend.Cuda.Interop;

// Threading: every call below, except CudaDevice.Open/Count/DriverVersion and Nvrtc, needs the device's primary context
// current on the calling thread. Open makes it current on the opening thread; call MakeCurrent on any other thread first.
// Releases (Dispose or finalizer) make the context current themselves.

/// <summary>Use of a disposed wrapper fails with ObjectDisposedException rather than reaching the driver with a freed handle.</summary>
file static class Live
{
    public static T Check<T>(T handle, object owner) where T : SafeHandle
    {
        ObjectDisposedException.ThrowIf(handle.IsClosed, owner);
        return handle;
    }
}

/// <summary>One GPU, holding a reference on its primary context; the factory for everything that lives on it.</summary>
internal sealed unsafe class CudaDevice : IDisposable
{
    private readonly CudaContextHandle _context;

    private CudaDevice(int ordinal, CudaContextHandle context)
    {
        _context = context;
        Ordinal = ordinal;
        var device = context.Device;
        var name = stackalloc byte[256];
        CudaCheck.Driver(Driver.cuDeviceGetName(name, 256, device));
        Name = Marshal.PtrToStringUTF8((nint)name) ?? "";
        ComputeCapability = (Attribute(CUdeviceAttribute.ComputeCapabilityMajor), Attribute(CUdeviceAttribute.ComputeCapabilityMinor));
        MultiprocessorCount = Attribute(CUdeviceAttribute.MultiprocessorCount);
        MaxSharedMemoryPerBlockOptin = Attribute(CUdeviceAttribute.MaxSharedMemoryPerBlockOptin);
        L2CacheBytes = Attribute(CUdeviceAttribute.L2CacheSize);
        nuint total;
        CudaCheck.Driver(Driver.cuDeviceTotalMem_v2(&total, device));
        TotalMemoryBytes = (long)total;
    }

    /// <summary>Devices visible to this process (after CUDA_VISIBLE_DEVICES).</summary>
    public static int Count
    {
        get
        {
            Initialize();
            int count;
            CudaCheck.Driver(Driver.cuDeviceGetCount(&count));
            return count;
        }
    }

    /// <summary>Device <paramref name="ordinal"/>'s memory in bytes, read without making a context.</summary>
    public static long TotalMemoryOf(int ordinal)
    {
        Initialize();
        int device;
        CudaCheck.Driver(Driver.cuDeviceGet(&device, ordinal));
        nuint total;
        CudaCheck.Driver(Driver.cuDeviceTotalMem_v2(&total, device));
        return (long)total;
    }

    /// <summary>The CUDA version the driver supports, as 1000·major + 10·minor (12080 for 12.8).</summary>
    public static int DriverVersion
    {
        get
        {
            CudaLibraries.EnsureLoaded();
            int version;
            CudaCheck.Driver(Driver.cuDriverGetVersion(&version));
            return version;
        }
    }

    public int Ordinal { get; }
    public string Name { get; }
    public (int Major, int Minor) ComputeCapability { get; }
    public int MultiprocessorCount { get; }

    /// <summary>The most shared memory one block may use after opting in with <see cref="CudaKernel.SetMaxDynamicSharedMemory"/>.</summary>
    public int MaxSharedMemoryPerBlockOptin { get; }

    public int L2CacheBytes { get; }
    public long TotalMemoryBytes { get; }

    private CudaContextHandle Context => Live.Check(_context, this);

    /// <summary>Loads the libraries, initialises the driver, retains device <paramref name="ordinal"/>'s primary context and makes it current.</summary>
    public static CudaDevice Open(int ordinal = 0)
    {
        Initialize();
        int device;
        CudaCheck.Driver(Driver.cuDeviceGet(&device, ordinal));
        nint context;
        CudaCheck.Driver(Driver.cuDevicePrimaryCtxRetain(&context, device));
        var handle = new CudaContextHandle(context, device);
        try
        {
            var opened = new CudaDevice(ordinal, handle);
            opened.MakeCurrent();
            return opened;
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    /// <summary>Makes this device's primary context current on the calling thread.</summary>
    public void MakeCurrent() => CudaCheck.Driver(Driver.cuCtxSetCurrent(Context.DangerousGetHandle()));

    /// <summary>Waits for all work on the device.</summary>
    public void Synchronize() => CudaCheck.Driver(Driver.cuCtxSynchronize());

    /// <summary>Free and total device memory now, as the driver sees it.</summary>
    public (long Free, long Total) GetMemoryInfo()
    {
        nuint free, total;
        CudaCheck.Driver(Driver.cuMemGetInfo_v2(&free, &total));
        return ((long)free, (long)total);
    }

    public DeviceBuffer Allocate(long bytes)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(bytes);
        var context = Context;
        ulong address;
        CudaCheck.Driver(Driver.cuMemAlloc_v2(&address, (nuint)bytes));
        return new DeviceBuffer(new DeviceMemoryHandle(address, bytes, context));
    }

    public PinnedBuffer<T> AllocatePinned<T>(int length) where T : unmanaged
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(length);
        var context = Context;
        var bytes = (long)length * sizeof(T);
        void* pointer;
        CudaCheck.Driver(Driver.cuMemHostAlloc(&pointer, (nuint)bytes, Driver.CU_MEMHOSTALLOC_PORTABLE));
        return new PinnedBuffer<T>(new PinnedHostMemoryHandle(pointer, bytes, context), length);
    }

    /// <summary>A stream that does not synchronise with the legacy NULL stream (and so can be captured).</summary>
    public CudaStream CreateStream()
    {
        var context = Context;
        nint stream;
        CudaCheck.Driver(Driver.cuStreamCreate(&stream, Driver.CU_STREAM_NON_BLOCKING));
        return new CudaStream(new CudaStreamHandle(stream, context), context);
    }

    /// <summary>An event; without <paramref name="timing"/> it is cheaper and serves only ordering and waiting.</summary>
    public CudaEvent CreateEvent(bool timing = false)
    {
        var context = Context;
        nint created;
        CudaCheck.Driver(Driver.cuEventCreate(&created, timing ? Driver.CU_EVENT_DEFAULT : Driver.CU_EVENT_DISABLE_TIMING));
        return new CudaEvent(new CudaEventHandle(created, context));
    }

    /// <summary>Loads a cubin or PTX image (as <see cref="Nvrtc.Compile"/> returns it; PTX without its NUL gets one).</summary>
    /// <summary>
    /// Loads a cubin or PTX image. With <paramref name="programmaticLaunch"/> every kernel of the module is launched with
    /// programmatic stream serialization, so each kernel must begin with griddepcontrol.wait (Kernels/common.cuh's
    /// <c>kernel_prologue</c>) before it touches memory the previous kernel writes or reads.
    /// </summary>
    public CudaModule LoadModule(ReadOnlySpan<byte> image, bool programmaticLaunch = false)
    {
        var context = Context;
        var isElf = image is [0x7F, (byte)'E', (byte)'L', (byte)'F', ..];
        ReadOnlySpan<byte> terminated = isElf || image is [.., 0] ? image : [.. image, 0];
        nint module;
        fixed (byte* data = terminated) CudaCheck.Driver(Driver.cuModuleLoadData(&module, data));
        return new CudaModule(new CudaModuleHandle(module, context), programmaticLaunch);
    }

    public CublasContext CreateCublas()
    {
        var context = Context;
        nint cublas;
        CudaCheck.Cublas(Cublas.cublasCreate_v2(&cublas));
        return new CublasContext(new CublasHandle(cublas, context));
    }

    public CublasLtGemms CreateCublasLt(CudaStream stream, DeviceBuffer workspace)
    {
        var context = Context;
        nint handle;
        CudaCheck.Cublas(CublasLt.cublasLtCreate(&handle));
        return new CublasLtGemms(new CublasLtHandle(handle, context), stream, workspace);
    }

    /// <summary>Drops this object's reference on the primary context; buffers, streams and modules made from it keep their own.</summary>
    public void Dispose() => _context.Dispose();

    private static void Initialize()
    {
        CudaLibraries.EnsureLoaded();
        CudaCheck.Driver(Driver.cuInit(0));
    }

    private int Attribute(CUdeviceAttribute attribute)
    {
        int value;
        CudaCheck.Driver(Driver.cuDeviceGetAttribute(&value, attribute, _context.Device));
        return value;
    }
}

/// <summary>A device allocation. Copies are ordered on the stream given; offsets and lengths are in bytes.</summary>
internal sealed unsafe class DeviceBuffer : IDisposable
{
    private readonly DeviceMemoryHandle _memory;

    internal DeviceBuffer(DeviceMemoryHandle memory) => _memory = memory;

    /// <summary>The CUdeviceptr of the first byte.</summary>
    public ulong Pointer => Live.Check(_memory, this).Address;

    public long ByteLength => _memory.ByteLength;

    /// <summary>
    /// Copies <paramref name="source"/> (any memory) to <paramref name="byteOffset"/> and then synchronises the stream, since
    /// the driver may still read pageable memory after returning. Not usable while the stream captures: see <see cref="UploadPinned"/>.
    /// </summary>
    public void Upload<T>(ReadOnlySpan<T> source, CudaStream stream, long byteOffset = 0) where T : unmanaged
    {
        var bytes = Range(byteOffset, (long)source.Length * sizeof(T));
        if (bytes == 0) return;
        fixed (T* host = source)
        {
            CudaCheck.Driver(Driver.cuMemcpyHtoDAsync_v2(Pointer + (ulong)byteOffset, host, bytes, stream.Handle));
            stream.Synchronize();
        }
    }

    /// <summary>Copies to <paramref name="destination"/> (any memory) and synchronises the stream before returning.</summary>
    public void Download<T>(Span<T> destination, CudaStream stream, long byteOffset = 0) where T : unmanaged
    {
        var bytes = Range(byteOffset, (long)destination.Length * sizeof(T));
        if (bytes == 0) return;
        fixed (T* host = destination)
        {
            CudaCheck.Driver(Driver.cuMemcpyDtoHAsync_v2(host, Pointer + (ulong)byteOffset, bytes, stream.Handle));
            stream.Synchronize();
        }
    }

    /// <summary>
    /// Enqueues a copy of the first <paramref name="count"/> elements of <paramref name="source"/>; returns at once, so the
    /// pinned memory must not change until the stream has passed this point. Capturable: a graph reads the pinned memory when it runs.
    /// </summary>
    public void UploadPinned<T>(PinnedBuffer<T> source, int count, CudaStream stream, long byteOffset = 0) where T : unmanaged
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan((uint)count, (uint)source.Length, nameof(count));
        var bytes = Range(byteOffset, (long)count * sizeof(T));
        CudaCheck.Driver(Driver.cuMemcpyHtoDAsync_v2(Pointer + (ulong)byteOffset, source.Pointer, bytes, stream.Handle));
    }

    /// <summary>Enqueues a copy into the first <paramref name="count"/> elements of <paramref name="destination"/>; valid once the stream has passed it.</summary>
    public void DownloadPinned<T>(PinnedBuffer<T> destination, int count, CudaStream stream, long byteOffset = 0) where T : unmanaged
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan((uint)count, (uint)destination.Length, nameof(count));
        var bytes = Range(byteOffset, (long)count * sizeof(T));
        CudaCheck.Driver(Driver.cuMemcpyDtoHAsync_v2(destination.Pointer, Pointer + (ulong)byteOffset, bytes, stream.Handle));
    }

    public void CopyTo(DeviceBuffer destination, long byteCount, CudaStream stream, long sourceOffset = 0, long destinationOffset = 0)
    {
        var bytes = Range(sourceOffset, byteCount);
        destination.Range(destinationOffset, byteCount);
        CudaCheck.Driver(Driver.cuMemcpyDtoDAsync_v2(destination.Pointer + (ulong)destinationOffset, Pointer + (ulong)sourceOffset, bytes, stream.Handle));
    }

    /// <summary>Sets every byte to <paramref name="value"/>.</summary>
    public void Memset(byte value, CudaStream stream) =>
        CudaCheck.Driver(Driver.cuMemsetD8Async(Pointer, value, (nuint)ByteLength, stream.Handle));

    /// <summary>Sets every 32-bit word to <paramref name="value"/> (a float's bits, say); the length must be a multiple of 4.</summary>
    public void Fill32(uint value, CudaStream stream)
    {
        if (ByteLength % 4 != 0) throw new InvalidOperationException($"a {ByteLength}-byte buffer is not a whole number of 32-bit words");
        CudaCheck.Driver(Driver.cuMemsetD32Async(Pointer, value, (nuint)(ByteLength / 4), stream.Handle));
    }

    public void Dispose() => _memory.Dispose();

    private nuint Range(long offset, long bytes)
    {
        if (offset < 0 || bytes < 0 || offset > ByteLength - bytes)
            throw new ArgumentOutOfRangeException(nameof(offset), $"{bytes} bytes at offset {offset} do not fit a {ByteLength}-byte device buffer");
        return (nuint)bytes;
    }
}

/// <summary>Page-locked host memory of <typeparamref name="T"/>, for copies that overlap compute and for captured copies.</summary>
internal sealed unsafe class PinnedBuffer<T> : IDisposable where T : unmanaged
{
    private readonly PinnedHostMemoryHandle _memory;

    internal PinnedBuffer(PinnedHostMemoryHandle memory, int length)
    {
        _memory = memory;
        Length = length;
    }

    public int Length { get; }

    public Span<T> Span => new(Pointer, Length);

    internal T* Pointer => (T*)Live.Check(_memory, this).Pointer;

    public void Dispose() => _memory.Dispose();
}

/// <summary>A CUDA stream: an ordered queue of device work.</summary>
internal sealed unsafe class CudaStream : IDisposable
{
    private readonly CudaStreamHandle _stream;
    private readonly CudaContextHandle _context;

    internal CudaStream(CudaStreamHandle stream, CudaContextHandle context)
    {
        _stream = stream;
        _context = context;
    }

    internal nint Handle => Live.Check(_stream, this).DangerousGetHandle();

    /// <summary>Blocks until all work queued so far has finished.</summary>
    public void Synchronize() => CudaCheck.Driver(Driver.cuStreamSynchronize(Handle));

    /// <summary>Makes later work on this stream wait for <paramref name="recorded"/> (recorded on any stream).</summary>
    public void Wait(CudaEvent recorded) => CudaCheck.Driver(Driver.cuStreamWaitEvent(Handle, recorded.Handle, 0));

    /// <summary>
    /// Starts recording instead of running. Until <see cref="EndCapture"/>: no synchronisation of this stream, no copies
    /// from pageable memory, no cuMemAlloc/cuMemFree; kernel arguments and copy addresses are fixed at capture time.
    /// <see cref="CUstreamCaptureMode.ThreadLocal"/> restricts only this thread's unsafe calls; Global restricts all threads'.
    /// </summary>
    public void BeginCapture(CUstreamCaptureMode mode = CUstreamCaptureMode.ThreadLocal) =>
        CudaCheck.Driver(Driver.cuStreamBeginCapture_v2(Handle, mode));

    /// <summary>Ends capture (on the thread that began it) and returns the recorded graph.</summary>
    public CudaGraph EndCapture()
    {
        nint graph;
        CudaCheck.Driver(Driver.cuStreamEndCapture(Handle, &graph));
        return new CudaGraph(new CudaGraphHandle(graph, _context), _context);
    }

    public void Dispose() => _stream.Dispose();
}

/// <summary>A captured graph, to instantiate once and then replay.</summary>
internal sealed unsafe class CudaGraph(CudaGraphHandle graph, CudaContextHandle context) : IDisposable
{
    public CudaGraphExec Instantiate()
    {
        nint exec;
        CudaCheck.Driver(Driver.cuGraphInstantiateWithFlags(&exec, Live.Check(graph, this).DangerousGetHandle(), 0));
        return new CudaGraphExec(new CudaGraphExecHandle(exec, context));
    }

    public void Dispose() => graph.Dispose();
}

/// <summary>An instantiated graph; independent of the <see cref="CudaGraph"/> it came from, which may be disposed.</summary>
internal sealed class CudaGraphExec(CudaGraphExecHandle exec) : IDisposable
{
    /// <summary>Enqueues one replay on <paramref name="stream"/>.</summary>
    public void Launch(CudaStream stream) => CudaCheck.Driver(Driver.cuGraphLaunch(Live.Check(exec, this).DangerousGetHandle(), stream.Handle));

    public void Dispose() => exec.Dispose();
}

/// <summary>A marker in a stream, for cross-stream ordering, host waits and (if created with timing) elapsed time.</summary>
internal sealed unsafe class CudaEvent(CudaEventHandle cudaEvent) : IDisposable
{
    internal nint Handle => Live.Check(cudaEvent, this).DangerousGetHandle();

    public void Record(CudaStream stream) => CudaCheck.Driver(Driver.cuEventRecord(Handle, stream.Handle));

    public void Synchronize() => CudaCheck.Driver(Driver.cuEventSynchronize(Handle));

    /// <summary>Milliseconds between two completed timing events (about 0.5 µs resolution).</summary>
    public static float ElapsedMilliseconds(CudaEvent start, CudaEvent end)
    {
        float milliseconds;
        CudaCheck.Driver(Driver.cuEventElapsedTime(&milliseconds, start.Handle, end.Handle));
        return milliseconds;
    }

    public void Dispose() => cudaEvent.Dispose();
}

/// <summary>A loaded cubin or PTX module.</summary>
internal sealed unsafe class CudaModule(CudaModuleHandle module, bool programmaticLaunch) : IDisposable
{
    internal bool IsDisposed => module.IsClosed;

    /// <summary>Whether its kernels are launched with programmatic stream serialization (see <see cref="CudaDevice.LoadModule"/>).</summary>
    internal bool ProgrammaticLaunch => programmaticLaunch;

    /// <summary>The <c>extern "C"</c> kernel <paramref name="name"/>; valid while this module is not disposed.</summary>
    public CudaKernel GetFunction(string name)
    {
        nint function;
        fixed (byte* utf8 = Encoding.UTF8.GetBytes(name + "\0"))
            CudaCheck.Driver(Driver.cuModuleGetFunction(&function, Live.Check(module, this).DangerousGetHandle(), utf8));
        return new CudaKernel(this, function, name);
    }

    public void Dispose() => module.Dispose();
}

/// <summary>A kernel in a <see cref="CudaModule"/>.</summary>
internal sealed unsafe class CudaKernel
{
    private const int MaxArguments = 64;
    private readonly CudaModule _module;
    private readonly nint _function;

    internal CudaKernel(CudaModule module, nint function, string name)
    {
        _module = module;
        _function = function;
        Name = name;
    }

    public string Name { get; }

    /// <summary>Allows launches with up to <paramref name="bytes"/> of dynamic shared memory (needed above 48 KiB).</summary>
    public void SetMaxDynamicSharedMemory(int bytes) =>
        CudaCheck.Driver(Driver.cuFuncSetAttribute(Function, CUfunctionAttribute.MaxDynamicSharedSizeBytes, bytes));

    /// <summary>One of the compiled function's attributes (registers a thread, local memory a thread).</summary>
    public int Attribute(CUfunctionAttribute attribute)
    {
        CudaCheck.Driver(Driver.cuFuncGetAttribute(out var value, attribute, Function));
        return value;
    }

    /// <summary>
    /// Enqueues the kernel. Each argument must have exactly the size of the kernel's parameter: device pointers as
    /// <see cref="ulong"/> or <see cref="DeviceBuffer"/>, C int as int, and so on. Allocates nothing.
    /// </summary>
    [SkipLocalsInit]
    public void Launch((uint X, uint Y, uint Z) grid, (uint X, uint Y, uint Z) block, uint sharedBytes, CudaStream stream,
        params ReadOnlySpan<KernelArg> args)
    {
        if (args.Length > MaxArguments) throw new ArgumentException($"at most {MaxArguments} kernel arguments", nameof(args));
        var function = Function;
        var parameters = stackalloc void*[args.Length];
        fixed (KernelArg* values = args)
        {
            for (var i = 0; i < args.Length; i++) parameters[i] = values[i].Indirect != 0 ? (void*)values[i].Indirect : &values[i].Low;
            if (!_module.ProgrammaticLaunch)
            {
                CudaCheck.Driver(Driver.cuLaunchKernel(function, grid.X, grid.Y, grid.Z, block.X, block.Y, block.Z, sharedBytes,
                    stream.Handle, parameters, null));
                return;
            }
            var attribute = new CUlaunchAttribute { Id = CUlaunchAttributeID.ProgrammaticStreamSerialization, Value = 1 };
            var config = new CUlaunchConfig
            {
                GridDimX = grid.X, GridDimY = grid.Y, GridDimZ = grid.Z, BlockDimX = block.X, BlockDimY = block.Y, BlockDimZ = block.Z,
                SharedMemBytes = sharedBytes, Stream = stream.Handle, Attributes = &attribute, AttributeCount = 1,
            };
            CudaCheck.Driver(Driver.cuLaunchKernelEx(&config, function, parameters, null));
        }
    }

    private nint Function => _module.IsDisposed ? throw new ObjectDisposedException(nameof(CudaModule)) : _function;
}

/// <summary>
/// One kernel argument by value: at most 16 bytes held here, or a larger value (a <see cref="TensorMap"/>) read from
/// where it lives; cuLaunchKernel reads as many bytes as the parameter has.
/// </summary>
[StructLayout(LayoutKind.Sequential)]
internal struct KernelArg
{
    internal ulong Low;
    internal ulong High;
    internal nint Indirect;

    public static KernelArg Of<T>(T value) where T : unmanaged
    {
        if (Unsafe.SizeOf<T>() > 16) throw new ArgumentException($"{typeof(T).Name} has {Unsafe.SizeOf<T>()} bytes; kernel arguments here hold at most 16");
        var arg = default(KernelArg);
        Unsafe.WriteUnaligned(ref Unsafe.As<ulong, byte>(ref arg.Low), value);
        return arg;
    }

    public static implicit operator KernelArg(ulong devicePointer) => Of(devicePointer);
    public static implicit operator KernelArg(DeviceBuffer buffer) => Of(buffer.Pointer);
    public static implicit operator KernelArg(long value) => Of(value);
    public static implicit operator KernelArg(int value) => Of(value);
    public static implicit operator KernelArg(uint value) => Of(value);
    public static implicit operator KernelArg(float value) => Of(value);
    public static implicit operator KernelArg(TensorMap map) => new() { Indirect = map.Address };
}

/// <summary>How wide a request the tensor-memory-access unit makes of L2 for each box row (CUtensorMapL2promotion).</summary>
internal enum L2Promotion
{
    None = 0,
    Bytes64 = 1,
    Bytes128 = 2,
    Bytes256 = 3,
}

/// <summary>
/// A CUtensorMap: how the tensor-memory-access unit copies boxes of a 2-D bf16 matrix (row-major, <c>columns</c> a row)
/// into shared memory, 128-byte swizzled (the layout the wgmma descriptors read), rows past the end read as zeros. Its
/// 128 bytes live in aligned native memory and are passed by value at each launch.
/// </summary>
internal sealed unsafe class TensorMap : IDisposable
{
    private void* _map = NativeMemory.AlignedAlloc(128, 64);

    /// <param name="boxColumns">Columns a box (64: 128 bytes, the swizzle's span).</param>
    public TensorMap(ulong address, long rows, long columns, int boxRows, L2Promotion promotion, int boxColumns = 64)
    {
        var dims = stackalloc ulong[] { (ulong)columns, (ulong)rows };
        var strides = stackalloc ulong[] { 2UL * (ulong)columns };
        var box = stackalloc uint[] { (uint)boxColumns, (uint)boxRows };
        var elementStrides = stackalloc uint[] { 1, 1 };
        try
        {
            CudaCheck.Driver(Driver.cuTensorMapEncodeTiled(_map, 9, 2, address, dims, strides, box, elementStrides, 0, 3, (int)promotion, 0));
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    internal nint Address => _map is null ? throw new ObjectDisposedException(nameof(TensorMap)) : (nint)_map;

    public void Dispose()
    {
        if (_map is null) return;
        NativeMemory.AlignedFree(_map);
        _map = null;
    }
}

/// <summary>Runtime compilation of CUDA C++ kernels.</summary>
internal static unsafe partial class Nvrtc
{
    /// <summary>NVRTC's version.</summary>
    public static (int Major, int Minor) Version
    {
        get
        {
            CudaLibraries.EnsureLoaded();
            int major, minor;
            CudaCheck.Nvrtc(nvrtcVersion(&major, &minor));
            return (major, minor);
        }
    }

    /// <summary>
    /// Compiles <paramref name="source"/>. Returns a cubin when <paramref name="options"/> name a real architecture
    /// (-arch=sm_90 or --gpu-architecture=sm_90), else NUL-terminated PTX, either ready for <see cref="CudaDevice.LoadModule"/>.
    /// A failed compilation throws <see cref="CudaException"/> with the compiler's log as its detail; a successful one
    /// hands a non-empty log (warnings, ptxas's advice) to <paramref name="log"/>.
    /// </summary>
    public static byte[] Compile(string source, string name, IReadOnlyList<string> options, Action<string>? log = null)
    {
        CudaLibraries.EnsureLoaded();
        nint created;
        fixed (byte* src = Encoding.UTF8.GetBytes(source + "\0"), programName = Encoding.UTF8.GetBytes(name + "\0"))
            CudaCheck.Nvrtc(nvrtcCreateProgram(&created, src, programName, 0, null, null));
        using var program = new NvrtcProgramHandle(created);
        var handle = program.DangerousGetHandle();

        var blob = Encoding.UTF8.GetBytes(string.Concat(options.Select(o => o + "\0")));
        var pointers = new nint[options.Count];
        NvrtcResult compiled;
        fixed (byte* text = blob)
        fixed (nint* starts = pointers)
        {
            for (int i = 0, offset = 0; i < options.Count; offset += Encoding.UTF8.GetByteCount(options[i]) + 1, i++)
                starts[i] = (nint)(text + offset);
            compiled = nvrtcCompileProgram(handle, options.Count, (byte**)starts);
        }
        if (compiled != NvrtcResult.Success) CudaCheck.ThrowNvrtc(compiled, $"nvrtcCompileProgram({name})", Log(handle));
        if (log != null && Log(handle) is { Length: > 0 } message) log(message);

        var cubin = IsRealArchitecture(options);
        nuint size;
        CudaCheck.Nvrtc(cubin ? nvrtcGetCUBINSize(handle, &size) : nvrtcGetPTXSize(handle, &size));
        var image = new byte[(int)size];
        fixed (byte* output = image) CudaCheck.Nvrtc(cubin ? nvrtcGetCUBIN(handle, output) : nvrtcGetPTX(handle, output));
        return image;
    }

    private static string Log(nint program)
    {
        nuint size;
        if (nvrtcGetProgramLogSize(program, &size) != NvrtcResult.Success || size <= 1) return "";
        var log = new byte[(int)size];
        fixed (byte* text = log)
            if (nvrtcGetProgramLog(program, text) != NvrtcResult.Success) return "";
        return Encoding.UTF8.GetString(log).TrimEnd('\0', '\n', '\r', ' ');
    }

    private static bool IsRealArchitecture(IReadOnlyList<string> options)
    {
        for (var i = 0; i < options.Count; i++)
        {
            var option = options[i];
            if (option.StartsWith("-arch=sm_", StringComparison.Ordinal) || option.StartsWith("--gpu-architecture=sm_", StringComparison.Ordinal))
                return true;
            if (option is "-arch" or "--gpu-architecture" && i + 1 < options.Count && options[i + 1].StartsWith("sm_", StringComparison.Ordinal))
                return true;
        }
        return false;
    }
}

/// <summary>A cuBLAS handle with its stream and workspace.</summary>
internal sealed unsafe class CublasContext : IDisposable
{
    private readonly CublasHandle _handle;
    private DeviceBuffer? _workspace;

    internal CublasContext(CublasHandle handle) => _handle = handle;

    /// <summary>cuBLAS's version, as 10000·major + 100·minor + patch.</summary>
    public int Version
    {
        get
        {
            int version;
            CudaCheck.Cublas(Cublas.cublasGetVersion_v2(Handle, &version));
            return version;
        }
    }

    private nint Handle => Live.Check(_handle, this).DangerousGetHandle();

    /// <summary>Runs later calls on <paramref name="stream"/>, keeping the workspace set by <see cref="SetWorkspace"/>.</summary>
    public void SetStream(CudaStream stream)
    {
        CudaCheck.Cublas(Cublas.cublasSetStream_v2(Handle, stream.Handle));
        // cublasSetStream resets the workspace to cuBLAS's own pool (cuBLAS documentation, cublasSetStream).
        if (_workspace is not null) SetWorkspace(_workspace);
    }

    /// <summary>
    /// Has cuBLAS use <paramref name="workspace"/> rather than allocate its own, which keeps graph capture free of
    /// allocations; it must not be disposed before this context. NVIDIA's cuBLAS documentation recommends 32 MiB on Hopper, 4 MiB before.
    /// </summary>
    public void SetWorkspace(DeviceBuffer workspace)
    {
        CudaCheck.Cublas(Cublas.cublasSetWorkspace_v2(Handle, (void*)workspace.Pointer, (nuint)workspace.ByteLength));
        _workspace = workspace;
    }

    public void SetMathMode(CublasMath mode) => CudaCheck.Cublas(Cublas.cublasSetMathMode(Handle, mode));

    /// <summary>
    /// Row-major C[m,n] = alpha·A[m,k]·B[n,k]ᵀ + beta·C, fp32 accumulation: A the bf16 activations, B a bf16 PyTorch Linear
    /// weight [out = n, in = k], C fp32 or bf16 (<paramref name="cType"/>). Arguments are device addresses.
    /// </summary>
    public void GemmBf16(int m, int n, int k, ulong a, ulong b, ulong c, CudaDataType cType = CudaDataType.R32F, float alpha = 1f, float beta = 0f)
    {
        if (cType is not (CudaDataType.R32F or CudaDataType.R16BF)) throw new ArgumentOutOfRangeException(nameof(cType), cType, "C must be fp32 or bf16");
        // cuBLAS is column-major, and a row-major X[r,c] buffer read column-major is Xᵀ (c×r, leading dimension c). So the
        // C buffer is Cᵀ[n×m] with ldc = n, and Cᵀ = B·Aᵀ: the first operand is the B buffer (Bᵀ as k×n, lda = k) read with
        // transa = T to give B (n×k); the second is the A buffer, already Aᵀ (k×m, ldb = k), so transb = N. Then
        // cuBLAS (m', n', k') = (n, m, k).
        CudaCheck.Cublas(Cublas.cublasGemmEx(Handle, CublasOperation.T, CublasOperation.N, n, m, k, &alpha,
            (void*)b, CudaDataType.R16BF, k,
            (void*)a, CudaDataType.R16BF, k, &beta,
            (void*)c, cType, n,
            CublasComputeType.Compute32F, CublasGemmAlgo.Default));
    }

    /// <summary>
    /// <paramref name="batch"/> products like <see cref="GemmBf16"/>, operand i at a + i·strideA, b + i·strideB and
    /// c + i·strideC (strides in elements; a stride of 0 shares one operand).
    /// </summary>
    public void GemmBf16Batched(int m, int n, int k, ulong a, long strideA, ulong b, long strideB, ulong c, long strideC, int batch,
        CudaDataType cType = CudaDataType.R32F)
    {
        if (cType is not (CudaDataType.R32F or CudaDataType.R16BF)) throw new ArgumentOutOfRangeException(nameof(cType), cType, "C must be fp32 or bf16");
        float alpha = 1f, beta = 0f;
        // The same column-major mapping as GemmBf16, per batch entry.
        CudaCheck.Cublas(Cublas.cublasGemmStridedBatchedEx(Handle, CublasOperation.T, CublasOperation.N, n, m, k, &alpha,
            (void*)b, CudaDataType.R16BF, k, strideB,
            (void*)a, CudaDataType.R16BF, k, strideA, &beta,
            (void*)c, cType, n, strideC, batch,
            CublasComputeType.Compute32F, CublasGemmAlgo.Default));
    }

    public void Dispose() => _handle.Dispose();
}
