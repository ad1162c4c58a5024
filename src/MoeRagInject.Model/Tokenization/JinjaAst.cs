using System.Text;
using static MoeRagInject.Model.Tokenization.JinjaValues;

namespace MoeRagInject.Model.Tokenization;

/// <summary>Variables of one scope; lookups fall through to the parent scope.</summary>
internal sealed class JinjaScope(JinjaScope? parent)
{
    private readonly Dictionary<string, object?> _vars = new(StringComparer.Ordinal);

    public JinjaScope? Parent { get; } = parent;

    public bool TryGet(string name, out object? value)
    {
        for (var s = this; s != null; s = s.Parent)
            if (s._vars.TryGetValue(name, out value)) return true;
        value = null;
        return false;
    }

    public void Set(string name, object? value) => _vars[name] = value;
}

/// <summary>Rendering state shared by all nodes of one render call.</summary>
internal sealed class JinjaEvaluator(string templateName)
{
    public string TemplateName { get; } = templateName;
    public int Depth { get; set; }

    public JinjaException At(int line, string message) => new($"{TemplateName}, line {line}: {message}");
}

internal enum JinjaFlow { Normal, Break, Continue }

internal abstract class JinjaNode(int line)
{
    public int Line { get; } = line;

    public abstract JinjaFlow Render(JinjaScope scope, StringBuilder output, JinjaEvaluator ev);

    /// <summary>Evaluates an expression, turning a location-less runtime error into one that names this line.</summary>
    protected object? Eval(JinjaExpr expr, JinjaScope scope, JinjaEvaluator ev)
    {
        try
        {
            return expr.Eval(scope, ev);
        }
        catch (JinjaRuntimeError e)
        {
            throw ev.At(expr.Line, e.Message);
        }
    }

    public static JinjaFlow RenderAll(List<JinjaNode> nodes, JinjaScope scope, StringBuilder output, JinjaEvaluator ev)
    {
        foreach (var n in nodes)
        {
            var flow = n.Render(scope, output, ev);
            if (flow != JinjaFlow.Normal) return flow;
        }
        return JinjaFlow.Normal;
    }
}

internal sealed class TextNode(int line, string text) : JinjaNode(line)
{
    public override JinjaFlow Render(JinjaScope scope, StringBuilder output, JinjaEvaluator ev)
    {
        output.Append(text);
        return JinjaFlow.Normal;
    }
}

internal sealed class OutputNode(int line, JinjaExpr expr) : JinjaNode(line)
{
    public override JinjaFlow Render(JinjaScope scope, StringBuilder output, JinjaEvaluator ev)
    {
        output.Append(ToStr(Eval(expr, scope, ev)));
        return JinjaFlow.Normal;
    }
}

internal sealed class IfNode(int line, List<(JinjaExpr Condition, List<JinjaNode> Body)> branches, List<JinjaNode>? elseBody) : JinjaNode(line)
{
    public override JinjaFlow Render(JinjaScope scope, StringBuilder output, JinjaEvaluator ev)
    {
        foreach (var (condition, body) in branches)
            if (IsTrue(Eval(condition, scope, ev))) return RenderAll(body, scope, output, ev);
        return elseBody is null ? JinjaFlow.Normal : RenderAll(elseBody, scope, output, ev);
    }
}

