using System.Globalization;
using MoeRagInject.Engine.Telemetry;
using MoeRagInject.Model.Tokenization;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine.Coordination;

/// <summary>What the loop captured when a trigger fired (everything the retrieval needs, copied, so the loop can go on).</summary>
/// <param name="First">The retrieval a request makes with its prompt before it is admitted (--retrieve-first): no step fired it
/// (batch size 0, no signal value), nothing was generated, and nothing restarts.</param>
internal sealed record RagTrigger(TriggerDecision Decision, int TokenIndex, int Position, int BatchSize, int[] QueryIds,
    InjectionMode Mode, float Scale, double Threshold, int GeneratedCount, bool First = false);

/// <summary>What a retrieval brings back to the loop: the event, and a vector to inject or a context to rebuild (or neither).</summary>
/// <param name="RestartAnswer">With <see cref="Context"/>: drop the answer generated so far and generate it again after the
/// context; with <see cref="Vector"/> (one vector an answer position): drop it and generate it again with the vectors.</param>
/// <param name="First">The outcome of a retrieval before admission (<see cref="RagTrigger.First"/>).</param>
internal sealed record RagOutcome(RagEvent Event, int TokenIndex, int Position, float[]? Vector, IReadOnlyList<int> InjectionLayers,
    int InjectionEnd, List<int>? Context, bool RestartAnswer = false, bool First = false);

