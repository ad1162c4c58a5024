using System.Collections.Concurrent;
using System.Diagnostics;
using System.Runtime.InteropServices;
using MoeRagInject.Backend;
using MoeRagInject.Engine.Coordination;
using MoeRagInject.Engine.Output;
using MoeRagInject.Engine.Scheduling;
using MoeRagInject.Engine.Telemetry;
using MoeRagInject.Model;
using MoeRagInject.Model.Tokenization;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine;

/// <summary>
/// Time counters of the engine loop since it started, for decode steps (every sequence of the step computes one position)
/// and for all steps (read them before and after a measured phase, and subtract).
/// </summary>
/// <param name="Steps">Steps run.</param>
/// <param name="StepTicks">Stopwatch ticks from scheduling a step to the end of applying its results.</param>
/// <param name="RunnerTicks">Of those, ticks inside the runner's Execute.</param>
/// <param name="DecodeSteps">Steps that were decode steps.</param>
/// <param name="DecodeTicks">Their ticks, scheduling to results applied.</param>
/// <param name="DecodeRunnerTicks">Of those, ticks inside the runner.</param>
/// <param name="DecodeTokens">Tokens accepted in decode steps.</param>
/// <param name="DecodeRows">Sequences in decode steps, summed over the steps.</param>
public readonly record struct EngineCounters(long Steps, long StepTicks, long RunnerTicks, long DecodeSteps, long DecodeTicks,
    long DecodeRunnerTicks, long DecodeTokens, long DecodeRows)
{
    public static EngineCounters operator -(EngineCounters a, EngineCounters b) =>
        new(a.Steps - b.Steps, a.StepTicks - b.StepTicks, a.RunnerTicks - b.RunnerTicks, a.DecodeSteps - b.DecodeSteps,
            a.DecodeTicks - b.DecodeTicks, a.DecodeRunnerTicks - b.DecodeRunnerTicks, a.DecodeTokens - b.DecodeTokens,
            a.DecodeRows - b.DecodeRows);

    /// <summary>Mean sequences in a decode step (the batch the runner saw).</summary>
    public double MeanDecodeBatch => DecodeSteps == 0 ? 0 : (double)DecodeRows / DecodeSteps;

    /// <summary>Microseconds per decode step spent outside the runner: scheduling, building inputs, applying results.</summary>
    public double HostMicrosecondsPerDecodeStep => DecodeSteps == 0 ? 0 : (DecodeTicks - DecodeRunnerTicks) * 1e6 / Stopwatch.Frequency / DecodeSteps;

    /// <summary>Milliseconds per decode step, scheduling to results applied.</summary>
    public double DecodeStepMilliseconds => DecodeSteps == 0 ? 0 : DecodeTicks * 1e3 / Stopwatch.Frequency / DecodeSteps;

    /// <summary>Milliseconds per step that was not a decode step (it prefilled some prompt rows), scheduling to results applied.</summary>
    public double PrefillStepMilliseconds => Steps == DecodeSteps ? 0 : (StepTicks - DecodeTicks) * 1e3 / Stopwatch.Frequency / (Steps - DecodeSteps);

    /// <summary>Of <see cref="PrefillStepMilliseconds"/>, the milliseconds inside the runner.</summary>
    public double PrefillRunnerMilliseconds =>
        Steps == DecodeSteps ? 0 : (RunnerTicks - DecodeRunnerTicks) * 1e3 / Stopwatch.Frequency / (Steps - DecodeSteps);

    /// <summary>Tokens per second of decode-step time.</summary>
    public double DecodeTokensPerSecond => DecodeTicks == 0 ? 0 : DecodeTokens * (double)Stopwatch.Frequency / DecodeTicks;
}

/// <summary>
/// The engine core: one loop thread that owns the scheduler and the runner. Each step it takes the scheduler's chunks,
/// writes them into the runner's fixed step inputs, runs the step, and applies the results: a token is accepted and handed
/// to its request's output queue, or a trigger parks its request while the retrieval runs off the loop. Detokenization,
/// stop strings and streaming happen on each request's reader (<see cref="GenerationStream"/>); other threads talk to the
/// loop through its inbox. One request's failure ends that request alone.
/// </summary>
public sealed class LlmEngine : IGenerationEngine
{
    private readonly EngineOptions _options;
    private readonly LoadedModel _loaded;
    private readonly IModelRunner _runner;
    private readonly Scheduler _scheduler;
    private readonly RagCoordinator _rag;
    private readonly RagEventWriter _eventLog;
    private readonly RetrievalService? _retrieval;
    private readonly TextWriter _notices;
    private readonly int _contextLength;
    private readonly HashSet<int> _eosIds;

