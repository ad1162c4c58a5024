using System.CommandLine;
using System.CommandLine.Invocation;
using MoeRagInject.Cli.CommandLine;

namespace MoeRagInject.Cli;

public static class Program
{
    public const string Name = "moe-rag-inject";

    /// <summary>Exit codes: 0 done, 1 a failure (a missing folder, a model that does not load), 2 a command-line mistake, 130 cancelled.</summary>
    public static async Task<int> Main(string[] args)
    {
        ArgumentNullException.ThrowIfNull(args);
        var root = CliRoot.Create();
        if (args.Length == 0)
        {
            // No command: the list of commands, on stderr since nothing was done.
            await root.Parse(["--help"]).InvokeAsync(new InvocationConfiguration { Output = Console.Error }).ConfigureAwait(false);
            return 2;
        }
        var parse = root.Parse(args);
        if (parse.Action is ParseErrorAction)
        {
            // One line per mistake, each naming the flag; exit 2, as argparse (sglang's parser) does.
            foreach (var line in ParseErrors.Describe(parse))
                await Console.Error.WriteLineAsync(line).ConfigureAwait(false);
            return 2;
        }
        // The commands handle Ctrl+C themselves (serve through the host's lifetime, generate by cancelling its request), and
        // their exceptions are reported below as one line.
        var invocation = new InvocationConfiguration { EnableDefaultExceptionHandler = false, ProcessTerminationTimeout = null };
        try
        {
            return await parse.InvokeAsync(invocation).ConfigureAwait(false);
        }
        catch (UsageException e)
        {
            await Console.Error.WriteLineAsync($"{Name}: {e.Message}").ConfigureAwait(false);
            return 2;
        }
        catch (OperationCanceledException)
        {
            await Console.Error.WriteLineAsync($"{Name}: cancelled").ConfigureAwait(false);
            return 130;
        }
        catch (Exception e)
        {
            // User errors (a missing folder, a malformed corpus line, a model that does not load) are one line;
            // MOE_RAG_INJECT_DEBUG=1 shows the stack trace when it is a bug to report.
            var message = Unwrap(e).Message;
            await Console.Error.WriteLineAsync($"{Name}: error: {message}").ConfigureAwait(false);
            if (Environment.GetEnvironmentVariable("MOE_RAG_INJECT_DEBUG") is "1" or "true")
                await Console.Error.WriteLineAsync(e.ToString()).ConfigureAwait(false);
            return 1;
        }
    }

    /// <summary>The exception that says what went wrong: the inner one of a task's AggregateException, else itself.</summary>
    public static Exception Unwrap(Exception e)
    {
        while (e is AggregateException { InnerExceptions.Count: 1 } aggregate) e = aggregate.InnerExceptions[0];
        return e;
    }
}
