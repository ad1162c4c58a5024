using System.CommandLine;
using System.CommandLine.Parsing;
using System.Globalization;

namespace MoeRagInject.Cli.CommandLine;

/// <summary>
/// Typed System.CommandLine options as this CLI spells them: long names only, a value name in help (<c>--port &lt;PORT&gt;</c>),
/// numbers in the invariant culture, and every bad value reported as <c>invalid value for --name: ...</c>, so that the
/// message names the flag. A default the parser can hold is a typed default (help shows it as <c>[default: X]</c>); a
/// default decided later (all cores, the model's own context length) is null here and shown in help in the same form.
/// </summary>
public static class CliOption
{
    /// <summary>An integer in [min, max] with a default.</summary>
    public static Option<int> Int(string name, string description, string valueName, int @default, int min = int.MinValue, int max = int.MaxValue)
        => new Option<int>(name)
        {
            Description = description,
            HelpName = valueName,
            DefaultValueFactory = _ => @default,
            CustomParser = r => ParseInt(r, min, max) ?? @default,
        };

    /// <summary>An integer in [min, max], null when absent; <paramref name="shownDefault"/> says in help what absent means.</summary>
    public static Option<int?> OptionalInt(string name, string description, string valueName, string? shownDefault = null,
        int min = int.MinValue, int max = int.MaxValue)
        => new Option<int?>(name)
        {
            Description = WithDefault(description, shownDefault),
            HelpName = valueName,
            CustomParser = r => ParseInt(r, min, max),
        };

    /// <summary>A finite number in [min, max] with a default.</summary>
    public static Option<double> Double(string name, string description, string valueName, double @default,
        double min = double.NegativeInfinity, double max = double.PositiveInfinity)
        => new Option<double>(name)
        {
            Description = description,
            HelpName = valueName,
            DefaultValueFactory = _ => @default,
            CustomParser = r => ParseDouble(r, min, max) ?? @default,
        };

    /// <summary>A finite number in [min, max], null when absent.</summary>
    public static Option<double?> OptionalDouble(string name, string description, string valueName, string? shownDefault = null,
        double min = double.NegativeInfinity, double max = double.PositiveInfinity)
        => new Option<double?>(name)
        {
            Description = WithDefault(description, shownDefault),
            HelpName = valueName,
            CustomParser = r => ParseDouble(r, min, max),
        };

    /// <summary>A string with a default.</summary>
    public static Option<string> Text(string name, string description, string valueName, string @default)
        => new Option<string>(name) { Description = description, HelpName = valueName, DefaultValueFactory = _ => @default };

    /// <summary>A string, null when absent.</summary>
    public static Option<string?> OptionalText(string name, string description, string valueName, string? shownDefault = null)
        => new Option<string?>(name) { Description = WithDefault(description, shownDefault), HelpName = valueName };

    /// <summary>One of <paramref name="choices"/>, case-insensitive, returned lower-case; offered by tab completion.</summary>
    public static Option<string> Choice(string name, string description, string @default, params string[] choices)
    {
        var option = new Option<string>(name)
        {
            Description = description,
            HelpName = string.Join('|', choices),
            DefaultValueFactory = _ => @default,
            CustomParser = r =>
            {
                if (r.Tokens.Count == 0) return @default;
                var value = r.Tokens[^1].Value;
                var lower = value.ToLowerInvariant();
                if (choices.Contains(lower, StringComparer.Ordinal)) return lower;
                r.AddError($"invalid value for {name}: '{value}' (expected {Alternatives(choices)})");
                return @default;
            },
        };
        option.CompletionSources.Add(choices);
        return option;
    }

    /// <summary>A switch: present means true (<c>--flag true</c>/<c>--flag=false</c> also work).</summary>
    public static Option<bool> Switch(string name, string description)
        => new Option<bool>(name) { Description = description };