    private readonly ConcurrentQueue<Action> _inbox = new();
    private readonly SemaphoreSlim _wake = new(0);
    private readonly ConcurrentDictionary<string, Sequence> _byRid = new(StringComparer.Ordinal);
    private readonly CancellationTokenSource _stop = new();
    private readonly Thread _loop;
    private long _nextArrival;
    private long _nextRid;

    private long _steps, _stepTicks, _runnerTicks, _decodeSteps, _decodeTicks, _decodeRunnerTicks, _decodeTokens, _decodeRows;
    private long _promptTokensComputed;
    private int _accepted;
    /// <summary>When the current step's results were ready: the time stamp its tokens carry.</summary>
    private long _resultsTicks;
    /// <summary>Vectors the projector makes (more than 1: one an answer position, and a latent trigger restarts the answer).</summary>
    private readonly int _answerPositions;
    private volatile EngineStatus _status;

    internal LlmEngine(EngineOptions options, LoadedModel loaded, IRetriever? retriever, ContextInjector injector, RouterProbe? probe = null)
    {
        var config = loaded.Config;
        _options = options;
        _loaded = loaded;
        RouterProbe = probe;
        _runner = loaded.Runner;
        Tokenizer = loaded.Tokenizer;
        _answerPositions = injector.AnswerPositions;
        foreach (var (name, layers) in new[] { ("injection layer", options.InjectionLayers), ("trigger layer", options.Trigger.Layers),
                     ("the projector's injection layer", injector.Layers) })
            foreach (var layer in layers ?? [])
                if (layer < 0 || layer >= config.NumLayers)
                    throw new ArgumentException($"{name} {layer} does not exist: the model has MoE layers 0..{config.NumLayers - 1}");
        _contextLength = Math.Min(options.ContextLength ?? config.MaxPositionEmbeddings, _runner.Limits.ContextLength);
        _eosIds = [.. config.EosTokenIds];
        if (Tokenizer.EosTokenId is { } eos) _eosIds.Add(eos);
        _notices = options.Notices ?? Console.Out;
        _retrieval = retriever is null ? null : new RetrievalService(retriever, options.RetrievalTimeout, options.RetrievalTopK);
        _eventLog = new RagEventWriter(options.LogDir, options.LogFsync,
            e => _notices.WriteLine($"[MoE-RAG] could not write the event log: {e.Message}"));
        Metrics = new EngineMetrics(GetStatus, config.NumLayers, config.NumExperts);
        _rag = new RagCoordinator(options, Tokenizer, injector, _retrieval, _eventLog, _notices, _contextLength, config.HiddenSize,
            Metrics, RagEvents, (sequence, outcome) => Post(() => Resume(sequence, outcome)));
        var limits = _runner.Limits;
        _scheduler = new Scheduler(new KvBlockManager(limits.NumKvBlocks, limits.BlockSize), limits.MaxSequences,
            options.ResolvedChunkedPrefillSize, options.PrefillBudget);

        Info = new ModelInfo(options.ModelPath, options.ModelPath, config.VocabSize, _contextLength, config.NumLayers, config.NumExperts, _runner.Device);
        _status = Snapshot();
        _loop = new Thread(Run) { IsBackground = true, Name = "moe-rag-inject engine" };
        _loop.Start();
    }

    public ModelInfo Info { get; }
    public Tokenizer Tokenizer { get; }
    public EngineMetrics Metrics { get; }
    public RagEventHistory RagEvents { get; } = new();
    public InjectionMode DefaultMode => _options.Mode;
    public ModelConfig Config => _loaded.Config;
    public RunnerLimits Limits => _runner.Limits;

    /// <summary>The router probe the steps compute (null: none was found; requests cannot ask for the router-probe signal).</summary>
    public RouterProbe? RouterProbe { get; }

