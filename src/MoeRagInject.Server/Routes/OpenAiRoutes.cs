using System.Text;
using System.Text.Json.Nodes;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;
using MoeRagInject.Engine;
using MoeRagInject.Server.Contracts;
using MoeRagInject.Server.Generation;
using MoeRagInject.Server.Requests;

namespace MoeRagInject.Server.Routes;

/// <summary>The OpenAI-compatible surface under /v1, plus sglang's /v1/tokenize and /v1/detokenize.</summary>
public static class OpenAiRoutes
{
    public static void Map(IEndpointRouteBuilder app)
    {
        var v1 = app.MapGroup("/v1").WithGroupName("openai");
        v1.MapGet("/models", (EngineHolder engine, ServerOptions options) => Models(engine, options));
        v1.MapPost("/completions", (HttpContext context, EngineHolder engine, ServerOptions options) => CompletionsAsync(context, engine, options));
        v1.MapPost("/chat/completions", (HttpContext context, EngineHolder engine, ServerOptions options) => ChatAsync(context, engine, options));
        v1.MapPost("/tokenize", (HttpContext context, EngineHolder engine) => TokenizeAsync(context, engine));
        v1.MapPost("/detokenize", (HttpContext context, EngineHolder engine) => DetokenizeAsync(context, engine));
    }

    private static string ModelName(IGenerationEngine engine, ServerOptions options) => options.ModelName(engine.Info.ModelPath);

    private static long Now() => DateTimeOffset.UtcNow.ToUnixTimeSeconds();

    private static IResult Models(EngineHolder holder, ServerOptions options)
    {
        var engine = holder.Require();
        var name = ModelName(engine, options);
        return Results.Json(
            new ModelList("list", [new ModelCard(name, "model", Now(), "moe-rag-inject", name, engine.Info.ContextLength)]),
            ApiJsonContext.Wire.ModelList);
    }

    private static async Task<ParsedOpenAi> ParseAsync(HttpContext context, IGenerationEngine engine, bool chat)
    {
        using var document = await JsonFields.ReadBodyAsync(context.Request.Body, context.RequestAborted).ConfigureAwait(false);
        var root = JsonFields.Root(document);
        return chat ? OpenAiRequestParser.ParseChat(root, engine) : OpenAiRequestParser.ParseCompletion(root, engine);
    }

    /// <summary>One output per choice: prompt i's sample j at index i·n + j.</summary>
    private static RequestOutput[] OutputsOf(IGenerationEngine engine, ParsedOpenAi parsed)
    {
        var outputs = new RequestOutput[parsed.Requests.Count * parsed.N];
        for (var i = 0; i < outputs.Length; i++)
        {
            var r = parsed.Requests[i / parsed.N];
            outputs[i] = new RequestOutput(engine.Tokenizer, r.ReturnLogprob, r.ReturnRouterEntropy, r.TopLogprobs,
                promptIds: r.PromptIds, skipSpecialTokens: r.Sampling.SkipSpecialTokens);
        }
        return outputs;
    }