    /// <summary>
    /// A comma-separated list of integers, each at least <paramref name="min"/>; null when absent. <paramref name="allWord"/>
    /// (e.g. "all") stands for every one and parses to the empty list, which the flag cannot otherwise give (System.CommandLine
    /// takes a parser's null for a failure).
    /// </summary>
    public static Option<IReadOnlyList<int>?> IntList(string name, string description, string valueName, string? shownDefault,
        string? allWord = null, int min = int.MinValue)
    {
        var option = new Option<IReadOnlyList<int>?>(name)
        {
            Description = WithDefault(description, shownDefault),
            HelpName = valueName,
            Arity = ArgumentArity.ExactlyOne,
            CustomParser = r =>
            {
                if (r.Tokens.Count == 0) return null;
                var text = r.Tokens[^1].Value;
                if (allWord is not null && text.Equals(allWord, StringComparison.OrdinalIgnoreCase)) return [];
                var items = Split(text);
                if (items.Length == 0)
                {
                    r.AddError($"invalid value for {name}: the list is empty");
                    return null;
                }
                var values = new int[items.Length];
                for (var i = 0; i < items.Length; i++)
                {
                    if (!int.TryParse(items[i], NumberStyles.Integer, CultureInfo.InvariantCulture, out values[i]))
                    {
                        r.AddError($"invalid value for {name}: '{items[i]}' is not an integer"
                            + (allWord is null ? "" : $" (give {allWord} or a list such as 0,2,3)"));
                        return null;
                    }
                    if (values[i] < min)
                    {
                        r.AddError(string.Create(CultureInfo.InvariantCulture, $"invalid value for {name}: {values[i]} (must be >= {min})"));
                        return null;
                    }
                }
                return values;
            },
        };
        if (allWord is not null) option.CompletionSources.Add(allWord);
        return option;
    }

    /// <summary>A comma-separated list of words, null when absent; with <paramref name="choices"/>, each must be one of them (any case).</summary>
    public static Option<IReadOnlyList<string>?> List(string name, string description, string valueName, string? shownDefault,
        IReadOnlyList<string>? choices = null)
    {
        var option = new Option<IReadOnlyList<string>?>(name)
        {
            Description = WithDefault(description, shownDefault),
            HelpName = valueName,
            Arity = ArgumentArity.ExactlyOne,
            CustomParser = r =>
            {
                if (r.Tokens.Count == 0) return null;
                var items = Split(r.Tokens[^1].Value);
                if (choices is not null)
                {
                    items = [.. items.Select(i => i.ToLowerInvariant())];
                    foreach (var item in items)
                    {
                        if (choices.Contains(item, StringComparer.Ordinal)) continue;
                        r.AddError($"invalid value for {name}: '{item}' (expected any of {string.Join(", ", choices)})");
                        return null;
                    }
                }
                return items;
            },
        };
        if (choices is not null) option.CompletionSources.Add([.. choices]);
        return option;
    }

    /// <summary>Stop strings and the like: split at commas, empty items dropped, items trimmed.</summary>
    public static string[] Split(string text) => text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);

    /// <summary>"a, b or c".</summary>
    public static string Alternatives(IReadOnlyList<string> choices)
        => choices.Count == 1 ? choices[0] : $"{string.Join(", ", choices.Take(choices.Count - 1))} or {choices[^1]}";

    /// <summary>The form System.CommandLine uses for a typed default, for defaults the parser cannot hold.</summary>
    private static string WithDefault(string description, string? shownDefault)
        => shownDefault is null ? description : $"{description} [default: {shownDefault}]";


    private static int? ParseInt(ArgumentResult result, int min, int max)
    {
        if (result.Tokens.Count == 0) return null;
        var text = result.Tokens[^1].Value;
        if (!int.TryParse(text, NumberStyles.Integer, CultureInfo.InvariantCulture, out var value))
        {
            result.AddError($"invalid value for {OptionName(result)}: '{text}' is not an integer");
            return null;
        }
        if (value < min || value > max)
        {
            result.AddError(max == int.MaxValue
                ? string.Create(CultureInfo.InvariantCulture, $"invalid value for {OptionName(result)}: {value} (must be >= {min})")
                : string.Create(CultureInfo.InvariantCulture, $"invalid value for {OptionName(result)}: {value} (must be in [{min}, {max}])"));
            return null;
        }
        return value;
    }

    private static double? ParseDouble(ArgumentResult result, double min, double max)
    {
        if (result.Tokens.Count == 0) return null;
        var text = result.Tokens[^1].Value;
        if (!double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out var value) || !double.IsFinite(value))
        {
            result.AddError($"invalid value for {OptionName(result)}: '{text}' is not a number");
            return null;
        }
        if (value < min || value > max)
        {
            result.AddError(double.IsPositiveInfinity(max)
                ? string.Create(CultureInfo.InvariantCulture, $"invalid value for {OptionName(result)}: {value} (must be >= {min})")
                : string.Create(CultureInfo.InvariantCulture, $"invalid value for {OptionName(result)}: {value} (must be in [{min}, {max}])"));
            return null;
        }
        return value;
    }

    private static string OptionName(ArgumentResult result) => result.Parent is OptionResult o ? o.Option.Name : result.Argument.Name;
}
