using System.Reflection;
using System.Security.Cryptography;
using System.Text;
using System.Text.RegularExpressions;
using MoeRagInject.Backend.Cuda.Interop;

namespace MoeRagInject.Backend.Cuda;

/// <summary>
/// The kernels of Kernels/*.cu, compiled at start-up by NVRTC for the card's architecture as one program (common.cuh first)
/// and cached on disk by the hash of source, options and NVRTC version, so a second start loads the cubin directly.
/// </summary>
internal sealed class CudaKernels : IDisposable
{
    private readonly CudaModule _module;
    private readonly Dictionary<string, CudaKernel> _kernels = new(StringComparer.Ordinal);

    public CudaKernels(CudaDevice device, Action<string>? progress, bool programmaticLaunch = true)
    {
        var (major, minor) = device.ComputeCapability;
        // Hopper's warpgroup instructions (wgmma, gemm_wgmma.cu) exist only in the architecture-specific target sm_90a.
        var arch = (major, minor) == (9, 0) ? "sm_90a" : $"sm_{major}{minor}";
        var source = Source();
        // MOE_RAG_INJECT_NVRTC_OPTIONS: more options, space-separated (e.g. --ptxas-options=-v for ptxas's register and
        // wgmma reports, printed with the compiler's other messages).
        string[] options = [$"-arch={arch}", "-std=c++17", "-DNDEBUG", "-lineinfo",
            .. (Environment.GetEnvironmentVariable("MOE_RAG_INJECT_NVRTC_OPTIONS") ?? "").Split(' ', StringSplitOptions.RemoveEmptyEntries)];
        var (nvrtcMajor, nvrtcMinor) = Nvrtc.Version;
        var key = Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(
            $"{source}\n{string.Join(' ', options)}\nnvrtc {nvrtcMajor}.{nvrtcMinor}")))[..24];
        var cache = Path.Combine(CacheDirectory(), $"{key}-{arch}.cubin");
        // The compiler's messages are kept beside the cubin (empty when it had none), so that a cached start still knows
        // them (check-device's check that ptxas serialised no wgmma reads them); a cubin without them is compiled again.
        var messagesFile = Path.ChangeExtension(cache, ".log");
        byte[] image;
        if (File.Exists(cache) && File.Exists(messagesFile))
        {
            image = File.ReadAllBytes(cache);
            CompilerMessages = File.ReadAllText(messagesFile);
            progress?.Invoke($"kernels: cached {arch} cubin {Path.GetFileName(cache)}");
        }
        else
        {
            var clock = System.Diagnostics.Stopwatch.StartNew();
            var messages = "";
            image = Nvrtc.Compile(source, "moe-rag-inject.cu", options, text => messages = text);
            CompilerMessages = messages;
            if (messages.Length > 0) progress?.Invoke($"kernels: the compiler says:\n{messages}");
            progress?.Invoke($"kernels: compiled for {arch} by NVRTC {nvrtcMajor}.{nvrtcMinor} in {clock.Elapsed.TotalSeconds:F1} s");
            try
            {
                Directory.CreateDirectory(Path.GetDirectoryName(cache)!);
                var temporary = cache + $".{Environment.ProcessId}.tmp";
                File.WriteAllText(temporary, messages);
                File.Move(temporary, messagesFile, overwrite: true);
                File.WriteAllBytes(temporary, image);
                File.Move(temporary, cache, overwrite: true);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                progress?.Invoke($"kernels: could not cache the cubin ({e.Message})");
            }
        }
        // Programmatic dependent launch (Hopper and later): a kernel's blocks are scheduled while the previous kernel's
        // last blocks still run, and wait in kernel_prologue; this hides the launch gap between the ~11 kernels a layer.
        // MOE_RAG_INJECT_PDL=0 launches them plainly (for comparisons; =1 asks for it under --deterministic too, CudaBackend).
        ProgrammaticLaunch = programmaticLaunch && major >= 9 && Environment.GetEnvironmentVariable("MOE_RAG_INJECT_PDL") != "0";
        _module = device.LoadModule(image, ProgrammaticLaunch);
        Architecture = arch;
    }

    public string Architecture { get; }

    /// <summary>What NVRTC and ptxas said when they compiled this program (warnings and advice; empty when nothing).</summary>
    public string CompilerMessages { get; }

    /// <summary>
    /// The kernels whose wgmma instructions ptxas serialised, by its advice in <paramref name="messages"/> (C7514, C7515, C7520:
    /// "wgmma.mma_async instructions are serialized due to …, in the function 'name'"): each waits for the one before,
    /// which in session 28 made the batch-256 decode step 10% longer. Distinct names in the order they are named.
    /// </summary>
    public static IReadOnlyList<string> SerialisedWgmma(string messages) =>
        [.. Regex.Matches(messages, @"wgmma\.mma_async instructions are serialized[^\n]*?in the function '([^']+)'")
            .Select(m => m.Groups[1].Value).Distinct(StringComparer.Ordinal)];

    /// <summary>Whether kernels are launched with programmatic dependent launch.</summary>
    public bool ProgrammaticLaunch { get; }

    public CudaKernel this[string name]
    {
        get
        {
            if (!_kernels.TryGetValue(name, out var kernel))
            {
                kernel = _module.GetFunction(name);
                _kernels[name] = kernel;
            }
            return kernel;
        }
    }

    /// <summary>
    /// common.cuh, then every .cu file in name order: the one program NVRTC compiles. A file of the same name in the folder
    /// MOE_RAG_INJECT_KERNEL_OVERRIDE replaces the embedded one (to time two versions of a kernel with one build; the
    /// host code's launches must fit both).
    /// </summary>
    public static string Source() => Source(Environment.GetEnvironmentVariable("MOE_RAG_INJECT_KERNEL_OVERRIDE"));

    /// <summary>The program with the files in <paramref name="overrides"/> (a folder, or null) in place of the embedded ones.</summary>
    public static string Source(string? overrides)
    {
        var assembly = typeof(CudaKernels).Assembly;
        var names = assembly.GetManifestResourceNames().Where(n => n.StartsWith("kernels/", StringComparison.Ordinal)).ToList();
        var text = new StringBuilder();
        foreach (var name in names.Where(n => n.EndsWith(".cuh", StringComparison.Ordinal)).Order(StringComparer.Ordinal)
                     .Concat(names.Where(n => n.EndsWith(".cu", StringComparison.Ordinal)).Order(StringComparer.Ordinal)))
        {
            var replacement = string.IsNullOrEmpty(overrides) ? null : Path.Combine(overrides, name["kernels/".Length..]);
            using var stream = replacement != null && File.Exists(replacement)
                ? File.OpenRead(replacement)
                : assembly.GetManifestResourceStream(name)!;
            using var reader = new StreamReader(stream);
            text.Append("// ---- ").Append(name).Append('\n').Append(reader.ReadToEnd()).Append('\n');
        }
        return text.ToString();
    }

    private static string CacheDirectory()
    {
        var root = Environment.GetEnvironmentVariable("MOE_RAG_INJECT_CACHE")
            ?? Environment.GetEnvironmentVariable("XDG_CACHE_HOME")
            ?? Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache");
        return Path.Combine(root, "moe-rag-inject", "kernels");
    }

    public void Dispose() => _module.Dispose();
}
