using System.Text.Json;
using MoeRagInject.Model.Tokenization;

namespace MoeRagInject.Model.Tests;

/// <summary>
/// Templates rendered by the real jinja2 (3.1.6) configured as transformers configures it for chat templates;
/// Data/make_jinja_cases.py regenerates Data/jinja_cases.json.
/// </summary>
public class JinjaReferenceTests
{
    private static readonly Lazy<JsonElement> Doc = new(() =>
        JsonDocument.Parse(File.ReadAllText(Path.Combine(TestPaths.RepoRoot, "tests", "MoeRagInject.Model.Tests", "Data", "jinja_cases.json")))
            .RootElement.Clone());

    public static TheoryData<int> Cases()
    {
        var data = new TheoryData<int>();
        for (int i = 0; i < Doc.Value.GetProperty("cases").GetArrayLength(); i++) data.Add(i);
        return data;
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void RendersLikeJinja2(int index)
    {
        var c = Doc.Value.GetProperty("cases")[index];
        var variables = Doc.Value.GetProperty("variables").EnumerateObject().ToDictionary(p => p.Name, p => (object?)p.Value);
        string template = c.GetProperty("template").GetString()!;
        Assert.Equal(c.GetProperty("rendered").GetString(), JinjaTemplate.Parse(template).Render(variables));
    }
}