internal sealed class ForNode(int line, string[] targets, JinjaExpr iterable, JinjaExpr? filter, List<JinjaNode> body, List<JinjaNode>? elseBody)
    : JinjaNode(line)
{
    public override JinjaFlow Render(JinjaScope scope, StringBuilder output, JinjaEvaluator ev)
    {
        List<object?> items;
        try
        {
            items = Iterate(iterable.Eval(scope, ev));
        }
        catch (JinjaRuntimeError e)
        {
            throw ev.At(Line, e.Message);
        }
        if (filter != null)
        {
            var kept = new List<object?>();
            foreach (var item in items)
            {
                var s = new JinjaScope(scope);
                Bind(s, item, ev);
                if (IsTrue(Eval(filter, s, ev))) kept.Add(item);
            }
            items = kept;
        }
        else
        {
            items = new List<object?>(items); // the body may not change what it iterates
        }
        if (items.Count == 0) return elseBody is null ? JinjaFlow.Normal : RenderAll(elseBody, scope, output, ev);

        var loop = new JinjaLoop(items);
        for (int i = 0; i < items.Count; i++)
        {
            loop.Index0 = i;
            var inner = new JinjaScope(scope); // a fresh scope per iteration, as Jinja
            Bind(inner, items[i], ev);
            inner.Set("loop", loop);
            if (RenderAll(body, inner, output, ev) == JinjaFlow.Break) break;
        }
        return JinjaFlow.Normal;
    }

    private void Bind(JinjaScope scope, object? item, JinjaEvaluator ev)
    {
        if (targets.Length == 1)
        {
            scope.Set(targets[0], item);
            return;
        }
        var values = item as List<object?> ?? throw ev.At(Line, $"cannot unpack {TypeName(item)} into {targets.Length} loop variables");
        if (values.Count != targets.Length)
            throw ev.At(Line, $"cannot unpack {values.Count} values into {targets.Length} loop variables");
        for (int k = 0; k < targets.Length; k++) scope.Set(targets[k], values[k]);
    }
}

internal sealed class SetNode(int line, string name, string? attribute, JinjaExpr? value, List<JinjaNode>? body) : JinjaNode(line)
{
    public override JinjaFlow Render(JinjaScope scope, StringBuilder output, JinjaEvaluator ev)
    {
        object? v;
        if (value != null) v = Eval(value, scope, ev);
        else
        {
            var sb = new StringBuilder();
            RenderAll(body!, scope, sb, ev);
            v = sb.ToString();
        }
        if (attribute is null)
        {
            scope.Set(name, v);
            return JinjaFlow.Normal;
        }
        if (!scope.TryGet(name, out var target) || target is not JinjaNamespace ns)
            throw ev.At(Line, $"cannot assign attribute on non-namespace object '{name}'");
        ns.Values[attribute] = v;
        return JinjaFlow.Normal;
    }
}

/// <summary>A plain group of nodes (the body of <c>{% generation %}</c>).</summary>
internal sealed class BlockNode(int line, List<JinjaNode> body) : JinjaNode(line)
{
    public override JinjaFlow Render(JinjaScope scope, StringBuilder output, JinjaEvaluator ev) => RenderAll(body, scope, output, ev);
}

internal sealed class LoopControlNode(int line, JinjaFlow flow) : JinjaNode(line)
{
    public override JinjaFlow Render(JinjaScope scope, StringBuilder output, JinjaEvaluator ev) => flow;
}

internal sealed class MacroNode(int line, string name, List<(string Name, JinjaExpr? Default)> parameters, List<JinjaNode> body) : JinjaNode(line)
{
    public override JinjaFlow Render(JinjaScope scope, StringBuilder output, JinjaEvaluator ev)
    {
        var definitionScope = scope;
        scope.Set(name, new JinjaCallable(name, args =>
        {
            if (ev.Depth > 100) throw new JinjaRuntimeError($"macro '{name}' recursion is too deep");
            var s = new JinjaScope(definitionScope);
            for (int i = 0; i < parameters.Count; i++)
            {
                var (p, dflt) = parameters[i];
                if (args.Named.TryGetValue(p, out var v)) s.Set(p, v);
                else if (i < args.Positional.Count) s.Set(p, args.Positional[i]);
                else s.Set(p, dflt is null ? new JinjaUndefined($"'{p}'") : dflt.Eval(definitionScope, ev));
            }
            s.Set("varargs", new JinjaTuple(args.Positional.Skip(parameters.Count)));
            var kwargs = new Dictionary<string, object?>(StringComparer.Ordinal);
            foreach (var kv in args.Named)
                if (!parameters.Exists(p => p.Name == kv.Key)) kwargs[kv.Key] = kv.Value;
            s.Set("kwargs", kwargs);
            var sb = new StringBuilder();
            ev.Depth++;
            try
            {
                RenderAll(body, s, sb, ev);
            }
            finally
            {
                ev.Depth--;
            }
            return sb.ToString();
        }));
        return JinjaFlow.Normal;
    }
}

