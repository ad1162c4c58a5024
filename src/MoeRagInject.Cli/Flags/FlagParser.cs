using System.Globalization;
using System.Text;

namespace MoeRagInject.Cli.Flags;

/// <summary>A command-line mistake: printed as one line, exit code 2.</summary>
public sealed class UsageException : Exception
{
    public UsageException(string message) : base(message) { }
    public UsageException() { }
    public UsageException(string message, Exception innerException) : base(message, innerException) { }
}

public enum FlagKind { String, Int, Double, Bool, List }

/// <param name="Name">Without the leading dashes.</param>
/// <param name="ValueName">How the value reads in help (e.g. PATH); null uses the kind.</param>
/// <param name="Default">Shown in help only; the command applies its own defaults.</param>
public sealed record FlagSpec(string Name, FlagKind Kind, string Help, string? Default = null, string? ValueName = null);

/// <summary>
/// The flags of one subcommand: <c>--flag value</c> and <c>--flag=value</c>; bools as a bare <c>--flag</c> (or <c>--flag=false</c>);
/// lists comma-separated; <c>--</c> ends the flags. Values are type-checked while parsing, so a bad one fails before any work starts.
/// </summary>
public sealed class FlagSet(string command, string usage, string summary)
{
    private readonly List<FlagSpec> _specs = [];
    private readonly Dictionary<string, FlagSpec> _byName = new(StringComparer.Ordinal);

    public string Command { get; } = command;

    public FlagSet Add(FlagSpec spec)
    {
        ArgumentNullException.ThrowIfNull(spec);
        if (!_byName.TryAdd(spec.Name, spec)) throw new InvalidOperationException($"flag --{spec.Name} defined twice");
        _specs.Add(spec);
        return this;
    }

    public FlagSet AddRange(IEnumerable<FlagSpec> specs)
    {
        foreach (var spec in specs ?? []) Add(spec);
        return this;
    }

    /// <summary>Parses the flags; when --help was asked, prints the help instead and returns null (the command then exits 0).</summary>
    public ParsedFlags? ParseOrPrintHelp(IReadOnlyList<string> args)
    {
        var flags = Parse(args);
        if (!flags.HelpRequested) return flags;
        Console.Out.Write(Help());
        return null;
    }

    public ParsedFlags Parse(IReadOnlyList<string> args)
    {
        ArgumentNullException.ThrowIfNull(args);
        var values = new Dictionary<string, string>(StringComparer.Ordinal);
        var positionals = new List<string>();
        var help = false;
        for (var i = 0; i < args.Count; i++)
        {
            var arg = args[i];
            if (arg == "--")
            {
                positionals.AddRange(args.Skip(i + 1));
                break;
            }
            if (arg is "-h" or "--help")
            {
                help = true;
                continue;
            }
            if (!arg.StartsWith("--", StringComparison.Ordinal) || arg.Length == 2)
            {
                if (arg.Length > 1 && arg[0] == '-' && char.IsAsciiLetter(arg[1]))
                    throw new UsageException($"unknown flag {arg} for '{Command}' (flags are spelt --name; see {Program.Name} {Command} --help)");
                positionals.Add(arg);
                continue;
            }
            var eq = arg.IndexOf('=', StringComparison.Ordinal);
            var name = eq < 0 ? arg[2..] : arg[2..eq];
            if (!_byName.TryGetValue(name, out var spec))
                throw new UsageException($"unknown flag --{name} for '{Command}' (see {Program.Name} {Command} --help)");
            string value;
            if (eq >= 0) value = arg[(eq + 1)..];
            else if (spec.Kind == FlagKind.Bool) value = "true";
            else if (i + 1 < args.Count) value = args[++i];
            else throw new UsageException($"--{name} needs a value ({Describe(spec)})");
            Check(spec, value);
            values[name] = value;
        }
        return new ParsedFlags(this, values, positionals, help);
    }

    internal FlagSpec Spec(string name)
        => _byName.TryGetValue(name, out var spec) ? spec : throw new InvalidOperationException($"flag --{name} is not defined for {Command}");

    private static void Check(FlagSpec spec, string value)
    {
        var ok = spec.Kind switch
        {
            FlagKind.Int => int.TryParse(value, NumberStyles.Integer, CultureInfo.InvariantCulture, out _),
            FlagKind.Double => double.TryParse(value, NumberStyles.Float, CultureInfo.InvariantCulture, out var d) && double.IsFinite(d),
            FlagKind.Bool => value is "true" or "false" or "1" or "0",
            _ => true,
        };
        if (!ok) throw new UsageException($"invalid value for --{spec.Name}: '{value}' is not {Describe(spec)}");
    }