    /// <summary>The threshold a request's trigger gets when it gives none: the router probe's for router-probe, else --entropy-threshold.</summary>
    public double DefaultThreshold(TriggerSignal signal) => signal == TriggerSignal.RouterProbe
        ? _options.RouterProbeThreshold ?? RouterProbe?.Threshold ?? double.NaN
        : _options.Trigger.Threshold;

    /// <summary>The runner under the engine (diagnostics: which graphs it captured, its limits).</summary>
    public IModelRunner Runner => _runner;

    public EngineStatus GetStatus() => _status;

    /// <summary>Host-time counters (read on any thread; steps in flight are not counted yet).</summary>
    public EngineCounters Counters => new(Interlocked.Read(ref _steps), Interlocked.Read(ref _stepTicks), Interlocked.Read(ref _runnerTicks),
        Interlocked.Read(ref _decodeSteps), Interlocked.Read(ref _decodeTicks), Interlocked.Read(ref _decodeRunnerTicks),
        Interlocked.Read(ref _decodeTokens), Interlocked.Read(ref _decodeRows));

    public GenerationStream Submit(GenerationRequest request) => SubmitParallel(request, 1)[0];

    public IReadOnlyList<GenerationStream> SubmitParallel(GenerationRequest request, int n)
    {
        ArgumentNullException.ThrowIfNull(request);
        ObjectDisposedException.ThrowIf(_stop.IsCancellationRequested, this);
        if (n < 1) throw new ArgumentException("n must be >= 1");
        Validate(request);
        var rid = request.Rid ?? $"req-{Interlocked.Increment(ref _nextRid)}-{Guid.NewGuid():N}"[..24];
        var rag = request.Rag;
        var signal = rag?.Signal ?? _options.Trigger.Signal;
        var trigger = _options.Trigger with
        {
            Signal = signal,
            Threshold = rag?.Threshold ?? DefaultThreshold(signal),
        };
        var sequences = new Sequence[n];
        var blockSize = _scheduler.Blocks.BlockSize;
        // Whole blocks strictly before the last prompt position: every sample computes that position itself, to sample from it.
        var sharedPrefix = (request.PromptIds.Count - 1) / blockSize * blockSize;
        try
        {
            for (var j = 0; j < n; j++)
            {
                var sample = n == 1 ? request with { Rid = rid } : request with
                {
                    Rid = $"{rid}-{j}",
                    Sampling = request.Sampling.Seed is { } seed ? request.Sampling with { Seed = unchecked(seed + (ulong)j) } : request.Sampling,
                };
                var mode = rag?.Mode ?? _options.Mode;
                var sequence = new Sequence(sample.Rid!, Interlocked.Increment(ref _nextArrival), sample, mode, trigger,
                    rag?.Scale ?? _options.InjectionScale)
                {
                    RetrieveFirst = mode != InjectionMode.Off && (rag?.RetrieveFirst ?? _options.RetrieveFirst),
                };
                if (j > 0 && sharedPrefix > 0)
                {
                    sequence.PrefixLeader = sequences[0];
                    sequence.SharedPrefix = sharedPrefix;
                }
                if (!_byRid.TryAdd(sequence.Rid, sequence)) throw new ArgumentException($"a request with rid \"{sequence.Rid}\" is already running");
                sequences[j] = sequence;
            }
        }
        catch
        {
            foreach (var added in sequences)
                if (added is not null) _byRid.TryRemove(new KeyValuePair<string, Sequence>(added.Rid, added));
            throw;
        }
        Post(() =>
        {
            foreach (var sequence in sequences)
            {
                if (sequence.State == SequenceState.Finished) continue;
                if (request.Sampling.MaxNewTokens == 0) Finish(sequence, new FinishReason(FinishKind.Length, Length: 0));
                else if (sequence.RetrieveFirst) _scheduler.HoldForRetrieval(sequence);
                else _scheduler.Add(sequence);
            }
        });
        // Retrievals before the prompt start here, not when the loop takes the request in after the step in flight: by then
        // they have usually ended (their outcomes are queued behind the request), and it is admitted in the same pass.
        if (request.Sampling.MaxNewTokens > 0)
            foreach (var sequence in sequences)
                if (sequence.RetrieveFirst) RetrieveFirst(sequence);
        var streams = new GenerationStream[n];
        for (var j = 0; j < n; j++) streams[j] = new GenerationStream(this, sequences[j], Tokenizer);
        return streams;
    }

