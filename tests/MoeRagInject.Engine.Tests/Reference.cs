using System.Text.Json;
using MoeRagInject.Model;

namespace MoeRagInject.Engine.Tests;

public static class TestPaths
{
    public static string RepoRoot { get; } = FindRoot();

    private static string FindRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "MoeRagInject.slnx"))) return dir.FullName;
        throw new InvalidOperationException("repository root (MoeRagInject.slnx) not found above " + AppContext.BaseDirectory);
    }

    public static string Case(string name) => Path.Combine(RepoRoot, "tests", "data", "reference", name);

    public static string DefaultModel => Case("tiny-mixtral");

    /// <summary>The trained WordNet demo model (the embedded default of serve and generate).</summary>
    public static string DemoModel => Path.Combine(RepoRoot, "assets", "models", "moe-wordnet-demo");
}

/// <summary>Outputs of transformers' MixtralForCausalLM recorded by tools/reference/make_reference.py.</summary>
public sealed class ReferenceCase : IDisposable
{
    private readonly SafeTensorsFile _tensors;

    public ReferenceCase(string name)
    {
        Name = name;
        var folder = Path.Combine(TestPaths.Case(name), "reference");
        using var json = JsonDocument.Parse(File.ReadAllText(Path.Combine(folder, "reference.json")));
        Prompts = json.RootElement.GetProperty("prompts").EnumerateArray().Select(p => new ReferencePrompt(
            p.GetProperty("text").GetString()!,
            Ids(p, "input_ids"),
            Ids(p, "greedy_ids"),
            p.TryGetProperty("greedy_ids_native", out _) ? Ids(p, "greedy_ids_native") : null,
            Ids(p, "full_ids"))).ToList();
        _tensors = new SafeTensorsFile(Path.Combine(folder, "reference.safetensors"));
    }

    private static int[] Ids(JsonElement e, string name) => e.GetProperty(name).EnumerateArray().Select(x => x.GetInt32()).ToArray();

    public string Name { get; }
    public IReadOnlyList<ReferencePrompt> Prompts { get; }

    /// <summary>Checkpoint folder: the demo model keeps its weights in assets/.</summary>
    public string CheckpointPath => Name == "demo" ? TestPaths.DemoModel : TestPaths.Case(Name);

    public bool HasNative => _tensors.Tensors.ContainsKey("logits_native.0");

    public TensorView Tensor(string name) => _tensors.Tensors[name];

    public void Dispose() => _tensors.Dispose();
}

public sealed record ReferencePrompt(string Text, int[] InputIds, int[] GreedyIds, int[]? GreedyIdsNative, int[] FullIds);
