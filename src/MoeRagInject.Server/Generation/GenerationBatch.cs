using System.Threading.Channels;
using MoeRagInject.Engine;

namespace MoeRagInject.Server.Generation;

/// <summary>
/// The requests of one HTTP call (one, or a batch from a list input) running side by side in the engine, their updates merged
/// into one sequence, ordered per request. Starting submits every request synchronously, so that an invalid one is rejected
/// (and the others aborted) before any response byte is written, and a valid call can send its headers at once. Disposing
/// cancels whatever still runs, which is how a client that left (or a failed write) frees the engine's slots.
/// </summary>
public sealed class GenerationBatch : IAsyncDisposable
{
    private readonly CancellationTokenSource _cancel;
    private readonly Channel<(int Index, GenerationUpdate Update)> _updates;
    private readonly Task[] _pumps;
    private readonly Task _completion;

    private GenerationBatch(IReadOnlyList<GenerationStream> streams, CancellationToken requestAborted)
    {
        _cancel = CancellationTokenSource.CreateLinkedTokenSource(requestAborted);
        _updates = Channel.CreateBounded<(int, GenerationUpdate)>(
            new BoundedChannelOptions(64) { SingleReader = true, SingleWriter = streams.Count == 1 });
        _pumps = new Task[streams.Count];
        for (var i = 0; i < streams.Count; i++) _pumps[i] = PumpAsync(i, streams[i]);
        _completion = CompleteWhenPumpsEndAsync();
    }

    public int Count => _pumps.Length;

    /// <summary>
    /// Submits every request, each as <paramref name="n"/> parallel samples (request i's sample j gets index i·n + j, the
    /// order OpenAI's choices and sglang's lists use); an invalid one throws (its <see cref="ArgumentException"/>) after the
    /// others are aborted.
    /// </summary>
    public static GenerationBatch Start(IGenerationEngine engine, IReadOnlyList<GenerationRequest> requests, CancellationToken requestAborted, int n = 1)
    {
        var streams = new List<GenerationStream>(requests.Count * n);
        try
        {
            foreach (var request in requests) streams.AddRange(n == 1 ? [engine.Submit(request)] : engine.SubmitParallel(request, n));
        }
        catch
        {
            foreach (var stream in streams) stream.Abort();
            throw;
        }
        return new GenerationBatch(streams, requestAborted);
    }

    private async Task PumpAsync(int index, GenerationStream stream)
    {
        // Cancelling ends the enumeration, and ending it early aborts the request in the engine.
        await foreach (var update in stream.WithCancellation(_cancel.Token).ConfigureAwait(false))
            await _updates.Writer.WriteAsync((index, update), _cancel.Token).ConfigureAwait(false);
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
            var failures = _pumps.Where(p => p.IsFaulted || p.IsCanceled)
                .Select(p => p.Exception?.GetBaseException() ?? new OperationCanceledException(_cancel.Token)).ToList();
            failure = failures.FirstOrDefault(e => e is not OperationCanceledException) ?? failures.FirstOrDefault()
                ?? new OperationCanceledException(_cancel.Token);
        }
        _updates.Writer.TryComplete(failure);
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
