using System.Runtime.CompilerServices;

namespace MoeRagInject.Tests;

/// <summary>
/// Gives the thread pool back the workers the test host keeps for the whole run: vstest's testhost reads its socket with a
/// blocking poll on one (TcpClientExtensions.MessageLoopAsync), and the xunit adapter waits for the assembly's run on another
/// (VsTestRunner.RunTestsInAssembly). On a 2-core machine those two are the pool's whole minimum, so work queued to the
/// pool waits for its starvation check to add a thread, which it does about once every 0.5-1 s. An engine whose requests
/// are submitted and read on the pool then sits idle between steps for that long, which no server or CLI run sees.
/// </summary>
internal static class TestHostThreadPool
{
    /// <summary>Pool workers the test host blocks for the whole run.</summary>
    public const int HeldByHost = 2;

    /// <summary>The pool's minimum workers: what it would have (one per core) plus the ones the host holds.</summary>
    public static int MinWorkers => Environment.ProcessorCount + HeldByHost;

    [ModuleInitializer]
    internal static void MakeRoom()
    {
        ThreadPool.GetMinThreads(out var workers, out var io);
        if (workers < MinWorkers) ThreadPool.SetMinThreads(MinWorkers, io);
    }
}