/// <summary>
/// Everything a trigger sets off, off the engine loop: the notice line, detokenizing the query, the retrieval (cancelled
/// with its request), tokenizing the passages, the P·c product or the rebuilt context, the event-log append, and the RAG
/// metrics and recent-event history. The loop only parks the request before and resumes it after (through <c>resume</c>).
/// </summary>
internal sealed class RagCoordinator(
    EngineOptions options,
    Tokenizer tokenizer,
    ContextInjector injector,
    RetrievalService? retrieval,
    RagEventWriter eventLog,
    TextWriter notices,
    int contextLength,
    int hiddenSize,
    EngineMetrics metrics,
    RagEventHistory history,
    Action<Sequence, RagOutcome> resume)
{
    public string RetrieverName => retrieval?.Retriever.Name ?? "none";

    /// <summary>Called on the loop after it parked <paramref name="sequence"/>; returns at once.</summary>
    public void Start(Sequence sequence, RagTrigger trigger) => _ = Task.Run(() => RunAsync(sequence, trigger));

    private async Task RunAsync(Sequence s, RagTrigger t)
    {
        var start = DateTimeOffset.UtcNow;
        var cancel = s.Cancellation.Token;
        try
        {
            await notices.WriteLineAsync(string.Create(CultureInfo.InvariantCulture,
                $"[MoE-RAG] entropy={t.Decision.Entropy:F2} > {t.Threshold:F2} (bsz={t.BatchSize}) -> triggering RAG")).ConfigureAwait(false);
            var query = tokenizer.Decode(t.QueryIds, skipSpecialTokens: true).Trim();
            var cached = s.QueryCache.TryGetValue(query, out var result);
            if (!cached)
            {
                result = retrieval is null
                    ? new RetrievalResult([], "no retriever is configured (--retriever)", TimeSpan.Zero)
                    : await retrieval.RetrieveAsync(query, cancel).ConfigureAwait(false);
                s.QueryCache[query] = result;
                Measure(result);
            }
            var outcome = Apply(s, t, query, start, result!, cached);
            Record(outcome.Event, t);
            try
            {
                var written = eventLog.AppendAsync(outcome.Event);
                if (eventLog.Fsync) await written.WaitAsync(cancel).ConfigureAwait(false);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException or ObjectDisposedException)
            {
                await notices.WriteLineAsync($"[MoE-RAG] could not write the event log: {e.Message}").ConfigureAwait(false);
            }
            resume(s, outcome);
        }
        catch (OperationCanceledException) when (cancel.IsCancellationRequested)
        {
            // The request finished (aborted, disconnected) while its retrieval ran: nobody waits for the result.
        }
        catch (Exception e)
        {
            // Whatever failed, the request goes on without injection, with the failure in its event.
            var failed = Event(s, t, "", start, null, false, $"RAG failed: {e.Message}", [], 0);
            metrics.RetrievalFailed("failed");
            Record(failed, t);
            resume(s, new RagOutcome(failed, t.TokenIndex, t.Position, null, [], 0, null, First: t.First));
        }
    }

    /// <summary>
    /// The trigger's event goes to the recent-event history and its layers to the trigger counts, together: a request that
    /// ends while its retrieval runs has neither, so the counts always match the triggers' events.
    /// </summary>
    private void Record(RagEvent ragEvent, RagTrigger t)
    {
        // A retrieval before the prompt (--retrieve-first) is no trigger: no layer fired.
        if (!t.First) metrics.Triggered(t.Decision.FiredLayers, t.Mode);
        history.Add(ragEvent);
    }

    /// <summary>Retrieval time, and why nothing came back when nothing did (a per-request cached answer is not measured again).</summary>
    private void Measure(RetrievalResult result)
    {
        if (retrieval is not null) metrics.Retrieved(result);
        var kind = retrieval is null ? "no_retriever" : result.Failure switch
        {
            RetrievalFailure.Timeout => "timeout",
            RetrievalFailure.Failed => "failed",
            RetrievalFailure.BadResponse => "bad_response",
            RetrievalFailure.EmptyQuery => "empty_query",
            _ => result.Passages.Count == 0 ? "no_passages" : null,
        };
        if (kind is not null) metrics.RetrievalFailed(kind);
    }

    private RagOutcome Apply(Sequence s, RagTrigger t, string query, DateTimeOffset start, RetrievalResult result, bool cached)
    {
        var snippets = result.Passages.Select(p => p.Text).ToList();
        var error = result.Error;
        if (error is null && snippets.Count == 0) error = "the retriever returned no passages";
        float[]? vector = null;
        IReadOnlyList<int> layers = [];
        List<int>? context = null;
        double norm = 0;
        var end = int.MaxValue;
        if (error is null)
        {
            try
            {
                if (t.Mode == InjectionMode.Latent)
                {
                    // --injection-layers, else the layers a trained projector was trained for, else the layers that fired.
                    layers = options.InjectionLayers ?? injector.Layers ?? t.Decision.FiredLayers;
                    vector = new float[injector.AnswerPositions * hiddenSize];
                    norm = injector.ComputeInjection(tokenizer.Encode(string.Join("\n", snippets), addSpecialTokens: false), t.Scale, vector);
                    options.Faults?.CorruptInjection(s.Rid, vector);
                    end = options.InjectionTokens is { } n ? t.Position + n : int.MaxValue;
                }
                else if (t.Mode == InjectionMode.Prompt)
                {
                    (context, error) = RebuildContext(s, t, snippets);
                }
            }
            catch (Exception e) when (e is ArgumentException or InvalidOperationException)
            {
                error = $"injection failed: {e.Message}";
                vector = null;
                layers = [];
                norm = 0;
            }
        }
        // A mode that may restart the answer (EngineOptions.RestartsAnswer) does when it fires within the tokens the loop holds
        // back; prompt mode records "continue" otherwise, and so does latent mode with one vector an answer position.
        // A retrieval before admission has no answer to restart or keep.
        var restarts = options.RestartsAnswer(t.Mode, injector.AnswerPositions);
        var keepsOrRestarts = t.Mode == InjectionMode.Prompt || t.Mode == InjectionMode.Latent && injector.AnswerPositions > 1;
        var restart = !t.First && keepsOrRestarts
            ? restarts && t.TokenIndex < EngineOptions.PromptRestartWindowTokens ? "answer" : "continue"
            : null;
        return new RagOutcome(Event(s, t, query, start, result, cached, error, layers, norm, snippets) with { Restart = restart },
            t.TokenIndex, t.Position, vector, layers, end, context, (context is not null || vector is not null) && restart == "answer", t.First);
    }

    /// <summary>Prompt-mode RAG: the passages go ahead of the prompt, and the whole context will be prefilled again.</summary>
    private (List<int>? Context, string? Error) RebuildContext(Sequence s, RagTrigger t, IReadOnlyList<string> snippets)
    {
        var bos = tokenizer.BosTokenId;
        var prompt = s.OriginalPrompt.AsSpan();
        if (bos is { } b && prompt.Length > 0 && prompt[0] == b) prompt = prompt[1..];
        var passages = tokenizer.Encode("Context:\n" + string.Join("\n", snippets) + "\n\n", addSpecialTokens: false);
        var context = new List<int>(passages.Length + prompt.Length + 1);
        if (bos is { } b2) context.Add(b2);
        context.AddRange(passages);
        foreach (var id in prompt) context.Add(id);
        var needed = context.Count + s.Sampling.MaxNewTokens;
        return needed > contextLength
            ? (null, $"the passages do not fit the context length {contextLength} ({context.Count} context tokens + max_new_tokens {s.Sampling.MaxNewTokens})")
            : (context, null);
    }

    private RagEvent Event(Sequence s, RagTrigger t, string query, DateTimeOffset start, RetrievalResult? result, bool cached, string? error,
        IReadOnlyList<int> injectionLayers, double norm, IReadOnlyList<string>? snippets = null) => new()
    {
        EventId = RagEvent.NewEventId(start),
        StartTime = start,
        EndTime = DateTimeOffset.UtcNow,
        RequestId = s.Rid,
        Query = query,
        Snippets = snippets ?? [],
        SnippetIds = result?.Passages.Select(p => p.Id).ToList() ?? [],
        TokenIndex = t.TokenIndex,
        Position = t.Position,
        Layers = t.Decision.FiredLayers,
        Signal = t.First ? RagEvent.RetrieveFirstSignal : TriggerSignals.Name(s.Trigger.Options.Signal),
        Entropy = t.Decision.Entropy,
        Threshold = t.Threshold,
        BatchSize = t.BatchSize,
        Retriever = RetrieverName,
        LatencyMs = result?.Latency.TotalMilliseconds ?? 0,
        Mode = t.Mode.ToString().ToLowerInvariant(),
        InjectionLayers = error is null ? injectionLayers : [],
        Scale = t.Mode == InjectionMode.Latent ? t.Scale : 0,
        InjectionNorm = error is null ? norm : 0,
        Cached = cached,
        Error = error,
    };
}
