using MoeRagInject.Engine;

namespace MoeRagInject.Evaluation.Tests;

public sealed class GoalsTests
{
    private static readonly QaItem[] s_items =
    [
        new("t1", "What is a?", "alpha one", null, "taught", false),
        new("t2", "What is b?", "beta two", null, "taught", false),
        new("h1", "What is c?", "gamma three", null, "heldout", false),
        new("h2", "What is d?", "delta four", null, "heldout", false),
    ];

    /// <summary>A mode whose answers are right for the given ids, with the given latency and j = 0 max entropy per question.</summary>
    private static ModeResult Mode(string name, string[] rightIds, double latency, double[]? entropy = null)
    {
        var runs = s_items.Select((item, i) =>
        {
            var text = rightIds.Contains(item.Id) ? item.Answer + "\nmore" : "wrong";
            var h = (float)(entropy?[i] ?? 1.0);
            return new QuestionRun
            {
                Item = item,
                Tokens = [1, 2],
                Text = text,
                Events = [],
                RouterEntropy = [[h, h / 2], [0.5f, 0.5f]],
                OutputEntropy = [2f, 1f],
                Finish = new FinishReason(FinishKind.Stop),
                LatencySeconds = latency,
            };
        }).ToArray();
        return ModeResult.Create(name, null, runs, 1, null);
    }

    [Fact]
    public void AnswersAreTheFirstLineAndScoredBySplit()
    {
        var m = Mode("none", ["t1", "h1"], 1);
        Assert.Equal("alpha one", m.Runs[0].Answer);
        Assert.Equal(0.5, m.Overall.TokenF1);
        Assert.Equal(1.0, m.BySplit["taught"].TokenF1 + m.BySplit["heldout"].TokenF1);
        Assert.Equal(0.5, m.HeldoutF1);
        Assert.Equal(2, m.BySplit["heldout"].Count);
    }

    [Fact]
    public void GoalsAreComputedFromTheModes()
    {
        // Held-out entropies above taught ones: AUROC 1.
        var none = Mode("none", ["t1", "t2"], 1.0, [0.2, 0.3, 1.5, 1.9]);
        var prompt = Mode("prompt_always", ["t1", "t2", "h1", "h2"], 2.0);
        var latent = Mode("latent_calibrated", ["t1", "t2", "h1"], 1.05);
        var modes = new Dictionary<string, ModeResult> { ["none"] = none, ["prompt_always"] = prompt, ["latent_calibrated"] = latent };
        var trigger = Evaluator.MeasureTrigger(none, 2);
        Assert.Equal(1.0, trigger.AurocHeldout["router_max_j0"]);
        Assert.Equal(1.0, trigger.AurocWrong["router_max_j0"]); // exactly the held-out ones are wrong
        Assert.Equal(0.5, trigger.AurocHeldout["output_entropy_j0"]); // all equal
        var goals = Evaluator.Goals(modes, trigger).ToDictionary(g => g.Key);
        Assert.Equal("MET", goals["heldout_auroc"].Status);
        Assert.Equal(0.5, goals["latent_recovery"].Value, 10); // (0.5 - 0) / (1 - 0)
        Assert.Equal("MET", goals["latent_recovery"].Status);
        Assert.Equal(0.05, goals["latency_ratio"].Value, 10); // (1.05 - 1) / (2 - 1)
        Assert.Equal("MET", goals["latency_ratio"].Status);

        // No gain from prompt RAG: the recovery is undefined; a slow latent mode misses the latency goal.
        modes["prompt_always"] = Mode("prompt_always", ["t1", "t2"], 2.0);
        modes["latent_calibrated"] = Mode("latent_calibrated", ["t1"], 1.5);
        goals = Evaluator.Goals(modes, trigger).ToDictionary(g => g.Key);
        Assert.Equal("UNDEFINED", goals["latent_recovery"].Status);
        Assert.True(double.IsNaN(goals["latent_recovery"].Value));
        Assert.Equal("NOT MET", goals["latency_ratio"].Status);
    }
    [Fact]
    public void TrainedProjectorGoalsCarryPairedBootstrapIntervals()
    {
        var modes = new Dictionary<string, ModeResult>
        {
            ["none"] = Mode("none", ["t1", "t2"], 1.0),
            ["prompt_always"] = Mode("prompt_always", ["t1", "t2", "h1", "h2"], 2.0),
            ["latent_trained"] = Mode("latent_trained", ["t1", "t2", "h1"], 1.05),
        };
        var goals = Evaluator.Goals(modes, null).ToDictionary(g => g.Key);
        var recovery = goals["trained_recovery"];
        Assert.Equal(0.5, recovery.Value, 10); // (0.5 − 0) / (1 − 0) on the two held-out questions
        Assert.Equal("MET", recovery.Status);
        // Resampling the two held-out questions gives 0 (h2 twice), 0.5 or 1 (h1 twice): the 2.5th and 97.5th percentiles are 0 and 1.
        Assert.Equal((0.0, 1.0), (recovery.CiLow, recovery.CiHigh));
        Assert.Contains("the interval contains the target", recovery.Detail);
        var latency = goals["trained_latency_ratio"];
        Assert.Equal(0.05, latency.Value, 9);
        Assert.Equal("MET", latency.Status);
        Assert.All(new[] { latency.CiLow, latency.CiHigh }, v => Assert.Equal(0.05, v, 9));
        var taught = goals["trained_taught_f1_delta"];
        Assert.Equal(0.0, taught.Value, 10);
        Assert.Equal("MET", taught.Status);
        Assert.Contains("the whole interval meets the target", taught.Detail);

        // Taught answers lost and a slow mode: both goals missed; without latent_trained, nothing is measured.
        modes["latent_trained"] = Mode("latent_trained", ["h1", "h2"], 1.5);
        goals = Evaluator.Goals(modes, null).ToDictionary(g => g.Key);
        Assert.Equal(1.0, goals["trained_recovery"].Value, 10);
        Assert.Equal("NOT MET", goals["trained_taught_f1_delta"].Status);
        Assert.Equal(-1.0, goals["trained_taught_f1_delta"].Value, 10);
        Assert.Equal("NOT MET", goals["trained_latency_ratio"].Status);
        modes.Remove("latent_trained");
        goals = Evaluator.Goals(modes, null).ToDictionary(g => g.Key);
        Assert.All(new[] { "trained_recovery", "trained_latency_ratio", "trained_taught_f1_delta" },
            key => Assert.Equal("NOT MEASURED", goals[key].Status));
        Assert.Contains("latent_trained", goals["trained_recovery"].Detail);
    }