    private void Validate(GenerationRequest request)
    {
        if (request.Sampling.Validate() is { } error) throw new ArgumentException(error);
        if (request.Rag?.Validate() is { } ragError) throw new ArgumentException(ragError);
        if ((request.Rag?.Signal ?? _options.Trigger.Signal) == TriggerSignal.RouterProbe && RouterProbe is null)
            throw new ArgumentException("rag.trigger_signal router-probe: this server has no router probe (run `./moe-rag-inject calibrate` to train one beside the model)");
        if (request.Rid is { Length: 0 }) throw new ArgumentException("rid must not be empty");
        if (request.PromptIds.Count == 0) throw new ArgumentException("the prompt is empty");
        if (request.TopLogprobs is < 0 or > StepState.MaxTopLogprobs)
            throw new ArgumentException($"top logprobs must be in [0, {StepState.MaxTopLogprobs}]");
        var vocab = Config.VocabSize;
        foreach (var id in request.PromptIds)
            if ((uint)id >= (uint)vocab) throw new ArgumentException($"token id {id} is outside the vocabulary [0, {vocab})");
        foreach (var id in request.Sampling.StopTokenIds)
            if ((uint)id >= (uint)vocab) throw new ArgumentException($"stop token id {id} is outside the vocabulary [0, {vocab})");
        if ((long)request.PromptIds.Count + request.Sampling.MaxNewTokens > _contextLength)
            throw new ArgumentException($"prompt ({request.PromptIds.Count} tokens) plus max_new_tokens ({request.Sampling.MaxNewTokens}) exceeds the context length {_contextLength}");
    }

    /// <summary>Aborts the request with this rid, or, when none has it, the samples of a parallel request (rid-0, rid-1, ...).</summary>
    public bool Abort(string rid)
    {
        if (_byRid.TryGetValue(rid, out var sequence))
        {
            AbortSequence(sequence, "aborted by request");
            return true;
        }
        var found = false;
        foreach (var (key, sample) in _byRid)
        {
            if (key.Length <= rid.Length + 1 || !key.StartsWith(rid, StringComparison.Ordinal) || key[rid.Length] != '-'
                || !int.TryParse(key.AsSpan(rid.Length + 1), System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out _))
                continue;
            AbortSequence(sample, "aborted by request");
            found = true;
        }
        return found;
    }

    internal void AbortSequence(Sequence sequence, string message) => FinishSequence(sequence, new FinishReason(FinishKind.Abort, Message: message));