    private static async Task CompletionsAsync(HttpContext context, EngineHolder holder, ServerOptions options)
    {
        var engine = holder.Require();
        var parsed = await ParseAsync(context, engine, chat: false).ConfigureAwait(false);
        var aborted = context.RequestAborted;
        var model = ModelName(engine, options);
        var created = Now();
        var outputs = OutputsOf(engine, parsed);
        await using var batch = GenerationBatch.Start(engine, parsed.Requests, aborted, parsed.N);
        var id = "cmpl-" + Guid.NewGuid().ToString("N");

        if (!parsed.Stream)
        {
            await foreach (var (index, update) in batch.ReadAllAsync(aborted).ConfigureAwait(false))
                outputs[index].Add(update);
            var choices = outputs.Select((o, i) => new CompletionChoice(
                i, o.Text, o.ReturnLogprob ? CompletionLogprobsOf(o, 0, o.OutputIds.Count, 0) : null,
                o.Finish is null ? null : RequestOutput.ToOpenAiFinish(o.Finish), MatchedStop(o.Finish),
                Rag(o, parsed.Requests[i / parsed.N]), o.ReturnRouterEntropy ? o.RouterEntropy.ToArray() : null)).ToArray();
            await context.Response.WriteAsJsonAsync(
                new CompletionResponse(id, "text_completion", created, model, choices, UsageOf(outputs, parsed.N)),
                ApiJsonContext.Wire.CompletionResponse, contentType: null, aborted).ConfigureAwait(false);
            return;
        }

        await ServerSentEvents.StartAsync(context.Response, aborted).ConfigureAwait(false);
        try
        {
            await foreach (var (index, update) in batch.ReadAllAsync(aborted).ConfigureAwait(false))
            {
                var output = outputs[index];
                var marks = output.Add(update);
                var final = update.Finish is not null;
                var choice = new CompletionChoice(
                    index, update.NewText,
                    output.ReturnLogprob ? CompletionLogprobsOf(output, marks.Token, output.OutputIds.Count - marks.Token, marks.Text) : null,
                    final ? RequestOutput.ToOpenAiFinish(update.Finish!) : null,
                    final ? MatchedStop(update.Finish) : null,
                    final ? Rag(output, parsed.Requests[index / parsed.N]) : null,
                    output.ReturnRouterEntropy && update.NewRouterEntropy.Count > 0 ? update.NewRouterEntropy.ToArray() : null);
                await ServerSentEvents.WriteAsync(context.Response,
                    new CompletionResponse(id, "text_completion", created, model, [choice], Usage: null),
                    ApiJsonContext.Wire.CompletionResponse, aborted).ConfigureAwait(false);
            }
            // stream_options.include_usage: one last chunk with empty choices and the usage of the whole request.
            if (parsed.IncludeUsageInStream)
                await ServerSentEvents.WriteAsync(context.Response,
                    new CompletionResponse(id, "text_completion", created, model, [], UsageOf(outputs, parsed.N)),
                    ApiJsonContext.Wire.CompletionResponse, aborted).ConfigureAwait(false);
        }
        catch (Exception e) when (e is not OperationCanceledException || !aborted.IsCancellationRequested)
        {
            await ServerSentEvents.WriteAsync(context.Response, ErrorHandling.ToError(e), ApiJsonContext.Wire.ErrorResponse, aborted)
                .ConfigureAwait(false);
        }
        await ServerSentEvents.WriteDoneAsync(context.Response, aborted).ConfigureAwait(false);
    }

    private static async Task ChatAsync(HttpContext context, EngineHolder holder, ServerOptions options)
    {
        var engine = holder.Require();
        var parsed = await ParseAsync(context, engine, chat: true).ConfigureAwait(false);
        var aborted = context.RequestAborted;
        var model = ModelName(engine, options);
        var created = Now();
        var request = parsed.Requests[0];
        var outputs = OutputsOf(engine, parsed);
        await using var batch = GenerationBatch.Start(engine, parsed.Requests, aborted, parsed.N);
        var id = "chatcmpl-" + Guid.NewGuid().ToString("N");

        if (!parsed.Stream)
        {
            await foreach (var (index, update) in batch.ReadAllAsync(aborted).ConfigureAwait(false))
                outputs[index].Add(update);
            var choices = outputs.Select((output, i) => new ChatChoice(
                i, new ChatMessageBody("assistant", output.Text),
                output.ReturnLogprob ? ChatLogprobsOf(output, 0, output.OutputIds.Count) : null,
                output.Finish is null ? null : RequestOutput.ToOpenAiFinish(output.Finish), MatchedStop(output.Finish),
                Rag(output, request), output.ReturnRouterEntropy ? output.RouterEntropy.ToArray() : null)).ToArray();
            await context.Response.WriteAsJsonAsync(
                new ChatCompletionResponse(id, "chat.completion", created, model, choices, UsageOf(outputs, parsed.N)),
                ApiJsonContext.Wire.ChatCompletionResponse, contentType: null, aborted).ConfigureAwait(false);
            return;
        }

        await ServerSentEvents.StartAsync(context.Response, aborted).ConfigureAwait(false);
        try
        {
            // OpenAI streams open each choice with the role on its own, then content deltas, then a chunk that carries only finish_reason.
            for (var i = 0; i < outputs.Length; i++)
                await WriteChunkAsync(new ChatChunkChoice(i, new ChatDelta(Role: "assistant", Content: ""), null, null)).ConfigureAwait(false);
            await foreach (var (index, update) in batch.ReadAllAsync(aborted).ConfigureAwait(false))
            {
                var output = outputs[index];
                var marks = output.Add(update);
                var final = update.Finish is not null;
                var text = update.NewText;
                if (text.Length > 0 || (output.ReturnLogprob && update.NewTokenIds.Count > 0))
                    await WriteChunkAsync(new ChatChunkChoice(
                        index, new ChatDelta(Content: text),
                        output.ReturnLogprob ? ChatLogprobsOf(output, marks.Token, output.OutputIds.Count - marks.Token) : null, null,
                        RouterEntropy: output.ReturnRouterEntropy && update.NewRouterEntropy.Count > 0 ? update.NewRouterEntropy.ToArray() : null))
                        .ConfigureAwait(false);
                if (final)
                    await WriteChunkAsync(new ChatChunkChoice(
                        index, new ChatDelta(), null, RequestOutput.ToOpenAiFinish(update.Finish!), MatchedStop(update.Finish), Rag(output, request)))
                        .ConfigureAwait(false);
            }
            // stream_options.include_usage: one last chunk with empty choices and the usage of the whole request.
            if (parsed.IncludeUsageInStream)
                await ServerSentEvents.WriteAsync(context.Response,
                    new ChatCompletionChunk(id, "chat.completion.chunk", created, model, [], UsageOf(outputs, parsed.N)),
                    ApiJsonContext.Wire.ChatCompletionChunk, aborted).ConfigureAwait(false);
        }
        catch (Exception e) when (e is not OperationCanceledException || !aborted.IsCancellationRequested)
        {
            await ServerSentEvents.WriteAsync(context.Response, ErrorHandling.ToError(e), ApiJsonContext.Wire.ErrorResponse, aborted)
                .ConfigureAwait(false);
        }
        await ServerSentEvents.WriteDoneAsync(context.Response, aborted).ConfigureAwait(false);

        Task WriteChunkAsync(ChatChunkChoice choice) => ServerSentEvents.WriteAsync(context.Response,
            new ChatCompletionChunk(id, "chat.completion.chunk", created, model, [choice]),
            ApiJsonContext.Wire.ChatCompletionChunk, aborted);
    }