    /// <summary>
    /// When the modes took turns, the latency ratio's interval resamples turns, not questions. Eight questions in four turns
    /// of two; latent_trained adds 0.4 of prompt RAG's added latency in turns 1 and 3 and nothing in 0 and 2 (load that came
    /// and went), 0.2 on the whole. Resampling the four turns, the ratio is 0.4·k/4 with k ~ Binomial(4, ½): k = 0 and k = 4
    /// each have probability 1/16 > 2.5%, so the interval is exactly 0 to 0.4. Resampling the eight questions makes it
    /// narrower (0.4·k/8 with k ~ Binomial(8, ½), P(k ≤ 1) = 9/256 > 2.5% > P(k = 0)): its lower end is 0.05.
    /// </summary>
    [Fact]
    public void TheLatencyIntervalResamplesTheTurnsTheModesTook()
    {
        var items = Enumerable.Range(0, 8).Select(i => new QaItem($"q{i}", $"What is {i}?", $"answer {i}", null, i % 2 == 0 ? "taught" : "heldout", false)).ToArray();
        ModeResult Turns(string name, Func<int, double> latency) => ModeResult.Create(name, null, [.. items.Select((item, i) => new QuestionRun
        {
            Item = item,
            Tokens = [1],
            Text = item.Answer,
            Events = [],
            RouterEntropy = [[1f]],
            OutputEntropy = [1f],
            Finish = new FinishReason(FinishKind.Stop),
            LatencySeconds = latency(i),
        })], 1, null) with { LatencyBlockSize = 2 };
        var modes = new Dictionary<string, ModeResult>
        {
            ["none"] = Turns("none", _ => 1.0),
            ["prompt_always"] = Turns("prompt_always", _ => 2.0),
            ["latent_trained"] = Turns("latent_trained", i => i / 2 % 2 == 1 ? 1.4 : 1.0),
        };
        var latency = Evaluator.Goals(modes, null).ToDictionary(g => g.Key)["trained_latency_ratio"];
        Assert.Equal(0.2, latency.Value, 10);
        Assert.Equal(0.0, latency.CiLow, 10);
        Assert.Equal(0.4, latency.CiHigh, 10);
        Assert.Contains("block bootstrap over the 4 turns", latency.Detail);

        // The same latencies without turns: the questions are resampled, and the interval no longer reaches 0.
        foreach (var key in modes.Keys.ToList()) modes[key] = modes[key] with { LatencyBlockSize = 0 };
        var byQuestion = Evaluator.Goals(modes, null).ToDictionary(g => g.Key)["trained_latency_ratio"];
        Assert.Equal(0.2, byQuestion.Value, 10);
        Assert.Equal(0.05, byQuestion.CiLow, 10);
        Assert.Contains("paired bootstrap", byQuestion.Detail);
        Assert.DoesNotContain("CPU time", byQuestion.Detail);

        // With the CPU time each mode used (8 questions: 1.0, 1.5 and 5.0 ms a question), the detail gives the same share in it.
        modes["none"] = modes["none"] with { CpuSeconds = 0.008 };
        modes["latent_trained"] = modes["latent_trained"] with { CpuSeconds = 0.012 };
        modes["prompt_always"] = modes["prompt_always"] with { CpuSeconds = 0.040 };
        var withCpu = Evaluator.Goals(modes, null).ToDictionary(g => g.Key)["trained_latency_ratio"];
        Assert.EndsWith("in CPU time a question, (cpu_trained − cpu_none) / (cpu_prompt_always − cpu_none) = (1.50 − 1.00) / (5.00 − 1.00) ms = 0.125", withCpu.Detail);
        Assert.Equal(0.2, withCpu.Value, 10);
    }
}