    private static string Describe(FlagSpec spec) => spec.Kind switch
    {
        FlagKind.Int => "an integer",
        FlagKind.Double => "a number",
        FlagKind.Bool => "true or false",
        FlagKind.List => "a comma-separated list",
        _ => "a string",
    };

    public string Help()
    {
        var text = new StringBuilder();
        text.Append(CultureInfo.InvariantCulture, $"usage: {Program.Name} {usage}\n\n{summary}\n");
        if (_specs.Count == 0) return text.ToString();
        text.Append("\nflags:\n");
        var lefts = _specs.Select(s => s.Kind == FlagKind.Bool ? $"--{s.Name}" : $"--{s.Name} {s.ValueName ?? s.Kind.ToString().ToUpperInvariant()}").ToList();
        var width = Math.Min(lefts.Max(l => l.Length), 34) + 2;
        for (var i = 0; i < _specs.Count; i++)
        {
            text.Append("  ").Append(lefts[i].PadRight(width));
            if (lefts[i].Length >= width) text.Append('\n').Append(' ', width + 2);
            text.Append(_specs[i].Help);
            if (_specs[i].Default is { } d) text.Append(CultureInfo.InvariantCulture, $" (default: {d})");
            text.Append('\n');
        }
        text.Append("  ").Append("-h, --help".PadRight(width)).Append("show this help\n");
        return text.ToString();
    }
}

public sealed class ParsedFlags
{
    private readonly FlagSet _set;
    private readonly Dictionary<string, string> _values;

    internal ParsedFlags(FlagSet set, Dictionary<string, string> values, List<string> positionals, bool help)
    {
        _set = set;
        _values = values;
        Positionals = positionals;
        HelpRequested = help;
    }

    public IReadOnlyList<string> Positionals { get; }
    public bool HelpRequested { get; }

    public bool Has(string name)
    {
        _set.Spec(name);
        return _values.ContainsKey(name);
    }

    public string? String(string name)
    {
        _set.Spec(name);
        return _values.TryGetValue(name, out var value) ? value : null;
    }

    public int? Int(string name) => String(name) is { } v ? int.Parse(v, CultureInfo.InvariantCulture) : null;

    public double? Double(string name) => String(name) is { } v ? double.Parse(v, CultureInfo.InvariantCulture) : null;

    public bool Bool(string name) => String(name) is "true" or "1";

    /// <summary>A comma-separated list, empty items dropped.</summary>
    public IReadOnlyList<string>? List(string name)
        => String(name) is { } v ? v.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries) : null;

    /// <summary>A comma-separated list of integers; <paramref name="all"/> (e.g. "all") means null.</summary>
    public IReadOnlyList<int>? IntList(string name, string? all = null)
    {
        if (String(name) is not { } v) return null;
        if (all is not null && v.Equals(all, StringComparison.OrdinalIgnoreCase)) return null;
        var items = List(name)!;
        var result = new int[items.Count];
        for (var i = 0; i < items.Count; i++)
            if (!int.TryParse(items[i], NumberStyles.Integer, CultureInfo.InvariantCulture, out result[i]))
                throw new UsageException($"invalid value for --{name}: '{items[i]}' is not an integer"
                    + (all is null ? "" : $" (give {all} or a list such as 0,2,3)"));
        if (result.Length == 0) throw new UsageException($"invalid value for --{name}: the list is empty");
        return result;
    }

    /// <summary>Throws unless the value is in [min, max].</summary>
    public int? IntIn(string name, int min, int max = int.MaxValue)
    {
        var value = Int(name);
        if (value is { } v && (v < min || v > max))
            throw new UsageException(max == int.MaxValue
                ? $"invalid value for --{name}: {v} (must be >= {min})"
                : $"invalid value for --{name}: {v} (must be in [{min}, {max}])");
        return value;
    }

    public double? DoubleIn(string name, double min, double max = double.PositiveInfinity)
    {
        var value = Double(name);
        if (value is { } v && (v < min || v > max))
            throw new UsageException(double.IsPositiveInfinity(max)
                ? string.Create(CultureInfo.InvariantCulture, $"invalid value for --{name}: {v} (must be >= {min})")
                : string.Create(CultureInfo.InvariantCulture, $"invalid value for --{name}: {v} (must be in [{min}, {max}])"));
        return value;
    }

    /// <summary>One of <paramref name="choices"/> (case-insensitive), returned lower-case.</summary>
    public string? Choice(string name, params string[] choices)
    {
        if (String(name) is not { } v) return null;
        var lower = v.ToLowerInvariant();
        if (!choices.Contains(lower, StringComparer.Ordinal))
            throw new UsageException($"invalid value for --{name}: '{v}' (expected {string.Join(", ", choices.SkipLast(1))} or {choices[^1]})");
        return lower;
    }
}