    /// <summary>
    /// OpenAI's usage: a prompt counts once however many samples it has (outputs i·n .. i·n + n − 1 share prompt i), every
    /// sample's tokens count; a prompt's cached tokens are the most any of its samples took from shared KV blocks, so that
    /// they stay a part of the prompt tokens counted.
    /// </summary>
    private static Usage UsageOf(IReadOnlyList<RequestOutput> outputs, int n)
    {
        int prompt = 0, completion = 0, cached = 0, promptCached = 0;
        for (var i = 0; i < outputs.Count; i++)
        {
            var o = outputs[i];
            if (i % n == 0) prompt += o.PromptTokens;
            completion += o.CompletionTokens;
            promptCached = Math.Max(i % n == 0 ? 0 : promptCached, Math.Min(o.CachedTokens, o.PromptTokens));
            if (i % n == n - 1) cached += promptCached;
        }
        return new Usage(prompt, completion, prompt + completion, cached > 0 ? new PromptTokensDetails(cached) : null);
    }

    private static JsonNode? MatchedStop(FinishReason? finish)
        => finish is { Kind: FinishKind.Stop } ? RequestOutput.MatchedToJson(finish.Matched) : null;

    /// <summary>RAG events are returned when the request named a RAG mode other than off, or the server's default mode is on.</summary>
    private static IReadOnlyList<JsonObject>? Rag(RequestOutput output, GenerationRequest request)
        => output.RagEvents.Count > 0 || request.Rag is not null ? output.RagEvents.ToArray() : null;

    /// <summary>
    /// The legacy shape: per token its text, logprob and text offset, and (logprobs: k > 0) a map from token text to logprob
    /// of the k most likely tokens plus the chosen one, as OpenAI's "up to logprobs + 1" entries.
    /// </summary>
    private static CompletionLogprobs CompletionLogprobsOf(RequestOutput output, int start, int count, int textOffset)
    {
        var tokens = new string[count];
        var logprobs = new float[count];
        var offsets = new int[count];
        var top = output.TopLogprobCount > 0 ? new JsonObject?[count] : null;
        for (var i = 0; i < count; i++)
        {
            tokens[i] = output.ContextText(start + i, output.OutputIds[start + i]);
            logprobs[i] = LogprobAt(output, start + i);
            offsets[i] = textOffset;
            textOffset += tokens[i].Length;
            if (top is null) continue;
            var map = new JsonObject();
            if (start + i < output.TopLogprobs.Count)
                foreach (var (id, logprob) in output.TopLogprobs[start + i])
                    map.TryAdd(output.ContextText(start + i, id), logprob); // ids that decode alike keep the likelier one
            map.TryAdd(tokens[i], logprobs[i]);
            top[i] = map;
        }
        return new CompletionLogprobs(tokens, logprobs, offsets, top);
    }

