using System.Text;

namespace MoeRagInject.Model.Tokenization;

/// <summary>How a template is lexed; the defaults are those transformers uses for chat templates.</summary>
public sealed record JinjaOptions
{
    /// <summary>Remove the first newline after a block tag (<c>%}</c>) or comment.</summary>
    public bool TrimBlocks { get; init; } = true;

    /// <summary>Remove spaces and tabs from the start of a line up to a block tag or comment.</summary>
    public bool LStripBlocks { get; init; } = true;

    /// <summary>Keep a single trailing newline of the template source (Jinja removes it by default).</summary>
    public bool KeepTrailingNewline { get; init; }

    /// <summary>Name used in error messages.</summary>
    public string Name { get; init; } = "chat template";
}

/// <summary>
/// A compiled template in the subset of Jinja2 that chat templates use: output, if/elif/else, for (with loop.*,
/// else, filters, break/continue), set (also on namespaces and as a block), macros, comments, raw blocks,
/// whitespace control, Python-like expressions, the common filters and tests, and <c>raise_exception</c>.
/// </summary>
public sealed class JinjaTemplate
{
    private readonly List<JinjaNode> _nodes;
    private readonly string _name;

    private JinjaTemplate(List<JinjaNode> nodes, string name)
    {
        _nodes = nodes;
        _name = name;
    }

    /// <summary>Parses <paramref name="source"/>; syntax errors are <see cref="JinjaException"/>s naming the line.</summary>
    public static JinjaTemplate Parse(string source, JinjaOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(source);
        options ??= new JinjaOptions();
        var segments = JinjaLexer.Tokenize(source, options);
        return new JinjaTemplate(JinjaParser.Parse(segments, options.Name), options.Name);
    }

    /// <summary>
    /// Renders with the given variables (strings, numbers, bools, null, lists, string-keyed dictionaries,
    /// <see cref="ChatMessage"/>s, JSON elements). The globals <c>range</c>, <c>namespace</c>, <c>dict</c>,
    /// <c>raise_exception</c> and <c>strftime_now</c> are always defined.
    /// </summary>
    public string Render(IReadOnlyDictionary<string, object?> variables)
    {
        ArgumentNullException.ThrowIfNull(variables);
        var globals = new JinjaScope(null);
        foreach (var kv in JinjaBuiltins.Globals()) globals.Set(kv.Key, kv.Value);
        var scope = new JinjaScope(globals);
        foreach (var kv in variables) scope.Set(kv.Key, JinjaValues.FromClr(kv.Value));
        var output = new StringBuilder();
        var ev = new JinjaEvaluator(_name);
        try
        {
            JinjaNode.RenderAll(_nodes, scope, output, ev);
        }
        catch (JinjaRuntimeError e)
        {
            throw new JinjaException($"{_name}: {e.Message}", e);
        }
        return output.ToString();
    }
}
