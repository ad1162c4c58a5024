using MoeRagInject.Backend;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine;

/// <summary>Everything `serve` and `generate` configure; one record so both commands share one mapping from flags.</summary>
public sealed record EngineOptions
{
    /// <summary>A Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json).</summary>
    public required string ModelPath { get; init; }
    /// <summary>Builds the model runner: the device. The CLI chooses it from --device; the engine knows no backend.</summary>
    public required IRunnerFactory Runner { get; init; }
    /// <summary>"auto" reads the safetensors; "dummy" builds random weights of the config's shapes.</summary>
    public string LoadFormat { get; init; } = "auto";
    public int MaxRunningRequests { get; init; } = 16;
    /// <summary>Overrides max_position_embeddings as the context limit when set.</summary>
    public int? ContextLength { get; init; }
    /// <summary>Tokens of KV cache in the pool; null sizes it from the device's memory (see <see cref="MemFractionStatic"/>).</summary>
    public int? KvCacheTokens { get; init; }
    /// <summary>Share of the device's memory that weights plus KV pool may take (sglang's --mem-fraction-static).</summary>
    public double MemFractionStatic { get; init; } = 0.9;
    /// <summary>
    /// Most prompt tokens one request prefills in a step; longer prompts are prefilled in chunks (sglang's
    /// --chunked-prefill-size). Null takes the device's default (<see cref="IRunnerFactory.DefaultChunkedPrefillSize"/>).
    /// </summary>
    public int? ChunkedPrefillSize { get; init; }
    /// <summary>Most prompt tokens of all requests prefilled in one step (sglang's --max-prefill-tokens).</summary>
    public int MaxPrefillTokens { get; init; } = 16384;
    /// <summary>Largest decode batch replayed from a captured graph (GPU backends).</summary>
    public int CudaGraphMaxBatchSize { get; init; } = 256;
    public bool DisableCudaGraph { get; init; }
    /// <summary>Batch-invariant kernels on backends that otherwise trade that for speed.</summary>
    public bool Deterministic { get; init; }
    /// <summary>How the experts' weights lie in device memory (--expert-layout; boxed on Hopper GPUs only).</summary>
    public ExpertLayout ExpertLayout { get; init; }

    public InjectionMode Mode { get; init; } = InjectionMode.Latent;
    public TriggerOptions Trigger { get; init; } = new();
    /// <summary>
    /// The router probe (--router-probe): null = &lt;model&gt;/router-probe.json. It is loaded when the file is there (so that a
    /// request may ask for the router-probe signal) and must be there when <see cref="Trigger"/> watches router-probe.
    /// </summary>
    public string? RouterProbePath { get; init; }
    /// <summary>
    /// The threshold (a probability) of router-probe triggers that give none of their own; null = the probe's calibrated
    /// threshold. <see cref="TriggerOptions.Threshold"/> stays the entropy signals' threshold.
    /// </summary>
    public double? RouterProbeThreshold { get; init; }
    /// <summary>α in α·P·c.</summary>
    public float InjectionScale { get; init; } = 1.0f;
    /// <summary>Fixed MoE layers to inject at; null injects at the layers that fired.</summary>
    public IReadOnlyList<int>? InjectionLayers { get; init; }
    /// <summary>How many tokens (the triggering one included) receive the injection; null = the rest of the request.</summary>
    public int? InjectionTokens { get; init; }
    public ProjectionKind Projection { get; init; } = ProjectionKind.Random;
    /// <summary>The projector file when <see cref="Projection"/> is File: "proj" [hidden, hidden], or a trained projector (ContextInjector.LoadFromFile).</summary>
    public string? ProjectionPath { get; init; }
    public int ProjectionSeed { get; init; }

    /// <summary>Retriever spec (see RetrieverFactory.Create); null uses the model's default corpus when it has one, else none.</summary>
    public string? Retriever { get; init; }
    public TimeSpan RetrievalTimeout { get; init; } = TimeSpan.FromSeconds(2);
    public int RetrievalTopK { get; init; } = 3;
    /// <summary>The retrieval query is the detokenised last N tokens of prompt plus output.</summary>
    public int QueryWindowTokens { get; init; } = 32;
    /// <summary>Answer tokens within which a prompt-mode trigger restarts the answer (<see cref="PromptRagRestart.Answer"/>), held back until they pass.</summary>
    public const int PromptRestartWindowTokens = 8;
    /// <summary>Prompt-mode RAG that fires early in the answer: restart the answer after the rebuilt context, or keep it.</summary>
    public PromptRagRestart PromptRagRestart { get; init; } = PromptRagRestart.Answer;
    /// <summary>
    /// Latent-mode RAG with a projector that makes one vector an answer position (vector i for the position that predicts
    /// answer token i), firing early in the answer: restart the answer with vector 0 at the prompt's last position (the
    /// default), or keep the answer written so far and inject from the trigger's position on, with that position's vector.
    /// </summary>
    public LatentRagRestart LatentRagRestart { get; init; } = LatentRagRestart.Answer;
    /// <summary>
    /// Every RAG request retrieves once, with its prompt as the query (the last <see cref="QueryWindowTokens"/> tokens), before
    /// its prompt is computed: prompt mode computes the passages and the prompt once, latent mode injects from the prompt's
    /// last position on, and nothing is computed twice. The trigger then watches the answer as usual; this retrieval counts
    /// towards <see cref="TriggerOptions.MaxRetrievalsPerRequest"/> and starts the cooldown at answer token 0.
    /// </summary>
    public bool RetrieveFirst { get; init; }

