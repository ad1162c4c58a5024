// An upper-bound experiment for latent injection (issue 9): instead of v = P·c from the passage, inject the activation
// difference the passage itself makes. For each held-out question, d_l = h_rag − h_plain, the residual stream after layer l
// at the last prompt position with the gold passage in the prompt ("Context:\n" + passage + "\n\n" + question, as the
// engine's prompt RAG builds it) minus without it. Then the plain prompt is answered greedily with d_l added after layer l
// from that position on, exactly as the engine adds an injection (ModelRunner.SetInjection), one layer at a time. At the
// last layer this makes the first answer token's logits those of prompt RAG; what it leaves is whether one fixed vector
// can carry the rest of the answer. The _once modes add d_l at the last prompt position only (the engine's injection end
// one past it), so the answer's positions see the patched position through attention alone. Token F1 against the gold
// answer, as eval scores it.
//   dotnet run --project tools/injection-oracle -c Release -- [--limit 200] [--seed 0] [--max-new-tokens 48]
using System.Globalization;
using MoeRagInject.Backend;
using MoeRagInject.Backend.Cpu;
using MoeRagInject.Engine;
using MoeRagInject.Evaluation;

var limit = Argument("--limit", 200);
var seed = Argument("--seed", 0);
var maxNew = Argument("--max-new-tokens", 48);
var root = FindRoot();
var qa = QaData.Load(Path.Combine(root, "assets", "eval", "wordnet-qa.jsonl"));
var passages = QaData.LoadPassages(Path.Combine(root, "assets", "corpus", "wordnet", "wordnet-demo.jsonl.gz"));
var heldout = qa.Where(i => i.Split.Equals("heldout", StringComparison.OrdinalIgnoreCase) && i.PassageId is not null && passages.ContainsKey(i.PassageId))
    .ToList();
var order = Enumerable.Range(0, heldout.Count).ToArray();
new Random(seed).Shuffle(order);
var items = order.Take(limit).Select(i => heldout[i]).ToList();

using var loaded = LoadedModel.Load(Path.Combine(root, "assets", "models", "moe-wordnet-demo"), "auto", new CpuRunnerFactory(2),
    _ => new RunnerOptions { MaxSequences = 1, MaxRows = 1024, ContextLength = 1024, KvCacheTokens = 1024 });
var runner = loaded.Runner;
var tokenizer = loaded.Tokenizer;
var layers = loaded.Config.NumLayers;
var hidden = loaded.Config.HiddenSize;
runner.BindSlot(0, SlotSampling.Greedy, []);
runner.SetBlocks(0, 0, [.. Enumerable.Range(0, runner.Limits.MaxBlocksPerSequence)]);

