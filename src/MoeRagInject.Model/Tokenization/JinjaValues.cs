using System.Collections;
using System.Globalization;
using System.Text;
using System.Text.Json;

namespace MoeRagInject.Model.Tokenization;

/// <summary>
/// An error of a template (syntax, unknown name, type error) or one raised by the template itself. It is an
/// <see cref="InvalidOperationException"/>: rendering is not possible for this template and these inputs.
/// </summary>
public sealed class JinjaException : InvalidOperationException
{
    public JinjaException() { }

    public JinjaException(string message) : base(message) { }

    public JinjaException(string message, Exception inner) : base(message, inner) { }

    /// <summary>True when the template called <c>raise_exception(msg)</c>; then <see cref="Exception.Message"/> is msg.</summary>
    public bool RaisedByTemplate { get; init; }
}

/// <summary>A runtime error without a location; statements turn it into a <see cref="JinjaException"/> with the line.</summary>
internal sealed class JinjaRuntimeError(string message) : Exception(message);

/// <summary>Jinja's undefined value: renders as "", is falsy, iterates as empty; attribute access on it fails.</summary>
internal sealed class JinjaUndefined
{
    public JinjaUndefined(string? hint) => Hint = hint;

    public string? Hint { get; }

    public static readonly JinjaUndefined Anonymous = new(null);

    public JinjaRuntimeError Error() => new(Hint is null ? "value is undefined" : $"{Hint} is undefined");
}

/// <summary>Arguments of a call: positional then keyword.</summary>
internal sealed class JinjaArgs
{
    public List<object?> Positional { get; } = [];
    public Dictionary<string, object?> Named { get; } = new(StringComparer.Ordinal);

    public object? Get(int index, string name, object? defaultValue)
    {
        if (Named.TryGetValue(name, out var v)) return v;
        return index < Positional.Count ? Positional[index] : defaultValue;
    }

    public bool Has(int index, string name) => Named.ContainsKey(name) || index < Positional.Count;
}

internal sealed class JinjaCallable(string name, Func<JinjaArgs, object?> body)
{
    public string Name { get; } = name;
    public object? Invoke(JinjaArgs args) => body(args);
}

/// <summary>The object made by <c>namespace()</c>: attributes that <c>{% set ns.x = ... %}</c> can change from any scope.</summary>
internal sealed class JinjaNamespace
{
    public Dictionary<string, object?> Values { get; } = new(StringComparer.Ordinal);
}

/// <summary>The <c>loop</c> variable of a for loop.</summary>
internal sealed class JinjaLoop(List<object?> items)
{
    public int Index0 { get; set; }

    public object? Get(string name) => name switch
    {
        "index0" => (long)Index0,
        "index" => (long)Index0 + 1,
        "revindex" => (long)(items.Count - Index0),
        "revindex0" => (long)(items.Count - Index0 - 1),
        "first" => Index0 == 0,
        "last" => Index0 == items.Count - 1,
        "length" => (long)items.Count,
        "depth" => 1L,
        "depth0" => 0L,
        "previtem" => Index0 > 0 ? items[Index0 - 1] : new JinjaUndefined("loop.previtem"),
        "nextitem" => Index0 + 1 < items.Count ? items[Index0 + 1] : new JinjaUndefined("loop.nextitem"),
        "cycle" => new JinjaCallable("loop.cycle", a =>
            a.Positional.Count == 0 ? throw new JinjaRuntimeError("loop.cycle() needs at least one argument") : a.Positional[Index0 % a.Positional.Count]),
        _ => new JinjaUndefined($"loop.{name}"),
    };
}

/// <summary>A Python tuple: a list that prints with parentheses.</summary>
internal sealed class JinjaTuple : List<object?>
{
    public JinjaTuple(IEnumerable<object?> items) : base(items) { }
}

/// <summary>A method of a built-in value (<c>content.strip</c>) waiting to be called.</summary>
internal sealed record JinjaBoundMethod(object Target, string Name);

