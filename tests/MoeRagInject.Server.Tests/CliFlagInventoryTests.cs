using MoeRagInject.Cli.Commands;
using MoeRagInject.Cli.Flags;

namespace MoeRagInject.Server.Tests;

/// <summary>The inventory is today's parser: every flag it lists is defined with that default, and nothing is missing.</summary>
public sealed class CliFlagInventoryTests
{
    private static readonly Dictionary<string, FlagSet> Commands = new()
    {
        ["serve"] = ServeCommand.Flags(), ["generate"] = GenerateCommand.Flags(), ["index"] = IndexCommand.Flags(),
        ["bench"] = BenchCommand.Flags(), ["calibrate"] = CalibrateCommand.Flags(), ["eval"] = EvalCommand.Flags(),
        ["check-device"] = CheckDeviceCommand.Flags(),
    };

    [Fact]
    public void Inventory_IsTheHandWrittenParser()
    {
        foreach (var (command, set) in Commands)
        {
            var help = set.Help();
            var listed = CliFlagInventory.Flags.Where(f => f.Command == command).ToList();
            foreach (var flag in listed)
            {
                var line = help.Split('\n').Single(l => l.StartsWith("  " + flag.Name + " ", StringComparison.Ordinal) || l == "  " + flag.Name
                    || l.StartsWith("  " + flag.Name + "  ", StringComparison.Ordinal));
                if (flag.ValueName is { } value) Assert.StartsWith($"  {flag.Name} {value}", line, StringComparison.Ordinal);
            }
            var defined = help.Split('\n').Where(l => l.StartsWith("  --", StringComparison.Ordinal)).Select(l => l.Trim().Split(' ')[0]).ToList();
            Assert.Equal(defined, listed.Select(f => f.Name));
            foreach (var flag in listed.Where(f => f.Default is not null))
                Assert.Contains($"(default: {flag.Default})", help, StringComparison.Ordinal);
        }
    }
}
