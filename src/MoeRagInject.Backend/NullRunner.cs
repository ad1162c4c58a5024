using MoeRagInject.Model;

namespace MoeRagInject.Backend;

/// <summary>
/// A runner that does no arithmetic, for measuring the host side: the engine, scheduler, output processing and RAG
/// coordination run for real over it. Each sampling sequence gets a token from a fixed pseudo-random walk over ordinary
/// ids (never EOS), and router entropies that exceed any threshold on a configurable share of tokens (the trigger rate).
/// A step can be made to last a given time (sleeping, as the host does while a GPU computes), so that retrievals and
/// readers run beside steps as long as a real device's.
/// </summary>
public sealed class NullRunner : IModelRunner
{
    private readonly float _triggerRate;
    private readonly TimeSpan _stepTime;

    public NullRunner(ModelConfig config, RunnerLimits limits, float triggerRate, TimeSpan stepTime = default)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(triggerRate, 0f);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(triggerRate, 1f);
        Config = config;
        Limits = limits;
        _triggerRate = triggerRate;
        _stepTime = stepTime;
        State = new StepState(limits, config);
    }

    public string Device => "null (no arithmetic)";
    public ModelConfig Config { get; }
    public RunnerLimits Limits { get; }
    public StepState State { get; }

    /// <summary>Entropy reported on triggering tokens: ln E, the largest a router can have, so any threshold below it fires.</summary>
    public float HighEntropy => MathF.Log(Config.NumExperts);

    public void BindSlot(int slot, SlotSampling sampling, ReadOnlySpan<int> promptIds)
    {
        State.Sampling[slot] = sampling;
        State.Penalties[slot].Reset(promptIds);
    }

    public void SetBlocks(int slot, int firstIndex, ReadOnlySpan<int> blocks) => blocks.CopyTo(State.BlockTable(slot)[firstIndex..]);

    public void SetInjection(int slot, ReadOnlySpan<float> vector, IReadOnlyList<int> layers, int start, int end, int answerBase = -1) =>
        vector[..State.HiddenSize].CopyTo(State.InjectionVector(slot));

    public void ClearInjection(int slot)
    {
    }

    public void AcceptToken(int slot, int token)
    {
    }

    public void Execute()
    {
        if (_stepTime > TimeSpan.Zero) Thread.Sleep(_stepTime);
        var s = State;
        var layers = Config.NumLayers;
        var firstOrdinary = Math.Min(259, Config.VocabSize - 1);
        var span = (ulong)Math.Max(1, Config.VocabSize - firstOrdinary);
        for (var i = 0; i < s.Sequences; i++)
        {
            var entropies = s.OutRouterEntropy.AsSpan(i * layers, layers);
            if ((s.SeqFlags[i] & StepState.FlagSample) == 0)
            {
                s.OutTokens[i] = -1;
                s.OutStatus[i] = SampleStatus.NoToken;
                continue;
            }
            var position = s.Positions[s.QueryStart[i + 1] - 1];
            var hash = Mix(((ulong)(uint)s.SeqSlot[i] << 32) | (uint)position);
            s.OutTokens[i] = firstOrdinary + (int)(hash % span);
            s.OutLogprobs[i] = -1f;
            s.OutOutputEntropy[i] = 1f;
            if ((s.SeqFlags[i] & StepState.FlagTopLogprobs) != 0)
            {
                // Nothing is computed: the one alternative reported is the token itself.
                s.TopIdsOf(i).Fill(-1);
                s.TopIdsOf(i)[0] = s.OutTokens[i];
                s.TopLogprobsOf(i)[0] = s.OutLogprobs[i];
            }
            var fires = (hash >> 40) * (1.0 / (1 << 24)) < _triggerRate;
            entropies.Fill(fires ? HighEntropy : 0f);
            s.OutStatus[i] = SampleStatus.Ok;
        }
    }

    private static ulong Mix(ulong z)
    {
        unchecked
        {
            z += 0x9E3779B97F4A7C15UL;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
            return z ^ (z >> 31);
        }
    }

    public EagerResult ForwardEager(IReadOnlyList<EagerSequence> sequences, IReadOnlyList<int>? captureLayers = null) =>
        throw new NotSupportedException("the null runner computes nothing: it has no eager forward pass");

    public void Dispose()
    {
    }
}

/// <summary>--device null: the <see cref="NullRunner"/>, sized like a real runner but holding no weights.</summary>
public sealed class NullRunnerFactory(float triggerRate, TimeSpan stepTime = default) : IRunnerFactory
{
    public string Device => "null";

    public IModelRunner Create(ModelConfig config, WeightSource weights, RunnerOptions options, Action<string>? progress = null)
    {
        var bs = options.BlockSize;
        var blocksPerSequence = (options.ContextLength + bs - 1) / bs;
        var tokens = options.KvCacheTokens ?? (long)options.MaxSequences * blocksPerSequence * bs;
        var limits = new RunnerLimits(options.MaxSequences, Math.Max(options.MaxRows, options.MaxSequences), blocksPerSequence, bs,
            (int)Math.Min((tokens + bs - 1) / bs, int.MaxValue / bs), 0, 0);
        return new NullRunner(config, limits, triggerRate, stepTime);
    }
}
