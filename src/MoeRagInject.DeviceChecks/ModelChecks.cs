using System.Text.Json;
using MoeRagInject.Backend;
using MoeRagInject.Model;

namespace MoeRagInject.DeviceChecks;

/// <summary>
/// A runner on the device against transformers on the committed reference checkpoints (tests/data/reference: prompts,
/// transformers' logits in fp32 and in the checkpoint's own precision, router probabilities, greedy tokens): per-position
/// log-probabilities and router entropies over whole sequences, and greedy decoding through the paged KV cache.
/// </summary>
public static class ModelChecks
{
    /// <summary>The bf16 checkpoints (the device keeps bf16 weights, so these are compared exactly as stored).</summary>
    public static readonly string[] Cases = ["c-bf16", "tiny-mixtral", "demo"];

    /// <param name="deterministic">Run the checkpoints on the batch-invariant kernels (--deterministic); their names say so.</param>
    public static List<CheckResult> Run(IRunnerFactory device, string referenceRoot, string demoModel, Action<string>? progress = null,
        bool deterministic = false)
    {
        var results = new List<CheckResult>();
        foreach (var name in Cases)
        {
            var referenceDir = Path.Combine(referenceRoot, name);
            var checkpointDir = name == "demo" ? demoModel : referenceDir;
            try
            {
                results.AddRange(RunCase(device, deterministic ? $"{name} (deterministic)" : name, checkpointDir, Path.Combine(referenceDir, "reference"),
                    progress, deterministic));
            }
            catch (Exception e)
            {
                results.Add(new CheckResult("model", name, false, double.NaN, 0, $"{e.GetType().Name}: {e.Message}"));
            }
        }
        return results;
    }

    /// <summary>One checkpoint folder with a reference/ folder beside or inside it (as tools/reference and tools/gpu write them).</summary>
    public static List<CheckResult> RunCase(IRunnerFactory device, string name, string checkpointDir, string referenceDir, Action<string>? progress = null,
        bool deterministic = false)
    {
        var config = ModelConfig.Load(checkpointDir);
        using var checkpoint = Checkpoint.Open(checkpointDir);
        using var reference = new SafeTensorsFile(Path.Combine(referenceDir, "reference.safetensors"));
        using var json = JsonDocument.Parse(File.ReadAllText(Path.Combine(referenceDir, "reference.json")));
        var prompts = json.RootElement.GetProperty("prompts").EnumerateArray().ToList();
        var weights = MixtralWeights.Resolve(checkpoint, config);
        var longest = prompts.Max(p => p.GetProperty("full_ids").GetArrayLength());
        using var runner = device.Create(config, new CheckpointWeights(weights, checkpoint.Tensors.Values.Sum(t => t.ByteLength), weights.Embedding.DType),
            new RunnerOptions
            {
                MaxSequences = 2, MaxRows = Math.Max(64, longest), ContextLength = Math.Max(64, longest + 16), KvCacheTokens = 2 * (longest + 16),
                Deterministic = deterministic,
            },
            progress);
        runner.BindSlot(0, SlotSampling.Greedy, []);
        runner.SetBlocks(0, 0, Enumerable.Range(0, runner.Limits.MaxBlocksPerSequence).ToArray());

        var rowErrors = new List<double>();
        double entropyError = 0;
        int agree = 0, positions = 0, greedyEqual = 0, greedyTotal = 0;
        var mismatched = new List<string>();
        for (var p = 0; p < prompts.Count; p++)
        {
            var prompt = prompts[p];
            var full = Ids(prompt, "full_ids");
            var native = prompt.TryGetProperty("greedy_ids_native", out _) ? "logits_native" : "logits";
            var theirs = reference.Tensors[$"{native}.{p}"].ToFloatArray();
            var probs = reference.Tensors[$"router_probs.{p}"].ToFloatArray();
            var ours = runner.ForwardEager([new EagerSequence(0, full, 0, AllLogits: true)]);
            var v = config.VocabSize;
            for (var row = 0; row < full.Length; row++)
            {
                var a = Sampler.LogSoftmax(ours.LogitRow(row));
                var b = Sampler.LogSoftmax(theirs.AsSpan(row * v, v));
                double worst = 0;
                for (var x = 0; x < v; x++) worst = Math.Max(worst, Math.Abs(a[x] - b[x]));
                rowErrors.Add(worst);
                positions++;
                if (ArgMax(a) == ArgMax(b)) agree++;
                for (var l = 0; l < config.NumLayers; l++)
                {
                    double h = 0;
                    for (var e = 0; e < config.NumExperts; e++)
                    {
                        double q = probs[(l * full.Length + row) * config.NumExperts + e];
                        if (q > 0) h -= q * Math.Log(q);
                    }
                    entropyError = Math.Max(entropyError, Math.Abs(h - ours.EntropyRow(row)[l]));
                }
            }

            // Greedy decoding one token a step through the paged KV cache.
            var input = Ids(prompt, "input_ids");
            // transformers' greedy tokens in fp32 and, for half-precision checkpoints, in the checkpoint's precision: a device
            // computing with bf16 GEMM inputs and an fp32 residual stream sits between the two, and must match one of them.
            var expected = Ids(prompt, "greedy_ids");
            int[]? nativeExpected = prompt.TryGetProperty("greedy_ids_native", out _) ? Ids(prompt, "greedy_ids_native") : null;
            var generated = new List<int>();
            IReadOnlyList<int> pending = input;
            var position = 0;
            while (generated.Count < expected.Length)
            {
                var step = runner.ForwardEager([new EagerSequence(0, pending, position)]);
                position += pending.Count;
                var next = ArgMax(Sampler.LogSoftmax(step.LogitRow(0)));
                generated.Add(next);
                pending = [next];
            }
            greedyTotal++;
            if (generated.SequenceEqual(expected) || (nativeExpected is not null && generated.SequenceEqual(nativeExpected))) greedyEqual++;
            else
                mismatched.Add($"prompt {p}: ours [{string.Join(",", generated)}] vs fp32 [{string.Join(",", expected)}]"
                    + (nativeExpected is null ? "" : $" and bf16 [{string.Join(",", nativeExpected)}]"));
        }
        rowErrors.Sort();
        var median = rowErrors[rowErrors.Count / 2];
        return
        [
            new CheckResult("model", $"{name}: median per-position max |Δ logprob| vs transformers in bf16",
                median < 0.25, median, 0.25, FormattableString.Invariant($"max {rowErrors[^1]:F3} over {positions} positions")),
            new CheckResult("model", $"{name}: greedy choice agrees at positions", agree >= 0.9 * positions, 1 - (double)agree / positions, 0.1,
                $"{agree} of {positions}"),
            new CheckResult("model", $"{name}: router entropy max |Δ| vs transformers-fp32", entropyError < 0.05, entropyError, 0.05, "nats"),
            new CheckResult("model", $"{name}: greedy tokens equal transformers' (fp32 or bf16)", greedyEqual == greedyTotal, greedyTotal - greedyEqual, 0,
                greedyEqual == greedyTotal ? $"{greedyTotal} prompts" : string.Join("; ", mismatched)),
        ];
    }

