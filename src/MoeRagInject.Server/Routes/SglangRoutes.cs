using System.Diagnostics;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;
using MoeRagInject.Engine;
using MoeRagInject.Rag;
using MoeRagInject.Server.Contracts;
using MoeRagInject.Server.Generation;
using MoeRagInject.Server.Requests;

namespace MoeRagInject.Server.Routes;

/// <summary>sglang's native surface: /generate, health, model and server info, abort.</summary>
public static class SglangRoutes
{
    public static void Map(IEndpointRouteBuilder app)
    {
        var sglang = app.MapGroup("").WithGroupName("sglang");
        sglang.MapGet("/health", (EngineHolder engine) => Health(engine));
        sglang.MapGet("/health_generate", (HttpContext context, EngineHolder engine) => HealthGenerateAsync(context, engine));
        sglang.MapGet("/get_model_info", (EngineHolder engine, ServerOptions options) => ModelInfo(engine, options));
        sglang.MapGet("/get_server_info", (ServerOptions options, EngineHolder engine, HttpContext context) => ServerInfo(options, engine, context));
        sglang.MapPost("/generate", (HttpContext context, EngineHolder engine, ServerOptions options) => GenerateAsync(context, engine, options));
        sglang.MapPost("/abort_request", (HttpContext context, EngineHolder engine) => AbortAsync(context, engine));
        sglang.MapPost("/flush_cache", (EngineHolder engine) => FlushCache(engine));
        sglang.MapGet("/flush_cache", (EngineHolder engine) => FlushCache(engine));
    }

    /// <summary>
    /// sglang flushes its radix (prefix) cache, and only when no request is running or waiting (400 otherwise). This engine
    /// keeps no prefix cache between requests (parallel samples share a prompt's blocks only while they run), so there is
    /// nothing to flush; it answers as sglang would, success when idle, and says so.
    /// </summary>
    private static IResult FlushCache(EngineHolder holder)
    {
        var status = holder.Require().GetStatus();
        var busy = status.Running + status.Waiting + status.Retrieving;
        return busy > 0
            ? Results.Json(new FlushCacheResponse(false, RequestParsing.Invariant(
                $"not flushed: {busy} requests are running or waiting (as sglang, the cache is flushed only when idle)")),
                ApiJsonContext.Wire.FlushCacheResponse, statusCode: StatusCodes.Status400BadRequest)
            : Results.Json(new FlushCacheResponse(true,
                "nothing to flush: this server keeps no prefix cache between requests (KV blocks are freed when a request ends)"),
                ApiJsonContext.Wire.FlushCacheResponse);
    }

    private static IResult Health(EngineHolder engine)
    {
        if (engine.Current is not null) return Results.Json(new HealthResponse("ok"), ApiJsonContext.Wire.HealthResponse);
        var status = engine.LoadError is null ? "loading" : "failed";
        return Results.Json(new HealthResponse(status, engine.LoadError), ApiJsonContext.Wire.HealthResponse, statusCode: 503);
    }

    /// <summary>Healthy when one greedy token can be generated end to end, within 30 s.</summary>
    private static async Task<IResult> HealthGenerateAsync(HttpContext context, EngineHolder holder)
    {
        var engine = holder.Require();
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(context.RequestAborted);
        timeout.CancelAfter(TimeSpan.FromSeconds(30));
        var request = new GenerationRequest
        {
            PromptIds = [engine.Tokenizer.BosTokenId ?? 0],
            Sampling = new SamplingParams { MaxNewTokens = 1, Temperature = 0, IgnoreEos = true },
            Rag = new RagOverrides { Mode = InjectionMode.Off },
        };
        try
        {
            FinishReason? finish = null;
            await foreach (var update in engine.GenerateAsync(request, timeout.Token).ConfigureAwait(false))
                finish = update.Finish ?? finish;
            if (finish is { Kind: FinishKind.Abort })
                return Results.Json(new HealthResponse("unhealthy", finish.Message), ApiJsonContext.Wire.HealthResponse, statusCode: 503);
            return Results.Json(new HealthResponse("ok"), ApiJsonContext.Wire.HealthResponse);
        }
        catch (OperationCanceledException) when (!context.RequestAborted.IsCancellationRequested)
        {
            return Results.Json(new HealthResponse("unhealthy", "generation did not finish within 30 s"),
                ApiJsonContext.Wire.HealthResponse, statusCode: 503);
        }
    }