/// <summary>Python-like semantics for template values: string, long, double, bool, null (None), lists, dicts, ...</summary>
internal static class JinjaValues
{
    public static string TypeName(object? v) => v switch
    {
        null => "NoneType",
        string => "str",
        bool => "bool",
        long => "int",
        double => "float",
        JinjaTuple => "tuple",
        List<object?> => "list",
        Dictionary<string, object?> => "dict",
        JinjaUndefined => "Undefined",
        JinjaNamespace => "Namespace",
        JinjaCallable or JinjaBoundMethod => "function",
        _ => v.GetType().Name,
    };

    /// <summary>Converts a CLR value (strings, numbers, dictionaries, lists, JSON, chat messages) into a template value.</summary>
    public static object? FromClr(object? value)
    {
        switch (value)
        {
            case null: return null;
            case string or bool or long or double or JinjaUndefined or JinjaCallable or JinjaNamespace: return value;
            case int i: return (long)i;
            case short s: return (long)s;
            case byte b: return (long)b;
            case uint ui: return (long)ui;
            case float f: return (double)f;
            case decimal d: return (double)d;
            case char c: return c.ToString();
            case ChatMessage m:
                return new Dictionary<string, object?>(StringComparer.Ordinal) { ["role"] = m.Role, ["content"] = m.Content };
            case JsonElement e: return FromJson(e);
            case IDictionary<string, object?> dict:
            {
                var r = new Dictionary<string, object?>(StringComparer.Ordinal);
                foreach (var kv in dict) r[kv.Key] = FromClr(kv.Value);
                return r;
            }
            case IReadOnlyDictionary<string, object?> rdict:
            {
                var r = new Dictionary<string, object?>(StringComparer.Ordinal);
                foreach (var kv in rdict) r[kv.Key] = FromClr(kv.Value);
                return r;
            }
            case IDictionary idict:
            {
                var r = new Dictionary<string, object?>(StringComparer.Ordinal);
                foreach (DictionaryEntry kv in idict) r[ToStr(FromClr(kv.Key))] = FromClr(kv.Value);
                return r;
            }
            case IEnumerable seq:
            {
                var r = new List<object?>();
                foreach (var item in seq) r.Add(FromClr(item));
                return r;
            }
            default:
                throw new ArgumentException($"values of type {value.GetType()} cannot be passed to a template");
        }
    }

    public static object? FromJson(JsonElement e) => e.ValueKind switch
    {
        JsonValueKind.String => e.GetString(),
        JsonValueKind.Number => e.TryGetInt64(out long l) ? (object)l : e.GetDouble(),
        JsonValueKind.True => true,
        JsonValueKind.False => false,
        JsonValueKind.Null or JsonValueKind.Undefined => null,
        JsonValueKind.Array => e.EnumerateArray().Select(FromJson).ToList(),
        JsonValueKind.Object => e.EnumerateObject().Aggregate(new Dictionary<string, object?>(StringComparer.Ordinal),
            (d, p) => { d[p.Name] = FromJson(p.Value); return d; }),
        _ => null,
    };

    public static bool IsTrue(object? v) => v switch
    {
        null => false,
        JinjaUndefined => false,
        bool b => b,
        long l => l != 0,
        double d => d != 0,
        string s => s.Length > 0,
        List<object?> l => l.Count > 0,
        Dictionary<string, object?> d => d.Count > 0,
        _ => true,
    };

    /// <summary>Python's str(), which is also what <c>{{ value }}</c> prints (undefined prints nothing).</summary>
    public static string ToStr(object? v) => v switch
    {
        string s => s,
        JinjaUndefined => "",
        null => "None",
        bool b => b ? "True" : "False",
        long l => l.ToString(CultureInfo.InvariantCulture),
        double d => FloatRepr(d),
        _ => Repr(v),
    };

