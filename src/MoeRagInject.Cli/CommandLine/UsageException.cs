namespace MoeRagInject.Cli.CommandLine;

/// <summary>
/// A command-line mistake found only once a command runs (a combination the parser cannot judge, such as --modes latent
/// without a retriever): printed as one line, exit code 2, as the parser's own errors.
/// </summary>
public sealed class UsageException : Exception
{
    public UsageException(string message) : base(message) { }
    public UsageException() { }
    public UsageException(string message, Exception innerException) : base(message, innerException) { }
}
