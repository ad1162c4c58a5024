namespace MoeRagInject.Model.Tests;

/// <summary>Locates the repository (the folder holding MoeRagInject.slnx) and its test data.</summary>
public static class TestPaths
{
    private static readonly Lazy<string> Root = new(() =>
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir != null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "MoeRagInject.slnx"))) return dir.FullName;
        }
        throw new InvalidOperationException($"MoeRagInject.slnx not found above {AppContext.BaseDirectory}");
    });

    public static string RepoRoot => Root.Value;

    public static string TestData(params string[] parts) => Path.Combine([RepoRoot, "tests", "data", .. parts]);
}
