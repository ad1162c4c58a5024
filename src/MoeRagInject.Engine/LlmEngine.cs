using System.Collections.Concurrent;
using System.Globalization;
using System.Runtime.CompilerServices;
using MoeRagInject.Backend;
using MoeRagInject.Model;
using MoeRagInject.Model.Tokenization;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine;

/// <summary>
/// Continuous batching over one model: requests queue, join the running batch when KV blocks allow, prefill and decode
/// together in one forward pass per step, and leave when finished. A trigger parks its request while the retrieval runs
/// (the rest of the batch goes on), then the token whose step fired is recomputed with the retrieved knowledge.
/// All scheduling state is owned by one loop thread; other threads talk to it through the inbox.
/// </summary>
public sealed class LlmEngine : IGenerationEngine
{
    private readonly EngineOptions _options;
    private readonly MixtralModel _model;
    private readonly IKvCache _cache;
    private readonly KvBlockManager _blocks;
    private readonly RetrievalService? _retrieval;
    private readonly ContextInjector _injector;
    private readonly RagEventLog _eventLog;
    private readonly TextWriter _notices;
    private readonly LoadedModel _loaded;
    private readonly int _contextLength;

    private readonly ConcurrentQueue<Action> _inbox = new();
    private readonly SemaphoreSlim _wake = new(0);
    private readonly ConcurrentDictionary<string, Sequence> _byRid = new(StringComparer.Ordinal);
    private readonly Queue<Sequence> _waiting = new();
    private readonly List<Sequence> _running = [];
    private readonly CancellationTokenSource _stop = new();
    private readonly Thread _loop;
    private long _nextRid;

    internal LlmEngine(EngineOptions options, LoadedModel loaded, IRetriever? retriever, ContextInjector injector)
    {
        var config = loaded.Config;
        _options = options;
        _loaded = loaded;
        _model = loaded.Model;
        Tokenizer = loaded.Tokenizer;
        _injector = injector;
        foreach (var (name, layers) in new[] { ("injection layer", options.InjectionLayers), ("trigger layer", options.Trigger.Layers) })
            foreach (var layer in layers ?? [])
                if (layer < 0 || layer >= config.NumLayers)
                    throw new ArgumentException($"{name} {layer} does not exist: the model has MoE layers 0..{config.NumLayers - 1}");
        _contextLength = options.ContextLength ?? config.MaxPositionEmbeddings;
        _notices = options.Notices ?? Console.Out;
        _retrieval = retriever is null ? null : new RetrievalService(retriever, options.RetrievalTimeout, options.RetrievalTopK);
        _eventLog = new RagEventLog(options.LogDir);

        const int blockSize = 16;
        var perToken = 2L * config.NumLayers * config.NumKvHeads * config.HeadDim * sizeof(float);
        var tokens = options.KvCacheTokens ?? (int)Math.Min((long)options.MaxRunningRequests * _contextLength, (2L << 30) / perToken);
        tokens = Math.Max(tokens, _contextLength);
        var numBlocks = (tokens + blockSize - 1) / blockSize;
        _blocks = new KvBlockManager(numBlocks, blockSize);
        _cache = _model.CreateKvCache(numBlocks, blockSize);

        Info = new ModelInfo(options.ModelPath, options.ModelPath, config.VocabSize, _contextLength, config.NumLayers, config.NumExperts, "cpu");
        _loop = new Thread(Run) { IsBackground = true, Name = "moe-rag-inject engine" };
        _loop.Start();
    }

    public ModelInfo Info { get; }
    public Tokenizer Tokenizer { get; }
    public InjectionMode DefaultMode => _options.Mode;
    public ModelConfig Config => _model.Config;

