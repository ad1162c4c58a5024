using System.Threading.Channels;
using MoeRagInject.Engine;

namespace MoeRagInject.Server.Generation;

/// <summary>
/// The requests of one HTTP call (one, or a batch from a list input) running side by side in the engine, their updates merged
/// into one ordered-per-request sequence. Starting waits for every request's first update, so that the engine's
/// <see cref="ArgumentException"/>s surface before any response byte is written. Disposing cancels whatever still runs,
/// which is how a client that left (or a failed write) frees the engine's slots.
/// </summary>
public sealed class GenerationBatch : IAsyncDisposable
{
    private readonly CancellationTokenSource _cancel;
    private readonly Channel<(int Index, GenerationUpdate Update)> _updates;
    private readonly Task[] _pumps;
    private readonly Task _completion;

    private GenerationBatch(CancellationTokenSource cancel, (IAsyncEnumerator<GenerationUpdate> Updates, bool HasFirst)[] started)
    {
        _cancel = cancel;
        _updates = Channel.CreateBounded<(int, GenerationUpdate)>(
            new BoundedChannelOptions(64) { SingleReader = true, SingleWriter = started.Length == 1 });
        _pumps = new Task[started.Length];
        for (var i = 0; i < started.Length; i++)
            _pumps[i] = PumpAsync(i, started[i].Updates, started[i].HasFirst);
        _completion = CompleteWhenPumpsEndAsync();
    }

    public int Count => _pumps.Length;

    /// <summary>Queues every request and waits for each one's first update; an engine exception cancels the others and is rethrown.</summary>
    public static async Task<GenerationBatch> StartAsync(IGenerationEngine engine, IReadOnlyList<GenerationRequest> requests, CancellationToken requestAborted)
    {
        var cancel = CancellationTokenSource.CreateLinkedTokenSource(requestAborted);
        var starts = new Task<(IAsyncEnumerator<GenerationUpdate>, bool)>[requests.Count];
        for (var i = 0; i < requests.Count; i++)
            starts[i] = StartOneAsync(engine, requests[i], cancel);
        try
        {
            await Task.WhenAll(starts).ConfigureAwait(false);
        }
        catch
        {
            await cancel.CancelAsync().ConfigureAwait(false);
            foreach (var start in starts)
                if (start.IsCompletedSuccessfully)
                    await start.Result.Item1.DisposeAsync().ConfigureAwait(false);
            cancel.Dispose();
            // Prefer the cause (an invalid request) over the cancellations it set off in the batch's other requests.
            var failures = starts.Where(s => s.IsFaulted).Select(s => s.Exception!.GetBaseException()).ToList();
            var cause = failures.FirstOrDefault(e => e is not OperationCanceledException) ?? failures.FirstOrDefault();
            if (cause is not null) System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(cause);
            throw;
        }
        return new GenerationBatch(cancel, starts.Select(s => s.Result).ToArray());
    }

    private static async Task<(IAsyncEnumerator<GenerationUpdate>, bool)> StartOneAsync(
        IGenerationEngine engine, GenerationRequest request, CancellationTokenSource cancel)
    {
        IAsyncEnumerator<GenerationUpdate>? updates = null;
        try
        {
            updates = engine.GenerateAsync(request, cancel.Token).GetAsyncEnumerator(cancel.Token);
            var hasFirst = await updates.MoveNextAsync().ConfigureAwait(false);
            return (updates, hasFirst);
        }
        catch
        {
            if (updates is not null) await updates.DisposeAsync().ConfigureAwait(false);
            await cancel.CancelAsync().ConfigureAwait(false);
            throw;
        }
    }

    private async Task PumpAsync(int index, IAsyncEnumerator<GenerationUpdate> updates, bool hasFirst)
    {
        try
        {
            if (!hasFirst) return;
            do
            {
                await _updates.Writer.WriteAsync((index, updates.Current), _cancel.Token).ConfigureAwait(false);
            }
            while (await updates.MoveNextAsync().ConfigureAwait(false));
        }
        finally
        {
            await updates.DisposeAsync().ConfigureAwait(false);
        }
    }

    private async Task CompleteWhenPumpsEndAsync()
    {
        Exception? failure = null;
        try
        {
            await Task.WhenAll(_pumps).ConfigureAwait(false);
        }
        catch (Exception)
        {
            var failures = _pumps.Where(p => p.IsFaulted).Select(p => p.Exception!.GetBaseException()).ToList();
            failure = failures.FirstOrDefault(e => e is not OperationCanceledException) ?? failures.FirstOrDefault()
                ?? new OperationCanceledException(_cancel.Token);
        }
        _updates.Writer.TryComplete(failure);
    }

    /// <summary>
    /// The updates in chunks of whatever has arrived since the last chunk (at most <paramref name="maxChunk"/>): a stream that
    /// writes one event per chunk stays one event behind at most, instead of falling further behind a fast engine.
    /// </summary>
    public async IAsyncEnumerable<List<(int Index, GenerationUpdate Update)>> ReadChunksAsync(
        int maxChunk, [System.Runtime.CompilerServices.EnumeratorCancellation] CancellationToken cancellationToken)
    {
        var reader = _updates.Reader;
        while (await reader.WaitToReadAsync(cancellationToken).ConfigureAwait(false))
        {
            var chunk = new List<(int, GenerationUpdate)>();
            while (chunk.Count < maxChunk && reader.TryRead(out var item)) chunk.Add(item);
            if (chunk.Count > 0) yield return chunk;
        }
    }

    /// <summary>Every update of every request, each request's in order; ends when all have finished.</summary>
    public IAsyncEnumerable<(int Index, GenerationUpdate Update)> ReadAllAsync(CancellationToken cancellationToken)
        => _updates.Reader.ReadAllAsync(cancellationToken);

    public async ValueTask DisposeAsync()
    {
        await _cancel.CancelAsync().ConfigureAwait(false);
        try
        {
            await _completion.ConfigureAwait(false);
        }
        finally
        {
            _cancel.Dispose();
        }
    }
}
