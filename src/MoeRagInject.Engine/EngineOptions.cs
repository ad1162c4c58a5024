using MoeRagInject.Rag;

namespace MoeRagInject.Engine;

/// <summary>Everything `serve` and `generate` configure; one record so both commands share one mapping from flags.</summary>
public sealed record EngineOptions
{
    /// <summary>A Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json).</summary>
    public required string ModelPath { get; init; }
    /// <summary>"cpu" (a "cuda" backend comes later).</summary>
    public string Device { get; init; } = "cpu";
    /// <summary>"auto" reads the safetensors; "dummy" builds random weights of the config's shapes.</summary>
    public string LoadFormat { get; init; } = "auto";
    public int MaxRunningRequests { get; init; } = 16;
    /// <summary>Overrides max_position_embeddings as the context limit when set.</summary>
    public int? ContextLength { get; init; }
    /// <summary>Tokens of KV cache in the pool; null sizes it for MaxRunningRequests full contexts.</summary>
    public int? KvCacheTokens { get; init; }
    /// <summary>CPU threads for the forward pass; null uses every core.</summary>
    public int? Threads { get; init; }

    public InjectionMode Mode { get; init; } = InjectionMode.Latent;
    public TriggerOptions Trigger { get; init; } = new();
    /// <summary>α in α·P·c.</summary>
    public float InjectionScale { get; init; } = 1.0f;
    /// <summary>Fixed MoE layers to inject at; null injects at the layers that fired.</summary>
    public IReadOnlyList<int>? InjectionLayers { get; init; }
    /// <summary>How many tokens (the triggering one included) receive the injection; null = the rest of the request.</summary>
    public int? InjectionTokens { get; init; }
    public ProjectionKind Projection { get; init; } = ProjectionKind.Random;
    /// <summary>safetensors file with "proj" when <see cref="Projection"/> is File.</summary>
    public string? ProjectionPath { get; init; }
    public int ProjectionSeed { get; init; }

    /// <summary>Retriever spec (see RetrieverFactory.Create); null uses the model's default corpus when it has one, else none.</summary>
    public string? Retriever { get; init; }
    public TimeSpan RetrievalTimeout { get; init; } = TimeSpan.FromSeconds(2);
    public int RetrievalTopK { get; init; } = 3;
    /// <summary>The retrieval query is the detokenised last N tokens of prompt plus output.</summary>
    public int QueryWindowTokens { get; init; } = 32;

    public string LogDir { get; init; } = "./logs";
    /// <summary>Where the one-line "[MoE-RAG] entropy=... -> triggering RAG" notices go; null = Console.Out.</summary>
    public TextWriter? Notices { get; init; }
}