    public static string Repr(object? v)
    {
        switch (v)
        {
            case string s: return StringRepr(s);
            case JinjaTuple tuple:
            {
                var sb = new StringBuilder("(");
                for (int i = 0; i < tuple.Count; i++)
                {
                    if (i > 0) sb.Append(", ");
                    sb.Append(Repr(tuple[i]));
                }
                return sb.Append(tuple.Count == 1 ? ",)" : ")").ToString();
            }
            case List<object?> list:
            {
                var sb = new StringBuilder("[");
                for (int i = 0; i < list.Count; i++)
                {
                    if (i > 0) sb.Append(", ");
                    sb.Append(Repr(list[i]));
                }
                return sb.Append(']').ToString();
            }
            case Dictionary<string, object?> dict:
            {
                var sb = new StringBuilder("{");
                bool first = true;
                foreach (var kv in dict)
                {
                    if (!first) sb.Append(", ");
                    first = false;
                    sb.Append(StringRepr(kv.Key)).Append(": ").Append(Repr(kv.Value));
                }
                return sb.Append('}').ToString();
            }
            case JinjaNamespace ns: return "<Namespace " + Repr(ns.Values) + ">";
            case JinjaCallable c: return $"<function {c.Name}>";
            case JinjaBoundMethod m: return $"<built-in method {m.Name}>";
            case null or bool or long or double or JinjaUndefined: return ToStr(v);
            default: return $"<{TypeName(v)} object>";
        }
    }

    private static string StringRepr(string s)
    {
        char quote = s.Contains('\'', StringComparison.Ordinal) && !s.Contains('"', StringComparison.Ordinal) ? '"' : '\'';
        var sb = new StringBuilder(s.Length + 2).Append(quote);
        foreach (char c in s)
        {
            switch (c)
            {
                case '\\': sb.Append("\\\\"); break;
                case '\n': sb.Append("\\n"); break;
                case '\r': sb.Append("\\r"); break;
                case '\t': sb.Append("\\t"); break;
                default:
                    if (c == quote) sb.Append('\\').Append(c);
                    else if (c < 0x20 || c == 0x7f) sb.Append(CultureInfo.InvariantCulture, $"\\x{(int)c:x2}");
                    else sb.Append(c);
                    break;
            }
        }
        return sb.Append(quote).ToString();
    }

    public static string FloatRepr(double d)
    {
        if (double.IsNaN(d)) return "nan";
        if (double.IsPositiveInfinity(d)) return "inf";
        if (double.IsNegativeInfinity(d)) return "-inf";
        if (d == Math.Floor(d) && Math.Abs(d) < 1e16) return d.ToString("F1", CultureInfo.InvariantCulture);
        string r = d.ToString("R", CultureInfo.InvariantCulture);
        int e = r.IndexOf('E', StringComparison.Ordinal);
        if (e < 0) return r;
        string mantissa = r[..e];
        string exp = r[(e + 1)..];
        char sign = exp[0] == '-' ? '-' : '+';
        exp = exp.TrimStart('+', '-');
        if (exp.Length < 2) exp = "0" + exp;
        return $"{mantissa}e{sign}{exp}";
    }

    private static bool IsNumber(object? v) => v is long or double or bool;

    private static double ToDouble(object? v) => v switch
    {
        long l => l,
        double d => d,
        bool b => b ? 1 : 0,
        _ => throw new JinjaRuntimeError($"expected a number, got {TypeName(v)}"),
    };

    private static long ToLong(object? v) => v switch
    {
        long l => l,
        bool b => b ? 1 : 0,
        _ => throw new JinjaRuntimeError($"expected an integer, got {TypeName(v)}"),
    };

    private static bool IsIntegral(object? v) => v is long or bool;

    public static bool ValueEquals(object? a, object? b)
    {
        if (a is JinjaUndefined || b is JinjaUndefined) return a is JinjaUndefined && b is JinjaUndefined;
        if (a is null || b is null) return a is null && b is null;
        if (IsNumber(a) && IsNumber(b))
            return IsIntegral(a) && IsIntegral(b) ? ToLong(a) == ToLong(b) : ToDouble(a) == ToDouble(b);
        if (a is string sa && b is string sb) return string.Equals(sa, sb, StringComparison.Ordinal);
        if (a is List<object?> la && b is List<object?> lb)
        {
            if (la.Count != lb.Count) return false;
            for (int i = 0; i < la.Count; i++)
                if (!ValueEquals(la[i], lb[i])) return false;
            return true;
        }
        if (a is Dictionary<string, object?> da && b is Dictionary<string, object?> db)
        {
            if (da.Count != db.Count) return false;
            foreach (var kv in da)
                if (!db.TryGetValue(kv.Key, out var other) || !ValueEquals(kv.Value, other)) return false;
            return true;
        }
        return ReferenceEquals(a, b);
    }

