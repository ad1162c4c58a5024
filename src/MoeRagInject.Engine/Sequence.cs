using System.Threading.Channels;
using MoeRagInject.Backend;
using MoeRagInject.Model;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine;

internal enum SequenceState
{
    Waiting,
    Running,
    /// <summary>A trigger fired; the token it was about to emit waits for the retrieval, then is recomputed.</summary>
    Retrieving,
    Finished,
}

/// <summary>Plain per-request data: tokens, KV blocks, sampling and RAG state, and what has not been streamed yet.</summary>
internal sealed class Sequence
{
    public Sequence(string rid, GenerationRequest request, InjectionMode mode, TriggerOptions trigger, float scale)
    {
        Rid = rid;
        Request = request;
        OriginalPrompt = [.. request.PromptIds];
        Context = [.. request.PromptIds];
        Mode = mode;
        Trigger = new EntropyTrigger(trigger);
        Scale = scale;
        Rng = new SplitMix64(request.Sampling.Seed ?? (ulong)Random.Shared.NextInt64());
    }

    public string Rid { get; }
    public GenerationRequest Request { get; }
    public SamplingParams Sampling => Request.Sampling;
    public InjectionMode Mode { get; }
    public EntropyTrigger Trigger { get; }
    public float Scale { get; }
    public SplitMix64 Rng { get; }
    public DateTimeOffset Arrival { get; } = DateTimeOffset.UtcNow;
    public Channel<GenerationUpdate> Updates { get; } = Channel.CreateUnbounded<GenerationUpdate>(new() { SingleReader = true, SingleWriter = true });

    public List<int> OriginalPrompt { get; }
    /// <summary>The tokens ahead of the output: the prompt, or (prompt-mode RAG) the passages and the prompt.</summary>
    public List<int> Context { get; set; }
    public List<int> Output { get; } = [];
    public Dictionary<int, int> OutputCounts { get; } = [];
    public List<int> BlockTable { get; } = [];
    /// <summary>Positions whose keys and values are in the cache.</summary>
    public int Computed { get; set; }
    public int TotalTokens => Context.Count + Output.Count;
    public SequenceState State { get; set; } = SequenceState.Waiting;

    public InjectionInput? Injection { get; set; }
    /// <summary>First position past the injection's reach.</summary>
    public int InjectionEnd { get; set; } = int.MaxValue;
    /// <summary>Output-token index being recomputed after a retrieval: the trigger does not fire twice for it.</summary>
    public int RecomputeTokenIndex { get; set; } = -1;
    public Dictionary<string, RetrievalResult> QueryCache { get; } = new(StringComparer.Ordinal);

    public string Text { get; set; } = "";
    public int StopScanFrom { get; set; }

    // Not yet streamed.
    public List<int> PendingTokens { get; } = [];
    public List<float> PendingLogprobs { get; } = [];
    public List<float[]> PendingEntropies { get; } = [];
    public List<float> PendingOutputEntropies { get; } = [];
    public List<RagEvent> PendingEvents { get; } = [];
}
