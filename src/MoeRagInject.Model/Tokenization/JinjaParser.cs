using System.Globalization;

namespace MoeRagInject.Model.Tokenization;

/// <summary>Builds the node tree of a template from its lexed segments.</summary>
internal sealed class JinjaParser
{
    private readonly List<JinjaSegment> _segments;
    private readonly string _name;
    private int _index;
    private int _loopDepth;

    private JinjaParser(List<JinjaSegment> segments, string name)
    {
        _segments = segments;
        _name = name;
    }

    public static List<JinjaNode> Parse(List<JinjaSegment> segments, string name)
    {
        var parser = new JinjaParser(segments, name);
        var body = parser.ParseBody([], out _, out _);
        return body;
    }

    private JinjaException Error(int line, string message) => new($"{_name}, line {line}: {message}");

    /// <summary>Parses nodes until a statement whose tag is one of <paramref name="endTags"/> (returned with its tokens).</summary>
    private List<JinjaNode> ParseBody(string[] endTags, out string? endTag, out TokenStream? endTokens)
    {
        var nodes = new List<JinjaNode>();
        while (_index < _segments.Count)
        {
            var seg = _segments[_index++];
            switch (seg.Kind)
            {
                case JinjaSegmentKind.Text:
                    nodes.Add(new TextNode(seg.Line, seg.Text));
                    break;
                case JinjaSegmentKind.Output:
                {
                    var ts = new TokenStream(seg, this);
                    if (ts.AtEnd) throw Error(seg.Line, "empty expression in {{ }}");
                    var expr = ts.ParseTuple(true);
                    ts.ExpectEnd();
                    nodes.Add(new OutputNode(seg.Line, expr));
                    break;
                }
                default:
                {
                    var ts = new TokenStream(seg, this);
                    if (ts.AtEnd || ts.Peek.Kind != JinjaTokenKind.Name) throw Error(seg.Line, "expected a tag name after {%");
                    string tag = ts.Next().Text;
                    if (Array.IndexOf(endTags, tag) >= 0)
                    {
                        endTag = tag;
                        endTokens = ts;
                        return nodes;
                    }
                    nodes.Add(ParseStatement(tag, ts, seg.Line));
                    break;
                }
            }
        }
        if (endTags.Length > 0)
            throw Error(_segments.Count > 0 ? _segments[^1].Line : 1,
                $"unexpected end of template: expected {string.Join(" or ", endTags.Select(t => "{% " + t + " %}"))}");
        endTag = null;
        endTokens = null;
        return nodes;
    }

