using MoeRagInject.Tests;

namespace MoeRagInject.Evaluation.Tests;

/// <summary>
/// The pool these tests run on. Without room beside the two workers the test host holds, a 2-core machine stalled the
/// engine in <see cref="LatencyTurnsTests"/> for 0.5-1 s in most runs (see <see cref="TestHostThreadPool"/>).
/// </summary>
public sealed class TestHostThreadPoolTests
{
    [Fact]
    public void ThePoolKeepsAWorkerPerCoreBesideTheOnesTheTestHostHolds()
    {
        ThreadPool.GetMinThreads(out var workers, out _);
        Assert.True(workers >= Environment.ProcessorCount + TestHostThreadPool.HeldByHost,
            $"minimum pool workers {workers}, cores {Environment.ProcessorCount}");
    }
}
