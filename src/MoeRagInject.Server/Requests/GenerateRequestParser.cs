using System.Text.Json;
using MoeRagInject.Engine;

namespace MoeRagInject.Server.Requests;

/// <summary>A /generate body, validated: one engine request per input (a list input is a batch, answered with a list).</summary>
public sealed record ParsedGenerate(IReadOnlyList<GenerationRequest> Requests, bool IsBatch, bool Stream);

public static class GenerateRequestParser
{
    private static readonly HashSet<string> Fields =
    [
        "text", "input_ids", "sampling_params", "stream", "rid", "return_logprob", "return_router_entropy", "rag",
        // sglang fields accepted and ignored: token text is always returned with logprobs, and logprobs start at the output.
        "return_text_in_logprobs", "logprob_start_len", "top_logprobs_num", "log_metrics", "model",
    ];

    public static ParsedGenerate Parse(JsonFields root, IGenerationEngine engine)
    {
        ArgumentNullException.ThrowIfNull(engine);
        root.RejectUnknown(Fields);
        var info = engine.Info;
        var (prompts, isBatch) = ReadPrompts(root, engine);

        var sampling = RequestParsing.ParseSglangSampling(root.Object("sampling_params"), info.VocabSize);
        var rag = RequestParsing.ParseRag(root);
        var stream = root.Bool("stream") ?? false;
        var returnLogprob = root.Bool("return_logprob") ?? false;
        var returnRouterEntropy = root.Bool("return_router_entropy") ?? false;
        if (root.Int("top_logprobs_num") is > 0)
            throw ApiException.BadRequest("top_logprobs_num is not supported by this server (use return_logprob for the chosen tokens' logprobs)");
        var rids = ReadRids(root, prompts.Count, isBatch);

        var requests = new GenerationRequest[prompts.Count];
        for (var i = 0; i < prompts.Count; i++)
        {
            var (ids, path) = prompts[i];
            RequestParsing.CheckFitsContext(ids.Count, sampling.MaxNewTokens, info.ContextLength, "sampling_params.max_new_tokens", path);
            requests[i] = new GenerationRequest
            {
                Rid = rids[i],
                PromptIds = ids,
                Sampling = sampling,
                Rag = rag,
                ReturnLogprob = returnLogprob,
                ReturnRouterEntropy = returnRouterEntropy,
            };
        }
        return new ParsedGenerate(requests, isBatch, stream);
    }

    /// <summary>The prompts as token ids, each with the path that names it in errors.</summary>
    private static (List<(IReadOnlyList<int> Ids, string Path)> Prompts, bool IsBatch) ReadPrompts(JsonFields root, IGenerationEngine engine)
    {
        var hasText = root.TryGet("text", out var text);
        var hasIds = root.TryGet("input_ids", out var ids);
        if (hasText && hasIds) throw ApiException.BadRequest("give exactly one of text and input_ids, not both");
        if (!hasText && !hasIds) throw ApiException.BadRequest("give exactly one of text and input_ids (neither was given)");

        var vocab = engine.Info.VocabSize;
        var prompts = new List<(IReadOnlyList<int>, string)>();
        if (hasText)
        {
            if (text.ValueKind == JsonValueKind.String)
            {
                prompts.Add((Encode(engine, text.GetString()!, "text"), "text"));
                return (prompts, false);
            }
            if (text.ValueKind != JsonValueKind.Array)
                throw ApiException.BadRequest($"text must be a string or a list of strings, not {JsonFields.Describe(text)}");
            if (text.GetArrayLength() == 0) throw ApiException.BadRequest("text must not be an empty list");
            var i = 0;
            foreach (var item in text.EnumerateArray())
            {
                var path = $"text[{i}]";
                if (item.ValueKind != JsonValueKind.String)
                    throw ApiException.BadRequest($"{path} must be a string, not {JsonFields.Describe(item)}");
                prompts.Add((Encode(engine, item.GetString()!, path), path));
                i++;
            }
            return (prompts, true);
        }

        if (ids.ValueKind != JsonValueKind.Array)
            throw ApiException.BadRequest($"input_ids must be a list of integers or a list of lists, not {JsonFields.Describe(ids)}");
        if (ids.GetArrayLength() == 0) throw ApiException.BadRequest("input_ids must not be empty");
        if (ids[0].ValueKind != JsonValueKind.Array)
        {
            var single = JsonFields.ToInts(ids, "input_ids");
            RequestParsing.CheckIds(single, vocab, "input_ids");
            prompts.Add((single, "input_ids"));
            return (prompts, false);
        }
        var n = 0;
        foreach (var item in ids.EnumerateArray())
        {
            var path = $"input_ids[{n}]";
            if (item.ValueKind != JsonValueKind.Array)
                throw ApiException.BadRequest($"{path} must be a list of integers (input_ids mixes lists and integers), not {JsonFields.Describe(item)}");
            var one = JsonFields.ToInts(item, path);
            RequestParsing.CheckIds(one, vocab, path);
            prompts.Add((one, path));
            n++;
        }
        return (prompts, true);
    }

    private static int[] Encode(IGenerationEngine engine, string text, string path)
    {
        if (text.Length == 0) throw ApiException.BadRequest($"{path} must not be empty");
        return engine.Tokenizer.Encode(text);
    }

    private static string?[] ReadRids(JsonFields root, int count, bool isBatch)
    {
        var rids = new string?[count];
        if (!root.TryGet("rid", out var rid)) return rids;
        if (rid.ValueKind == JsonValueKind.String)
        {
            var value = rid.GetString()!;
            if (value.Length == 0) throw ApiException.BadRequest("rid must not be empty");
            // One id for a batch names its items rid-0, rid-1, ... so that each can still be aborted on its own.
            for (var i = 0; i < count; i++) rids[i] = isBatch ? $"{value}-{i}" : value;
            return rids;
        }
        if (rid.ValueKind != JsonValueKind.Array)
            throw ApiException.BadRequest($"rid must be a string (or a list of strings for a list input), not {JsonFields.Describe(rid)}");
        if (!isBatch) throw ApiException.BadRequest("rid must be a string for a single input");
        if (rid.GetArrayLength() != count)
            throw ApiException.BadRequest(RequestParsing.Invariant($"rid has {rid.GetArrayLength()} ids for {count} inputs"));
        var n = 0;
        foreach (var item in rid.EnumerateArray())
        {
            if (item.ValueKind != JsonValueKind.String || item.GetString()!.Length == 0)
                throw ApiException.BadRequest($"rid[{n}] must be a non-empty string, not {JsonFields.Describe(item)}");
            rids[n++] = item.GetString();
        }
        if (rids.Distinct(StringComparer.Ordinal).Count() != count) throw ApiException.BadRequest("rid must not repeat an id");
        return rids;
    }
}