    private JinjaNode ParseStatement(string tag, TokenStream ts, int line)
    {
        switch (tag)
        {
            case "if":
            {
                var branches = new List<(JinjaExpr, List<JinjaNode>)>();
                var cond = ts.ParseTuple(false);
                ts.ExpectEnd();
                List<JinjaNode>? elseBody = null;
                while (true)
                {
                    var body = ParseBody(["elif", "else", "endif"], out var end, out var endTs);
                    branches.Add((cond, body));
                    if (end == "elif")
                    {
                        cond = endTs!.ParseTuple(false);
                        endTs.ExpectEnd();
                        continue;
                    }
                    endTs!.ExpectEnd();
                    if (end == "else")
                    {
                        elseBody = ParseBody(["endif"], out _, out var endIf);
                        endIf!.ExpectEnd();
                    }
                    break;
                }
                return new IfNode(line, branches, elseBody);
            }
            case "for":
            {
                var targets = new List<string>();
                bool paren = ts.SkipOperator("(");
                do targets.Add(ts.ExpectName());
                while (ts.SkipOperator(","));
                if (paren) ts.ExpectOperator(")");
                ts.ExpectKeyword("in");
                var iterable = ts.ParseTuple(false);
                JinjaExpr? filter = null;
                if (ts.SkipKeyword("if")) filter = ts.ParseExpression(true);
                if (ts.SkipKeyword("recursive")) throw Error(line, "recursive for loops are not supported");
                ts.ExpectEnd();
                _loopDepth++;
                var body = ParseBody(["else", "endfor"], out var end, out var endTs);
                _loopDepth--;
                endTs!.ExpectEnd();
                List<JinjaNode>? elseBody = null;
                if (end == "else")
                {
                    elseBody = ParseBody(["endfor"], out _, out var endFor);
                    endFor!.ExpectEnd();
                }
                return new ForNode(line, targets.ToArray(), iterable, filter, body, elseBody);
            }
            case "set":
            {
                string name = ts.ExpectName();
                string? attribute = null;
                if (ts.SkipOperator(".")) attribute = ts.ExpectName();
                if (ts.Peek.IsOperator(",")) throw Error(line, "unpacking several variables in {% set %} is not supported");
                if (ts.SkipOperator("="))
                {
                    var value = ts.ParseTuple(true);
                    ts.ExpectEnd();
                    return new SetNode(line, name, attribute, value, null);
                }
                ts.ExpectEnd();
                var body = ParseBody(["endset"], out _, out var endSet);
                endSet!.ExpectEnd();
                return new SetNode(line, name, attribute, null, body);
            }
            case "macro":
            {
                string name = ts.ExpectName();
                var parameters = new List<(string, JinjaExpr?)>();
                ts.ExpectOperator("(");
                while (!ts.SkipOperator(")"))
                {
                    if (parameters.Count > 0) ts.ExpectOperator(",");
                    if (ts.SkipOperator(")")) break;
                    string p = ts.ExpectName();
                    JinjaExpr? dflt = ts.SkipOperator("=") ? ts.ParseExpression(true) : null;
                    parameters.Add((p, dflt));
                }
                ts.ExpectEnd();
                int saved = _loopDepth;
                _loopDepth = 0;
                var body = ParseBody(["endmacro"], out _, out var endMacro);
                _loopDepth = saved;
                endMacro!.SkipName();
                endMacro.ExpectEnd();
                return new MacroNode(line, name, parameters, body);
            }
            case "break":
            case "continue":
                ts.ExpectEnd();
                if (_loopDepth == 0) throw Error(line, $"'{tag}' outside of a for loop");
                return new LoopControlNode(line, tag == "break" ? JinjaFlow.Break : JinjaFlow.Continue);
            case "generation":
            {
                // transformers' assistant-mask marker: renders its body unchanged.
                ts.ExpectEnd();
                var body = ParseBody(["endgeneration"], out _, out var endGen);
                endGen!.ExpectEnd();
                return new BlockNode(line, body);
            }
            case "elif" or "else" or "endif" or "endfor" or "endset" or "endmacro" or "endgeneration" or "endraw":
                throw Error(line, $"unexpected {{% {tag} %}}");
            default:
                throw Error(line, $"unknown or unsupported tag '{tag}'");
        }
    }

    /// <summary>Expression parser over the tokens of one tag (Jinja's precedence rules).</summary>
    internal sealed class TokenStream(JinjaSegment segment, JinjaParser parser)
    {
        private readonly List<JinjaToken> _tokens = segment.Tokens;
        private int _pos;

        public bool AtEnd => _pos >= _tokens.Count;

        public JinjaToken Peek => AtEnd ? new JinjaToken(JinjaTokenKind.Operator, "<end of tag>", segment.Line) : _tokens[_pos];

        private JinjaToken PeekAt(int offset) =>
            _pos + offset < _tokens.Count ? _tokens[_pos + offset] : new JinjaToken(JinjaTokenKind.Operator, "<end of tag>", segment.Line);

        private int Line => AtEnd ? segment.Line : _tokens[_pos].Line;

        private JinjaException Error(string message) => parser.Error(Line, message);

        public JinjaToken Next()
        {
            if (AtEnd) throw Error("unexpected end of tag");
            return _tokens[_pos++];
        }

        public void ExpectEnd()
        {
            if (!AtEnd) throw Error($"unexpected {Peek}");
        }

        public bool SkipOperator(string op)
        {
            if (!AtEnd && Peek.IsOperator(op))
            {
                _pos++;
                return true;
            }
            return false;
        }

