using System.Diagnostics;
using System.Diagnostics.Metrics;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine.Telemetry;

/// <summary>
/// The engine's instruments (System.Diagnostics.Metrics), named as Prometheus expects them to be scraped: prefix
/// <c>moe_rag_</c>, the unit in the name, <c>_total</c> on counters. One meter per engine, so that a server exports the
/// engine it serves and nothing else. Nothing here runs on the engine loop: request measurements are taken by each
/// request's reader (<see cref="GenerationStream"/>), RAG measurements by the coordinator, and the gauges are read from
/// the loop's status snapshot at scrape time. Without a listener, a measurement costs a flag check.
/// </summary>
public sealed class EngineMetrics : IDisposable
{
    /// <summary>The meter's name (what an exporter subscribes to).</summary>
    public const string MeterName = "MoeRagInject";

    // Bucket bounds in seconds. First-token and end-to-end times span prefills on a CPU to queued long generations;
    // inter-token times span a GPU decode step (a few ms) to a retrieval pause.
    private static readonly double[] s_ttftBuckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80];
    private static readonly double[] s_itlBuckets = [0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5];
    private static readonly double[] s_e2eBuckets = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 60, 120, 300, 600];
    private static readonly double[] s_retrievalBuckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

    private readonly Histogram<double> _timeToFirstToken;
    private readonly Histogram<double> _interTokenLatency;
    private readonly Histogram<double> _e2eRequestLatency;
    private readonly Counter<long> _promptTokens;
    private readonly Counter<long> _generationTokens;
    private readonly Counter<long> _requests;
    private readonly Counter<long> _triggers;
    private readonly Histogram<double> _retrieval;
    private readonly Counter<long> _retrievalErrors;
    private readonly Histogram<float> _routerEntropy;
    /// <summary>One boxed "layer" tag per MoE layer, made once: a measurement allocates nothing.</summary>
    private readonly KeyValuePair<string, object?>[] _layerTags;
    private readonly KeyValuePair<string, object?>[] _finishTags;

    /// <param name="status">The engine's latest status (read at scrape time for the gauges).</param>
    /// <param name="numLayers">MoE layers (one entropy series each).</param>
    /// <param name="numExperts">Experts per layer: router entropy lies in [0, ln E].</param>
    internal EngineMetrics(Func<EngineStatus> status, int numLayers, int numExperts)
    {
        Meter = new Meter(MeterName, typeof(EngineMetrics).Assembly.GetName().Version?.ToString());
        _timeToFirstToken = Histogram("moe_rag_time_to_first_token_seconds", "s",
            "Time from a request's arrival at the engine to its first generated token.", s_ttftBuckets);
        _interTokenLatency = Histogram("moe_rag_inter_token_latency_seconds", "s",
            "Time between two consecutive generated tokens of a request (a retrieval pause included).", s_itlBuckets);
        _e2eRequestLatency = Histogram("moe_rag_e2e_request_latency_seconds", "s",
            "Time from a request's arrival at the engine to its last output.", s_e2eBuckets);
        _retrieval = Histogram("moe_rag_retrieval_seconds", "s",
            "Time of one retrieval (cached answers within a request are not counted).", s_retrievalBuckets);
        _routerEntropy = Meter.CreateHistogram("moe_rag_router_entropy_nats", "nats",
            "Router entropy H = -sum p ln p of each generated token's forward pass, per MoE layer.",
            advice: new InstrumentAdvice<float> { HistogramBucketBoundaries = EntropyBuckets(numExperts) });
        _promptTokens = Meter.CreateCounter<long>("moe_rag_prompt_tokens_total", "{token}", "Prompt tokens of finished requests.");
        _generationTokens = Meter.CreateCounter<long>("moe_rag_generation_tokens_total", "{token}", "Tokens generated and returned.");
        _requests = Meter.CreateCounter<long>("moe_rag_requests_total", "{request}", "Finished requests by finish reason (stop, length, abort).");
        _triggers = Meter.CreateCounter<long>("moe_rag_triggers_total", "{trigger}",
            "Entropy triggers that led to a RAG event, once under each layer that fired, by RAG mode.");
        _retrievalErrors = Meter.CreateCounter<long>("moe_rag_retrieval_errors_total", "{error}",
            "Retrievals that brought nothing to inject, by kind (timeout, failed, bad_response, no_passages, empty_query, no_retriever).");
        Meter.CreateObservableGauge("moe_rag_num_requests_running", () => { var s = status(); return s.Running + s.Retrieving; }, "{request}",
            "Requests holding a slot (decoding, prefilling or waiting for their retrieval).");
        Meter.CreateObservableGauge("moe_rag_num_requests_waiting", () => status().Waiting, "{request}",
            "Requests queued for a slot or KV blocks (new or preempted).");
        Meter.CreateObservableGauge("moe_rag_num_requests_retrieving", () => status().Retrieving, "{request}",
            "Running requests parked while their retrieval runs.");
        Meter.CreateObservableGauge("moe_rag_kv_cache_usage_ratio", () =>
        {
            var s = status();
            return s.TotalKvBlocks == 0 ? 0 : 1 - (double)s.FreeKvBlocks / s.TotalKvBlocks;
        }, "1", "Share of the KV pool's blocks in use.");

        _layerTags = new KeyValuePair<string, object?>[numLayers];
        for (var l = 0; l < numLayers; l++) _layerTags[l] = new("layer", l.ToString(System.Globalization.CultureInfo.InvariantCulture));
        _finishTags = [new("finish_reason", "stop"), new("finish_reason", "length"), new("finish_reason", "abort")];
    }

    public Meter Meter { get; }

    private Histogram<double> Histogram(string name, string unit, string description, double[] buckets) =>
        Meter.CreateHistogram(name, unit, description, advice: new InstrumentAdvice<double> { HistogramBucketBoundaries = buckets });

    /// <summary>0.1-nat buckets up to ln E (the largest entropy a router over E experts can have).</summary>
    private static float[] EntropyBuckets(int numExperts)
    {
        var top = (int)Math.Ceiling(Math.Log(Math.Max(2, numExperts)) * 10);
        var bounds = new float[top];
        for (var i = 0; i < top; i++) bounds[i] = (i + 1) / 10f;
        return bounds;
    }

    /// <summary>Label values every counter series can take.</summary>
    private static readonly string[] s_retrievalErrorKinds = ["timeout", "failed", "bad_response", "no_passages", "empty_query", "no_retriever"];
    private static readonly string[] s_triggerModes = ["latent", "prompt"];

    /// <summary>
    /// Adds zero to every labelled counter series that can occur (each finish reason, each trigger layer and mode, each
    /// retrieval error kind), so that a listener started now exports them at 0 from its first scrape: as Prometheus
    /// advises, a series that appears only once it is nonzero breaks rate() and alerting on it.
    /// </summary>
    public void PublishZeroes()
    {
        foreach (var tag in _finishTags) _requests.Add(0, tag);
        foreach (var mode in s_triggerModes)
            foreach (var layer in _layerTags) _triggers.Add(0, layer, new KeyValuePair<string, object?>("mode", mode));
        foreach (var kind in s_retrievalErrorKinds) _retrievalErrors.Add(0, new KeyValuePair<string, object?>("kind", kind));
        _promptTokens.Add(0);
        _generationTokens.Add(0);
    }

    internal static double Seconds(long fromTicks, long toTicks) => (toTicks - fromTicks) / (double)Stopwatch.Frequency;

    internal void FirstToken(double seconds) => _timeToFirstToken.Record(seconds);

    internal void InterToken(double seconds) => _interTokenLatency.Record(seconds);

    /// <summary>One generated token's router entropies, one per layer (layers past the model's are ignored).</summary>
    internal void RouterEntropy(ReadOnlySpan<float> entropies)
    {
        if (!_routerEntropy.Enabled) return;
        var n = Math.Min(entropies.Length, _layerTags.Length);
        for (var l = 0; l < n; l++) _routerEntropy.Record(entropies[l], _layerTags[l]);
    }

    /// <summary>A request's last output: its finish reason, latency and token counts.</summary>
    internal void Finished(FinishKind kind, double seconds, int promptTokens, int generatedTokens)
    {
        _e2eRequestLatency.Record(seconds);
        _requests.Add(1, _finishTags[(int)kind]);
        _promptTokens.Add(promptTokens);
        _generationTokens.Add(generatedTokens);
    }

    internal void Triggered(IReadOnlyList<int> layers, InjectionMode mode)
    {
        if (!_triggers.Enabled) return;
        var modeTag = new KeyValuePair<string, object?>("mode", mode switch
        {
            InjectionMode.Latent => "latent",
            InjectionMode.Prompt => "prompt",
            _ => "off",
        });
        foreach (var layer in layers)
            if ((uint)layer < (uint)_layerTags.Length) _triggers.Add(1, _layerTags[layer], modeTag);
    }

    /// <summary>A retrieval the retriever was asked for (not a per-request cached answer).</summary>
    internal void Retrieved(RetrievalResult result) => _retrieval.Record(result.Latency.TotalSeconds);

    internal void RetrievalFailed(string kind) => _retrievalErrors.Add(1, new KeyValuePair<string, object?>("kind", kind));

    public void Dispose() => Meter.Dispose();
}
