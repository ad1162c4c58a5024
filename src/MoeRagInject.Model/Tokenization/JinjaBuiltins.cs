using System.Globalization;
using System.Text;
using static MoeRagInject.Model.Tokenization.JinjaValues;

namespace MoeRagInject.Model.Tokenization;

/// <summary>The filters, tests, global functions and built-in methods available to templates.</summary>
internal static class JinjaBuiltins
{
    public delegate object? Filter(object? value, JinjaArgs args, JinjaEvaluator evaluator);

    public static readonly Dictionary<string, Filter> Filters = new(StringComparer.Ordinal)
    {
        ["trim"] = (v, a, _) => Strip(ToStr(v), a.Get(0, "chars", null), true, true),
        ["length"] = (v, _, _) => Length(v),
        ["count"] = (v, _, _) => Length(v),
        ["upper"] = (v, _, _) => ToStr(v).ToUpperInvariant(),
        ["lower"] = (v, _, _) => ToStr(v).ToLowerInvariant(),
        ["capitalize"] = (v, _, _) => Capitalize(ToStr(v)),
        ["title"] = (v, _, _) => Title(ToStr(v)),
        ["tojson"] = (v, a, _) => ToJson(v, a.Get(0, "indent", null) is long n ? (int)n : null, IsTrue(a.Get(4, "sort_keys", false))),
        ["first"] = (v, _, _) => Iterate(v) is { Count: > 0 } l ? l[0] : new JinjaUndefined("first item of an empty sequence"),
        ["last"] = (v, _, _) => Iterate(v) is { Count: > 0 } l ? l[^1] : new JinjaUndefined("last item of an empty sequence"),
        ["join"] = Join,
        ["default"] = Default,
        ["d"] = Default,
        ["list"] = (v, _, _) => new List<object?>(Iterate(v)),
        ["string"] = (v, _, _) => ToStr(v),
        ["int"] = ToInt,
        ["float"] = ToFloat,
        ["abs"] = (v, _, _) => v switch
        {
            long l => (object)Math.Abs(l),
            double d => Math.Abs(d),
            bool b => b ? 1L : 0L,
            _ => throw new JinjaRuntimeError($"bad operand type for abs(): '{TypeName(v)}'"),
        },
        ["round"] = Round,
        ["replace"] = (v, a, _) => Replace(ToStr(v), ToStr(a.Get(0, "old", "")), ToStr(a.Get(1, "new", "")), a.Get(2, "count", null)),
        ["selectattr"] = (v, a, e) => SelectAttr(v, a, e, true),
        ["rejectattr"] = (v, a, e) => SelectAttr(v, a, e, false),
        ["select"] = (v, a, e) => Select(v, a, e, true),
        ["reject"] = (v, a, e) => Select(v, a, e, false),
        ["map"] = Map,
        ["items"] = (v, _, _) => v switch
        {
            Dictionary<string, object?> d => d.Select(kv => (object?)new JinjaTuple([kv.Key, kv.Value])).ToList(),
            JinjaUndefined => new List<object?>(),
            _ => throw new JinjaRuntimeError($"items filter: expected a dict, got {TypeName(v)}"),
        },
        ["reverse"] = (v, _, _) => v is string s ? string.Concat(Iterate(s).AsEnumerable().Reverse().Select(x => (string)x!)) : Iterate(v).AsEnumerable().Reverse().ToList(),
        ["sort"] = Sort,
        ["unique"] = (v, _, _) =>
        {
            var r = new List<object?>();
            foreach (var x in Iterate(v))
                if (!r.Any(y => ValueEquals(x, y))) r.Add(x);
            return r;
        },
        ["min"] = (v, _, _) => Iterate(v) is { Count: > 0 } l ? l.Aggregate((x, y) => Compare(y, x, "<") < 0 ? y : x) : new JinjaUndefined("min of an empty sequence"),
        ["max"] = (v, _, _) => Iterate(v) is { Count: > 0 } l ? l.Aggregate((x, y) => Compare(y, x, ">") > 0 ? y : x) : new JinjaUndefined("max of an empty sequence"),
        ["sum"] = (v, a, _) =>
        {
            object? total = a.Get(1, "start", 0L);
            string? attribute = a.Get(0, "attribute", null) as string;
            foreach (var x in Iterate(v)) total = Add(total, attribute is null ? x : GetAttr(x, attribute));
            return total;
        },
        ["safe"] = (v, _, _) => v,
        ["escape"] = (v, _, _) => HtmlEscape(ToStr(v)),
        ["e"] = (v, _, _) => HtmlEscape(ToStr(v)),
        ["indent"] = Indent,
        ["format"] = (v, a, _) => PercentFormat(ToStr(v), a.Positional.Count == 1 ? a.Positional[0] : new List<object?>(a.Positional)),
        ["attr"] = (v, a, _) => GetAttr(v, ToStr(a.Get(0, "name", ""))),
        ["center"] = (v, a, _) => StringMethod(ToStr(v), "center", a),
        ["wordcount"] = (v, _, _) => (long)ToStr(v).Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries).Length,
    };

    public delegate bool Test(object? value, JinjaArgs args);

    public static readonly Dictionary<string, Test> Tests = new(StringComparer.Ordinal)
    {
        ["defined"] = (v, _) => v is not JinjaUndefined,
        ["undefined"] = (v, _) => v is JinjaUndefined,
        ["none"] = (v, _) => v is null,
        ["string"] = (v, _) => v is string,
        ["number"] = (v, _) => v is long or double,
        ["integer"] = (v, _) => v is long,
        ["float"] = (v, _) => v is double,
        ["boolean"] = (v, _) => v is bool,
        ["true"] = (v, _) => v is true,
        ["false"] = (v, _) => v is false,
        ["mapping"] = (v, _) => v is Dictionary<string, object?>,
        ["iterable"] = (v, _) => v is string or List<object?> or Dictionary<string, object?>,
        ["sequence"] = (v, _) => v is string or List<object?> or Dictionary<string, object?>,
        ["callable"] = (v, _) => v is JinjaCallable or JinjaBoundMethod,
        ["even"] = (v, _) => v is long l ? l % 2 == 0 : throw new JinjaRuntimeError($"even test: expected an integer, got {TypeName(v)}"),
        ["odd"] = (v, _) => v is long l ? l % 2 != 0 : throw new JinjaRuntimeError($"odd test: expected an integer, got {TypeName(v)}"),
        ["divisibleby"] = (v, a) => ValueEquals(Arithmetic("%", v, a.Get(0, "num", 1L)), 0L),
        ["eq"] = (v, a) => ValueEquals(v, a.Get(0, "other", null)),
        ["equalto"] = (v, a) => ValueEquals(v, a.Get(0, "other", null)),
        ["=="] = (v, a) => ValueEquals(v, a.Get(0, "other", null)),
        ["ne"] = (v, a) => !ValueEquals(v, a.Get(0, "other", null)),
        ["!="] = (v, a) => !ValueEquals(v, a.Get(0, "other", null)),
        ["lt"] = (v, a) => Compare(v, a.Get(0, "other", null), "<") < 0,
        ["lessthan"] = (v, a) => Compare(v, a.Get(0, "other", null), "<") < 0,
        ["<"] = (v, a) => Compare(v, a.Get(0, "other", null), "<") < 0,
        ["le"] = (v, a) => Compare(v, a.Get(0, "other", null), "<=") <= 0,
        ["<="] = (v, a) => Compare(v, a.Get(0, "other", null), "<=") <= 0,
        ["gt"] = (v, a) => Compare(v, a.Get(0, "other", null), ">") > 0,
        ["greaterthan"] = (v, a) => Compare(v, a.Get(0, "other", null), ">") > 0,
        [">"] = (v, a) => Compare(v, a.Get(0, "other", null), ">") > 0,
        ["ge"] = (v, a) => Compare(v, a.Get(0, "other", null), ">=") >= 0,
        [">="] = (v, a) => Compare(v, a.Get(0, "other", null), ">=") >= 0,
        ["in"] = (v, a) => Contains(a.Get(0, "seq", null), v),
        ["sameas"] = (v, a) => ReferenceEquals(v, a.Get(0, "other", null)) || (v is null && a.Get(0, "other", null) is null) ||
                               (v is bool x && a.Get(0, "other", null) is bool y && x == y),
        ["lower"] = (v, _) => v is string s && s == s.ToLowerInvariant(),
        ["upper"] = (v, _) => v is string s && s == s.ToUpperInvariant(),
        ["escaped"] = (_, _) => false,
    };

    /// <summary>The global functions every template sees.</summary>
    public static Dictionary<string, object?> Globals() => new(StringComparer.Ordinal)
    {
        ["range"] = new JinjaCallable("range", Range),
        ["namespace"] = new JinjaCallable("namespace", a =>
        {
            var ns = new JinjaNamespace();
            foreach (var p in a.Positional)
            {
                if (p is Dictionary<string, object?> d)
                    foreach (var kv in d) ns.Values[kv.Key] = kv.Value;
                else throw new JinjaRuntimeError("namespace() takes only a dict as positional argument");
            }
            foreach (var kv in a.Named) ns.Values[kv.Key] = kv.Value;
            return ns;
        }),
        ["dict"] = new JinjaCallable("dict", a =>
        {
            var d = new Dictionary<string, object?>(StringComparer.Ordinal);
            foreach (var p in a.Positional)
                if (p is Dictionary<string, object?> src)
                    foreach (var kv in src) d[kv.Key] = kv.Value;
            foreach (var kv in a.Named) d[kv.Key] = kv.Value;
            return d;
        }),
        ["raise_exception"] = new JinjaCallable("raise_exception", a =>
            throw new JinjaException(ToStr(a.Get(0, "message", ""))) { RaisedByTemplate = true }),
        ["strftime_now"] = new JinjaCallable("strftime_now", a => StrFTime(DateTime.Now, ToStr(a.Get(0, "format", "")))),
    };

    private static object? Range(JinjaArgs a)
    {
        long start = 0, stop, step = 1;
        var p = a.Positional;
        if (p.Count == 1) stop = AsLong(p[0]);
        else if (p.Count is 2 or 3)
        {
            start = AsLong(p[0]);
            stop = AsLong(p[1]);
            if (p.Count == 3) step = AsLong(p[2]);
        }
        else throw new JinjaRuntimeError($"range expected 1 to 3 arguments, got {p.Count}");
        if (step == 0) throw new JinjaRuntimeError("range() arg 3 must not be zero");
        var r = new List<object?>();
        for (long i = start; step > 0 ? i < stop : i > stop; i += step)
        {
            r.Add(i);
            if (r.Count > 1_000_000) throw new JinjaRuntimeError("range too big");
        }
        return r;
    }

    private static long AsLong(object? v) => v switch
    {
        long l => l,
        bool b => b ? 1 : 0,
        _ => throw new JinjaRuntimeError($"'{TypeName(v)}' object cannot be interpreted as an integer"),
    };

    private static object? Join(object? v, JinjaArgs a, JinjaEvaluator e)
    {
        string sep = ToStr(a.Get(0, "d", ""));
        string? attribute = a.Get(1, "attribute", null) as string;
        var items = Iterate(v).Select(x => ToStr(attribute is null ? x : GetAttr(x, attribute)));
        return string.Join(sep, items);
    }

    private static object? Default(object? v, JinjaArgs a, JinjaEvaluator e)
    {
        object? dflt = a.Get(0, "default_value", "");
        bool boolean = IsTrue(a.Get(1, "boolean", false));
        if (v is JinjaUndefined || (boolean && !IsTrue(v))) return dflt;
        return v;
    }

    private static object? ToInt(object? v, JinjaArgs a, JinjaEvaluator e)
    {
        object? dflt = a.Get(0, "default", 0L);
        switch (v)
        {
            case long l: return l;
            case bool b: return b ? 1L : 0L;
            case double d: return double.IsFinite(d) ? (long)Math.Truncate(d) : dflt;
            case string s:
                if (long.TryParse(s.Trim().Replace("_", "", StringComparison.Ordinal), NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out long r)) return r;
                if (double.TryParse(s.Trim(), NumberStyles.Float, CultureInfo.InvariantCulture, out double f) && double.IsFinite(f)) return (long)Math.Truncate(f);
                return dflt;
            default: return dflt;
        }
    }

    private static object? ToFloat(object? v, JinjaArgs a, JinjaEvaluator e)
    {
        object? dflt = a.Get(0, "default", 0.0);
        return v switch
        {
            long l => (double)l,
            double d => d,
            bool b => b ? 1.0 : 0.0,
            string s when double.TryParse(s.Trim(), NumberStyles.Float, CultureInfo.InvariantCulture, out double f) => f,
            _ => dflt,
        };
    }

    private static object? Round(object? v, JinjaArgs a, JinjaEvaluator e)
    {
        int precision = a.Get(0, "precision", 0L) is long p ? (int)p : 0;
        string method = ToStr(a.Get(1, "method", "common"));
        double d = v switch
        {
            long l => l,
            double x => x,
            _ => throw new JinjaRuntimeError($"round filter: expected a number, got {TypeName(v)}"),
        };
        double factor = Math.Pow(10, precision);
        double r = method switch
        {
            "common" => Math.Round(d * factor, MidpointRounding.AwayFromZero) / factor,
            "ceil" => Math.Ceiling(d * factor) / factor,
            "floor" => Math.Floor(d * factor) / factor,
            _ => throw new JinjaRuntimeError("round filter: method must be common, ceil or floor"),
        };
        return r;
    }

    private static object? SelectAttr(object? v, JinjaArgs a, JinjaEvaluator e, bool keep)
    {
        if (a.Positional.Count == 0) throw new JinjaRuntimeError("selectattr/rejectattr need an attribute name");
        string attribute = ToStr(a.Positional[0]);
        var result = new List<object?>();
        foreach (var item in Iterate(v))
        {
            object? value = GetAttrPath(item, attribute);
            bool ok = a.Positional.Count < 2 ? IsTrue(value) : RunTest(ToStr(a.Positional[1]), value, a.Positional.Skip(2));
            if (ok == keep) result.Add(item);
        }
        return result;
    }

    private static object? Select(object? v, JinjaArgs a, JinjaEvaluator e, bool keep)
    {
        var result = new List<object?>();
        foreach (var item in Iterate(v))
        {
            bool ok = a.Positional.Count < 1 ? IsTrue(item) : RunTest(ToStr(a.Positional[0]), item, a.Positional.Skip(1));
            if (ok == keep) result.Add(item);
        }
        return result;
    }

    private static object? GetAttrPath(object? item, string path)
    {
        foreach (var part in path.Split('.'))
            item = long.TryParse(part, NumberStyles.None, CultureInfo.InvariantCulture, out long idx) ? GetItem(item, idx) : GetItem(item, part);
        return item;
    }

    private static bool RunTest(string name, object? value, IEnumerable<object?> args)
    {
        if (!Tests.TryGetValue(name, out var test)) throw new JinjaRuntimeError($"no test named '{name}'");
        var ja = new JinjaArgs();
        ja.Positional.AddRange(args);
        return test(value, ja);
    }

    private static object? Map(object? v, JinjaArgs a, JinjaEvaluator e)
    {
        var result = new List<object?>();
        if (a.Named.TryGetValue("attribute", out var attr))
        {
            object? dflt = a.Named.TryGetValue("default", out var d) ? d : null;
            foreach (var item in Iterate(v))
            {
                var x = GetAttrPath(item, ToStr(attr));
                result.Add(x is JinjaUndefined && a.Named.ContainsKey("default") ? dflt : x);
            }
            return result;
        }
        if (a.Positional.Count == 0) throw new JinjaRuntimeError("map filter needs a filter name or attribute=");
        string filterName = ToStr(a.Positional[0]);
        if (!Filters.TryGetValue(filterName, out var filter)) throw new JinjaRuntimeError($"no filter named '{filterName}'");
        var rest = new JinjaArgs();
        rest.Positional.AddRange(a.Positional.Skip(1));
        foreach (var kv in a.Named) rest.Named[kv.Key] = kv.Value;
        foreach (var item in Iterate(v)) result.Add(filter(item, rest, e));
        return result;
    }

    private static object? Sort(object? v, JinjaArgs a, JinjaEvaluator e)
    {
        bool reverse = IsTrue(a.Get(0, "reverse", false));
        bool caseSensitive = IsTrue(a.Get(1, "case_sensitive", false));
        string? attribute = a.Get(2, "attribute", null) as string;
        var items = new List<object?>(Iterate(v));
        object? Key(object? x)
        {
            var k = attribute is null ? x : GetAttrPath(x, attribute);
            return !caseSensitive && k is string s ? s.ToLowerInvariant() : k;
        }
        var sorted = items.Select((x, i) => (x, i)).ToList();
        sorted.Sort((p, q) =>
        {
            int c = Compare(Key(p.x), Key(q.x), "<");
            if (reverse) c = -c;
            return c != 0 ? c : p.i.CompareTo(q.i);
        });
        return sorted.Select(p => p.x).ToList();
    }

    private static object? Indent(object? v, JinjaArgs a, JinjaEvaluator e)
    {
        object? width = a.Get(0, "width", 4L);
        string indention = width is string ws ? ws : new string(' ', (int)(width is long w ? w : 4));
        bool first = IsTrue(a.Get(1, "first", false));
        bool blank = IsTrue(a.Get(2, "blank", false));
        string s = ToStr(v) + "\n";
        var lines = SplitLines(s);
        string rv;
        if (blank) rv = string.Join("\n" + indention, lines);
        else
        {
            rv = lines.Count > 0 ? lines[0] : "";
            if (lines.Count > 1)
                rv += "\n" + string.Join("\n", lines.Skip(1).Select(l => l.Length > 0 ? indention + l : l));
        }
        if (first) rv = indention + rv;
        return rv;
    }

    private static List<string> SplitLines(string s, bool keepEnds = false)
    {
        var lines = new List<string>();
        int start = 0;
        for (int i = 0; i < s.Length; i++)
        {
            char c = s[i];
            if (c is '\n' or '\r' or '\v' or '\f' or '\x1c' or '\x1d' or '\x1e' or '\x85' or '\u2028' or '\u2029')
            {
                int end = i;
                if (c == '\r' && i + 1 < s.Length && s[i + 1] == '\n') i++;
                lines.Add(keepEnds ? s[start..(i + 1)] : s[start..end]);
                start = i + 1;
            }
        }
        if (start < s.Length) lines.Add(s[start..]);
        return lines;
    }

    private static string HtmlEscape(string s) =>
        s.Replace("&", "&amp;", StringComparison.Ordinal).Replace("<", "&lt;", StringComparison.Ordinal)
         .Replace(">", "&gt;", StringComparison.Ordinal).Replace("\"", "&#34;", StringComparison.Ordinal)
         .Replace("'", "&#39;", StringComparison.Ordinal);

    private static string Capitalize(string s) =>
        s.Length == 0 ? s : string.Concat(s[..1].ToUpperInvariant(), s[1..].ToLowerInvariant());

    private static string Title(string s)
    {
        var sb = new StringBuilder(s.Length);
        bool prevCased = false;
        foreach (char c in s)
        {
            sb.Append(prevCased ? char.ToLowerInvariant(c) : char.ToUpperInvariant(c));
            prevCased = char.IsLetter(c);
        }
        return sb.ToString();
    }

    private static string Strip(string s, object? chars, bool left, bool right)
    {
        if (chars is null or JinjaUndefined)
        {
            if (left) s = s.TrimStart();
            if (right) s = s.TrimEnd();
            return s;
        }
        char[] set = ToStr(chars).ToCharArray();
        if (left) s = s.TrimStart(set);
        if (right) s = s.TrimEnd(set);
        return s;
    }

    private static string Replace(string s, string old, string replacement, object? count)
    {
        long n = count is long c ? c : -1;
        if (n < 0) return old.Length == 0 ? InsertEverywhere(s, replacement) : s.Replace(old, replacement, StringComparison.Ordinal);
        var sb = new StringBuilder();
        int pos = 0;
        while (n-- > 0)
        {
            int i = s.IndexOf(old, pos, StringComparison.Ordinal);
            if (i < 0 || old.Length == 0) break;
            sb.Append(s, pos, i - pos).Append(replacement);
            pos = i + old.Length;
        }
        return sb.Append(s, pos, s.Length - pos).ToString();
    }

    private static string InsertEverywhere(string s, string r)
    {
        var sb = new StringBuilder(r);
        foreach (char c in s) sb.Append(c).Append(r);
        return sb.ToString();
    }

    /// <summary>Calls a method of a string, dict or list (<c>content.strip()</c>, <c>message.get('x')</c>, ...).</summary>
    public static object? CallMethod(JinjaBoundMethod m, JinjaArgs a)
    {
        switch (m.Target)
        {
            case string s: return StringMethod(s, m.Name, a);
            case Dictionary<string, object?> d:
                return m.Name switch
                {
                    "items" => d.Select(kv => (object?)new JinjaTuple([kv.Key, kv.Value])).ToList(),
                    "keys" => d.Keys.Cast<object?>().ToList(),
                    "values" => d.Values.ToList(),
                    "get" => a.Get(0, "key", null) is string k && d.TryGetValue(k, out var v) ? v : a.Get(1, "default", null),
                    "copy" => new Dictionary<string, object?>(d, StringComparer.Ordinal),
                    _ => throw new JinjaRuntimeError($"dict has no method '{m.Name}'"),
                };
            case List<object?> l:
                return m.Name switch
                {
                    "index" => IndexOf(l, a.Get(0, "value", null)),
                    "count" => (long)l.Count(x => ValueEquals(x, a.Get(0, "value", null))),
                    "copy" => new List<object?>(l),
                    _ => throw new JinjaRuntimeError($"list has no method '{m.Name}'"),
                };
            default:
                throw new JinjaRuntimeError($"'{TypeName(m.Target)}' has no method '{m.Name}'");
        }
    }

    private static long IndexOf(List<object?> l, object? value)
    {
        for (int i = 0; i < l.Count; i++)
            if (ValueEquals(l[i], value)) return i;
        throw new JinjaRuntimeError($"{Repr(value)} is not in list");
    }

    private static object? StringMethod(string s, string name, JinjaArgs a)
    {
        switch (name)
        {
            case "strip": return Strip(s, a.Get(0, "chars", null), true, true);
            case "lstrip": return Strip(s, a.Get(0, "chars", null), true, false);
            case "rstrip": return Strip(s, a.Get(0, "chars", null), false, true);
            case "upper": return s.ToUpperInvariant();
            case "lower": return s.ToLowerInvariant();
            case "title": return Title(s);
            case "capitalize": return Capitalize(s);
            case "swapcase":
                return string.Concat(s.Select(c => char.IsUpper(c) ? char.ToLowerInvariant(c) : char.ToUpperInvariant(c)));
            case "startswith":
            case "endswith":
            {
                var arg = a.Get(0, "prefix", "");
                var options = arg is List<object?> l ? l.Select(ToStr) : [ToStr(arg)];
                return name == "startswith"
                    ? options.Any(p => s.StartsWith(p, StringComparison.Ordinal))
                    : options.Any(p => s.EndsWith(p, StringComparison.Ordinal));
            }
            case "split":
            case "rsplit":
            {
                object? sep = a.Get(0, "sep", null);
                long max = a.Get(1, "maxsplit", -1L) is long m ? m : -1;
                return Split(s, sep is null or JinjaUndefined ? null : ToStr(sep), max, name == "rsplit");
            }
            case "splitlines": return SplitLines(s, IsTrue(a.Get(0, "keepends", false))).Cast<object?>().ToList();
            case "replace": return Replace(s, ToStr(a.Get(0, "old", "")), ToStr(a.Get(1, "new", "")), a.Get(2, "count", null));
            case "join": return string.Join(s, Iterate(a.Get(0, "iterable", null)).Select(ToStr));
            case "find": return (long)s.IndexOf(ToStr(a.Get(0, "sub", "")), StringComparison.Ordinal);
            case "rfind": return (long)s.LastIndexOf(ToStr(a.Get(0, "sub", "")), StringComparison.Ordinal);
            case "count":
            {
                string sub = ToStr(a.Get(0, "sub", ""));
                if (sub.Length == 0) return (long)s.Length + 1;
                long n = 0;
                for (int i = s.IndexOf(sub, StringComparison.Ordinal); i >= 0; i = s.IndexOf(sub, i + sub.Length, StringComparison.Ordinal)) n++;
                return n;
            }
            case "isdigit": return s.Length > 0 && s.All(char.IsDigit);
            case "isalpha": return s.Length > 0 && s.All(char.IsLetter);
            case "isalnum": return s.Length > 0 && s.All(char.IsLetterOrDigit);
            case "isspace": return s.Length > 0 && s.All(char.IsWhiteSpace);
            case "isupper": return s.Any(char.IsLetter) && s == s.ToUpperInvariant();
            case "islower": return s.Any(char.IsLetter) && s == s.ToLowerInvariant();
            case "removeprefix": { string p = ToStr(a.Get(0, "prefix", "")); return s.StartsWith(p, StringComparison.Ordinal) ? s[p.Length..] : s; }
            case "removesuffix": { string p = ToStr(a.Get(0, "suffix", "")); return p.Length > 0 && s.EndsWith(p, StringComparison.Ordinal) ? s[..^p.Length] : s; }
            case "center":
            case "ljust":
            case "rjust":
            {
                int width = (int)AsLong(a.Get(0, "width", 0L));
                char fill = ToStr(a.Get(1, "fillchar", " ")) is { Length: 1 } f ? f[0] : ' ';
                int pad = Math.Max(0, width - s.Length);
                if (name == "ljust") return s + new string(fill, pad);
                if (name == "rjust") return new string(fill, pad) + s;
                int left = pad / 2 + (pad & width & 1);
                return new string(fill, left) + s + new string(fill, pad - left);
            }
            case "zfill":
            {
                int width = (int)AsLong(a.Get(0, "width", 0L));
                if (s.Length >= width) return s;
                int signLen = s.Length > 0 && s[0] is '+' or '-' ? 1 : 0;
                return s[..signLen] + new string('0', width - s.Length) + s[signLen..];
            }
            case "partition":
            case "rpartition":
            {
                string sep = ToStr(a.Get(0, "sep", ""));
                int i = name == "partition" ? s.IndexOf(sep, StringComparison.Ordinal) : s.LastIndexOf(sep, StringComparison.Ordinal);
                if (i < 0) return name == "partition" ? new JinjaTuple([s, "", ""]) : new JinjaTuple(["", "", s]);
                return new JinjaTuple([s[..i], sep, s[(i + sep.Length)..]]);
            }
            case "format": return BraceFormat(s, a);
            default: throw new JinjaRuntimeError($"str has no method '{name}'");
        }
    }

    private static List<object?> Split(string s, string? sep, long max, bool fromRight)
    {
        var parts = new List<string>();
        if (sep == null)
        {
            var words = s.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries);
            if (max < 0 || words.Length <= max + 1) return words.Cast<object?>().ToList();
            // Keep the remainder unsplit (approximation of Python for maxsplit with whitespace separators).
            if (!fromRight)
            {
                var head = words.Take((int)max).ToList();
                string rest = s.TrimStart();
                foreach (var w in head) rest = rest[w.Length..].TrimStart();
                head.Add(rest);
                return head.Cast<object?>().ToList();
            }
            var tail = words.Skip(words.Length - (int)max).ToList();
            string restR = s.TrimEnd();
            for (int i = tail.Count - 1; i >= 0; i--) restR = restR[..^tail[i].Length].TrimEnd();
            tail.Insert(0, restR);
            return tail.Cast<object?>().ToList();
        }
        if (sep.Length == 0) throw new JinjaRuntimeError("empty separator");
        if (!fromRight || max < 0)
        {
            var all = s.Split(sep);
            if (max < 0 || all.Length <= max + 1) return all.Cast<object?>().ToList();
            var head = all.Take((int)max).ToList();
            head.Add(string.Join(sep, all.Skip((int)max)));
            return head.Cast<object?>().ToList();
        }
        var pieces = s.Split(sep);
        if (pieces.Length <= max + 1) return pieces.Cast<object?>().ToList();
        int keep = pieces.Length - (int)max;
        var r = new List<object?> { string.Join(sep, pieces.Take(keep)) };
        r.AddRange(pieces.Skip(keep));
        return r;
    }

    private static string BraceFormat(string format, JinjaArgs a)
    {
        var sb = new StringBuilder();
        int auto = 0;
        for (int i = 0; i < format.Length; i++)
        {
            char c = format[i];
            if (c == '{' && i + 1 < format.Length && format[i + 1] == '{') { sb.Append('{'); i++; continue; }
            if (c == '}' && i + 1 < format.Length && format[i + 1] == '}') { sb.Append('}'); i++; continue; }
            if (c != '{') { sb.Append(c); continue; }
            int close = format.IndexOf('}', i);
            if (close < 0) throw new JinjaRuntimeError("single '{' encountered in format string");
            string field = format[(i + 1)..close];
            int colon = field.IndexOf(':', StringComparison.Ordinal);
            if (colon >= 0) field = field[..colon];
            object? value = field.Length == 0 ? a.Positional.ElementAtOrDefault(auto++)
                : int.TryParse(field, NumberStyles.None, CultureInfo.InvariantCulture, out int idx) ? a.Positional.ElementAtOrDefault(idx)
                : a.Named.GetValueOrDefault(field);
            sb.Append(ToStr(value));
            i = close;
        }
        return sb.ToString();
    }

    private static readonly string[] MonthNames = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    private static readonly string[] DayNames = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];

    /// <summary>A subset of C strftime (the directives chat templates use for dates).</summary>
    public static string StrFTime(DateTime t, string format)
    {
        var sb = new StringBuilder();
        for (int i = 0; i < format.Length; i++)
        {
            if (format[i] != '%' || i + 1 >= format.Length)
            {
                sb.Append(format[i]);
                continue;
            }
            char c = format[++i];
            bool noPad = false;
            if (c == '-' && i + 1 < format.Length)
            {
                noPad = true;
                c = format[++i];
            }
            string Num(int v, int width) => noPad ? v.ToString(CultureInfo.InvariantCulture) : v.ToString(new string('0', width), CultureInfo.InvariantCulture);
            sb.Append(c switch
            {
                'Y' => t.Year.ToString(CultureInfo.InvariantCulture),
                'y' => Num(t.Year % 100, 2),
                'm' => Num(t.Month, 2),
                'd' => Num(t.Day, 2),
                'e' => t.Day.ToString(CultureInfo.InvariantCulture).PadLeft(2),
                'H' => Num(t.Hour, 2),
                'I' => Num(t.Hour % 12 == 0 ? 12 : t.Hour % 12, 2),
                'M' => Num(t.Minute, 2),
                'S' => Num(t.Second, 2),
                'p' => t.Hour < 12 ? "AM" : "PM",
                'B' => MonthNames[t.Month - 1],
                'b' or 'h' => MonthNames[t.Month - 1][..3],
                'A' => DayNames[(int)t.DayOfWeek],
                'a' => DayNames[(int)t.DayOfWeek][..3],
                'j' => Num(t.DayOfYear, 3),
                '%' => "%",
                _ => "%" + (noPad ? "-" : "") + c,
            });
        }
        return sb.ToString();
    }
}
