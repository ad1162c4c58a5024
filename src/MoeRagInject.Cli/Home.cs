namespace MoeRagInject.Cli;

/// <summary>A user-facing failure (missing folder, unreadable file): printed as one line, exit code 1.</summary>
public sealed class CliException : Exception
{
    public CliException(string message) : base(message) { }
    public CliException() { }
    public CliException(string message, Exception innerException) : base(message, innerException) { }
}

/// <summary>The repository root, where the embedded model and corpus live under assets/.</summary>
public static class Home
{
    public const string EnvironmentVariable = "MOE_RAG_INJECT_HOME";
    private const string Marker = "MoeRagInject.slnx";

    /// <summary>$MOE_RAG_INJECT_HOME, else the nearest folder holding MoeRagInject.slnx above the executable, else above the working directory.</summary>
    public static string Locate()
    {
        if (Environment.GetEnvironmentVariable(EnvironmentVariable) is { Length: > 0 } fromEnvironment)
        {
            if (!Directory.Exists(fromEnvironment))
                throw new CliException($"{EnvironmentVariable} names a folder that does not exist: {fromEnvironment}");
            return Path.GetFullPath(fromEnvironment);
        }
        return FindUp(AppContext.BaseDirectory) ?? FindUp(Environment.CurrentDirectory)
            ?? throw new CliException($"cannot find the moe-rag-inject folder (no {Marker} above {AppContext.BaseDirectory}); set {EnvironmentVariable} or pass --model-path");
    }

    public static string? FindUp(string start)
    {
        for (var dir = new DirectoryInfo(start); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, Marker))) return dir.FullName;
        return null;
    }
}
