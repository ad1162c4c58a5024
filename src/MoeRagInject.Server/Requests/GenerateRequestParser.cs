using System.Text.Json;
using MoeRagInject.Engine;

namespace MoeRagInject.Server.Requests;

/// <summary>
/// A /generate body, validated: one engine request per input, each sampled <see cref="N"/> times (sampling_params.n). A list
/// input or n &gt; 1 is a batch, answered with a list (input i's sample j at index i·n + j, as sglang orders them).
/// </summary>
public sealed record ParsedGenerate(IReadOnlyList<GenerationRequest> Requests, bool IsBatch, bool Stream, int N = 1, bool ReturnTextInLogprobs = false);

public static class GenerateRequestParser
{
    private static readonly HashSet<string> Fields =
    [
        "text", "input_ids", "sampling_params", "stream", "rid", "return_logprob", "top_logprobs_num", "return_text_in_logprobs",
        "return_router_entropy", "rag",
        // sglang fields accepted and ignored: logprobs always start at the output, and metrics are always logged.
        "logprob_start_len", "log_metrics", "model",
    ];

    public static ParsedGenerate Parse(JsonFields root, IGenerationEngine engine)
    {
        ArgumentNullException.ThrowIfNull(engine);
        root.RejectUnknown(Fields);
        var info = engine.Info;
        var (prompts, isBatch) = ReadPrompts(root, engine);

        var samplings = ReadSamplingParams(root, prompts.Count, isBatch, info.VocabSize, out var n);
        var rag = RequestParsing.ParseRag(root);
        var stream = root.Bool("stream") ?? false;
        var returnLogprob = PerInput(root, "return_logprob", prompts.Count, isBatch, (value, path) => value.ValueKind switch
        {
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            _ => throw ApiException.BadRequest($"{path} must be a boolean, not {JsonFields.Describe(value)}"),
        }, false);
        var topLogprobsNum = PerInput(root, "top_logprobs_num", prompts.Count, isBatch, (value, path) =>
        {
            var k = JsonFields.ToInt(value, path);
            if (k is < 0 or > GenerationRequest.MaxTopLogprobs)
                throw ApiException.BadRequest(RequestParsing.Invariant($"{path} must be an integer in [0, {GenerationRequest.MaxTopLogprobs}] (got {k})"));
            return k;
        }, 0);
        var returnText = root.Bool("return_text_in_logprobs") ?? false;
        var returnRouterEntropy = root.Bool("return_router_entropy") ?? false;
        var rids = ReadRids(root, prompts.Count, isBatch);

        var requests = new GenerationRequest[prompts.Count];
        for (var i = 0; i < prompts.Count; i++)
        {
            var (ids, path) = prompts[i];
            var maxNewTokensPath = isBatch && root.TryGet("sampling_params", out var sp) && sp.ValueKind == JsonValueKind.Array
                ? $"sampling_params[{i}].max_new_tokens" : "sampling_params.max_new_tokens";
            RequestParsing.CheckFitsContext(ids.Count, samplings[i].MaxNewTokens, info.ContextLength, maxNewTokensPath, path);
            requests[i] = new GenerationRequest
            {
                Rid = rids[i],
                PromptIds = ids,
                Sampling = samplings[i],
                Rag = rag,
                // sglang computes top logprobs only with return_logprob; top_logprobs_num alone changes nothing.
                ReturnLogprob = returnLogprob[i],
                TopLogprobs = returnLogprob[i] ? topLogprobsNum[i] : 0,
                ReturnRouterEntropy = returnRouterEntropy,
            };
        }
        return new ParsedGenerate(requests, isBatch || n > 1, stream, n, returnText);
    }

    /// <summary>
    /// sampling_params: one object for every input, or (a list input) a list of objects, one per input. Every input must ask
    /// for the same n, as sglang requires.
    /// </summary>
    private static SamplingParams[] ReadSamplingParams(JsonFields root, int count, bool isBatch, int vocabSize, out int n)
    {
        var result = new SamplingParams[count];
        if (!root.TryGet("sampling_params", out var value) || value.ValueKind != JsonValueKind.Array)
        {
            var fields = root.Object("sampling_params");
            n = RequestParsing.ParseN(fields);
            Array.Fill(result, RequestParsing.ParseSglangSampling(fields, vocabSize));
            return result;
        }
        if (!isBatch) throw ApiException.BadRequest("sampling_params must be an object for a single input (a list needs a list of texts or input_ids)");
        if (value.GetArrayLength() != count)
            throw ApiException.BadRequest(RequestParsing.Invariant($"sampling_params has {value.GetArrayLength()} objects for {count} inputs"));
        n = 1;
        var i = 0;
        foreach (var item in value.EnumerateArray())
        {
            var fields = JsonFields.Element(item, $"sampling_params[{i}]");
            var itemN = RequestParsing.ParseN(fields);
            if (i == 0) n = itemN;
            else if (itemN != n)
                throw ApiException.BadRequest(RequestParsing.Invariant($"sampling_params[{i}].n is {itemN} but sampling_params[0].n is {n}: every input must ask for the same n"));
            result[i++] = RequestParsing.ParseSglangSampling(fields, vocabSize);
        }
        return result;
    }

    /// <summary>A field given once for every input, or (a list input) as a list with one value per input, as sglang accepts return_logprob and top_logprobs_num.</summary>
    private static T[] PerInput<T>(JsonFields root, string name, int count, bool isBatch, Func<JsonElement, string, T> read, T absent)
    {
        var result = new T[count];
        if (!root.TryGet(name, out var value))
        {
            Array.Fill(result, absent);
            return result;
        }
        if (value.ValueKind != JsonValueKind.Array)
        {
            Array.Fill(result, read(value, name));
            return result;
        }
        if (!isBatch) throw ApiException.BadRequest($"{name} must be a single value for a single input, not a list");
        if (value.GetArrayLength() != count)
            throw ApiException.BadRequest(RequestParsing.Invariant($"{name} has {value.GetArrayLength()} values for {count} inputs"));
        var i = 0;
        foreach (var item in value.EnumerateArray())
        {
            result[i] = read(item, $"{name}[{i}]");
            i++;
        }
        return result;
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
