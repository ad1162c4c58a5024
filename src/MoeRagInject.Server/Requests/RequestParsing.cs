using System.Globalization;
using MoeRagInject.Engine;
using MoeRagInject.Rag;

namespace MoeRagInject.Server.Requests;

/// <summary>The parts that /generate and the OpenAI routes share: sampling parameters, RAG overrides, and the checks on prompts.</summary>
public static class RequestParsing
{
    private static readonly HashSet<string> SamplingFields =
    [
        "max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
        "repetition_penalty", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens", "no_stop_trim", "sampling_seed", "seed",
        "n", "spaces_between_special_tokens", "json_schema", "regex", "ebnf", "structural_tag", "logit_bias", "custom_params",
    ];

    private static readonly HashSet<string> RagFields = ["mode", "trigger_signal", "threshold", "scale", "retrieve_first"];

    /// <summary>sglang's <c>sampling_params</c> object (snake_case names, sglang's defaults); null means all defaults.</summary>
    public static SamplingParams ParseSglangSampling(JsonFields? fields, int vocabSize)
    {
        var sampling = new SamplingParams();
        if (fields is not { } f) return sampling;
        f.RejectUnknown(SamplingFields);
        foreach (var unsupported in (ReadOnlySpan<string>)["json_schema", "regex", "ebnf", "structural_tag", "logit_bias", "custom_params"])
            if (f.Has(unsupported))
                throw ApiException.BadRequest($"{f.PathOf(unsupported)} is not supported by this server");
        if (f.Has("sampling_seed") && f.Has("seed"))
            throw ApiException.BadRequest($"give only one of {f.PathOf("sampling_seed")} and {f.PathOf("seed")}");

        sampling = sampling with
        {
            MaxNewTokens = f.Int("max_new_tokens") ?? sampling.MaxNewTokens,
            MinNewTokens = f.Int("min_new_tokens") ?? sampling.MinNewTokens,
            Temperature = f.Float("temperature") ?? sampling.Temperature,
            TopP = f.Float("top_p") ?? sampling.TopP,
            TopK = f.Int("top_k") ?? sampling.TopK,
            MinP = f.Float("min_p") ?? sampling.MinP,
            FrequencyPenalty = f.Float("frequency_penalty") ?? sampling.FrequencyPenalty,
            PresencePenalty = f.Float("presence_penalty") ?? sampling.PresencePenalty,
            RepetitionPenalty = f.Float("repetition_penalty") ?? sampling.RepetitionPenalty,
            Stop = f.StringOrStrings("stop") ?? sampling.Stop,
            StopTokenIds = f.Ints("stop_token_ids") ?? sampling.StopTokenIds,
            IgnoreEos = f.Bool("ignore_eos") ?? sampling.IgnoreEos,
            SkipSpecialTokens = f.Bool("skip_special_tokens") ?? sampling.SkipSpecialTokens,
            NoStopTrim = f.Bool("no_stop_trim") ?? sampling.NoStopTrim,
            Seed = f.UInt64("sampling_seed") ?? f.UInt64("seed") ?? sampling.Seed,
        };
        _ = f.Bool("spaces_between_special_tokens");
        CheckSampling(sampling, vocabSize, f.PathOf("stop_token_ids"));
        return sampling;
    }

    /// <summary>Most parallel samples one request may ask for (OpenAI's limit on n).</summary>
    public const int MaxParallelSamples = 128;

    /// <summary>Parallel samples asked for by the field <paramref name="name"/> (sglang's sampling_params.n, OpenAI's n); 1 when absent.</summary>
    public static int ParseN(JsonFields? fields, string name = "n")
    {
        if (fields is not { } f || f.Int(name) is not { } n) return 1;
        if (n is < 1 or > MaxParallelSamples)
            throw ApiException.BadRequest(Invariant($"{f.PathOf(name)} must be an integer in [1, {MaxParallelSamples}] (got {n})"));
        return n;
    }