// ---------------------------------------------------------------- expressions

internal abstract class JinjaExpr(int line)
{
    public int Line { get; } = line;
    public abstract object? Eval(JinjaScope scope, JinjaEvaluator ev);
}

internal sealed class LiteralExpr(int line, object? value) : JinjaExpr(line)
{
    public object? Value { get; } = value;
    public override object? Eval(JinjaScope scope, JinjaEvaluator ev) => Value;
}

internal sealed class NameExpr(int line, string name) : JinjaExpr(line)
{
    public string Name { get; } = name;
    public override object? Eval(JinjaScope scope, JinjaEvaluator ev) =>
        scope.TryGet(Name, out var v) ? v : new JinjaUndefined($"'{Name}'");
}

internal sealed class ListExpr(int line, List<JinjaExpr> items, bool isTuple = false) : JinjaExpr(line)
{
    public override object? Eval(JinjaScope scope, JinjaEvaluator ev)
    {
        var values = items.Select(i => i.Eval(scope, ev));
        return isTuple ? new JinjaTuple(values) : values.ToList();
    }
}

internal sealed class DictExpr(int line, List<(JinjaExpr Key, JinjaExpr Value)> items) : JinjaExpr(line)
{
    public override object? Eval(JinjaScope scope, JinjaEvaluator ev)
    {
        var d = new Dictionary<string, object?>(StringComparer.Ordinal);
        foreach (var (k, v) in items)
        {
            var key = k.Eval(scope, ev);
            if (key is not string s) throw new JinjaRuntimeError($"dict keys must be strings here, got {TypeName(key)}");
            d[s] = v.Eval(scope, ev);
        }
        return d;
    }
}

internal sealed class AttrExpr(int line, JinjaExpr target, string name) : JinjaExpr(line)
{
    public JinjaExpr Target { get; } = target;
    public string Name { get; } = name;
    public override object? Eval(JinjaScope scope, JinjaEvaluator ev) => GetAttr(Target.Eval(scope, ev), Name);
}

internal sealed class ItemExpr(int line, JinjaExpr target, JinjaExpr key) : JinjaExpr(line)
{
    public override object? Eval(JinjaScope scope, JinjaEvaluator ev) => GetItem(target.Eval(scope, ev), key.Eval(scope, ev));
}

internal sealed class SliceExpr(int line, JinjaExpr target, JinjaExpr? start, JinjaExpr? stop, JinjaExpr? step) : JinjaExpr(line)
{
    public override object? Eval(JinjaScope scope, JinjaEvaluator ev) =>
        Slice(target.Eval(scope, ev), start?.Eval(scope, ev), stop?.Eval(scope, ev), step?.Eval(scope, ev));
}

internal sealed class CallArgs(List<JinjaExpr> positional, List<(string Name, JinjaExpr Value)> named)
{
    public JinjaArgs Eval(JinjaScope scope, JinjaEvaluator ev)
    {
        var a = new JinjaArgs();
        foreach (var p in positional) a.Positional.Add(p.Eval(scope, ev));
        foreach (var (n, v) in named) a.Named[n] = v.Eval(scope, ev);
        return a;
    }

    public static readonly CallArgs Empty = new([], []);
}

internal sealed class CallExpr(int line, JinjaExpr callee, CallArgs args) : JinjaExpr(line)
{
    public override object? Eval(JinjaScope scope, JinjaEvaluator ev)
    {
        var f = callee.Eval(scope, ev);
        var a = args.Eval(scope, ev);
        return f switch
        {
            JinjaCallable c => c.Invoke(a),
            JinjaBoundMethod m => JinjaBuiltins.CallMethod(m, a),
            JinjaUndefined u => throw u.Error(),
            _ => throw new JinjaRuntimeError($"'{TypeName(f)}' object is not callable"),
        };
    }
}

