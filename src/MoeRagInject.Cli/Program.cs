using MoeRagInject.Cli.Commands;
using MoeRagInject.Cli.Flags;

namespace MoeRagInject.Cli;

public static class Program
{
    public const string Name = "moe-rag-inject";

    private const string Usage = """
        usage: moe-rag-inject <command> [flags]

        commands:
          serve      run the HTTP server (sglang's /generate and OpenAI-compatible /v1 routes)
          generate   generate from one prompt in-process and print the text and the RAG events
          index      build a SQLite FTS5 retrieval index from .jsonl or text files
          bench      measure prefill and decode throughput, RAG off and on
          calibrate  entropy percentiles and threshold; fit the latent-injection projection P
          eval       answer quality, retrievals, latency and trigger AUROC for every RAG mode
          check-device  check a GPU: ops against the CPU backend, graphs, the model against transformers

        moe-rag-inject <command> --help shows a command's flags.
        """;

    public static async Task<int> Main(string[] args)
    {
        ArgumentNullException.ThrowIfNull(args);
        try
        {
            if (args.Length == 0)
            {
                await Console.Error.WriteLineAsync(Usage).ConfigureAwait(false);
                return 2;
            }
            var rest = args[1..];
            return args[0] switch
            {
                "serve" => await ServeCommand.RunAsync(rest).ConfigureAwait(false),
                "generate" => await GenerateCommand.RunAsync(rest).ConfigureAwait(false),
                "index" => IndexCommand.Run(rest),
                "bench" => await BenchCommand.RunAsync(rest).ConfigureAwait(false),
#if WITH_EVALUATION
                "calibrate" => await CalibrateCommand.RunAsync(rest).ConfigureAwait(false),
                "eval" => await EvalCommand.RunAsync(rest).ConfigureAwait(false),
#else
                "calibrate" or "eval" => throw new UsageException($"{args[0]} is not in this build (it was built without the evaluation, for a GPU machine)"),
#endif
                "check-device" => await CheckDeviceCommand.RunAsync(rest).ConfigureAwait(false),
                "-h" or "--help" or "help" => WriteUsage(),
                "--version" => WriteVersion(),
                var other => throw new UsageException($"unknown command '{other}' (expected serve, generate, index, bench, calibrate or eval; see {Name} --help)"),
            };
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

    private static int WriteUsage()
    {
        Console.Out.WriteLine(Usage);
        return 0;
    }

    private static int WriteVersion()
    {
        Console.Out.WriteLine($"{Name} {typeof(Program).Assembly.GetName().Version}");
        return 0;
    }
}
