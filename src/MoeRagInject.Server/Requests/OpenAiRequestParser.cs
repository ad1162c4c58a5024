using System.Text.Json;
using MoeRagInject.Engine;
using MoeRagInject.Model.Tokenization;

namespace MoeRagInject.Server.Requests;

/// <summary>A validated /v1/completions or /v1/chat/completions body: one engine request per prompt.</summary>
public sealed record ParsedOpenAi(
    IReadOnlyList<GenerationRequest> Requests,
    bool Stream,
    bool IncludeUsageInStream,
    // The number of alternatives per token (completions: logprobs; chat: top_logprobs, 0 with "logprobs": true alone); null when logprobs were not asked for.
    int? Logprobs,
    // Parallel samples of each prompt: choice i·n + j is prompt i's sample j.
    int N = 1);

/// <summary>
/// OpenAI's request fields mapped onto the engine: the standard ones, sglang's extensions (top_k, min_p, repetition_penalty,
/// min_tokens, ignore_eos, stop_token_ids, ...) and ours (rag, return_router_entropy). Fields outside these are ignored, as
/// OpenAI clients send many that do not change the result (user, metadata, ...).
/// </summary>
public static class OpenAiRequestParser
{
    public static ParsedOpenAi ParseCompletion(JsonFields root, IGenerationEngine engine)
    {
        ArgumentNullException.ThrowIfNull(engine);
        if (root.Bool("echo") == true) throw ApiException.BadRequest("echo is not supported by this server");
        if (root.String("suffix") is { Length: > 0 }) throw ApiException.BadRequest("suffix is not supported by this server");
        if (root.Int("best_of") is { } bestOf && bestOf != 1) throw ApiException.BadRequest("best_of must be 1");
        RejectResponseFormat(root);

        var prompts = ReadCompletionPrompts(root, engine);
        int? logprobs = null;
        if (root.TryGet("logprobs", out var lp))
        {
            logprobs = lp.ValueKind switch
            {
                JsonValueKind.True => 0,
                JsonValueKind.False => null,
                _ => JsonFields.ToInt(lp, "logprobs"),
            };
            if (logprobs is < 0 or > GenerationRequest.MaxTopLogprobs)
                throw ApiException.BadRequest($"logprobs must be an integer in [0, {GenerationRequest.MaxTopLogprobs}]");
        }
        return Build(root, engine, prompts, defaultMaxTokens: 16, logprobs);
    }

    public static ParsedOpenAi ParseChat(JsonFields root, IGenerationEngine engine)
    {
        ArgumentNullException.ThrowIfNull(engine);
        var messages = ReadMessages(root);
        var ids = EncodeChat(engine.Tokenizer, messages);
        if (root.TryGet("tools", out var tools) && tools.ValueKind == JsonValueKind.Array && tools.GetArrayLength() > 0)
            throw ApiException.BadRequest("tools are not supported by this server");
        RejectResponseFormat(root);
        var logprobs = root.Bool("logprobs") == true ? 0 : (int?)null;
        if (root.Int("top_logprobs") is { } top)
        {
            if (logprobs is null) throw ApiException.BadRequest("top_logprobs needs logprobs to be true");
            if (top is < 0 or > GenerationRequest.MaxTopLogprobs)
                throw ApiException.BadRequest($"top_logprobs must be an integer in [0, {GenerationRequest.MaxTopLogprobs}]");
            logprobs = top;
        }
        // OpenAI's default is "as many as fit"; sglang caps it at the context left after the prompt.
        var defaultMaxTokens = Math.Max(0, engine.Info.ContextLength - ids.Length);
        return Build(root, engine, [(ids, "messages")], defaultMaxTokens, logprobs);
    }

    /// <summary>Structured output is not implemented: any response_format but plain text is refused, not silently ignored.</summary>
    private static void RejectResponseFormat(JsonFields root)
    {
        if (root.Object("response_format") is not { } format) return;
        var type = format.String("type") ?? throw ApiException.BadRequest("response_format.type is required");
        if (type != "text")
            throw ApiException.BadRequest($"response_format.type '{type}' is not supported by this server: it does not constrain output (only 'text')");
    }