        public void ExpectOperator(string op)
        {
            if (!SkipOperator(op)) throw Error($"expected '{op}', found {Peek}");
        }

        public bool SkipKeyword(string name)
        {
            if (!AtEnd && Peek.IsName(name))
            {
                _pos++;
                return true;
            }
            return false;
        }

        public void ExpectKeyword(string name)
        {
            if (!SkipKeyword(name)) throw Error($"expected '{name}', found {Peek}");
        }

        public string ExpectName()
        {
            if (AtEnd || Peek.Kind != JinjaTokenKind.Name) throw Error($"expected a name, found {Peek}");
            return Next().Text;
        }

        public void SkipName()
        {
            if (!AtEnd && Peek.Kind == JinjaTokenKind.Name) _pos++;
        }

        /// <summary>An expression, or a comma-separated tuple of them (a list value).</summary>
        public JinjaExpr ParseTuple(bool withCondExpr)
        {
            int line = Line;
            var first = ParseExpression(withCondExpr);
            if (AtEnd || !Peek.IsOperator(",")) return first;
            var items = new List<JinjaExpr> { first };
            while (SkipOperator(","))
            {
                if (AtEnd || Peek.IsOperator(")") || Peek.IsName("if")) break;
                items.Add(ParseExpression(withCondExpr));
            }
            return new ListExpr(line, items, isTuple: true);
        }

        public JinjaExpr ParseExpression(bool withCondExpr)
        {
            if (!withCondExpr) return ParseOr();
            var expr = ParseOr();
            while (SkipKeyword("if"))
            {
                int line = Line;
                var cond = ParseOr();
                JinjaExpr? otherwise = SkipKeyword("else") ? ParseExpression(true) : null;
                expr = new CondExpr(line, cond, expr, otherwise);
            }
            return expr;
        }

        private JinjaExpr ParseOr()
        {
            var left = ParseAnd();
            while (!AtEnd && Peek.IsName("or"))
            {
                int line = Next().Line;
                left = new AndOrExpr(line, left, ParseAnd(), false);
            }
            return left;
        }

        private JinjaExpr ParseAnd()
        {
            var left = ParseNot();
            while (!AtEnd && Peek.IsName("and"))
            {
                int line = Next().Line;
                left = new AndOrExpr(line, left, ParseNot(), true);
            }
            return left;
        }

        private JinjaExpr ParseNot()
        {
            if (!AtEnd && Peek.IsName("not"))
            {
                int line = Next().Line;
                return new NotExpr(line, ParseNot());
            }
            return ParseCompare();
        }

        private JinjaExpr ParseCompare()
        {
            int line = Line;
            var first = ParseMath1();
            var rest = new List<(string, JinjaExpr)>();
            while (!AtEnd)
            {
                var t = Peek;
                if (t.Kind == JinjaTokenKind.Operator && t.Text is "==" or "!=" or "<" or ">" or "<=" or ">=")
                {
                    _pos++;
                    rest.Add((t.Text, ParseMath1()));
                }
                else if (t.IsName("in"))
                {
                    _pos++;
                    rest.Add(("in", ParseMath1()));
                }
                else if (t.IsName("not") && PeekAt(1).IsName("in"))
                {
                    _pos += 2;
                    rest.Add(("not in", ParseMath1()));
                }
                else break;
            }
            return rest.Count == 0 ? first : new CompareExpr(line, first, rest);
        }

        private JinjaExpr ParseMath1()
        {
            var left = ParseConcat();
            while (!AtEnd && (Peek.IsOperator("+") || Peek.IsOperator("-")))
            {
                var op = Next();
                left = new BinaryExpr(op.Line, op.Text, left, ParseConcat());
            }
            return left;
        }

        private JinjaExpr ParseConcat()
        {
            var left = ParseMath2();
            while (!AtEnd && Peek.IsOperator("~"))
            {
                var op = Next();
                left = new BinaryExpr(op.Line, "~", left, ParseMath2());
            }
            return left;
        }

