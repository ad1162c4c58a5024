using System.Reflection;
using System.Runtime.InteropServices;

namespace MoeRagInject.Backend.Cuda.Interop;

/// <summary>
/// Finds the CUDA driver, NVRTC and cuBLAS for this assembly's imports, which name them by the logical names
/// <c>cuda</c>, <c>nvrtc</c>, <c>cublas</c> and <c>cublasLt</c>. Linux only.
/// </summary>
public static class CudaLibraries
{
    private static readonly Lock Gate = new();
    private static readonly Dictionary<string, nint> Loaded = new(StringComparer.Ordinal);
    private static bool _resolverInstalled;
    private static volatile bool _allLoaded;

    // Newest major first. The driver is searched on the loader path only: a toolkit's lib64/stubs/libcuda.so is a link-time
    // stub whose every call fails with CUDA_ERROR_STUB_LIBRARY.
    private static readonly (string Logical, string[] Files, bool InToolkit)[] Known =
    [
        ("cuda", ["libcuda.so.1"], false),
        ("nvrtc", ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"], true),
        ("cublasLt", ["libcublasLt.so.13", "libcublasLt.so.12"], true),
        ("cublas", ["libcublas.so.13", "libcublas.so.12"], true),
    ];

    /// <summary>
    /// Installs the import resolver and loads all four libraries (cuBLASLt before cuBLAS, which depends on it).
    /// Cheap after the first success. Throws <see cref="CudaUnavailableException"/> naming every path tried.
    /// </summary>
    public static void EnsureLoaded()
    {
        if (_allLoaded) return;
        InstallResolver();
        foreach (var (logical, _, _) in Known)
            if (Load(logical, out var failure) == 0) throw new CudaUnavailableException(failure!);
        _allLoaded = true;
    }

    /// <summary>
    /// Whether CUDA can be used here: the libraries load, <c>cuInit</c> succeeds and at least one device is present.
    /// When not, <paramref name="reason"/> says why (for skipping device tests).
    /// </summary>
    public static unsafe bool TryProbe(out string reason)
    {
        try
        {
            EnsureLoaded();
        }
        catch (CudaUnavailableException e)
        {
            reason = e.Message;
            return false;
        }
        var init = Driver.cuInit(0);
        if (init != CUresult.Success)
        {
            reason = $"the CUDA driver failed to initialise: {CudaCheck.DriverErrorName(init)} ({(int)init}); is an NVIDIA GPU visible to this process?";
            return false;
        }
        int count;
        var counted = Driver.cuDeviceGetCount(&count);
        if (counted != CUresult.Success || count == 0)
        {
            reason = counted == CUresult.Success ? "the CUDA driver reports no device" : $"cuDeviceGetCount failed: {CudaCheck.DriverErrorName(counted)}";
            return false;
        }
        reason = string.Empty;
        return true;
    }

    /// <summary>Installs the resolver for this assembly once; later calls do nothing. Never throws for missing libraries.</summary>
    internal static void InstallResolver()
    {
        lock (Gate)
        {
            if (_resolverInstalled) return;
            NativeLibrary.SetDllImportResolver(typeof(CudaLibraries).Assembly, Resolve);
            _resolverInstalled = true;
        }
    }

    private static nint Resolve(string libraryName, Assembly assembly, DllImportSearchPath? searchPath)
    {
        if (Array.FindIndex(Known, k => k.Logical == libraryName) < 0) return 0;
        var handle = Load(libraryName, out var failure);
        return handle != 0 ? handle : throw new CudaUnavailableException(failure!);
    }

    private static nint Load(string logical, out string? failure)
    {
        failure = null;
        lock (Gate)
        {
            if (Loaded.TryGetValue(logical, out var cached)) return cached;
            var (_, files, inToolkit) = Known[Array.FindIndex(Known, k => k.Logical == logical)];
            var tried = new List<string>();
            if (inToolkit)
            {
                foreach (var directory in ToolkitDirectories())
                {
                    foreach (var file in files)
                    {
                        var path = Path.Combine(directory, file);
                        if (!File.Exists(path))
                        {
                            tried.Add($"{path} (absent)");
                            continue;
                        }
                        try
                        {
                            return Loaded[logical] = NativeLibrary.Load(path);
                        }
                        catch (Exception e) when (e is DllNotFoundException or BadImageFormatException)
                        {
                            tried.Add($"{path} ({e.Message})");
                        }
                    }
                }
            }
            foreach (var file in files)
            {
                if (NativeLibrary.TryLoad(file, out var handle)) return Loaded[logical] = handle;
                tried.Add($"{file} (not on the loader path)");
            }
            failure = $"The CUDA library '{logical}' could not be loaded. Tried: {string.Join("; ", tried)}. " +
                "Install the NVIDIA driver (libcuda.so.1) and CUDA 12 or 13 (NVRTC, cuBLAS), or set CUDA_HOME to the toolkit's root.";
            return 0;
        }
    }

    private static List<string> ToolkitDirectories()
    {
        var directories = new List<string>(5);
        foreach (var variable in (ReadOnlySpan<string>)["CUDA_HOME", "CUDA_PATH"])
            if (Environment.GetEnvironmentVariable(variable) is { Length: > 0 } root) directories.Add(Path.Combine(root, "lib64"));
        directories.Add("/usr/local/cuda/lib64");
        directories.Add(RuntimeInformation.ProcessArchitecture == Architecture.Arm64
            ? "/usr/local/cuda/targets/sbsa-linux/lib"
            : "/usr/local/cuda/targets/x86_64-linux/lib");
        return directories;
    }
}

/// <summary>CUDA, NVRTC or cuBLAS is not installed where this process can load it; the message lists every path tried.</summary>
public sealed class CudaUnavailableException(string message) : DllNotFoundException(message);
