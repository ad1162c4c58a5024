namespace MoeRagInject.Engine.Tests;

/// <summary>
/// Waiting for the engine's status, which the loop publishes once a pass: right after a test sees something happen (a
/// stream ends, a server is connected to) the status may not show it yet.
/// </summary>
internal static class EngineStatusWaits
{
    /// <summary>The status once it satisfies <paramref name="condition"/>, or after 5 s the status as it is then (for the test's assertion to report).</summary>
    public static async Task<EngineStatus> WaitForStatusAsync(IGenerationEngine engine, Func<EngineStatus, bool> condition)
    {
        for (var i = 0; i < 500; i++)
        {
            var status = engine.GetStatus();
            if (condition(status)) return status;
            await Task.Delay(10);
        }
        return engine.GetStatus();
    }

    /// <summary>The status once nothing runs, waits or retrieves and every KV block is free.</summary>
    public static Task<EngineStatus> WaitForIdleAsync(IGenerationEngine engine) =>
        WaitForStatusAsync(engine, s => s.Running == 0 && s.Waiting == 0 && s.Retrieving == 0 && s.FreeKvBlocks == s.TotalKvBlocks);
}