        private JinjaExpr ParseMath2()
        {
            var left = ParsePow();
            while (!AtEnd && Peek.Kind == JinjaTokenKind.Operator && Peek.Text is "*" or "/" or "//" or "%")
            {
                var op = Next();
                left = new BinaryExpr(op.Line, op.Text, left, ParsePow());
            }
            return left;
        }

        private JinjaExpr ParsePow()
        {
            var left = ParseUnary(true);
            while (!AtEnd && Peek.IsOperator("**"))
            {
                var op = Next();
                left = new BinaryExpr(op.Line, "**", left, ParseUnary(true));
            }
            return left;
        }

        private JinjaExpr ParseUnary(bool withFilter)
        {
            JinjaExpr node;
            if (!AtEnd && (Peek.IsOperator("-") || Peek.IsOperator("+")))
            {
                var op = Next();
                node = new NegExpr(op.Line, ParseUnary(false), op.Text == "-");
            }
            else
            {
                node = ParsePrimary();
            }
            node = ParsePostfix(node);
            if (withFilter) node = ParseFilterExpr(node);
            return node;
        }

        private JinjaExpr ParsePrimary()
        {
            if (AtEnd) throw Error("expected an expression, found the end of the tag");
            var t = Next();
            switch (t.Kind)
            {
                case JinjaTokenKind.Name:
                    return t.Text switch
                    {
                        "true" or "True" => new LiteralExpr(t.Line, true),
                        "false" or "False" => new LiteralExpr(t.Line, false),
                        "none" or "None" => new LiteralExpr(t.Line, null),
                        _ => new NameExpr(t.Line, t.Text),
                    };
                case JinjaTokenKind.String:
                {
                    string s = t.Text;
                    while (!AtEnd && Peek.Kind == JinjaTokenKind.String) s += Next().Text; // adjacent literals concatenate
                    return new LiteralExpr(t.Line, s);
                }
                case JinjaTokenKind.Integer:
                    if (!long.TryParse(t.Text, NumberStyles.None, CultureInfo.InvariantCulture, out long l))
                        throw parser.Error(t.Line, $"integer literal {t.Text} is too large");
                    return new LiteralExpr(t.Line, l);
                case JinjaTokenKind.Float:
                    return new LiteralExpr(t.Line, double.Parse(t.Text, NumberStyles.Float, CultureInfo.InvariantCulture));
            }
            switch (t.Text)
            {
                case "(":
                {
                    if (SkipOperator(")")) return new ListExpr(t.Line, [], isTuple: true);
                    var inner = ParseTuple(true);
                    ExpectOperator(")");
                    return inner;
                }
                case "[":
                {
                    var items = new List<JinjaExpr>();
                    while (!SkipOperator("]"))
                    {
                        if (items.Count > 0)
                        {
                            ExpectOperator(",");
                            if (SkipOperator("]")) break;
                        }
                        items.Add(ParseExpression(true));
                    }
                    return new ListExpr(t.Line, items);
                }
                case "{":
                {
                    var items = new List<(JinjaExpr, JinjaExpr)>();
                    while (!SkipOperator("}"))
                    {
                        if (items.Count > 0)
                        {
                            ExpectOperator(",");
                            if (SkipOperator("}")) break;
                        }
                        var key = ParseExpression(true);
                        ExpectOperator(":");
                        items.Add((key, ParseExpression(true)));
                    }
                    return new DictExpr(t.Line, items);
                }
                default:
                    throw parser.Error(t.Line, $"unexpected {t}");
            }
        }

