using MoeRagInject.Cli.Flags;
using MoeRagInject.Rag;

namespace MoeRagInject.Cli.Commands;

public static class IndexCommand
{
    public static FlagSet Flags() => new FlagSet(
            "index", "index <files...> --output <index.db> [flags]",
            "Adds passages to a SQLite FTS5 index (BM25) for --retriever: .jsonl files hold one {\"id\", \"title\", \"text\"} object\n"
            + "per line; other files are plain text split at blank lines.")
        .Add(new("output", FlagKind.String, "the index file to create or add to", null, "INDEX.db"))
        .Add(new("max-passage-chars", FlagKind.Int, "plain-text paragraphs longer than this are cut", "800", "N"));

    public static int Run(IReadOnlyList<string> args)
    {
        if (Flags().ParseOrPrintHelp(args) is not { } flags) return 0;
        var output = flags.String("output") ?? throw new UsageException($"index needs --output <index.db> (see {Program.Name} index --help)");
        if (flags.Positionals.Count == 0) throw new UsageException("index needs at least one input file");
        var maxChars = flags.IntIn("max-passage-chars", 50) ?? 800;
        foreach (var file in flags.Positionals)
            if (!File.Exists(file)) throw new CliException($"input file not found: {file}");
        var outputDirectory = Path.GetDirectoryName(Path.GetFullPath(output))!;
        if (!Directory.Exists(outputDirectory)) throw new CliException($"the folder for --output does not exist: {outputDirectory}");

        var count = CorpusIndex.Build(flags.Positionals, output, maxChars);
        Console.Out.WriteLine($"indexed {count} passages from {flags.Positionals.Count} file(s) into {output}");
        return 0;
    }
}
