using System.Text.Json.Nodes;

namespace MoeRagInject.Server.Tests;

/// <summary>One prompt of reference.json: ids from the Hugging Face tokenizer and the greedy continuation from transformers.</summary>
public sealed record ReferencePrompt(int Index, string Text, int[] InputIds, int[] GreedyIds)
{
    public override string ToString() => $"prompt {Index}";
}

public static class TestData
{
    private static readonly Lazy<string> Root = new(() =>
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "MoeRagInject.slnx"))) return dir.FullName;
        throw new InvalidOperationException($"no MoeRagInject.slnx above {AppContext.BaseDirectory}");
    });

    public static string RepoRoot => Root.Value;

    public static string CheckpointPath => Path.Combine(RepoRoot, "tests", "data", "reference", "a-fp32");

    private static readonly Lazy<IReadOnlyList<ReferencePrompt>> Prompts = new(LoadPrompts);

    public static IReadOnlyList<ReferencePrompt> ReferencePrompts => Prompts.Value;

    /// <summary>max_new_tokens the reference's greedy_ids were generated with.</summary>
    public const int ReferenceNewTokens = 12;

    public static IEnumerable<object[]> PromptIndices() => Enumerable.Range(0, 4).Select(i => new object[] { i });

    private static IReadOnlyList<ReferencePrompt> LoadPrompts()
    {
        var path = Path.Combine(CheckpointPath, "reference", "reference.json");
        var root = JsonNode.Parse(File.ReadAllText(path))!;
        return root["prompts"]!.AsArray().Select((p, i) => new ReferencePrompt(
            i, p!["text"]!.GetValue<string>(), Ids(p["input_ids"]!), Ids(p["greedy_ids"]!))).ToList();
    }

    /// <summary>The reference stores id lists either as JSON arrays or as strings holding one.</summary>
    private static int[] Ids(JsonNode node)
    {
        var array = node.GetValueKind() == System.Text.Json.JsonValueKind.String
            ? JsonNode.Parse(node.GetValue<string>())!.AsArray()
            : node.AsArray();
        return array.Select(x => x!.GetValue<int>()).ToArray();
    }

    public static JsonArray ToJson(IEnumerable<int> ids) => new(ids.Select(i => (JsonNode?)JsonValue.Create(i)).ToArray());

    public static int[] IntArray(JsonNode? node) => node!.AsArray().Select(x => x!.GetValue<int>()).ToArray();

    /// <summary>A few passages for the JSONL retriever; the quantum ones match the original's example query.</summary>
    public const string CorpusJsonl = """
        {"id": "q1", "title": "Quantum", "text": "A quantum is the smallest discrete amount of a physical quantity, such as a photon of light."}
        {"id": "q2", "title": "Quantum mechanics", "text": "Quantum mechanics describes matter at the scale of atoms with wave functions and probabilities."}
        {"id": "f1", "title": "Fox", "text": "The red fox is a small omnivorous mammal that is quick and lives in forests and cities."}
        {"id": "d1", "title": "Dog", "text": "The dog is a domesticated descendant of the wolf, sometimes lazy, often loyal."}
        {"id": "c1", "title": "Coffee", "text": "Coffee is a drink brewed from roasted coffee beans, served in a cafe."}
        """;
}