    /// <summary>
    /// Decode steps replayed from captured graphs give bit-identical tokens, log-probabilities, router entropies and router
    /// probe sums to the same steps run op by op: three sequences (a bucket of four, so one padding sequence), eight steps, on
    /// two runners with the same (seeded) router probe.
    /// </summary>
    public static CheckResult GraphReplay(IRunnerFactory device, string checkpointDir)
    {
        var config = ModelConfig.Load(checkpointDir);
        using var checkpoint = Checkpoint.Open(checkpointDir);
        var weights = MixtralWeights.Resolve(checkpoint, config);
        var source = new CheckpointWeights(weights, checkpoint.Tensors.Values.Sum(t => t.ByteLength), weights.Embedding.DType);
        var rng = new Random(5);
        float[] probe = [.. Enumerable.Range(0, config.NumLayers * config.NumExperts).Select(_ => (float)(rng.NextDouble() * 2 - 1))];
        RunnerOptions Options(bool graphs) => new()
        {
            MaxSequences = 4, MaxRows = 64, ContextLength = 64, KvCacheTokens = 256, DisableCudaGraph = !graphs, RouterProbe = probe,
        };
        using var graphed = device.Create(config, source, Options(true));
        using var eager = device.Create(config, source, Options(false));
        int[][] prompts = [[1, 300, 301, 302], [1, 500], [1, 700, 701, 702, 703, 704]];
        var outputs = new List<float>[2];
        var runners = new[] { graphed, eager };
        for (var r = 0; r < 2; r++)
        {
            var runner = runners[r];
            outputs[r] = [];
            var tokens = new int[3];
            for (var s = 0; s < 3; s++)
            {
                runner.BindSlot(s, SlotSampling.Greedy, []);
                runner.SetBlocks(s, 0, Enumerable.Range(s * 4, 4).ToArray());
                var first = runner.ForwardEager([new EagerSequence(s, prompts[s], 0)]);
                tokens[s] = ArgMax(Sampler.LogSoftmax(first.LogitRow(0)));
            }
            for (var step = 0; step < 8; step++)
            {
                var state = runner.State;
                for (var s = 0; s < 3; s++)
                {
                    state.SeqSlot[s] = s;
                    state.QueryStart[s] = s;
                    state.TokenIds[s] = tokens[s];
                    state.Positions[s] = prompts[s].Length + step;
                    state.SeqFlags[s] = StepState.FlagSample | StepState.FlagLogprob | StepState.FlagOutputEntropy;
                }
                state.QueryStart[3] = 3;
                state.Rows = state.Sequences = 3;
                runner.Execute();
                for (var s = 0; s < 3; s++)
                {
                    tokens[s] = state.OutTokens[s];
                    outputs[r].Add(tokens[s]);
                    outputs[r].Add(state.OutLogprobs[s]);
                    outputs[r].Add(state.OutOutputEntropy[s]);
                    outputs[r].AddRange(state.RouterEntropyOf(s).ToArray());
                    outputs[r].Add(state.OutProbeLogit[s]);
                }
            }
        }
        var captured = (graphed as ModelRunner)?.CapturedBuckets.Count ?? 0;
        var differences = outputs[0].Zip(outputs[1]).Count(p => BitConverter.SingleToInt32Bits(p.First) != BitConverter.SingleToInt32Bits(p.Second));
        return new CheckResult("graph", "decode steps replayed from graphs == op by op (bitwise)", differences == 0 && captured > 0, differences, 0,
            $"{captured} graph(s) captured, {outputs[0].Count} values compared");
    }

    private static int[] Ids(JsonElement prompt, string name)
    {
        var value = prompt.GetProperty(name);
        if (value.ValueKind == JsonValueKind.String) value = JsonDocument.Parse(value.GetString()!).RootElement;
        return [.. value.EnumerateArray().Select(x => x.GetInt32())];
    }

    internal static int ArgMax(double[] values)
    {
        var best = 0;
        for (var i = 1; i < values.Length; i++)
            if (values[i] > values[best]) best = i;
        return best;
    }
}
