using MoeRagInject.Rag;

namespace MoeRagInject.Engine.Telemetry;

/// <summary>
/// The last RAG events of the engine, newest last, at most <see cref="Capacity"/> of them (for the dashboard; the full
/// record is the event log). Safe from many threads; events arrive off the engine loop, one per retrieval.
/// </summary>
public sealed class RagEventHistory(int capacity = RagEventHistory.DefaultCapacity)
{
    public const int DefaultCapacity = 200;

    private readonly Lock _gate = new();
    private readonly Queue<RagEvent> _events = new(capacity);

    public int Capacity { get; } = capacity > 0 ? capacity : throw new ArgumentOutOfRangeException(nameof(capacity));

    public void Add(RagEvent ragEvent)
    {
        ArgumentNullException.ThrowIfNull(ragEvent);
        lock (_gate)
        {
            if (_events.Count == Capacity) _events.Dequeue();
            _events.Enqueue(ragEvent);
        }
    }

    /// <summary>The newest <paramref name="limit"/> events, newest first.</summary>
    public IReadOnlyList<RagEvent> Latest(int limit)
    {
        lock (_gate)
        {
            var all = _events.ToArray();
            var n = Math.Clamp(limit, 0, all.Length);
            var latest = new RagEvent[n];
            for (var i = 0; i < n; i++) latest[i] = all[all.Length - 1 - i];
            return latest;
        }
    }
}