    /// <summary>
    /// Whether a trigger of this mode restarts the answer when it fires within the first
    /// <see cref="PromptRestartWindowTokens"/> tokens (which are then held back from the client): prompt mode with
    /// <see cref="PromptRagRestart.Answer"/>, and latent mode whose projector makes one vector an answer position
    /// (<paramref name="answerPositions"/> &gt; 1).
    /// </summary>
    internal bool RestartsAnswer(InjectionMode mode, int answerPositions) =>
        mode == InjectionMode.Prompt
            ? PromptRagRestart == PromptRagRestart.Answer
            : mode == InjectionMode.Latent && answerPositions > 1 && LatentRagRestart == LatentRagRestart.Answer;

    public string LogDir { get; init; } = "./logs";
    /// <summary>Each RAG event line is on disk (fsync) before its request goes on.</summary>
    public bool LogFsync { get; init; }
    /// <summary>Where the one-line "[MoE-RAG] entropy=... -> triggering RAG" notices go; null = Console.Out.</summary>
    public TextWriter? Notices { get; init; }
    /// <summary>Faults to inject, for tests of per-request isolation; null in production.</summary>
    public IFaultInjection? Faults { get; init; }

    /// <summary>Where the router probe is looked for: <see cref="RouterProbePath"/>, else beside the model.</summary>
    public string ResolvedRouterProbePath => RouterProbePath ?? Path.Combine(ModelPath, RouterProbe.FileName);

    /// <summary>The prefill tokens one step may hold: a chunk of one prompt at most, and all prompts' share at most.</summary>
    public int PrefillBudget => Math.Min(ResolvedChunkedPrefillSize, MaxPrefillTokens);

    /// <summary><see cref="ChunkedPrefillSize"/>, or the device's default when none was given.</summary>
    public int ResolvedChunkedPrefillSize => ChunkedPrefillSize ?? Runner.DefaultChunkedPrefillSize;

    /// <summary>Null when valid, else what is wrong.</summary>
    public string? Validate()
    {
        if (MaxRunningRequests < 1) return "max_running_requests must be >= 1";
        if (ChunkedPrefillSize is < 1) return "chunked_prefill_size must be >= 1";
        if (MaxPrefillTokens < 1) return "max_prefill_tokens must be >= 1";
        if (!(MemFractionStatic > 0 && MemFractionStatic <= 1)) return "mem_fraction_static must be in (0, 1]";
        if (ContextLength is < 1) return "context_length must be >= 1";
        if (KvCacheTokens is < 1) return "kv_cache_tokens must be >= 1";
        if (QueryWindowTokens < 1) return "query_window must be >= 1";
        if (RetrievalTopK < 1) return "retrieval_top_k must be >= 1";
        if (RouterProbeThreshold is { } p && !(p >= 0 && p <= 1)) return "the router probe's threshold must be a probability in [0, 1]";
        return null;
    }
}

/// <summary>Faults a test can inject into chosen requests, to show that one request's failure is its own.</summary>
public interface IFaultInjection
{
    /// <summary>The sampler fails for this request's tokens.</summary>
    bool FailSampling(string rid) => false;

    /// <summary>Replaces this request's injection vector (after it was computed), e.g. with NaNs.</summary>
    void CorruptInjection(string rid, Span<float> vector)
    {
    }
}

/// <summary>
/// What latent-mode RAG does with the answer generated before its trigger when the projector makes one vector an answer
/// position (--latent-rag-restart). On the demo model (docs/eval/answer-positions.md) continuing recovers less of prompt
/// RAG's gain than restarting and costs less: it computes the answer once and holds no token back from the client.
/// </summary>
public enum LatentRagRestart
{
    /// <summary>
    /// The answer is generated again from its first token with vector 0 at the prompt's last position, when the trigger fires
    /// within the first <see cref="EngineOptions.PromptRestartWindowTokens"/> tokens; those tokens are held back from the
    /// client until then. Later triggers continue.
    /// </summary>
    Answer,
    /// <summary>The tokens written so far stay; the vectors apply from the trigger's position on, each at its own answer position.</summary>
    Continue,
}

/// <summary>What prompt-mode RAG does with the answer generated before its trigger (--prompt-rag-restart).</summary>
public enum PromptRagRestart
{
    /// <summary>
    /// The answer so far is dropped and generated again after the rebuilt context, when the trigger fires within the first
    /// <see cref="EngineOptions.PromptRestartWindowTokens"/> tokens; those tokens are held back from the client until then
    /// (so nothing sent is ever taken back). Later triggers continue.
    /// </summary>
    Answer,
    /// <summary>FLARE's behaviour: the tokens generated so far stay, and generation goes on after them.</summary>
    Continue,
}