    public async IAsyncEnumerable<GenerationUpdate> GenerateAsync(GenerationRequest request,
        [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        var sequence = Admit(request);
        using var registration = cancellationToken.Register(() => Post(() => Finish(sequence, new FinishReason(FinishKind.Abort, Message: "client disconnected"))));
        await foreach (var update in sequence.Updates.Reader.ReadAllAsync(CancellationToken.None))
            yield return update;
    }

    public bool Abort(string rid)
    {
        if (!_byRid.TryGetValue(rid, out var sequence)) return false;
        Post(() => Finish(sequence, new FinishReason(FinishKind.Abort, Message: "aborted by request")));
        return true;
    }

    private Sequence Admit(GenerationRequest request)
    {
        if (request.Sampling.Validate() is { } error) throw new ArgumentException(error);
        if (request.PromptIds.Count == 0) throw new ArgumentException("the prompt is empty");
        foreach (var id in request.PromptIds)
            if (id < 0 || id >= _model.Config.VocabSize)
                throw new ArgumentException($"token id {id} is outside the vocabulary [0, {_model.Config.VocabSize})");
        if (request.PromptIds.Count + request.Sampling.MaxNewTokens > _contextLength)
            throw new ArgumentException($"prompt ({request.PromptIds.Count} tokens) plus max_new_tokens ({request.Sampling.MaxNewTokens}) exceeds the context length {_contextLength}");
        if (request.Rag?.Threshold is { } t && (double.IsNaN(t) || t < 0)) throw new ArgumentException("rag.threshold must be a number >= 0");

        var rid = request.Rid ?? $"req-{Interlocked.Increment(ref _nextRid)}-{Guid.NewGuid():N}"[..24];
        var trigger = _options.Trigger with { Threshold = request.Rag?.Threshold ?? _options.Trigger.Threshold };
        var sequence = new Sequence(rid, request, request.Rag?.Mode ?? _options.Mode, trigger, request.Rag?.Scale ?? _options.InjectionScale);
        if (!_byRid.TryAdd(rid, sequence)) throw new ArgumentException($"a request with rid \"{rid}\" is already running");
        Post(() => _waiting.Enqueue(sequence));
        return sequence;
    }

    private void Post(Action action)
    {
        _inbox.Enqueue(action);
        _wake.Release();
    }

    private void Run()
    {
        while (!_stop.IsCancellationRequested)
        {
            while (_inbox.TryDequeue(out var action))
            {
                try
                {
                    action();
                }
                catch (Exception e)
                {
                    // The loop thread must survive whatever one request's bookkeeping throws.
                    _notices.WriteLine($"[engine] {e.GetType().Name}: {e.Message}");
                }
            }
            Schedule();
            var batch = _running.Where(s => s.State == SequenceState.Running).ToList();
            if (batch.Count == 0)
            {
                try
                {
                    _wake.Wait(_stop.Token);
                }
                catch (OperationCanceledException)
                {
                    break;
                }
                continue;
            }
            try
            {
                Step(batch);
            }
            catch (Exception e)
            {
                // A failed step must not take the server down: the requests in it end with the error.
                foreach (var sequence in batch) Finish(sequence, new FinishReason(FinishKind.Abort, Message: $"internal error: {e.Message}"));
                _notices.WriteLine($"[engine] step failed: {e}");
            }
        }
    }

    /// <summary>Moves waiting requests into the batch while slots and KV blocks allow (a request reserves its whole budget).</summary>
    private void Schedule()
    {
        while (_waiting.Count > 0 && _running.Count < _options.MaxRunningRequests)
        {
            var next = _waiting.Peek();
            if (next.State == SequenceState.Finished)
            {
                _waiting.Dequeue();
                continue;
            }
            var budget = Math.Min(_contextLength, next.Context.Count + next.Sampling.MaxNewTokens);
            if (!_blocks.EnsureCapacity(next.BlockTable, budget)) break;
            _waiting.Dequeue();
            if (next.Sampling.MaxNewTokens == 0)
            {
                Finish(next, new FinishReason(FinishKind.Length, Length: 0));
                continue;
            }
            next.State = SequenceState.Running;
            _running.Add(next);
        }
    }

    private void Step(List<Sequence> batch)
    {
        var steps = new List<SequenceStep>(batch.Count);
        foreach (var s in batch)
        {
            var tokens = s.Context.Count;
            var all = new List<int>(s.TotalTokens - s.Computed);
            for (var p = s.Computed; p < s.TotalTokens; p++) all.Add(p < tokens ? s.Context[p] : s.Output[p - tokens]);
            if (s.Injection is not null && s.Computed >= s.InjectionEnd) s.Injection = null;
            steps.Add(new SequenceStep(all, s.Computed, s.BlockTable, Injection: s.Injection));
        }
        var stepBatch = new StepBatch(_model.Config.HiddenSize, _model.Config.NumLayers, steps);
        var output = _model.Forward(stepBatch, _cache);

        for (var i = 0; i < batch.Count; i++)
        {
            var s = batch[i];
            if (s.State != SequenceState.Running) continue;
            var lastRow = stepBatch.FirstRow[i] + steps[i].TokenIds.Count - 1;
            var entropies = output.EntropyRow(lastRow);
            s.Computed = s.TotalTokens;
            var tokenIndex = s.Output.Count;

            if (s.Mode != InjectionMode.Off && tokenIndex != s.RecomputeTokenIndex)
            {
                var decision = s.Trigger.Evaluate(entropies, tokenIndex);
                if (decision.Fired)
                {
                    StartRetrieval(s, decision, tokenIndex, batch.Count);
                    continue;
                }
            }
            EmitToken(s, output.LogitRow(i), entropies);
        }
    }

    private void EmitToken(Sequence s, ReadOnlySpan<float> logits, ReadOnlySpan<float> entropies)
    {
        var p = s.Sampling;
        HashSet<int>? suppressed = null;
        if (s.Output.Count < p.MinNewTokens)
        {
            suppressed = [.. p.StopTokenIds];
            if (!p.IgnoreEos) suppressed.UnionWith(_model.Config.EosTokenIds);
            if (Tokenizer.EosTokenId is { } eos && !p.IgnoreEos) suppressed.Add(eos);
        }
        var token = Sampler.Sample(logits, p, s.OriginalPrompt, s.OutputCounts, s.Rng, suppressed);
        s.Output.Add(token);
        s.OutputCounts[token] = s.OutputCounts.GetValueOrDefault(token) + 1;
        s.PendingTokens.Add(token);
        if (s.Request.ReturnLogprob) s.PendingLogprobs.Add(Sampler.LogProb(logits, token));
        if (s.Request.ReturnRouterEntropy)
        {
            s.PendingEntropies.Add(entropies.ToArray());
            s.PendingOutputEntropies.Add(Sampler.Entropy(logits));
        }

        var previousLength = s.Text.Length;
        s.Text = Tokenizer.Decode(s.Output.ToArray(), p.SkipSpecialTokens);
        FinishReason? finish = null;
        var isEos = !p.IgnoreEos && (_model.Config.EosTokenIds.Contains(token) || token == Tokenizer.EosTokenId);
        if (isEos || p.StopTokenIds.Contains(token))
        {
            finish = new FinishReason(FinishKind.Stop, Matched: token);
        }
        else if (p.Stop.Count > 0)
        {
            var longest = p.Stop.Max(x => x.Length);
            var from = Math.Max(0, Math.Min(previousLength, s.Text.Length) - longest);
            var best = -1;
            string? matched = null;
            foreach (var stop in p.Stop)
            {
                var at = s.Text.IndexOf(stop, from, StringComparison.Ordinal);
                if (at >= 0 && (best < 0 || at < best))
                {
                    best = at;
                    matched = stop;
                }
            }
            if (matched is not null)
            {
                if (!p.NoStopTrim) s.Text = s.Text[..best];
                finish = new FinishReason(FinishKind.Stop, Matched: matched);
            }
        }
        if (finish is null && (s.Output.Count >= p.MaxNewTokens || s.TotalTokens >= _contextLength))
            finish = new FinishReason(FinishKind.Length, Length: s.Output.Count);

        if (finish is not null) Finish(s, finish);
        else Flush(s, null);
    }

    private void StartRetrieval(Sequence s, TriggerDecision decision, int tokenIndex, int batchSize)
    {
        s.State = SequenceState.Retrieving;
        s.Computed = s.TotalTokens - 1;
        s.Trigger.RecordRetrieval(tokenIndex);
        var position = s.TotalTokens - 1;
        _notices.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"[MoE-RAG] entropy={decision.Entropy:F2} > {s.Trigger.Options.Threshold:F2} (bsz={batchSize}) -> triggering RAG"));

