using MoeRagInject.Backend;
using MoeRagInject.Engine.Output;
using MoeRagInject.Model;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine;

internal enum SequenceState
{
    /// <summary>Queued, or preempted and waiting to be recomputed.</summary>
    Waiting,
    Running,
    /// <summary>A trigger fired; the token it was about to emit waits for the retrieval, then is recomputed.</summary>
    Retrieving,
    Finished,
}

/// <summary>An injection waiting for its sequence's slot: the vectors, their layers, and positions [Start, End) with vector 0 at Start.</summary>
internal sealed record PendingInjection(float[] Vector, IReadOnlyList<int> Layers, int Start, int End);

/// <summary>Plain per-request data owned by the engine loop: tokens, KV blocks, slot, sampling and RAG state.</summary>
internal sealed class Sequence
{
    public Sequence(string rid, long arrival, GenerationRequest request, InjectionMode mode, TriggerOptions trigger, float scale)
    {
        Rid = rid;
        Arrival = arrival;
        ArrivalTicks = System.Diagnostics.Stopwatch.GetTimestamp();
        Request = request;
        OriginalPrompt = [.. request.PromptIds];
        Context = [.. request.PromptIds];
        Mode = mode;
        Trigger = new EntropyTrigger(trigger);
        Scale = scale;
        Rng = new SplitMix64(request.Sampling.Seed ?? (ulong)Random.Shared.NextInt64());
    }

    public string Rid { get; }
    /// <summary>Admission order: the newest running request is preempted first.</summary>
    public long Arrival { get; }
    /// <summary>Stopwatch timestamp of its submission (first-token and end-to-end times count from it).</summary>
    public long ArrivalTicks { get; }
    public GenerationRequest Request { get; }
    public SamplingParams Sampling => Request.Sampling;
    public InjectionMode Mode { get; set; }
    public EntropyTrigger Trigger { get; }
    public float Scale { get; }
    public SplitMix64 Rng { get; }
    /// <summary>Where the loop puts what the request produced; its stream reads it.</summary>
    public OutputQueue Output { get; } = new();
    /// <summary>Cancels the request's retrieval when it finishes.</summary>
    public CancellationTokenSource Cancellation { get; } = new();

    public int[] OriginalPrompt { get; }
    /// <summary>The tokens ahead of the output: the prompt, or (prompt-mode RAG) the passages and the prompt.</summary>
    public List<int> Context { get; set; }
    public List<int> Generated { get; } = [];
    /// <summary>Tokens accepted but not yet given to <see cref="Output"/>: a prompt-mode restart may still drop them.</summary>
    internal List<(TokenOutput Token, float[] RouterEntropy)> Held { get; } = [];
    public int TotalTokens => Context.Count + Generated.Count;
    public int TokenAt(int position) => position < Context.Count ? Context[position] : Generated[position - Context.Count];

    public SequenceState State { get; set; } = SequenceState.Waiting;
    /// <summary>The runner slot holding its per-request state, or −1.</summary>
    public int Slot { get; set; } = -1;
    /// <summary>The slot's sampling state was given to the runner.</summary>
    public bool SlotBound { get; set; }
    /// <summary>KV blocks in position order.</summary>
    public List<int> BlockTable { get; } = [];
    /// <summary>Entries of <see cref="BlockTable"/> already written to the runner's table.</summary>
    public int SyncedBlocks { get; set; }
    /// <summary>Positions whose keys and values are in the cache.</summary>
    public int Computed { get; set; }
    public int Preemptions { get; set; }

    /// <summary>
    /// Parallel sampling: the first sample of this one's group, whose KV blocks for positions below <see cref="SharedPrefix"/>
    /// this one takes when it is admitted (null once taken, or for a sequence that shares nothing).
    /// </summary>
    public Sequence? PrefixLeader { get; set; }
    /// <summary>Prompt positions covered by full blocks that a follower may share: whole blocks strictly before the last prompt position.</summary>
    public int SharedPrefix { get; set; }
    /// <summary>Prompt positions this sequence took from its leader's blocks instead of computing (reported as cached tokens).</summary>
    public int CachedTokens { get; set; }
    /// <summary>Prompt-mode RAG replaced <see cref="Context"/>: its KV no longer holds the original prompt, so nobody may share it.</summary>
    public bool ContextRebuilt { get; set; }

    /// <summary>Retrieves with its prompt before it is admitted (<see cref="EngineOptions.RetrieveFirst"/>).</summary>
    public bool RetrieveFirst { get; init; }
    /// <summary>An injection retrieved before admission, set on the runner when the sequence's slot is bound.</summary>
    public PendingInjection? PendingInjection { get; set; }
    /// <summary>First position that receives the current injection, or −1 when none is set.</summary>
    public int InjectionStart { get; set; } = -1;
    /// <summary>Output-token index being recomputed after a retrieval: the trigger does not fire twice for it.</summary>
    public int RecomputeTokenIndex { get; set; } = -1;
    /// <summary>The router probe's per-token sums of the answer so far, by output-token index (for its pooling window).</summary>
    public List<float> ProbeSums { get; } = [];
    /// <summary>Per-request answers by query (a request has one retrieval in flight at most, so its tasks use it in turn).</summary>
    public Dictionary<string, RetrievalResult> QueryCache { get; } = new(StringComparer.Ordinal);

    /// <summary>The next draw of the request's generator, without consuming it: a token that a trigger discards leaves the generator where it was.</summary>
    public float PeekUniform() => Rng.PeekSingle();
}
