using System.CommandLine;
using System.Globalization;
using MoeRagInject.Cli.CommandLine;

namespace MoeRagInject.Server.Tests;

/// <summary>
/// The System.CommandLine parser against the inventory of the hand-written one it replaced: every flag keeps its name, its
/// synonyms, its value's name and its default, and help shows that default.
/// </summary>
public sealed class CliFlagInventoryTests
{
    /// <summary>Defaults changed on purpose since the inventory was taken, with the reason.</summary>
    private static readonly Dictionary<(string Command, string Flag), string> Changed = new()
    {
        // Issue 8: /v1/models names the model by its folder, not by an absolute path of the serving machine.
        [("serve", "--served-model-name")] = "the model folder's name",
        // Issue 9: calibrate also trains the router probe and measures AUROCs on questions it keeps back; 256 left too few.
        [("calibrate", "--limit")] = "1000",
    };

    public static IEnumerable<object[]> Flags() => CliFlagInventory.Cases();

    /// <summary>What a command needs besides options to parse without errors (defaults are applied to a valid parse only).</summary>
    private static readonly Dictionary<string, string[]> ValidArguments = new()
    {
        ["generate"] = ["What is Quantum?"],
        ["index"] = ["corpus.jsonl", "--output", "index.db"],
    };

    private static Command CommandNamed(string name) => CliRoot.Create().Subcommands.Single(c => c.Name == name);

    private static Option OptionNamed(Command command, string name)
        => command.Options.SingleOrDefault(o => o.Name == name || o.Aliases.Contains(name))
           ?? throw new Xunit.Sdk.XunitException($"{command.Name} has no option {name}");

    [Theory]
    [MemberData(nameof(Flags))]
    public void EveryFlagOfToday_KeepsItsNameValueNameAndDefault(CliFlag flag)
    {
        var command = CommandNamed(flag.Command);
        var option = OptionNamed(command, flag.Name);
        var expectedDefault = Changed.GetValueOrDefault((flag.Command, flag.Name), flag.Default!);

        if (flag.ValueName is null)
        {
            // A switch: a bool that is false unless given.
            Assert.Equal(typeof(bool), option.ValueType);
            string[] valid = ValidArguments.GetValueOrDefault(flag.Command, []);
            Assert.False(command.Parse(valid).GetValue<bool>(option.Name));
            Assert.True(command.Parse([.. valid, flag.Name]).GetValue<bool>(option.Name));
            return;
        }
        Assert.Equal(flag.ValueName, option.HelpName);
        if (expectedDefault is null)
        {
            Assert.False(option.HasDefaultValue, $"{flag} has a default it did not have");
            Assert.DoesNotContain("[default:", option.Description, StringComparison.Ordinal);
        }
        else if (option.HasDefaultValue)
        {
            // A default the parser holds: the typed value, as help prints it, and what a parse without the flag gives.
            Assert.Equal(expectedDefault, Format(option.GetDefaultValue()));
            Assert.Equal(expectedDefault, Format(command.Parse(ValidArguments.GetValueOrDefault(flag.Command, [])).GetValue<object>(option.Name)));
        }
        else
        {
            // A default decided later (all cores, the config's context length): said in help in the same form.
            Assert.EndsWith($"[default: {expectedDefault}]", option.Description, StringComparison.Ordinal);
        }
    }

    [Theory]
    [MemberData(nameof(Flags))]
    public void Help_ShowsEveryFlagOfToday_WithItsDefault(CliFlag flag)
    {
        var help = HelpOf(flag.Command);
        // One help row per option: "  --name, --synonym <VALUE>   description [default: X]", wrapped onto indented lines.
        var rows = System.Text.RegularExpressions.Regex.Split(help[help.IndexOf("\nOptions:\n", StringComparison.Ordinal)..], @"\n(?=  -)");
        static IEnumerable<string> Names(string row) => row.TrimStart().Split("  ")[0].Split(' ')[0..].Select(w => w.TrimEnd(',')).Where(w => w.StartsWith('-'));
        var row = rows.Single(r => Names(r).Contains(flag.Name));
        var oneLine = System.Text.RegularExpressions.Regex.Replace(row, @"\s+", " ");
        if (flag.ValueName is not null) Assert.Contains($"<{flag.ValueName}>", oneLine, StringComparison.Ordinal);
        if (Changed.GetValueOrDefault((flag.Command, flag.Name), flag.Default!) is { } expectedDefault)
            Assert.Contains($"[default: {expectedDefault}]", oneLine, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("--input-len", "--prompt-tokens")]
    [InlineData("--output-len", "--new-tokens")]
    public void Bench_Synonyms_AreOneOption(string name, string synonym)
    {
        var bench = CommandNamed("bench");
        Assert.Same(OptionNamed(bench, name), OptionNamed(bench, synonym));
        Assert.Equal(20, bench.Parse([synonym, "20"]).GetValue<int>(name));
    }

    [Fact]
    public void EveryCommandOfToday_Exists_AndTakesHelp()
    {
        foreach (var command in CliFlagInventory.Flags.Select(f => f.Command).Distinct())
        {
            foreach (var help in (string[])["-h", "--help"])
            {
                using var output = new StringWriter();
                Assert.Equal(0, CliRoot.Create().Parse([command, help]).Invoke(new InvocationConfiguration { Output = output }));
                Assert.Contains($"Usage:\n  moe-rag-inject {command} ", output.ToString(), StringComparison.Ordinal);
            }
        }
    }

    /// <summary>A value as System.CommandLine's help prints it: invariant numbers, lists joined by commas.</summary>
    private static string? Format(object? value) => value switch
    {
        null => null,
        string s => s,
        IFormattable f => f.ToString(null, CultureInfo.InvariantCulture),
        System.Collections.IEnumerable items => string.Join(",", items.Cast<object>()),
        _ => value.ToString(),
    };

    internal static string HelpOf(string command)
    {
        using var output = new StringWriter();
        var parse = CliRoot.Create().Parse([command, "--help"]);
        Assert.Equal(0, parse.Invoke(new InvocationConfiguration { Output = output }));
        return output.ToString();
    }
}
