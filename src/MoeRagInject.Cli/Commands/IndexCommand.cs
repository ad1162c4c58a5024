using System.CommandLine;
using MoeRagInject.Cli.CommandLine;
using MoeRagInject.Rag;

namespace MoeRagInject.Cli.Commands;

/// <summary><c>index</c>: builds (or adds to) the SQLite FTS5 index that --retriever reads.</summary>
public static class IndexCommand
{
    public static Command Create()
    {
        var files = new Argument<string[]>("files")
        {
            Description = ".jsonl or .jsonl.gz files of {\"id\", \"title\", \"text\"} objects, or plain text files",
            Arity = ArgumentArity.ZeroOrMore,
        };
        var output = CliOption.OptionalText("--output", "the index file to create or add to", "INDEX.db");
        var maxPassageChars = CliOption.Int("--max-passage-chars", "plain-text paragraphs longer than this are cut", "N", 800, min: 50);
        var command = new Command("index",
            "Adds passages to a SQLite FTS5 index (BM25) for --retriever: .jsonl files hold one {\"id\", \"title\", \"text\"} object "
            + "per line; other files are plain text split at blank lines.")
        {
            files, output, maxPassageChars,
        };
        command.Validators.Add(result =>
        {
            if (result.GetValue(output) is null) result.AddError("index needs --output <index.db>");
            else if (result.GetValue(files) is not { Length: > 0 }) result.AddError("index needs at least one input file");
        });
        command.SetAction(parse => Run(parse.GetRequiredValue(files), parse.GetRequiredValue(output)!, parse.GetValue(maxPassageChars)));
        return command;
    }

    private static int Run(string[] files, string output, int maxChars)
    {
        foreach (var file in files)
            if (!File.Exists(file)) throw new CliException($"input file not found: {file}");
        var outputDirectory = Path.GetDirectoryName(Path.GetFullPath(output))!;
        if (!Directory.Exists(outputDirectory)) throw new CliException($"the folder for --output does not exist: {outputDirectory}");

        var count = CorpusIndex.Build(files, output, maxChars);
        Console.Out.WriteLine($"indexed {count} passages from {files.Length} file(s) into {output}");
        return 0;
    }
}