    private static ChatLogprobs ChatLogprobsOf(RequestOutput output, int start, int count)
    {
        var content = new ChatTokenLogprob[count];
        for (var i = 0; i < count; i++)
        {
            var position = start + i;
            var id = output.OutputIds[position];
            var alternatives = position < output.TopLogprobs.Count ? output.TopLogprobs[position] : [];
            var top = new ChatTopLogprob[alternatives.Length];
            for (var j = 0; j < top.Length; j++)
            {
                var other = alternatives[j].TokenId;
                top[j] = new ChatTopLogprob(output.ContextText(position, other), alternatives[j].Logprob, output.ContextBytes(position, other));
            }
            content[i] = new ChatTokenLogprob(output.ContextText(position, id), LogprobAt(output, position), output.ContextBytes(position, id), top);
        }
        return new ChatLogprobs(content);
    }

    // OpenAI's stand-in for "no logprob" is -9999 (JSON has no NaN).
    private static float LogprobAt(RequestOutput output, int i) => i < output.Logprobs.Count ? output.Logprobs[i] : -9999f;

    private static async Task TokenizeAsync(HttpContext context, EngineHolder holder)
    {
        var engine = holder.Require();
        using var document = await JsonFields.ReadBodyAsync(context.Request.Body, context.RequestAborted).ConfigureAwait(false);
        var root = JsonFields.Root(document);
        var addSpecialTokens = root.Bool("add_special_tokens") ?? true;
        if (!root.TryGet("prompt", out var prompt)) throw ApiException.BadRequest("prompt is required");
        var max = engine.Info.ContextLength;
        if (prompt.ValueKind == System.Text.Json.JsonValueKind.String)
        {
            var ids = engine.Tokenizer.Encode(prompt.GetString()!, addSpecialTokens);
            await context.Response.WriteAsJsonAsync(new TokenizeResponse(ids, ids.Length, max), ApiJsonContext.Wire.TokenizeResponse,
                contentType: null, context.RequestAborted).ConfigureAwait(false);
            return;
        }
        var texts = root.StringOrStrings("prompt")!;
        var all = texts.Select(t => (IReadOnlyList<int>)engine.Tokenizer.Encode(t, addSpecialTokens)).ToArray();
        await context.Response.WriteAsJsonAsync(new BatchTokenizeResponse(all, all.Select(a => a.Count).ToArray(), max),
            ApiJsonContext.Wire.BatchTokenizeResponse, contentType: null, context.RequestAborted).ConfigureAwait(false);
    }

    private static async Task DetokenizeAsync(HttpContext context, EngineHolder holder)
    {
        var engine = holder.Require();
        using var document = await JsonFields.ReadBodyAsync(context.Request.Body, context.RequestAborted).ConfigureAwait(false);
        var root = JsonFields.Root(document);
        var skipSpecial = root.Bool("skip_special_tokens") ?? true;
        if (!root.TryGet("tokens", out var tokens)) throw ApiException.BadRequest("tokens is required");
        var vocab = engine.Info.VocabSize;
        if (tokens.ValueKind == System.Text.Json.JsonValueKind.Array && tokens.GetArrayLength() > 0
            && tokens[0].ValueKind == System.Text.Json.JsonValueKind.Array)
        {
            var prompts = new List<string>();
            var i = 0;
            foreach (var item in tokens.EnumerateArray())
                prompts.Add(Decode(engine, JsonFields.ToInts(item, $"tokens[{i}]"), $"tokens[{i++}]", vocab, skipSpecial));
            await context.Response.WriteAsJsonAsync(new BatchDetokenizeResponse(prompts), ApiJsonContext.Wire.BatchDetokenizeResponse,
                contentType: null, context.RequestAborted).ConfigureAwait(false);
            return;
        }
        var text = Decode(engine, JsonFields.ToInts(tokens, "tokens"), "tokens", vocab, skipSpecial);
        await context.Response.WriteAsJsonAsync(new DetokenizeResponse(text), ApiJsonContext.Wire.DetokenizeResponse,
            contentType: null, context.RequestAborted).ConfigureAwait(false);
    }

    private static string Decode(IGenerationEngine engine, IReadOnlyList<int> ids, string path, int vocab, bool skipSpecial)
    {
        for (var i = 0; i < ids.Count; i++)
            if ((uint)ids[i] >= (uint)vocab)
                throw ApiException.BadRequest(RequestParsing.Invariant($"{path}[{i}] = {ids[i]} is outside the vocabulary [0, {vocab})"));
        return engine.Tokenizer.Decode(ids.ToArray(), skipSpecial);
    }
}