    public static int Compare(object? a, object? b, string op)
    {
        if (IsNumber(a) && IsNumber(b))
            return IsIntegral(a) && IsIntegral(b) ? ToLong(a).CompareTo(ToLong(b)) : ToDouble(a).CompareTo(ToDouble(b));
        if (a is string sa && b is string sb) return CompareCodePoints(sa, sb);
        if (a is List<object?> la && b is List<object?> lb)
        {
            for (int i = 0; i < Math.Min(la.Count, lb.Count); i++)
            {
                if (ValueEquals(la[i], lb[i])) continue;
                return Compare(la[i], lb[i], op);
            }
            return la.Count.CompareTo(lb.Count);
        }
        throw new JinjaRuntimeError($"'{op}' not supported between instances of '{TypeName(a)}' and '{TypeName(b)}'");
    }

    private static int CompareCodePoints(string a, string b)
    {
        // Python compares code points; ordinal UTF-16 comparison differs only around surrogates.
        int n = Math.Min(a.Length, b.Length);
        for (int i = 0; i < n; i++)
        {
            if (a[i] == b[i]) continue;
            bool sa = char.IsSurrogate(a[i]), sb = char.IsSurrogate(b[i]);
            if (sa != sb) return sa ? 1 : -1;
            return a[i].CompareTo(b[i]);
        }
        return a.Length.CompareTo(b.Length);
    }

    public static List<object?> Iterate(object? v) => v switch
    {
        List<object?> l => l,
        Dictionary<string, object?> d => d.Keys.Cast<object?>().ToList(),
        string s => Chars(s),
        JinjaUndefined => [],
        JinjaNamespace ns => ns.Values.Keys.Cast<object?>().ToList(),
        _ => throw new JinjaRuntimeError($"'{TypeName(v)}' object is not iterable"),
    };

    private static List<object?> Chars(string s)
    {
        var r = new List<object?>(s.Length);
        foreach (var rune in s.EnumerateRunes()) r.Add(rune.ToString());
        return r;
    }

    public static long Length(object? v) => v switch
    {
        string s => CodePointCount(s),
        List<object?> l => l.Count,
        Dictionary<string, object?> d => d.Count,
        JinjaUndefined => 0,
        _ => throw new JinjaRuntimeError($"object of type '{TypeName(v)}' has no len()"),
    };

    public static int CodePointCount(string s)
    {
        int n = 0;
        foreach (var _ in s.EnumerateRunes()) n++;
        return n;
    }

    public static bool Contains(object? container, object? item) => container switch
    {
        string s when item is string sub => s.Contains(sub, StringComparison.Ordinal),
        string => throw new JinjaRuntimeError($"'in <string>' requires string as left operand, not {TypeName(item)}"),
        List<object?> l => l.Any(x => ValueEquals(x, item)),
        Dictionary<string, object?> d => item is string k && d.ContainsKey(k),
        JinjaUndefined => false,
        _ => throw new JinjaRuntimeError($"argument of type '{TypeName(container)}' is not iterable"),
    };

    private static readonly HashSet<string> StringMethods = new(StringComparer.Ordinal)
    {
        "strip", "lstrip", "rstrip", "upper", "lower", "title", "capitalize", "startswith", "endswith", "split", "rsplit",
        "replace", "join", "find", "rfind", "count", "splitlines", "isdigit", "isalpha", "isalnum", "isspace", "isupper",
        "islower", "format", "removeprefix", "removesuffix", "swapcase", "center", "ljust", "rjust", "zfill", "partition", "rpartition",
    };

    private static readonly HashSet<string> DictMethods = new(StringComparer.Ordinal) { "items", "keys", "values", "get", "copy" };

