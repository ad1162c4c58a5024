using System.CommandLine;
using System.CommandLine.Help;
using System.CommandLine.Invocation;
using MoeRagInject.Cli.Commands;

namespace MoeRagInject.Cli.CommandLine;

/// <summary>The command tree: one System.CommandLine command per subcommand, each with its typed options and action.</summary>
public static class CliRoot
{
    /// <summary>Help is wrapped to the terminal, and to this width when written to a file or a pipe.</summary>
    public const int RedirectedHelpWidth = 120;

    /// <summary>One line per command, for the program's own --help.</summary>
    private static readonly Dictionary<string, string> Summaries = new(StringComparer.Ordinal)
    {
        ["serve"] = "run the HTTP server (sglang's /generate and OpenAI-compatible /v1 routes)",
        ["generate"] = "generate from one prompt in-process: the text on stdout, notices and RAG events on stderr",
        ["index"] = "build a SQLite FTS5 retrieval index from .jsonl or text files",
        ["bench"] = "measure prefill and decode throughput, RAG off and on",
        ["calibrate"] = "entropy percentiles and threshold; fit the latent-injection projection P",
        ["eval"] = "answer quality, retrievals, latency and trigger AUROC for every RAG mode",
        ["check-device"] = "check a GPU: ops against the CPU backend, graphs, the model against transformers",
    };

    public static RootCommand Create()
    {
        var root = new RootCommand(
            "A serving engine for Mixture-of-Experts models that watches router entropy while it decodes and injects retrieved text.")
        {
            ServeCommand.Create(),
            GenerateCommand.Create(),
            IndexCommand.Create(),
            BenchCommand.Create(),
#if WITH_EVALUATION
            CalibrateCommand.Create(),
            EvalCommand.Create(),
#else
            NotInThisBuild("calibrate"),
            NotInThisBuild("eval"),
#endif
            CheckDeviceCommand.Create(),
        };
        // Usage lines name the program, not the process that hosts it (dotnet, or a test host).
        root.HelpName = Program.Name;
        foreach (var option in root.Options)
        {
            if (option is not HelpOption { Action: HelpAction help }) continue;
            help.MaxWidth = Console.IsOutputRedirected ? RedirectedHelpWidth : Math.Max(80, WindowWidth());
            option.Action = new CliHelpAction(root, help);
        }
        return root;
    }

    private static int WindowWidth()
    {
        try
        {
            return Console.WindowWidth;
        }
        catch (IOException)
        {
            return RedirectedHelpWidth;
        }
    }

    /// <summary>
    /// System.CommandLine's help for a command; for the program itself, one line per command (System.CommandLine would print
    /// each command's whole description there).
    /// </summary>
    private sealed class CliHelpAction(RootCommand root, HelpAction commandHelp) : SynchronousCommandLineAction
    {
        public override bool ClearsParseErrors => true;

        public override int Invoke(ParseResult parseResult)
        {
            ArgumentNullException.ThrowIfNull(parseResult);
            if (parseResult.CommandResult.Command != root) return commandHelp.Invoke(parseResult);
            var output = parseResult.InvocationConfiguration.Output;
            output.WriteLine($"Description:\n  {root.Description}\n\nUsage:\n  {Program.Name} <command> [options]\n\nCommands:");
            var commands = root.Subcommands.Where(c => !c.Hidden).ToList();
            var width = commands.Max(c => c.Name.Length) + 2;
            foreach (var command in commands)
                output.WriteLine($"  {command.Name.PadRight(width)}{(Summaries.TryGetValue(command.Name, out var summary) ? summary : command.Description)}");
            output.WriteLine("\nOptions:\n  -?, -h, --help  Show help and usage information\n  --version       Show version information\n");
            output.WriteLine($"'{Program.Name} <command> --help' lists a command's options and their defaults.");
            return 0;
        }
    }

#if !WITH_EVALUATION
    /// <summary>A command left out of the lean GPU build: it exists only to say so.</summary>
    private static Command NotInThisBuild(string name)
    {
        var command = new Command(name, "not in this build (built without the evaluation, for a GPU machine)")
        {
            TreatUnmatchedTokensAsErrors = false,
        };
        command.SetAction(int (_) =>
            throw new UsageException($"{name} is not in this build (it was built without the evaluation, for a GPU machine)"));
        return command;
    }
#endif
}