    private static IResult ModelInfo(EngineHolder holder, ServerOptions options)
    {
        var engine = holder.Require();
        var info = engine.Info;
        return Results.Json(
            new ModelInfoResponse(
                info.ModelPath, info.TokenizerPath, IsGeneration: true, options.ModelName(info.ModelPath),
                info.VocabSize, info.ContextLength, info.NumMoeLayers, info.NumExperts, info.Device,
                RequestParsing.ModeName(engine.DefaultMode)),
            ApiJsonContext.Wire.ModelInfoResponse);
    }

    private static IResult ServerInfo(ServerOptions options, EngineHolder holder, HttpContext context)
    {
        var engine = holder.Current;
        var status = engine?.GetStatus();
        var e = options.Engine;
        var port = context.Connection.LocalPort != 0 ? context.Connection.LocalPort : options.Port;
        // sglang's max_total_num_tokens: the KV pool's size in tokens.
        int? maxTotalTokens = status is null ? null : status.TotalKvBlocks * status.KvBlockSize;
        var projection = e is null ? null : e.Projection switch
        {
            ProjectionKind.Random => "random",
            ProjectionKind.Identity => "identity",
            _ => e.ProjectionPath ?? "file",
        };
        return Results.Json(
            new ServerInfoResponse(
                Version: typeof(SglangRoutes).Assembly.GetName().Version?.ToString() ?? "0.0.0",
                options.Host, port,
                e?.ModelPath, e?.Runner.Device, engine?.Info.Device, e?.LoadFormat, e?.ContextLength, e?.MaxRunningRequests, e?.KvCacheTokens,
                e?.ResolvedChunkedPrefillSize, e?.MaxPrefillTokens, e?.MemFractionStatic, e?.CudaGraphMaxBatchSize, e?.DisableCudaGraph, e?.Deterministic,
                e is null ? null : e.ExpertLayout == MoeRagInject.Backend.ExpertLayout.Boxed ? "boxed" : "row-major",
                e is null ? null : RequestParsing.ModeName(e.Mode), e?.PromptRagRestart.ToString().ToLowerInvariant(),
                e?.LatentRagRestart.ToString().ToLowerInvariant(),
                e is null ? null : TriggerSignals.Name(e.Trigger.Signal),
                // The server's signal's threshold: router-probe's is the probe's own unless --entropy-threshold set it.
                e is null ? null : e.Trigger.Signal == TriggerSignal.RouterProbe ? e.RouterProbeThreshold ?? (engine as LlmEngine)?.RouterProbe?.Threshold : e.Trigger.Threshold, e?.Trigger.Layers, e?.Trigger.Aggregation.ToString().ToLowerInvariant(),
                e?.Trigger.CooldownTokens, e?.Trigger.MaxRetrievalsPerRequest, e?.Trigger.WindowTokens,
                e?.InjectionScale, e?.InjectionLayers, e?.InjectionTokens, projection, e?.ProjectionSeed,
                e?.Retriever, e?.RetrievalTimeout.TotalMilliseconds, e?.RetrievalTopK, e?.QueryWindowTokens, e?.LogDir, e?.LogFsync,
                options.IncrementalStreamingOutput,
                status is null ? null : new EngineStatusJson(status.Running, status.Waiting, status.Retrieving, status.FreeKvBlocks,
                    status.TotalKvBlocks, status.KvBlockSize, status.Preemptions, status.Steps, status.PromptTokensComputed,
                    status.PromptTokensShared),
                TokenizerPath: engine?.Info.TokenizerPath,
                ServedModelName: engine is null ? null : options.ServedModelName ?? engine.Info.ModelPath,
                MaxTotalNumTokens: maxTotalTokens,
                MaxReqInputLen: engine is null ? null : engine.Info.ContextLength - 1,
                PageSize: status?.KvBlockSize,
                InternalStates: status is null ? null :
                [
                    new InternalStateJson(
                        // Decode tokens per second of decode-step time since the engine started (0 before any decode step).
                        engine is LlmEngine llm ? llm.Counters.DecodeTokensPerSecond : 0,
                        // No speculative decoding: every step accepts exactly one token per request.
                        AvgSpecAcceptLength: 1.0, maxTotalTokens ?? 0, e?.MaxRunningRequests ?? 0),
                ],
                RouterProbe: e is not null && (engine as LlmEngine)?.RouterProbe is not null ? e.ResolvedRouterProbePath : null,
                RetrieveFirst: e?.RetrieveFirst),
            ApiJsonContext.Wire.ServerInfoResponse);
    }