internal sealed class FilterExpr(int line, JinjaExpr value, string name, CallArgs args) : JinjaExpr(line)
{
    public override object? Eval(JinjaScope scope, JinjaEvaluator ev)
    {
        if (!JinjaBuiltins.Filters.TryGetValue(name, out var filter)) throw new JinjaRuntimeError($"no filter named '{name}'");
        return filter(value.Eval(scope, ev), args.Eval(scope, ev), ev);
    }
}

internal sealed class TestExpr(int line, JinjaExpr value, string name, CallArgs args, bool negated) : JinjaExpr(line)
{
    public override object? Eval(JinjaScope scope, JinjaEvaluator ev)
    {
        if (!JinjaBuiltins.Tests.TryGetValue(name, out var test)) throw new JinjaRuntimeError($"no test named '{name}'");
        return test(value.Eval(scope, ev), args.Eval(scope, ev)) != negated;
    }
}

internal sealed class NotExpr(int line, JinjaExpr operand) : JinjaExpr(line)
{
    public override object? Eval(JinjaScope scope, JinjaEvaluator ev) => !IsTrue(operand.Eval(scope, ev));
}

internal sealed class NegExpr(int line, JinjaExpr operand, bool negate) : JinjaExpr(line)
{
    public override object? Eval(JinjaScope scope, JinjaEvaluator ev)
    {
        var v = operand.Eval(scope, ev);
        if (negate) return Negate(v);
        return v is long or double ? v : v is bool b ? (b ? 1L : 0L) : throw new JinjaRuntimeError($"bad operand type for unary +: '{TypeName(v)}'");
    }
}

internal sealed class AndOrExpr(int line, JinjaExpr left, JinjaExpr right, bool isAnd) : JinjaExpr(line)
{
    public override object? Eval(JinjaScope scope, JinjaEvaluator ev)
    {
        var l = left.Eval(scope, ev);
        return IsTrue(l) == isAnd ? right.Eval(scope, ev) : l;
    }
}

internal sealed class BinaryExpr(int line, string op, JinjaExpr left, JinjaExpr right) : JinjaExpr(line)
{
    public override object? Eval(JinjaScope scope, JinjaEvaluator ev)
    {
        var l = left.Eval(scope, ev);
        var r = right.Eval(scope, ev);
        return op switch
        {
            "+" => Add(l, r),
            "~" => ToStr(l) + ToStr(r),
            _ => Arithmetic(op, l, r),
        };
    }
}

internal sealed class CompareExpr(int line, JinjaExpr first, List<(string Op, JinjaExpr Operand)> rest) : JinjaExpr(line)
{
    public override object? Eval(JinjaScope scope, JinjaEvaluator ev)
    {
        var left = first.Eval(scope, ev);
        foreach (var (op, operand) in rest)
        {
            var right = operand.Eval(scope, ev);
            bool ok = op switch
            {
                "==" => ValueEquals(left, right),
                "!=" => !ValueEquals(left, right),
                "<" => Compare(left, right, op) < 0,
                "<=" => Compare(left, right, op) <= 0,
                ">" => Compare(left, right, op) > 0,
                ">=" => Compare(left, right, op) >= 0,
                "in" => Contains(right, left),
                "not in" => !Contains(right, left),
                _ => throw new JinjaRuntimeError($"unknown comparison {op}"),
            };
            if (!ok) return false;
            left = right;
        }
        return true;
    }
}

internal sealed class CondExpr(int line, JinjaExpr condition, JinjaExpr then, JinjaExpr? otherwise) : JinjaExpr(line)
{
    public override object? Eval(JinjaScope scope, JinjaEvaluator ev) =>
        IsTrue(condition.Eval(scope, ev)) ? then.Eval(scope, ev)
        : otherwise is null ? new JinjaUndefined("the else branch of an inline if") : otherwise.Eval(scope, ev);
}