    /// <summary>Ends a request from another thread (its stream found a stop string, or was closed).</summary>
    internal void FinishSequence(Sequence sequence, FinishReason reason) => Post(() => Finish(sequence, reason));

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
            var started = Stopwatch.GetTimestamp();
            IReadOnlyList<ScheduledChunk> batch;
            try
            {
                batch = _scheduler.Schedule();
            }
            catch (Exception e)
            {
                // A scheduler bug must not spin or kill the loop: every request ends with the error.
                _notices.WriteLine($"[engine] scheduling failed: {e}");
                foreach (var s in _scheduler.All()) Finish(s, new FinishReason(FinishKind.Abort, Message: $"internal error: {e.Message}"));
                continue;
            }
            _status = Snapshot();
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
                Step(batch, started);
            }
            catch (Exception e)
            {
                // The runner failed for the whole step (a device fault): the requests in it end with the error; the loop goes on.
                foreach (var chunk in batch.ToList()) Finish(chunk.Sequence, new FinishReason(FinishKind.Abort, Message: $"internal error: {e.Message}"));
                _notices.WriteLine($"[engine] step failed: {e}");
            }
        }
    }

    private EngineStatus Snapshot() => new(_scheduler.Running, _scheduler.Waiting, _scheduler.Retrieving,
        _scheduler.Blocks.FreeBlocks, _scheduler.Blocks.NumBlocks, _scheduler.Blocks.BlockSize, _scheduler.Preemptions, Interlocked.Read(ref _steps),
        Interlocked.Read(ref _promptTokensComputed), _scheduler.SharedTokens);

    private void Step(IReadOnlyList<ScheduledChunk> batch, long started)
    {
        var state = _runner.State;
        var rows = 0;
        var promptRows = 0;
        for (var i = 0; i < batch.Count; i++)
        {
            var (s, tokens, _) = batch[i];
            PrepareSlot(s);
            state.SeqSlot[i] = s.Slot;
            state.QueryStart[i] = rows;
            for (var p = s.Computed; p < s.Computed + tokens; p++)
            {
                state.TokenIds[rows] = s.TokenAt(p);
                state.Positions[rows++] = p;
            }
            promptRows += Math.Max(0, Math.Min(s.Computed + tokens, s.Context.Count) - s.Computed);
            var samples = s.Computed + tokens == s.TotalTokens;
            var request = s.Request;
            byte flags = 0;
            if (samples) flags |= StepState.FlagSample;
            if (request.ReturnLogprob) flags |= StepState.FlagLogprob;
            if (request.ReturnLogprob && request.TopLogprobs > 0) flags |= StepState.FlagTopLogprobs;
            if (request.ReturnRouterEntropy || s.Trigger.Options.Signal == TriggerSignal.OutputEntropy) flags |= StepState.FlagOutputEntropy;
            if (s.Generated.Count < s.Sampling.MinNewTokens) flags |= StepState.FlagSuppressStops;
            if (_options.Faults?.FailSampling(s.Rid) == true) flags |= StepState.FlagFailSampling;
            state.SeqFlags[i] = flags;
            state.Uniform[i] = s.Sampling.IsGreedy ? 0f : s.PeekUniform();
        }
        state.Sequences = batch.Count;
        state.Rows = rows;
        state.QueryStart[batch.Count] = rows;

        var before = Stopwatch.GetTimestamp();
        _runner.Execute();
        _resultsTicks = Stopwatch.GetTimestamp();
        var runner = _resultsTicks - before;

        _accepted = 0;
        for (var i = 0; i < batch.Count; i++)
        {
            var (s, tokens, _) = batch[i];
            if (s.State == SequenceState.Finished) continue;
            s.Computed += tokens;
            if ((state.SeqFlags[i] & StepState.FlagSample) != 0) Apply(s, i, batch.Count);
        }
        var ticks = Stopwatch.GetTimestamp() - started;
        Interlocked.Increment(ref _steps);
        Interlocked.Add(ref _promptTokensComputed, promptRows);
        Interlocked.Add(ref _runnerTicks, runner);
        Interlocked.Add(ref _stepTicks, ticks);
        if (rows == batch.Count)
        {
            Interlocked.Increment(ref _decodeSteps);
            Interlocked.Add(ref _decodeTicks, ticks);
            Interlocked.Add(ref _decodeRunnerTicks, runner);
            Interlocked.Add(ref _decodeTokens, _accepted);
            Interlocked.Add(ref _decodeRows, rows);
        }
    }

    /// <summary>Gives a newly admitted request its slot's sampling state, and the runner the KV blocks it gained.</summary>
    private void PrepareSlot(Sequence s)
    {
        if (!s.SlotBound)
        {
            _runner.BindSlot(s.Slot, ToSlotSampling(s.Sampling), s.OriginalPrompt);
            s.SlotBound = true;
            s.InjectionStart = -1;
            if (s.PendingInjection is { } p)
            {
                _runner.SetInjection(s.Slot, p.Vector, p.Layers, p.Start, p.End, p.Start);
                s.InjectionStart = p.Start;
                s.PendingInjection = null;
            }
        }
        if (s.SyncedBlocks < s.BlockTable.Count)
        {
            _runner.SetBlocks(s.Slot, s.SyncedBlocks, CollectionsMarshal.AsSpan(s.BlockTable)[s.SyncedBlocks..]);
            s.SyncedBlocks = s.BlockTable.Count;
        }
    }

    private SlotSampling ToSlotSampling(SamplingParams p)
    {
        List<int> suppressed = [];
        if (p.MinNewTokens > 0)
        {
            suppressed.AddRange(p.StopTokenIds);
            if (!p.IgnoreEos) suppressed.AddRange(_eosIds);
        }
        return new SlotSampling
        {
            Temperature = p.Temperature,
            TopP = p.TopP,
            TopK = p.TopK,
            MinP = p.MinP,
            RepetitionPenalty = p.RepetitionPenalty,
            FrequencyPenalty = p.FrequencyPenalty,
            PresencePenalty = p.PresencePenalty,
            SuppressedIds = suppressed.Distinct().ToArray(),
        };
    }

    /// <summary>Applies sequence <paramref name="i"/>'s sampled result: isolate a failure, fire a trigger, or accept the token.</summary>
    private void Apply(Sequence s, int i, int batchSize)
    {
        var state = _runner.State;
        switch (state.OutStatus[i])
        {
            case SampleStatus.Ok:
                break;
            case SampleStatus.NonFinite:
                NonFinite(s);
                return;
            case SampleStatus.SamplerFailed:
                Finish(s, new FinishReason(FinishKind.Abort, Message: "sampling failed for this request"));
                return;
            default:
                return;
        }
        var tokenIndex = s.Generated.Count;
        var entropies = state.RouterEntropyOf(i);
        var probeScore = RouterProbe is { } probe ? (float)ProbeScore(s, probe, state.OutProbeLogit[i], tokenIndex) : float.NaN;
        if (s.Mode != InjectionMode.Off && tokenIndex != s.RecomputeTokenIndex)
        {
            var decision = s.Trigger.Options.Signal switch
            {
                TriggerSignal.OutputEntropy => WholeModelDecision(s, state.OutOutputEntropy[i], tokenIndex, entropies.Length),
                TriggerSignal.RouterProbe => WholeModelDecision(s, probeScore, tokenIndex, entropies.Length),
                _ => s.Trigger.Evaluate(entropies, tokenIndex),
            };
            if (decision.Fired)
            {
                Park(s, decision, tokenIndex, batchSize);
                return;
            }
        }

        var token = state.OutTokens[i];
        _accepted++;
        if (!s.Sampling.IsGreedy) s.Rng.NextSingle();
        if (state.Sampling[s.Slot].HasPenalties) _runner.AcceptToken(s.Slot, token);
        s.Generated.Add(token);
        var request = s.Request;
        Emit(s, new TokenOutput(token, state.OutLogprobs[i], state.OutOutputEntropy[i], _resultsTicks,
            (state.SeqFlags[i] & StepState.FlagTopLogprobs) != 0 ? TopOf(state, i, request.TopLogprobs) : null, probeScore), entropies);

        var p = s.Sampling;
        if ((!p.IgnoreEos && _eosIds.Contains(token)) || p.StopTokenIds.Contains(token))
            Finish(s, new FinishReason(FinishKind.Stop, Matched: token));
        else if (s.Generated.Count >= p.MaxNewTokens || s.TotalTokens >= _contextLength)
            Finish(s, new FinishReason(FinishKind.Length, Length: s.Generated.Count));
    }

    /// <summary>
    /// The trigger on a signal of the whole model (the output distribution's entropy, the router probe's score): the same
    /// threshold, cooldown and cap as the router signal, over one value; a fire counts every MoE layer as fired.
    /// </summary>
    private static TriggerDecision WholeModelDecision(Sequence s, float value, int tokenIndex, int layers)
    {
        var decision = s.Trigger.Evaluate([value], tokenIndex);
        return decision.Fired ? decision with { FiredLayers = [.. Enumerable.Range(0, layers)] } : decision;
    }

    /// <summary>
    /// The router probe's score of answer token <paramref name="tokenIndex"/>: the step's probe sum is kept at that index (a
    /// recomputed token, or a restarted answer, replaces what was there), and the probe pools the window that ends there.
    /// </summary>
    private static double ProbeScore(Sequence s, RouterProbe probe, float sum, int tokenIndex)
    {
        var sums = s.ProbeSums;
        if (sums.Count > tokenIndex) sums.RemoveRange(tokenIndex, sums.Count - tokenIndex);
        while (sums.Count < tokenIndex) sums.Add(float.NaN);  // never: every earlier token was sampled and kept first
        sums.Add(sum);
        return probe.Score(CollectionsMarshal.AsSpan(sums), tokenIndex);
    }

    /// <summary>
    /// Gives an accepted token to the request's output, or holds it back while a prompt-mode trigger, or a latent one with
    /// one vector an answer position, may still restart the answer (the first
    /// <see cref="EngineOptions.PromptRestartWindowTokens"/> tokens), so that no token the client got is ever dropped. Held
    /// tokens go out, in order, as soon as no restart can come.
    /// </summary>
    private void Emit(Sequence s, in TokenOutput token, ReadOnlySpan<float> entropies)
    {
        if (_options.RestartsAnswer(s.Mode, _answerPositions) && s.Generated.Count < EngineOptions.PromptRestartWindowTokens
            && s.Trigger.RetrievalCount < s.Trigger.Options.MaxRetrievalsPerRequest)
        {
            s.Held.Add((token, entropies.ToArray()));
            return;
        }
        ReleaseHeld(s);
        s.Output.AddToken(token, entropies);
    }

    private static void ReleaseHeld(Sequence s)
    {
        foreach (var (held, entropies) in s.Held) s.Output.AddToken(held, entropies);
        s.Held.Clear();
    }

    /// <summary>The first <paramref name="k"/> alternatives the runner reported for sequence <paramref name="i"/> (fewer past the vocabulary).</summary>
    private static TokenLogprob[] TopOf(StepState state, int i, int k)
    {
        var ids = state.TopIdsOf(i);
        var logprobs = state.TopLogprobsOf(i);
        var count = 0;
        while (count < k && count < ids.Length && ids[count] >= 0) count++;
        var top = new TokenLogprob[count];
        for (var j = 0; j < count; j++) top[j] = new TokenLogprob(ids[j], logprobs[j]);
        return top;
    }

    /// <summary>
    /// Non-finite logits or router entropies. With an injection active it is the likely cause: the request goes on without
    /// it (and without further RAG), recomputing from where the injection started. Without one, the request ends.
    /// </summary>
    private void NonFinite(Sequence s)
    {
        if (s.InjectionStart < 0)
        {
            Finish(s, new FinishReason(FinishKind.Abort, Message: "the model produced non-finite logits or router entropies for this request"));
            return;
        }
        _runner.ClearInjection(s.Slot);
        s.Computed = Math.Min(s.Computed, s.InjectionStart);
        s.InjectionStart = -1;
        s.Mode = InjectionMode.Off;
        _notices.WriteLine($"[MoE-RAG] request {s.Rid}: the injection made its hidden state non-finite; it goes on without injection");
    }

    /// <summary>A trigger fired: the token is dropped, the request waits for its retrieval, and the position is recomputed after.</summary>
    private void Park(Sequence s, TriggerDecision decision, int tokenIndex, int batchSize)
    {
        s.State = SequenceState.Retrieving;
        s.Computed = s.TotalTokens - 1;
        s.Trigger.RecordRetrieval(tokenIndex);
        _rag.Start(s, new RagTrigger(decision, tokenIndex, s.TotalTokens - 1, batchSize, QueryIds(s), s.Mode, s.Scale,
            s.Trigger.Options.Threshold, s.Generated.Count));
    }

    /// <summary>
    /// A new request with --retrieve-first (called on the submitting thread, after the request was posted to the loop, which
    /// holds it outside the queue): it retrieves with its prompt, and joins the queue when the passages (prompt mode) or
    /// vectors (latent mode) are ready. A fire counts every MoE layer, as a whole-model signal's does.
    /// </summary>
    private void RetrieveFirst(Sequence s)
    {
        s.Trigger.RecordRetrieval(0);
        var decision = new TriggerDecision(true, double.NaN, [.. Enumerable.Range(0, _loaded.Config.NumLayers)]);
        _rag.Start(s, new RagTrigger(decision, 0, s.Context.Count - 1, 0, QueryIds(s), s.Mode, s.Scale, double.NaN, 0, First: true));
    }

    /// <summary>The retrieval query's token ids: the last --query-window tokens of the prompt and the answer so far.</summary>
    private int[] QueryIds(Sequence s)
    {
        var history = s.OriginalPrompt.Length + s.Generated.Count;
        var queryIds = new int[Math.Min(_options.QueryWindowTokens, history)];
        for (var j = 0; j < queryIds.Length; j++)
        {
            var index = history - queryIds.Length + j;
            queryIds[j] = index < s.OriginalPrompt.Length ? s.OriginalPrompt[index] : s.Generated[index - s.OriginalPrompt.Length];
        }
        return queryIds;
    }

    private void Resume(Sequence s, RagOutcome outcome)
    {
        if (s.State != SequenceState.Retrieving) return;
        s.Output.AddEvent(outcome.Event);
        if (outcome.First)
        {
            // Retrieved before admission: the injection waits for the slot (vector 0 at the prompt's last position), or the
            // passages go ahead of the prompt before any of it is computed (and nothing is shared with parallel samples).
            if (outcome.Vector is { } first)
            {
                s.PendingInjection = new PendingInjection(first, outcome.InjectionLayers, outcome.Position, outcome.InjectionEnd);
                // One vector an answer position covers the answer, as after a latent restart: no further retrieval.
                if (_options.RestartsAnswer(s.Mode, _answerPositions)) s.Trigger.EndRetrievals();
            }
            else if (outcome.Context is { } rebuilt)
            {
                s.Context = rebuilt;
                s.ContextRebuilt = true;
                s.PrefixLeader = null;
            }
            _scheduler.Resume(s);
            return;
        }
        if (outcome.Vector is { } vector)
        {
            // With one vector an answer position, vector i goes at the position that predicts answer token i.
            var answerBase = s.Context.Count - 1;
            if (outcome.RestartAnswer)
            {
                // The answer starts again from its first token with vector 0: its held tokens were never sent, its
                // penalties start afresh, and the last context position is computed again with the injection, which now
                // covers the answer: no further retrieval.
                s.Generated.Clear();
                s.Held.Clear();
                s.Trigger.RestartAnswer();
                s.Trigger.EndRetrievals();
                _runner.BindSlot(s.Slot, ToSlotSampling(s.Sampling), s.OriginalPrompt);
                // --injection-tokens counts from where the injection now starts.
                var end = outcome.InjectionEnd == int.MaxValue ? int.MaxValue : answerBase + (outcome.InjectionEnd - outcome.Position);
                _runner.SetInjection(s.Slot, vector, outcome.InjectionLayers, answerBase, end, answerBase);
                s.InjectionStart = answerBase;
                s.Computed = answerBase;
                s.RecomputeTokenIndex = -1;
                _scheduler.Resume(s);
                return;
            }
            _runner.SetInjection(s.Slot, vector, outcome.InjectionLayers, outcome.Position, outcome.InjectionEnd, answerBase);
            s.InjectionStart = outcome.Position;
            // --latent-rag-restart continue: one vector an answer position covers the rest of the answer, as after a restart:
            // no further retrieval. (A late trigger of the restarting default may still retrieve again, as before.)
            if (_answerPositions > 1 && _options.LatentRagRestart == LatentRagRestart.Continue) s.Trigger.EndRetrievals();
        }
        else if (outcome.Context is { } context)
        {
            s.Context = context;
            s.ContextRebuilt = true;
            s.Computed = 0;
            // The new context is written from position 0: blocks shared with parallel samples must not be overwritten.
            _scheduler.DropSharedBlocks(s);
            if (outcome.RestartAnswer)
            {
                // The answer starts again after the passages: its held tokens were never sent, its penalties start afresh.
                s.Generated.Clear();
                s.Held.Clear();
                s.SlotBound = false;
                s.Trigger.RestartAnswer();
                s.RecomputeTokenIndex = -1;
                _scheduler.Resume(s);
                return;
            }
        }
        s.RecomputeTokenIndex = outcome.TokenIndex;
        _scheduler.Resume(s);
    }

    private void Finish(Sequence s, FinishReason reason)
    {
        if (s.State == SequenceState.Finished) return;
        ReleaseHeld(s);
        _scheduler.Remove(s);
        s.State = SequenceState.Finished;
        _byRid.TryRemove(new KeyValuePair<string, Sequence>(s.Rid, s));
        s.Cancellation.Cancel();
        s.Output.Complete(reason);
    }

    public async ValueTask DisposeAsync()
    {
        Post(() =>
        {
            foreach (var s in _scheduler.All()) Finish(s, new FinishReason(FinishKind.Abort, Message: "server shutting down"));
            _stop.Cancel();
        });
        _loop.Join();
        await _eventLog.DisposeAsync().ConfigureAwait(false);
        Metrics.Dispose();
        _retrieval?.Retriever.Dispose();
        _loaded.Dispose();
        _stop.Dispose();
        _wake.Dispose();
    }
}