    private static async Task AbortAsync(HttpContext context, EngineHolder holder)
    {
        var engine = holder.Require();
        using var document = await JsonFields.ReadBodyAsync(context.Request.Body, context.RequestAborted).ConfigureAwait(false);
        var root = JsonFields.Root(document);
        var rid = root.String("rid") ?? throw ApiException.BadRequest("rid is required");
        var aborted = engine.Abort(rid);
        await context.Response.WriteAsJsonAsync(new AbortResponse(rid, aborted), ApiJsonContext.Wire.AbortResponse, contentType: null, context.RequestAborted)
            .ConfigureAwait(false);
    }

    private static async Task GenerateAsync(HttpContext context, EngineHolder holder, ServerOptions options)
    {
        var arrived = Stopwatch.GetTimestamp();
        var engine = holder.Require();
        ParsedGenerate parsed;
        using (var document = await JsonFields.ReadBodyAsync(context.Request.Body, context.RequestAborted).ConfigureAwait(false))
            parsed = GenerateRequestParser.Parse(JsonFields.Root(document), engine);

        var aborted = context.RequestAborted;
        var outputs = new RequestOutput[parsed.Requests.Count * parsed.N];
        for (var i = 0; i < outputs.Length; i++)
        {
            var r = parsed.Requests[i / parsed.N];
            outputs[i] = new RequestOutput(engine.Tokenizer, r.ReturnLogprob, r.ReturnRouterEntropy, r.TopLogprobs, parsed.ReturnTextInLogprobs);
        }
        await using var batch = GenerationBatch.Start(engine, parsed.Requests, aborted, parsed.N);

        if (!parsed.Stream)
        {
            await foreach (var (index, update) in batch.ReadAllAsync(aborted).ConfigureAwait(false))
                outputs[index].Add(update);
            var latency = Stopwatch.GetElapsedTime(arrived).TotalSeconds;
            if (parsed.IsBatch)
            {
                var list = outputs.Select(o => o.ToGenerateResponse(latency)).ToArray();
                await context.Response.WriteAsJsonAsync<IReadOnlyList<GenerateResponse>>(
                    list, ApiJsonContext.Wire.IReadOnlyListGenerateResponse, contentType: null, aborted).ConfigureAwait(false);
            }
            else
            {
                await context.Response.WriteAsJsonAsync(
                    outputs[0].ToGenerateResponse(latency), ApiJsonContext.Wire.GenerateResponse, contentType: null, aborted).ConfigureAwait(false);
            }
            return;
        }

        await ServerSentEvents.StartAsync(context.Response, aborted).ConfigureAwait(false);
        try
        {
            // Each event carries what is new for its request: tokens, logprobs, entropies and RAG events (and, with
            // --incremental-streaming-output, only the new text; by default the text so far, as sglang streams it).
            await foreach (var (index, update) in batch.ReadAllAsync(aborted).ConfigureAwait(false))
            {
                var marks = outputs[index].Add(update);
                var latency = Stopwatch.GetElapsedTime(arrived).TotalSeconds;
                await ServerSentEvents.WriteAsync(
                    context.Response,
                    outputs[index].ToGenerateEvent(marks, options.IncrementalStreamingOutput, latency, parsed.IsBatch ? index : null),
                    ApiJsonContext.Wire.GenerateResponse, aborted).ConfigureAwait(false);
            }
        }
        catch (Exception e) when (e is not OperationCanceledException || !aborted.IsCancellationRequested)
        {
            // Headers are gone already: report the failure as a last event, then end the stream as usual.
            await ServerSentEvents.WriteAsync(context.Response, ErrorHandling.ToError(e), ApiJsonContext.Wire.ErrorResponse, aborted)
                .ConfigureAwait(false);
        }
        await ServerSentEvents.WriteDoneAsync(context.Response, aborted).ConfigureAwait(false);
    }
}
