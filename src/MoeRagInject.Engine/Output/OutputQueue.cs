using MoeRagInject.Rag;

namespace MoeRagInject.Engine.Output;

/// <summary>One accepted token as the loop reports it.</summary>
/// <param name="Ticks">Stopwatch timestamp of the end of the step that produced it (for first-token and inter-token times).</param>
/// <param name="Top">The most likely tokens at this position, when the request asked for top logprobs.</param>
/// <param name="RouterProbe">The router probe's score of the token (NaN when the engine has no probe).</param>
internal readonly record struct TokenOutput(int Token, float Logprob, float OutputEntropy, long Ticks, TokenLogprob[]? Top = null,
    float RouterProbe = float.NaN);

/// <summary>
/// What the engine loop hands one request's stream: tokens, RAG events and the finish, coalesced. The loop appends without
/// ever waiting (it must not stall on a slow reader); the reader takes everything pending at once, so a reader that falls
/// behind gets fewer, larger updates. What can pile up is bounded by the request itself: max_new_tokens tokens (and their
/// router entropies, one per layer, kept flat so that the loop allocates nothing per token), one event per retrieval
/// (capped by --max-retrievals) and one finish.
/// </summary>
internal sealed class OutputQueue
{
    private readonly Lock _gate = new();
    private List<TokenOutput> _tokens = [];
    private List<float> _routerEntropy = [];
    private List<RagEvent> _events = [];
    private FinishReason? _finish;
    private TaskCompletionSource? _waiter;

    /// <summary>What one take returns; the lists belong to the reader until its next take.</summary>
    /// <param name="RouterEntropy">The tokens' router entropies, token after token, the same number of layers each.</param>
    public readonly record struct Batch(List<TokenOutput> Tokens, List<float> RouterEntropy, List<RagEvent> Events, FinishReason? Finish);

    public void AddToken(in TokenOutput token, ReadOnlySpan<float> routerEntropy)
    {
        TaskCompletionSource? wake;
        lock (_gate)
        {
            if (_finish is not null) return;
            _tokens.Add(token);
            _routerEntropy.AddRange(routerEntropy);
            wake = TakeWaiter();
        }
        wake?.TrySetResult();
    }

    public void AddEvent(RagEvent ragEvent)
    {
        TaskCompletionSource? wake;
        lock (_gate)
        {
            if (_finish is not null) return;
            _events.Add(ragEvent);
            wake = TakeWaiter();
        }
        wake?.TrySetResult();
    }

    /// <summary>The last thing the request produces; later additions are ignored.</summary>
    public void Complete(FinishReason finish)
    {
        TaskCompletionSource? wake;
        lock (_gate)
        {
            if (_finish is not null) return;
            _finish = finish;
            wake = TakeWaiter();
        }
        wake?.TrySetResult();
    }

    /// <summary>Waits until something is pending, then takes all of it (swapping in the lists the reader gave back).</summary>
    public async ValueTask<Batch> TakeAsync(List<TokenOutput> spareTokens, List<float> spareEntropy, List<RagEvent> spareEvents,
        CancellationToken cancellationToken)
    {
        while (true)
        {
            Task wait;
            lock (_gate)
            {
                if (_tokens.Count > 0 || _events.Count > 0 || _finish is not null)
                {
                    var batch = new Batch(_tokens, _routerEntropy, _events, _finish);
                    spareTokens.Clear();
                    spareEntropy.Clear();
                    spareEvents.Clear();
                    _tokens = spareTokens;
                    _routerEntropy = spareEntropy;
                    _events = spareEvents;
                    return batch;
                }
                _waiter ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                wait = _waiter.Task;
            }
            await wait.WaitAsync(cancellationToken).ConfigureAwait(false);
        }
    }

    private TaskCompletionSource? TakeWaiter()
    {
        var waiter = _waiter;
        _waiter = null;
        return waiter;
    }
}