    private static readonly HashSet<string> ListMethods = new(StringComparer.Ordinal) { "index", "count", "copy" };

    /// <summary><c>obj.name</c>: an attribute (method) first, then an item, as Jinja's getattr.</summary>
    public static object? GetAttr(object? obj, string name)
    {
        switch (obj)
        {
            case JinjaUndefined u: throw u.Error();
            case Dictionary<string, object?> d:
                if (DictMethods.Contains(name)) return new JinjaBoundMethod(d, name);
                return d.TryGetValue(name, out var v) ? v : new JinjaUndefined($"'dict object' has no attribute '{name}'");
            case string s when StringMethods.Contains(name): return new JinjaBoundMethod(s, name);
            case List<object?> l when ListMethods.Contains(name): return new JinjaBoundMethod(l, name);
            case JinjaNamespace ns:
                return ns.Values.TryGetValue(name, out var nv) ? nv : new JinjaUndefined($"namespace has no attribute '{name}'");
            case JinjaLoop loop: return loop.Get(name);
            default: return new JinjaUndefined($"'{TypeName(obj)} object' has no attribute '{name}'");
        }
    }

    /// <summary><c>obj[key]</c>: an item first, then an attribute, as Jinja's getitem.</summary>
    public static object? GetItem(object? obj, object? key)
    {
        switch (obj)
        {
            case JinjaUndefined u: throw u.Error();
            case Dictionary<string, object?> d:
                if (key is string k)
                {
                    if (d.TryGetValue(k, out var v)) return v;
                    return DictMethods.Contains(k) ? new JinjaBoundMethod(d, k) : new JinjaUndefined($"'dict object' has no attribute '{k}'");
                }
                return new JinjaUndefined($"'dict object' has no attribute {Repr(key)}");
            case List<object?> l when IsIntegral(key):
            {
                long i = ToLong(key);
                if (i < 0) i += l.Count;
                return i >= 0 && i < l.Count ? l[(int)i] : new JinjaUndefined($"list object has no element {ToLong(key)}");
            }
            case string s when IsIntegral(key):
            {
                var chars = Chars(s);
                long i = ToLong(key);
                if (i < 0) i += chars.Count;
                return i >= 0 && i < chars.Count ? chars[(int)i] : new JinjaUndefined($"str object has no element {ToLong(key)}");
            }
            default:
                return key is string name ? GetAttr(obj, name) : new JinjaUndefined($"{TypeName(obj)} object has no element {Repr(key)}");
        }
    }

    public static object? Slice(object? obj, object? start, object? stop, object? step)
    {
        long st = step is null or JinjaUndefined ? 1 : ToLong(step);
        if (st == 0) throw new JinjaRuntimeError("slice step cannot be zero");
        List<object?> items = obj switch
        {
            List<object?> l => l,
            string s => Chars(s),
            JinjaUndefined u => throw u.Error(),
            _ => throw new JinjaRuntimeError($"'{TypeName(obj)}' object is not subscriptable"),
        };
        int n = items.Count;
        long Clamp(object? v, long dflt, bool isStart)
        {
            if (v is null or JinjaUndefined) return dflt;
            long i = ToLong(v);
            if (i < 0) i += n;
            if (st > 0) return Math.Clamp(i, 0, n);
            return Math.Clamp(i, -1, n - 1);
        }
        long a = Clamp(start, st > 0 ? 0 : n - 1, true);
        long b = Clamp(stop, st > 0 ? n : -1, false);
        var result = new List<object?>();
        if (st > 0)
            for (long i = a; i < b; i += st) result.Add(items[(int)i]);
        else
            for (long i = a; i > b; i += st) result.Add(items[(int)i]);
        if (obj is string) return string.Concat(result.Select(x => (string)x!));
        return result;
    }

    public static object? Add(object? a, object? b)
    {
        if (a is JinjaUndefined ua) throw ua.Error();
        if (b is JinjaUndefined ub) throw ub.Error();
        if (a is string sa && b is string sb) return sa + sb;
        if (a is List<object?> la && b is List<object?> lb) return la.Concat(lb).ToList();
        if (IsNumber(a) && IsNumber(b))
            return IsIntegral(a) && IsIntegral(b) ? (object)(ToLong(a) + ToLong(b)) : ToDouble(a) + ToDouble(b);
        throw BinaryError("+", a, b);
    }