        var window = _options.QueryWindowTokens;
        var history = s.OriginalPrompt.Concat(s.Output).ToList();
        var query = Tokenizer.Decode(history.Skip(Math.Max(0, history.Count - window)).ToArray(), skipSpecialTokens: true).Trim();
        var start = DateTimeOffset.UtcNow;

        if (s.QueryCache.TryGetValue(query, out var cached))
        {
            CompleteRetrieval(s, decision, tokenIndex, position, batchSize, query, start, cached, true);
            return;
        }
        if (_retrieval is null)
        {
            var none = new RetrievalResult([], "no retriever is configured (--retriever)", TimeSpan.Zero);
            CompleteRetrieval(s, decision, tokenIndex, position, batchSize, query, start, none, false);
            return;
        }
        _ = _retrieval.RetrieveAsync(query, _stop.Token).ContinueWith(task =>
        {
            var result = task.IsCompletedSuccessfully ? task.Result
                : new RetrievalResult([], task.Exception?.GetBaseException().Message ?? "retrieval cancelled", DateTimeOffset.UtcNow - start);
            Post(() => CompleteRetrieval(s, decision, tokenIndex, position, batchSize, query, start, result, false));
        }, TaskScheduler.Default);
    }

    private void CompleteRetrieval(Sequence s, TriggerDecision decision, int tokenIndex, int position, int batchSize, string query,
        DateTimeOffset start, RetrievalResult result, bool cached)
    {
        if (s.State == SequenceState.Finished) return;
        s.QueryCache[query] = result;
        var snippets = result.Passages.Select(p => p.Text).ToList();
        var error = result.Error;
        IReadOnlyList<int> injectionLayers = [];
        double norm = 0;

        if (error is null && snippets.Count > 0)
        {
            try
            {
                if (s.Mode == InjectionMode.Latent)
                {
                    var layers = _options.InjectionLayers ?? decision.FiredLayers;
                    var vector = new float[_model.Config.HiddenSize];
                    norm = _injector.ComputeInjection(Tokenizer.Encode(string.Join("\n", snippets), addSpecialTokens: false), s.Scale, vector);
                    s.Injection = new InjectionInput(vector, layers, position);
                    s.InjectionEnd = _options.InjectionTokens is { } n ? position + n : int.MaxValue;
                    injectionLayers = layers;
                }
                else if (s.Mode == InjectionMode.Prompt)
                {
                    error = RebuildContext(s, snippets);
                }
            }
            catch (Exception e) when (e is ArgumentException or InvalidOperationException)
            {
                // The request goes on without injection rather than failing.
                error = $"injection failed: {e.Message}";
                norm = 0;
            }
        }
        else if (error is null)
        {
            error = "the retriever returned no passages";
        }

        var ragEvent = new RagEvent
        {
            EventId = RagEvent.NewEventId(start),
            StartTime = start,
            EndTime = DateTimeOffset.UtcNow,
            RequestId = s.Rid,
            Query = query,
            Snippets = snippets,
            SnippetIds = result.Passages.Select(p => p.Id).ToList(),
            TokenIndex = tokenIndex,
            Position = position,
            Layers = decision.FiredLayers,
            Entropy = decision.Entropy,
            Threshold = s.Trigger.Options.Threshold,
            BatchSize = batchSize,
            Retriever = _retrieval?.Retriever.Name ?? "none",
            LatencyMs = result.Latency.TotalMilliseconds,
            Mode = s.Mode.ToString().ToLowerInvariant(),
            InjectionLayers = injectionLayers,
            Scale = s.Mode == InjectionMode.Latent ? s.Scale : 0,
            InjectionNorm = norm,
            Cached = cached,
            Error = error,
        };
        try
        {
            _eventLog.Append(ragEvent);
        }
        catch (IOException e)
        {
            _notices.WriteLine($"[MoE-RAG] could not write the event log: {e.Message}");
        }
        s.PendingEvents.Add(ragEvent);
        s.RecomputeTokenIndex = tokenIndex;
        s.State = SequenceState.Running;
    }

    /// <summary>Prompt-mode RAG: the passages go ahead of the prompt and the whole context is prefilled again.</summary>
    private string? RebuildContext(Sequence s, IReadOnlyList<string> snippets)
    {
        var bos = Tokenizer.BosTokenId;
        var prompt = s.OriginalPrompt.ToList();
        if (bos is { } b && prompt.Count > 0 && prompt[0] == b) prompt.RemoveAt(0);
        var passages = Tokenizer.Encode("Context:\n" + string.Join("\n", snippets) + "\n\n", addSpecialTokens: false);
        var context = new List<int>();
        if (bos is { } b2) context.Add(b2);
        context.AddRange(passages);
        context.AddRange(prompt);
        var remaining = s.Sampling.MaxNewTokens - s.Output.Count;
        var needed = context.Count + s.Output.Count + remaining;
        if (needed > _contextLength) return $"the passages do not fit the context length {_contextLength}";
        if (!_blocks.EnsureCapacity(s.BlockTable, needed)) return "no free KV cache blocks for the passages";
        s.Context = context;
        s.Computed = 0;
        return null;
    }

    private void Finish(Sequence s, FinishReason reason)
    {
        if (s.State == SequenceState.Finished) return;
        s.State = SequenceState.Finished;
        _running.Remove(s);
        _blocks.Release(s.BlockTable);
        _byRid.TryRemove(s.Rid, out _);
        Flush(s, reason);
        s.Updates.Writer.TryComplete();
    }

    private void Flush(Sequence s, FinishReason? finish)
    {
        s.Updates.Writer.TryWrite(new GenerationUpdate
        {
            Rid = s.Rid,
            NewTokenIds = [.. s.PendingTokens],
            NewLogprobs = [.. s.PendingLogprobs],
            NewRouterEntropy = [.. s.PendingEntropies],
            NewOutputEntropy = [.. s.PendingOutputEntropies],
            NewEvents = [.. s.PendingEvents],
            Text = s.Text,
            PromptTokens = s.OriginalPrompt.Count,
            CompletionTokens = s.Output.Count,
            Finish = finish,
        });
        s.PendingTokens.Clear();
        s.PendingLogprobs.Clear();
        s.PendingEntropies.Clear();
        s.PendingOutputEntropies.Clear();
        s.PendingEvents.Clear();
    }

    public ValueTask DisposeAsync()
    {
        Post(() =>
        {
            foreach (var s in _running.ToList()) Finish(s, new FinishReason(FinishKind.Abort, Message: "server shutting down"));
            while (_waiting.Count > 0) Finish(_waiting.Dequeue(), new FinishReason(FinishKind.Abort, Message: "server shutting down"));
            _stop.Cancel();
        });
        _loop.Join();
        _cache.Dispose();
        _eventLog.Dispose();
        _retrieval?.Retriever.Dispose();
        _loaded.Dispose();
        _stop.Dispose();
        _wake.Dispose();
        return ValueTask.CompletedTask;
    }
}