    /// <summary>SamplingParams.Validate() plus the vocabulary check of stop_token_ids.</summary>
    public static void CheckSampling(SamplingParams sampling, int vocabSize, string stopTokenIdsPath)
    {
        if (sampling.Validate() is { } message) throw ApiException.BadRequest(message);
        for (var i = 0; i < sampling.StopTokenIds.Count; i++)
            if ((uint)sampling.StopTokenIds[i] >= (uint)vocabSize)
                throw ApiException.BadRequest(Invariant($"{stopTokenIdsPath}[{i}] = {sampling.StopTokenIds[i]} is outside the vocabulary [0, {vocabSize})"));
    }

    /// <summary>The request's <c>rag</c> object: <c>{"mode": "off"|"latent"|"prompt", "trigger_signal": "router-entropy"|"output-entropy"|"router-probe", "threshold": nats or probability, "scale": α, "retrieve_first": bool}</c>.</summary>
    public static RagOverrides? ParseRag(JsonFields root)
    {
        if (root.Object("rag") is not { } rag) return null;
        rag.RejectUnknown(RagFields);
        InjectionMode? mode = null;
        if (rag.String("mode") is { } text)
            mode = ParseMode(text) ?? throw ApiException.BadRequest($"{rag.PathOf("mode")} must be one of off, latent, prompt (got '{text}')");
        var threshold = rag.Number("threshold");
        if (threshold < 0)
            throw ApiException.BadRequest($"{rag.PathOf("threshold")} must be >= 0 (entropy in nats, or the router probe's probability)");
        // Range-checked as a double first: a value past fp32's range would otherwise arrive as infinity.
        if (rag.Number("scale") is { } scale && !(Math.Abs(scale) <= RagOverrides.MaxScale))
            throw ApiException.BadRequest(Invariant($"{rag.PathOf("scale")} must be a finite number in [-{RagOverrides.MaxScale}, {RagOverrides.MaxScale}] (got {scale})"));
        TriggerSignal? signal = null;
        if (rag.String("trigger_signal") is { } name)
            signal = TriggerSignals.Parse(name)
                ?? throw ApiException.BadRequest($"{rag.PathOf("trigger_signal")} must be one of {string.Join(", ", TriggerSignals.Names)} (got '{name}')");
        var overrides = new RagOverrides
        {
            Mode = mode, Signal = signal, Threshold = threshold, Scale = (float?)rag.Number("scale"), RetrieveFirst = rag.Bool("retrieve_first"),
        };
        if (overrides.Validate() is { } message) throw ApiException.BadRequest(message);
        return overrides;
    }

    public static InjectionMode? ParseMode(string text) => text.ToLowerInvariant() switch
    {
        "off" => InjectionMode.Off,
        "latent" => InjectionMode.Latent,
        "prompt" => InjectionMode.Prompt,
        _ => null,
    };

    public static string ModeName(InjectionMode mode) => mode switch
    {
        InjectionMode.Off => "off",
        InjectionMode.Latent => "latent",
        InjectionMode.Prompt => "prompt",
        _ => mode.ToString().ToLowerInvariant(),
    };

    public static void CheckIds(IReadOnlyList<int> ids, int vocabSize, string path)
    {
        if (ids.Count == 0) throw ApiException.BadRequest($"{path} must not be empty");
        for (var i = 0; i < ids.Count; i++)
            if ((uint)ids[i] >= (uint)vocabSize)
                throw ApiException.BadRequest(Invariant($"{path}[{i}] = {ids[i]} is outside the vocabulary [0, {vocabSize})"));
    }

    /// <summary>The prompt plus every token the request may generate must fit the context (sglang checks the same before queueing).</summary>
    public static void CheckFitsContext(int promptTokens, int maxNewTokens, int contextLength, string maxNewTokensName, string where)
    {
        if ((long)promptTokens + maxNewTokens > contextLength)
            throw ApiException.BadRequest(Invariant(
                $"{where}: prompt_tokens ({promptTokens}) + {maxNewTokensName} ({maxNewTokens}) = {(long)promptTokens + maxNewTokens} exceeds the context length ({contextLength})"));
    }

    public static string Invariant(FormattableString text) => text.ToString(CultureInfo.InvariantCulture);
}