    public static object? Arithmetic(string op, object? a, object? b)
    {
        if (a is JinjaUndefined ua) throw ua.Error();
        if (b is JinjaUndefined ub) throw ub.Error();
        if (op == "*")
        {
            if (a is string s && IsIntegral(b)) return Repeat(s, ToLong(b));
            if (b is string s2 && IsIntegral(a)) return Repeat(s2, ToLong(a));
            if (a is List<object?> l && IsIntegral(b)) return Enumerable.Repeat(l, (int)Math.Max(0, ToLong(b))).SelectMany(x => x).ToList();
        }
        if (op == "%" && a is string fmt) return PercentFormat(fmt, b);
        if (!IsNumber(a) || !IsNumber(b)) throw BinaryError(op, a, b);
        bool ints = IsIntegral(a) && IsIntegral(b);
        switch (op)
        {
            case "-": return ints ? (object)(ToLong(a) - ToLong(b)) : ToDouble(a) - ToDouble(b);
            case "*": return ints ? (object)(ToLong(a) * ToLong(b)) : ToDouble(a) * ToDouble(b);
            case "/":
                if (ToDouble(b) == 0) throw new JinjaRuntimeError("division by zero");
                return ToDouble(a) / ToDouble(b);
            case "//":
                if (ToDouble(b) == 0) throw new JinjaRuntimeError("integer division or modulo by zero");
                if (ints)
                {
                    long x = ToLong(a), y = ToLong(b);
                    long q = x / y;
                    if ((x % y != 0) && ((x < 0) != (y < 0))) q--;
                    return q;
                }
                return Math.Floor(ToDouble(a) / ToDouble(b));
            case "%":
                if (ToDouble(b) == 0) throw new JinjaRuntimeError("integer division or modulo by zero");
                if (ints)
                {
                    long x = ToLong(a), y = ToLong(b);
                    long r = x % y;
                    if (r != 0 && ((r < 0) != (y < 0))) r += y;
                    return r;
                }
                else
                {
                    double x = ToDouble(a), y = ToDouble(b);
                    double r = x % y;
                    if (r != 0 && ((r < 0) != (y < 0))) r += y;
                    return r;
                }
            case "**":
                if (ints && ToLong(b) >= 0) return (long)Math.Pow(ToLong(a), ToLong(b));
                return Math.Pow(ToDouble(a), ToDouble(b));
            default: throw new JinjaRuntimeError($"unknown operator {op}");
        }
    }

    private static string Repeat(string s, long n) => n <= 0 ? "" : new StringBuilder(s.Length * (int)n).Insert(0, s, (int)n).ToString();

    public static object? Negate(object? v) => v switch
    {
        long l => (object)(-l),
        double d => -d,
        bool b => b ? -1L : 0L,
        JinjaUndefined u => throw u.Error(),
        _ => throw new JinjaRuntimeError($"bad operand type for unary -: '{TypeName(v)}'"),
    };

    private static JinjaRuntimeError BinaryError(string op, object? a, object? b) =>
        new($"unsupported operand type(s) for {op}: '{TypeName(a)}' and '{TypeName(b)}'");