var modes = new List<string> { "none", "prompt" };
modes.AddRange(Enumerable.Range(0, layers).Select(l => $"oracle_l{l}"));
modes.AddRange(Enumerable.Range(0, layers).Select(l => $"oracle_l{l}_once"));
var f1 = modes.ToDictionary(m => m, _ => new List<double>());
double worstLastLayer = 0;
var firstDiffers = 0;  // questions whose first answer token differs between none and prompt RAG
var lastFirst = -1;  // |logits(plain + d at the last layer) − logits(prompt RAG)| at the last prompt position, over the questions
var norms = Enumerable.Range(0, layers).Select(_ => new List<double>()).ToArray();
foreach (var item in items)
{
    var plain = tokenizer.Encode(item.Question);
    var context = tokenizer.Encode("Context:\n" + passages[item.PassageId!] + "\n\n", addSpecialTokens: false);
    int[] rag = [.. plain.Take(1), .. context, .. plain.Skip(1)];  // BOS, the context, the question without its BOS
    var hPlain = LastPositionStates(plain);
    var hRag = LastPositionStates(rag);
    f1["none"].Add(AnswerMetrics.TokenF1(Generate(plain), item.Answer));
    var firstPlain = lastFirst;
    f1["prompt"].Add(AnswerMetrics.TokenF1(Generate(rag), item.Answer));
    if (lastFirst != firstPlain) firstDiffers++;
    for (var l = 0; l < layers; l++)
    {
        var d = new float[hidden];
        for (var x = 0; x < hidden; x++) d[x] = hRag[l * hidden + x] - hPlain[l * hidden + x];
        norms[l].Add(Math.Sqrt(d.Sum(v => (double)v * v)));
        runner.SetInjection(0, d, [l], plain.Length - 1, int.MaxValue);
        if (l == layers - 1)
        {
            var patched = runner.ForwardEager([new EagerSequence(0, plain, 0)]).Logits;
            runner.ClearInjection(0);
            var reference = runner.ForwardEager([new EagerSequence(0, rag, 0)]).Logits;
            worstLastLayer = Math.Max(worstLastLayer, patched.Zip(reference, (a, b) => Math.Abs((double)a - b)).Max());
            runner.SetInjection(0, d, [l], plain.Length - 1, int.MaxValue);
        }
        f1[$"oracle_l{l}"].Add(AnswerMetrics.TokenF1(Generate(plain), item.Answer));
        // Once: only the last prompt position patched; the answer's positions read it through attention alone.
        runner.SetInjection(0, d, [l], plain.Length - 1, plain.Length);
        f1[$"oracle_l{l}_once"].Add(AnswerMetrics.TokenF1(Generate(plain), item.Answer));
        runner.ClearInjection(0);
    }
}

Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
    $"{items.Count} held-out questions (seed {seed}) of {heldout.Count} with a gold passage; greedy, at most {maxNew} new tokens; demo model, CPU"));
Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
    $"check: with d added after the last layer, the last prompt position's logits are prompt RAG's within {worstLastLayer:G3} (max over the questions)"));
Console.WriteLine($"the first answer token differs between none and prompt RAG in {firstDiffers} of {items.Count} questions");
Console.WriteLine("| mode | mean token F1 | recovery of prompt RAG's gain over none | ‖d‖ (mean) |");
Console.WriteLine("|---|---|---|---|");
var none = f1["none"].Average();
var prompt = f1["prompt"].Average();
foreach (var mode in modes)
{
    var mean = f1[mode].Average();
    var norm = mode.StartsWith("oracle_l", StringComparison.Ordinal) ? norms[mode[8] - '0'].Average().ToString("F2", CultureInfo.InvariantCulture) : "—";
    Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"| {mode} | {mean:F3} | {(mean - none) / (prompt - none):P1} | {norm} |"));
}
return 0;

// The residual stream after every layer at the sequence's last position: [layer, hidden].
float[] LastPositionStates(int[] ids) =>
    runner.ForwardEager([new EagerSequence(0, ids, 0)], [.. Enumerable.Range(0, layers)]).Captured
    ?? throw new InvalidOperationException("no hidden states returned");

// Greedy answer to the prompt: one eager step for the prompt, then one a token (the cache holds the rest), until EOS.
// lastFirst: the answer's first token (−1 for none).
string Generate(int[] prompt)
{
    var answer = new List<int>();
    var logits = runner.ForwardEager([new EagerSequence(0, prompt, 0)]).Logits;
    lastFirst = ArgMax(logits);
    for (var position = prompt.Length; answer.Count < maxNew; position++)
    {
        var next = ArgMax(logits);
        if (next == tokenizer.EosTokenId) break;
        answer.Add(next);
        logits = runner.ForwardEager([new EagerSequence(0, [next], position)]).Logits;
    }
    return tokenizer.Decode([.. answer]);
}

static int ArgMax(float[] values)
{
    var best = 0;
    for (var i = 1; i < values.Length; i++) if (values[i] > values[best]) best = i;
    return best;
}

int Argument(string name, int fallback)
{
    var index = Array.IndexOf(args, name);
    return index >= 0 && index + 1 < args.Length ? int.Parse(args[index + 1], CultureInfo.InvariantCulture) : fallback;
}

static string FindRoot()
{
    for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        if (File.Exists(Path.Combine(dir.FullName, "MoeRagInject.slnx"))) return dir.FullName;
    throw new DirectoryNotFoundException("the repository root (MoeRagInject.slnx) was not found above " + AppContext.BaseDirectory);
}
