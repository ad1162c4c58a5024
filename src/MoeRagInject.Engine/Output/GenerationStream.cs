using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Text;
using MoeRagInject.Engine.Output;
using MoeRagInject.Engine.Telemetry;
using MoeRagInject.Model.Tokenization;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine;

/// <summary>
/// One request's output as it streams: the request's own output processing (incremental detokenization, stop strings held
/// back until they can no longer match) and its metrics (first-token, inter-token and end-to-end times, tokens, router
/// entropy, finish reason: what the client is given) run here, on the reader's side, never on the engine loop. Enumerate
/// it once. Disposing it, or stopping the enumeration, before the final update aborts the request.
/// </summary>
public sealed class GenerationStream : IAsyncEnumerable<GenerationUpdate>, IAsyncDisposable
{
    private readonly LlmEngine _engine;
    private readonly Sequence _sequence;
    private readonly Tokenizer _tokenizer;
    private int _enumerated;
    private int _measured;
    private volatile bool _finished;

    internal GenerationStream(LlmEngine engine, Sequence sequence, Tokenizer tokenizer)
    {
        _engine = engine;
        _sequence = sequence;
        _tokenizer = tokenizer;
    }

    public string Rid => _sequence.Rid;

    /// <summary>Aborts the request (as a client that left); the stream then ends with its abort update.</summary>
    public void Abort()
    {
        if (!_finished) _engine.AbortSequence(_sequence, "client disconnected");
    }

    public async IAsyncEnumerator<GenerationUpdate> GetAsyncEnumerator(CancellationToken cancellationToken = default)
    {
        if (Interlocked.Exchange(ref _enumerated, 1) != 0) throw new InvalidOperationException("a generation stream can be read once");
        var request = _sequence.Request;
        var sampling = request.Sampling;
        var detokenizer = new IncrementalDetokenizer(_tokenizer, sampling.SkipSpecialTokens);
        var stops = new StopMatcher(sampling.Stop, sampling.NoStopTrim);
        List<TokenOutput> spareTokens = [];
        List<float> spareEntropy = [];
        List<RagEvent> spareEvents = [];
        var completion = 0;
        var metrics = _engine.Metrics;
        var lastTokenTicks = _sequence.ArrivalTicks;
        try
        {
            while (!_finished)
            {
                var batch = await _sequence.Output.TakeAsync(spareTokens, spareEntropy, spareEvents, cancellationToken).ConfigureAwait(false);
                spareTokens = batch.Tokens;
                spareEntropy = batch.RouterEntropy;
                spareEvents = batch.Events;
                var layers = batch.Tokens.Count == 0 ? 0 : batch.RouterEntropy.Count / batch.Tokens.Count;
                var ids = new List<int>(batch.Tokens.Count);
                var logprobs = request.ReturnLogprob ? new List<float>(batch.Tokens.Count) : null;
                var top = request.ReturnLogprob && request.TopLogprobs > 0 ? new List<TokenLogprob[]>(batch.Tokens.Count) : null;
                var routerEntropy = request.ReturnRouterEntropy ? new List<float[]>(batch.Tokens.Count) : null;
                var outputEntropy = request.ReturnRouterEntropy ? new List<float>(batch.Tokens.Count) : null;
                var routerProbe = request.ReturnRouterEntropy && _engine.RouterProbe is not null ? new List<float>(batch.Tokens.Count) : null;
                var text = new StringBuilder();
                FinishReason? finish = null;
                for (var t = 0; t < batch.Tokens.Count; t++)
                {
                    var token = batch.Tokens[t];
                    var tokenEntropy = CollectionsMarshal.AsSpan(batch.RouterEntropy).Slice(t * layers, layers);
                    ids.Add(token.Token);
                    logprobs?.Add(token.Logprob);
                    top?.Add(token.Top ?? []);
                    routerEntropy?.Add(tokenEntropy.ToArray());
                    outputEntropy?.Add(token.OutputEntropy);
                    routerProbe?.Add(token.RouterProbe);
                    if (completion + ids.Count == 1) metrics.FirstToken(EngineMetrics.Seconds(_sequence.ArrivalTicks, token.Ticks));
                    else metrics.InterToken(EngineMetrics.Seconds(lastTokenTicks, token.Ticks));
                    lastTokenTicks = token.Ticks;
                    metrics.RouterEntropy(tokenEntropy);
                    text.Append(stops.Push(detokenizer.Push(token.Token)));
                    if (stops.Matched is { } matched)
                    {
                        finish = new FinishReason(FinishKind.Stop, Matched: matched);
                        _engine.FinishSequence(_sequence, finish);
                        break;
                    }
                }
                if (finish is null && batch.Finish is { } engineFinish)
                {
                    text.Append(stops.Push(detokenizer.Flush()));
                    finish = stops.Matched is { } matched ? new FinishReason(FinishKind.Stop, Matched: matched) : engineFinish;
                    if (stops.Matched is null) text.Append(stops.Flush());
                }
                completion += ids.Count;
                _finished = finish is not null;
                // Measured before the client is given the last update, so a scrape after a response always counts it.
                if (finish is not null) Measure(finish.Kind, completion);
                yield return new GenerationUpdate
                {
                    Rid = _sequence.Rid,
                    NewTokenIds = ids,
                    NewLogprobs = (IReadOnlyList<float>?)logprobs ?? [],
                    NewTopLogprobs = (IReadOnlyList<TokenLogprob[]>?)top ?? [],
                    NewRouterEntropy = (IReadOnlyList<float[]>?)routerEntropy ?? [],
                    NewOutputEntropy = (IReadOnlyList<float>?)outputEntropy ?? [],
                    NewRouterProbe = (IReadOnlyList<float>?)routerProbe ?? [],
                    NewEvents = batch.Events.Count == 0 ? [] : [.. batch.Events],
                    NewText = text.ToString(),
                    PromptTokens = _sequence.OriginalPrompt.Length,
                    CachedTokens = _sequence.CachedTokens,
                    CompletionTokens = completion,
                    Finish = finish,
                };
            }
        }
        finally
        {
            if (!_finished)
            {
                _engine.AbortSequence(_sequence, "the request's stream was closed before it finished");
                Measure(FinishKind.Abort, completion);
            }
        }
    }

    /// <summary>The request's end, measured once whichever way it ends (last update, closed stream, or never read).</summary>
    private void Measure(FinishKind kind, int completionTokens)
    {
        if (Interlocked.Exchange(ref _measured, 1) != 0) return;
        _engine.Metrics.Finished(kind, EngineMetrics.Seconds(_sequence.ArrivalTicks, Stopwatch.GetTimestamp()),
            _sequence.OriginalPrompt.Length, completionTokens);
    }

    public ValueTask DisposeAsync()
    {
        Abort();
        if (Volatile.Read(ref _enumerated) == 0) Measure(FinishKind.Abort, 0);
        return ValueTask.CompletedTask;
    }
}