    /// <summary>
    /// The chat prompt's ids. A template that writes the BOS token itself (Mistral's does) is encoded without adding a second
    /// one; without a template the messages become "role: content" lines ending in "assistant:", the plainest text a base
    /// model can continue, encoded with BOS as any text.
    /// </summary>
    public static int[] EncodeChat(Tokenizer tokenizer, IReadOnlyList<ChatMessage> messages)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        if (tokenizer.ChatTemplate is null)
            return tokenizer.Encode(string.Join("\n", messages.Select(m => $"{m.Role}: {m.Content}")) + "\nassistant:");
        string rendered;
        try
        {
            rendered = tokenizer.ApplyChatTemplate(messages, addGenerationPrompt: true);
        }
        catch (Exception e) when (e is InvalidOperationException or ArgumentException or FormatException)
        {
            // Templates raise errors of their own (Mistral's: roles must alternate user/assistant); they are the caller's to fix.
            throw ApiException.BadRequest($"the chat template rejected the messages: {e.Message}");
        }
        var bosText = tokenizer.BosTokenId is { } bos ? tokenizer.Decode([bos], skipSpecialTokens: false) : null;
        var templateWritesBos = !string.IsNullOrEmpty(bosText) && rendered.StartsWith(bosText, StringComparison.Ordinal);
        return tokenizer.Encode(rendered, addSpecialTokens: !templateWritesBos);
    }

    private static ParsedOpenAi Build(JsonFields root, IGenerationEngine engine, List<(int[] Ids, string Path)> prompts, int defaultMaxTokens, int? logprobs)
    {
        var info = engine.Info;
        var n = RequestParsing.ParseN(root);
        var maxTokensName = root.Has("max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
        var maxTokens = root.Int("max_completion_tokens") ?? root.Int("max_tokens");
        var defaults = new SamplingParams();
        var sampling = new SamplingParams
        {
            MaxNewTokens = maxTokens ?? defaultMaxTokens,
            MinNewTokens = root.Int("min_tokens") ?? 0,
            Temperature = root.Float("temperature") ?? defaults.Temperature,
            TopP = root.Float("top_p") ?? defaults.TopP,
            TopK = root.Int("top_k") ?? defaults.TopK,
            MinP = root.Float("min_p") ?? defaults.MinP,
            FrequencyPenalty = root.Float("frequency_penalty") ?? defaults.FrequencyPenalty,
            PresencePenalty = root.Float("presence_penalty") ?? defaults.PresencePenalty,
            RepetitionPenalty = root.Float("repetition_penalty") ?? defaults.RepetitionPenalty,
            Stop = root.StringOrStrings("stop") ?? defaults.Stop,
            StopTokenIds = root.Ints("stop_token_ids") ?? defaults.StopTokenIds,
            IgnoreEos = root.Bool("ignore_eos") ?? defaults.IgnoreEos,
            SkipSpecialTokens = root.Bool("skip_special_tokens") ?? defaults.SkipSpecialTokens,
            NoStopTrim = root.Bool("no_stop_trim") ?? defaults.NoStopTrim,
            Seed = root.UInt64("seed") ?? defaults.Seed,
        };
        if (sampling.MaxNewTokens < 0) throw ApiException.BadRequest($"{maxTokensName} must be >= 0");
        if (sampling.Validate() is { } message)
            throw ApiException.BadRequest(message.Replace("sampling_params.", "", StringComparison.Ordinal)
                .Replace("max_new_tokens", maxTokensName, StringComparison.Ordinal)
                .Replace("min_new_tokens", "min_tokens", StringComparison.Ordinal));
        RequestParsing.CheckSampling(sampling with { Stop = [] }, info.VocabSize, "stop_token_ids");

        var rag = RequestParsing.ParseRag(root);
        var returnRouterEntropy = root.Bool("return_router_entropy") ?? false;
        var stream = root.Bool("stream") ?? false;
        var streamOptions = root.Object("stream_options");
        if (streamOptions is not null && !stream) throw ApiException.BadRequest("stream_options is only allowed with stream: true");
        var includeUsage = streamOptions?.Bool("include_usage") ?? false;

        var requests = new GenerationRequest[prompts.Count];
        for (var i = 0; i < prompts.Count; i++)
        {
            RequestParsing.CheckFitsContext(prompts[i].Ids.Length, sampling.MaxNewTokens, info.ContextLength, maxTokensName, prompts[i].Path);
            requests[i] = new GenerationRequest
            {
                PromptIds = prompts[i].Ids,
                Sampling = sampling,
                Rag = rag,
                ReturnLogprob = logprobs is not null,
                TopLogprobs = logprobs ?? 0,
                ReturnRouterEntropy = returnRouterEntropy,
            };
        }
        return new ParsedOpenAi(requests, stream, includeUsage, logprobs, n);
    }

    /// <summary>prompt: a string, a list of strings, a list of token ids, or a list of lists of ids.</summary>
    private static List<(int[] Ids, string Path)> ReadCompletionPrompts(JsonFields root, IGenerationEngine engine)
    {
        if (!root.TryGet("prompt", out var prompt)) throw ApiException.BadRequest("prompt is required");
        var vocab = engine.Info.VocabSize;
        var prompts = new List<(int[], string)>();
        if (prompt.ValueKind == JsonValueKind.String)
        {
            prompts.Add((EncodeText(engine.Tokenizer, prompt.GetString()!, "prompt"), "prompt"));
            return prompts;
        }
        if (prompt.ValueKind != JsonValueKind.Array)
            throw ApiException.BadRequest($"prompt must be a string, a list of strings, or a list of token ids, not {JsonFields.Describe(prompt)}");
        if (prompt.GetArrayLength() == 0) throw ApiException.BadRequest("prompt must not be empty");
        switch (prompt[0].ValueKind)
        {
            case JsonValueKind.Number:
                var ids = JsonFields.ToInts(prompt, "prompt").ToArray();
                RequestParsing.CheckIds(ids, vocab, "prompt");
                prompts.Add((ids, "prompt"));
                return prompts;
            case JsonValueKind.String:
            case JsonValueKind.Array:
                var i = 0;
                foreach (var item in prompt.EnumerateArray())
                {
                    var path = $"prompt[{i++}]";
                    if (item.ValueKind != prompt[0].ValueKind)
                        throw ApiException.BadRequest(
                            $"{path} must be {(prompt[0].ValueKind == JsonValueKind.String ? "a string" : "a list of token ids")} like prompt[0], not {JsonFields.Describe(item)}");
                    if (item.ValueKind == JsonValueKind.String)
                    {
                        prompts.Add((EncodeText(engine.Tokenizer, item.GetString()!, path), path));
                    }
                    else
                    {
                        var one = JsonFields.ToInts(item, path).ToArray();
                        RequestParsing.CheckIds(one, vocab, path);
                        prompts.Add((one, path));
                    }
                }
                return prompts;
            default:
                throw ApiException.BadRequest($"prompt[0] must be a string, a token id, or a list of token ids, not {JsonFields.Describe(prompt[0])}");
        }
    }

    private static int[] EncodeText(Tokenizer tokenizer, string text, string path)
    {
        if (text.Length == 0) throw ApiException.BadRequest($"{path} must not be empty");
        return tokenizer.Encode(text);
    }

    private static List<ChatMessage> ReadMessages(JsonFields root)
    {
        if (!root.TryGet("messages", out var messages)) throw ApiException.BadRequest("messages is required");
        if (messages.ValueKind != JsonValueKind.Array)
            throw ApiException.BadRequest($"messages must be a list of message objects, not {JsonFields.Describe(messages)}");
        if (messages.GetArrayLength() == 0) throw ApiException.BadRequest("messages must not be empty");
        var list = new List<ChatMessage>();
        var i = 0;
        foreach (var message in messages.EnumerateArray())
        {
            var path = $"messages[{i++}]";
            if (message.ValueKind != JsonValueKind.Object)
                throw ApiException.BadRequest($"{path} must be an object, not {JsonFields.Describe(message)}");
            if (!message.TryGetProperty("role", out var role) || role.ValueKind != JsonValueKind.String)
                throw ApiException.BadRequest($"{path}.role must be a string");
            var roleName = role.GetString()!;
            if (roleName is not ("system" or "user" or "assistant" or "developer" or "tool"))
                throw ApiException.BadRequest($"{path}.role must be one of system, user, assistant, developer, tool (got '{roleName}')");
            if (roleName == "tool" && (!message.TryGetProperty("tool_call_id", out var callId) || callId.ValueKind != JsonValueKind.String))
                throw ApiException.BadRequest($"{path}.tool_call_id is required for a tool message (a string)");
            if (message.TryGetProperty("name", out var name) && name.ValueKind is not (JsonValueKind.String or JsonValueKind.Null))
                throw ApiException.BadRequest($"{path}.name must be a string, not {JsonFields.Describe(name)}");
            list.Add(new ChatMessage(roleName == "developer" ? "system" : roleName, ReadContent(message, roleName, path)));
        }
        return list;
    }

    /// <summary>
    /// content: a string or a list of parts of which only "text" parts are supported. As OpenAI, it is required for every role
    /// except an assistant turn that carries tool_calls (whose content may be null or absent).
    /// </summary>
    private static string ReadContent(JsonElement message, string role, string path)
    {
        if (!message.TryGetProperty("content", out var content) || content.ValueKind == JsonValueKind.Null)
        {
            if (role == "assistant" && message.TryGetProperty("tool_calls", out var calls) && calls.ValueKind == JsonValueKind.Array)
                return "";
            throw ApiException.BadRequest(role == "assistant"
                ? $"{path}.content is required for an assistant message without tool_calls"
                : $"{path}.content is required for a {role} message");
        }
        if (content.ValueKind == JsonValueKind.String) return content.GetString()!;
        if (content.ValueKind != JsonValueKind.Array)
            throw ApiException.BadRequest($"{path}.content must be a string or a list of content parts, not {JsonFields.Describe(content)}");
        var text = new System.Text.StringBuilder();
        var j = 0;
        foreach (var part in content.EnumerateArray())
        {
            var partPath = $"{path}.content[{j++}]";
            if (part.ValueKind != JsonValueKind.Object
                || !part.TryGetProperty("type", out var type) || type.ValueKind != JsonValueKind.String)
                throw ApiException.BadRequest($"{partPath} must be an object with a string type");
            if (type.GetString() != "text")
                throw ApiException.BadRequest($"{partPath}.type '{type.GetString()}' is not supported by this server (only 'text')");
            if (!part.TryGetProperty("text", out var partText) || partText.ValueKind != JsonValueKind.String)
                throw ApiException.BadRequest($"{partPath}.text must be a string");
            text.Append(partText.GetString());
        }
        return text.ToString();
    }
}