    /// <summary>Python's <c>"%s" % value</c> for %s, %r, %d, %i, %f and %%.</summary>
    public static string PercentFormat(string format, object? args)
    {
        var values = args is List<object?> l ? l : [args];
        int next = 0;
        var sb = new StringBuilder();
        for (int i = 0; i < format.Length; i++)
        {
            char c = format[i];
            if (c != '%')
            {
                sb.Append(c);
                continue;
            }
            if (++i >= format.Length) throw new JinjaRuntimeError("incomplete format");
            char spec = format[i];
            if (spec == '%')
            {
                sb.Append('%');
                continue;
            }
            if (next >= values.Count) throw new JinjaRuntimeError("not enough arguments for format string");
            object? v = values[next++];
            sb.Append(spec switch
            {
                's' => ToStr(v),
                'r' => Repr(v),
                'd' or 'i' => IsNumber(v) ? ((long)Math.Truncate(ToDouble(v))).ToString(CultureInfo.InvariantCulture)
                    : throw new JinjaRuntimeError($"%{spec} format: a number is required, not {TypeName(v)}"),
                'f' => ToDouble(v).ToString("F6", CultureInfo.InvariantCulture),
                _ => throw new JinjaRuntimeError($"unsupported format character '{spec}'"),
            });
        }
        if (next < values.Count && args is List<object?>) throw new JinjaRuntimeError("not all arguments converted during string formatting");
        return sb.ToString();
    }

    /// <summary>JSON as Python's <c>json.dumps(value, ensure_ascii=False, indent=indent)</c> (what transformers' tojson does).</summary>
    public static string ToJson(object? value, int? indent, bool sortKeys = false)
    {
        var sb = new StringBuilder();
        WriteJson(sb, value, indent, 0, sortKeys);
        return sb.ToString();
    }

    private static void WriteJson(StringBuilder sb, object? v, int? indent, int level, bool sortKeys)
    {
        switch (v)
        {
            case null: sb.Append("null"); return;
            case bool b: sb.Append(b ? "true" : "false"); return;
            case long l: sb.Append(l.ToString(CultureInfo.InvariantCulture)); return;
            case double d:
                sb.Append(double.IsNaN(d) ? "NaN" : double.IsPositiveInfinity(d) ? "Infinity" : double.IsNegativeInfinity(d) ? "-Infinity" : FloatRepr(d));
                return;
            case string s: JsonString(sb, s); return;
            case List<object?> list:
                WriteJsonContainer(sb, '[', ']', list.Count, indent, level, i => WriteJson(sb, list[i], indent, level + 1, sortKeys));
                return;
            case Dictionary<string, object?> dict:
            {
                var entries = dict.ToList();
                if (sortKeys) entries.Sort((x, y) => string.CompareOrdinal(x.Key, y.Key));
                WriteJsonContainer(sb, '{', '}', entries.Count, indent, level, i =>
                {
                    JsonString(sb, entries[i].Key);
                    sb.Append(": ");
                    WriteJson(sb, entries[i].Value, indent, level + 1, sortKeys);
                });
                return;
            }
            case JinjaNamespace ns: WriteJson(sb, ns.Values, indent, level, sortKeys); return;
            case JinjaUndefined u: throw new JinjaRuntimeError($"Object of type Undefined is not JSON serializable ({u.Hint ?? "undefined"})");
            default: throw new JinjaRuntimeError($"Object of type {TypeName(v)} is not JSON serializable");
        }
    }

    private static void WriteJsonContainer(StringBuilder sb, char open, char close, int count, int? indent, int level, Action<int> writeItem)
    {
        sb.Append(open);
        if (count == 0)
        {
            sb.Append(close);
            return;
        }
        for (int i = 0; i < count; i++)
        {
            if (i > 0) sb.Append(indent is null ? ", " : ",");
            if (indent is int n) sb.Append('\n').Append(' ', n * (level + 1));
            writeItem(i);
        }
        if (indent is int m) sb.Append('\n').Append(' ', m * level);
        sb.Append(close);
    }

    private static void JsonString(StringBuilder sb, string s)
    {
        sb.Append('"');
        foreach (char c in s)
        {
            switch (c)
            {
                case '"': sb.Append("\\\""); break;
                case '\\': sb.Append("\\\\"); break;
                case '\n': sb.Append("\\n"); break;
                case '\r': sb.Append("\\r"); break;
                case '\t': sb.Append("\\t"); break;
                case '\b': sb.Append("\\b"); break;
                case '\f': sb.Append("\\f"); break;
                default:
                    if (c < 0x20) sb.Append(CultureInfo.InvariantCulture, $"\\u{(int)c:x4}");
                    else sb.Append(c);
                    break;
            }
        }
        sb.Append('"');
    }
}