        private JinjaExpr ParsePostfix(JinjaExpr node)
        {
            while (!AtEnd)
            {
                var t = Peek;
                if (t.IsOperator("."))
                {
                    _pos++;
                    var name = Next();
                    if (name.Kind == JinjaTokenKind.Name) node = new AttrExpr(t.Line, node, name.Text);
                    else if (name.Kind == JinjaTokenKind.Integer) node = new ItemExpr(t.Line, node, new LiteralExpr(t.Line, long.Parse(name.Text, CultureInfo.InvariantCulture)));
                    else throw parser.Error(name.Line, $"expected an attribute name after '.', found {name}");
                }
                else if (t.IsOperator("["))
                {
                    _pos++;
                    node = ParseSubscript(node, t.Line);
                }
                else if (t.IsOperator("("))
                {
                    _pos++;
                    node = new CallExpr(t.Line, node, ParseCallArgs());
                }
                else break;
            }
            return node;
        }

        private JinjaExpr ParseSubscript(JinjaExpr target, int line)
        {
            JinjaExpr? start = null;
            if (!Peek.IsOperator(":")) start = ParseExpression(true);
            if (SkipOperator("]")) return new ItemExpr(line, target, start!);
            ExpectOperator(":");
            JinjaExpr? stop = null, step = null;
            if (!Peek.IsOperator("]") && !Peek.IsOperator(":")) stop = ParseExpression(true);
            if (SkipOperator(":") && !Peek.IsOperator("]")) step = ParseExpression(true);
            ExpectOperator("]");
            return new SliceExpr(line, target, start, stop, step);
        }

        /// <summary>Arguments after an opening parenthesis, through the closing one.</summary>
        private CallArgs ParseCallArgs()
        {
            var positional = new List<JinjaExpr>();
            var named = new List<(string, JinjaExpr)>();
            while (!SkipOperator(")"))
            {
                if (positional.Count + named.Count > 0)
                {
                    ExpectOperator(",");
                    if (SkipOperator(")")) break;
                }
                if (Peek.Kind == JinjaTokenKind.Name && PeekAt(1).IsOperator("="))
                {
                    string name = Next().Text;
                    _pos++;
                    named.Add((name, ParseExpression(true)));
                }
                else
                {
                    if (named.Count > 0) throw Error("positional argument follows keyword argument");
                    positional.Add(ParseExpression(true));
                }
            }
            return new CallArgs(positional, named);
        }

        private static readonly HashSet<string> NotATestArgument = new(StringComparer.Ordinal)
        {
            "else", "or", "and", "if", "in", "not", "is", "for", "recursive",
        };

        private JinjaExpr ParseFilterExpr(JinjaExpr node)
        {
            while (!AtEnd)
            {
                var t = Peek;
                if (t.IsOperator("|"))
                {
                    _pos++;
                    string name = ExpectName();
                    while (SkipOperator(".")) name += "." + ExpectName();
                    var args = SkipOperator("(") ? ParseCallArgs() : CallArgs.Empty;
                    node = new FilterExpr(t.Line, node, name, args);
                }
                else if (t.IsName("is"))
                {
                    _pos++;
                    bool negated = SkipKeyword("not");
                    string name;
                    if (Peek.Kind == JinjaTokenKind.Name) name = Next().Text;
                    else if (Peek.Kind == JinjaTokenKind.Operator && Peek.Text is "==" or "!=" or "<" or ">" or "<=" or ">=") name = Next().Text;
                    else throw Error($"expected a test name after 'is', found {Peek}");
                    while (SkipOperator(".")) name += "." + ExpectName();
                    CallArgs args;
                    if (SkipOperator("(")) args = ParseCallArgs();
                    else if (!AtEnd && (Peek.Kind is JinjaTokenKind.String or JinjaTokenKind.Integer or JinjaTokenKind.Float ||
                                        (Peek.Kind == JinjaTokenKind.Name && !NotATestArgument.Contains(Peek.Text)) ||
                                        Peek.IsOperator("[") || Peek.IsOperator("{")))
                    {
                        var arg = ParsePostfix(ParsePrimary());
                        args = new CallArgs([arg], []);
                    }
                    else args = CallArgs.Empty;
                    node = new TestExpr(t.Line, node, name, args, negated);
                }
                else if (t.IsOperator("("))
                {
                    _pos++;
                    node = new CallExpr(t.Line, node, ParseCallArgs());
                }
                else break;
            }
            return node;
        }
    }
}
