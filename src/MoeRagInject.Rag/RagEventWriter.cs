using System.Threading.Channels;

namespace MoeRagInject.Rag;

/// <summary>
/// The event log behind a queue: callers hand an event over and go on, one background task appends each line whole and
/// flushes it (and, with fsync, forces it to disk), in order. Disposing drains the queue first, so an orderly shutdown
/// loses nothing.
/// </summary>
public sealed class RagEventWriter : IAsyncDisposable
{
    private readonly RagEventLog _log;
    private readonly bool _fsync;
    private readonly Channel<(RagEvent Event, TaskCompletionSource Written)> _queue =
        Channel.CreateUnbounded<(RagEvent, TaskCompletionSource)>(new UnboundedChannelOptions { SingleReader = true });
    private readonly Task _writer;

    /// <param name="onError">Told of a line that could not be written (the event is then lost, the writer goes on).</param>
    public RagEventWriter(string directory, bool fsync, Action<Exception>? onError = null)
    {
        _log = new RagEventLog(directory);
        _fsync = fsync;
        _writer = Task.Run(async () =>
        {
            await foreach (var (ragEvent, written) in _queue.Reader.ReadAllAsync().ConfigureAwait(false))
            {
                try
                {
                    _log.Append(ragEvent, _fsync);
                    written.TrySetResult();
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException or ObjectDisposedException)
                {
                    onError?.Invoke(e);
                    written.TrySetException(e);
                }
            }
        });
    }

    public string FilePath => _log.FilePath;

    public bool Fsync => _fsync;

    /// <summary>Queues the event; the task completes once its line is written (and, with fsync, on disk).</summary>
    public Task AppendAsync(RagEvent ragEvent)
    {
        ArgumentNullException.ThrowIfNull(ragEvent);
        var written = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        if (!_queue.Writer.TryWrite((ragEvent, written)))
            written.TrySetException(new ObjectDisposedException(nameof(RagEventWriter)));
        return written.Task;
    }

    public async ValueTask DisposeAsync()
    {
        _queue.Writer.TryComplete();
        await _writer.ConfigureAwait(false);
        _log.Dispose();
    }
}
