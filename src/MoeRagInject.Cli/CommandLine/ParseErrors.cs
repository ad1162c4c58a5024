using System.CommandLine;
using System.CommandLine.Parsing;

namespace MoeRagInject.Cli.CommandLine;

/// <summary>
/// How a command-line mistake is reported: one line per error, each naming the flag or word at fault, with a pointer to
/// the command's --help and, for a misspelt flag or command, the nearest real one (as git and dotnet do).
/// </summary>
public static class ParseErrors
{
    public static IEnumerable<string> Describe(ParseResult parse)
    {
        ArgumentNullException.ThrowIfNull(parse);
        var command = parse.CommandResult.Command;
        var isRoot = command is RootCommand;
        var see = isRoot ? $"{Program.Name} --help" : $"{Program.Name} {command.Name} --help";
        var unmatched = parse.UnmatchedTokens;
        // The value after an unknown flag (--prot 3) is unmatched too; the flag's error is the one that matters.
        var tokens = parse.Tokens.Select(t => t.Value).ToList();
        var valuesOfUnknownFlags = new HashSet<string>(StringComparer.Ordinal);
        for (var i = 0; i + 1 < tokens.Count; i++)
            if (tokens[i].StartsWith('-') && unmatched.Contains(tokens[i]) && !tokens[i + 1].StartsWith('-') && unmatched.Contains(tokens[i + 1]))
                valuesOfUnknownFlags.Add(tokens[i + 1]);
        foreach (var error in parse.Errors)
        {
            if (valuesOfUnknownFlags.Any(v => error.Message.Contains($"'{v}'", StringComparison.Ordinal))) continue;
            // "frobnicate" at the top gives both "unrecognized" and "command not provided"; the first says it all.
            if (isRoot && unmatched.Count > 0 && error.SymbolResult is CommandResult && !error.Message.Contains('\'', StringComparison.Ordinal))
                continue;
            var message = error.Message;
            if (unmatched.FirstOrDefault(t => message.Contains($"'{t}'", StringComparison.Ordinal)) is { } token
                && Nearest(token, isRoot ? command.Subcommands.Select(c => c.Name) : command.Options.SelectMany(o => o.Aliases.Append(o.Name)))
                    is { } nearest)
                message += $" Did you mean {nearest}?";
            yield return $"{Program.Name}: {message} (see {see})";
        }
    }

    /// <summary>The candidate within edit distance 2 of <paramref name="word"/> (or that it starts), if there is one.</summary>
    private static string? Nearest(string word, IEnumerable<string> candidates)
    {
        if (word.Length < 3) return null;
        string? best = null;
        var bestDistance = 3;
        foreach (var candidate in candidates.Distinct())
        {
            var distance = candidate.StartsWith(word, StringComparison.Ordinal) ? 1 : Distance(word, candidate);
            if (distance >= bestDistance) continue;
            (best, bestDistance) = (candidate, distance);
        }
        return best;
    }

    /// <summary>Damerau-free Levenshtein distance (insertions, deletions, substitutions).</summary>
    private static int Distance(string a, string b)
    {
        var previous = new int[b.Length + 1];
        var current = new int[b.Length + 1];
        for (var j = 0; j <= b.Length; j++) previous[j] = j;
        for (var i = 1; i <= a.Length; i++)
        {
            current[0] = i;
            for (var j = 1; j <= b.Length; j++)
                current[j] = Math.Min(Math.Min(current[j - 1] + 1, previous[j] + 1), previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1));
            (previous, current) = (current, previous);
        }
        return previous[b.Length];
    }
}
