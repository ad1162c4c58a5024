using System.Globalization;
using System.Text;

namespace MoeRagInject.Model.Tokenization;

internal enum JinjaTokenKind { Name, String, Integer, Float, Operator }

internal readonly record struct JinjaToken(JinjaTokenKind Kind, string Text, int Line)
{
    public bool IsOperator(string op) => Kind == JinjaTokenKind.Operator && Text == op;
    public bool IsName(string name) => Kind == JinjaTokenKind.Name && Text == name;
    public override string ToString() => Kind == JinjaTokenKind.String ? $"string '{Text}'" : $"'{Text}'";
}

internal enum JinjaSegmentKind { Text, Output, Statement }

/// <summary>Template text, a <c>{{ expression }}</c> or a <c>{% statement %}</c> with its tokens.</summary>
internal sealed record JinjaSegment(JinjaSegmentKind Kind, string Text, List<JinjaToken> Tokens, int Line);

/// <summary>
/// Splits a Jinja template into text, output and statement segments, applying whitespace control
/// (<c>{%-</c>, <c>-%}</c>, <c>{{-</c>, <c>-}}</c>, <c>{%+</c>, <c>+%}</c>), <c>trim_blocks</c>, <c>lstrip_blocks</c>,
/// comments, <c>{% raw %}</c> and the removal of one trailing newline.
/// </summary>
internal sealed class JinjaLexer
{
    private readonly string _src;
    private readonly JinjaOptions _options;
    private int _pos;
    private int _line = 1;

    private JinjaLexer(string source, JinjaOptions options)
    {
        source = source.Replace("\r\n", "\n", StringComparison.Ordinal).Replace('\r', '\n');
        if (!options.KeepTrailingNewline && source.EndsWith('\n')) source = source[..^1];
        _src = source;
        _options = options;
    }

    public static List<JinjaSegment> Tokenize(string source, JinjaOptions options) => new JinjaLexer(source, options).Run();

    private enum TrimAfter { None, AllWhitespace, OneNewline }

    private List<JinjaSegment> Run()
    {
        var segments = new List<JinjaSegment>();
        var trimAfter = TrimAfter.None;
        bool lineStarting = true;
        while (_pos <= _src.Length)
        {
            int tagStart = FindTagStart(_pos);
            int textEnd = tagStart < 0 ? _src.Length : tagStart;
            string text = _src[_pos..textEnd];
            int textLine = _line;
            _line += Count(text, '\n');

            if (trimAfter == TrimAfter.AllWhitespace) text = text.TrimStart();
            else if (trimAfter == TrimAfter.OneNewline && text.StartsWith('\n')) text = text[1..];
            trimAfter = TrimAfter.None;

            if (tagStart < 0)
            {
                if (text.Length > 0) segments.Add(new JinjaSegment(JinjaSegmentKind.Text, text, [], textLine));
                break;
            }

            char kind = _src[tagStart + 1]; // '{', '%' or '#'
            char modifier = tagStart + 2 < _src.Length ? _src[tagStart + 2] : '\0';
            if (modifier == '-')
            {
                text = text.TrimEnd();
            }
            else if (kind != '{' && _options.LStripBlocks && modifier != '+')
            {
                int lpos = text.LastIndexOf('\n') + 1;
                if ((lpos > 0 || lineStarting) && IsBlank(text.AsSpan(lpos))) text = text[..lpos];
            }
            if (text.Length > 0) segments.Add(new JinjaSegment(JinjaSegmentKind.Text, text, [], textLine));

            _pos = tagStart + 2 + (modifier is '-' or '+' ? 1 : 0);
            int tagLine = _line;
            char closeModifier;
            if (kind == '#')
            {
                int end = _src.IndexOf("#}", _pos, StringComparison.Ordinal);
                if (end < 0) throw Error(tagLine, "unclosed comment (missing '#}')");
                closeModifier = end > _pos && _src[end - 1] is '-' or '+' ? _src[end - 1] : '\0';
                _line += Count(_src.AsSpan(_pos, end - _pos), '\n');
                _pos = end + 2;
            }
            else
            {
                var tokens = LexTag(kind == '{' ? "}}" : "%}", tagLine, out closeModifier);
                if (kind == '%' && tokens.Count > 0 && tokens[0].IsName("raw"))
                {
                    if (tokens.Count != 1) throw Error(tagLine, "unexpected tokens after 'raw'");
                    // Jinja does not apply trim_blocks after {% raw %}; only "-%}" strips what follows.
                    trimAfter = closeModifier == '-' ? TrimAfter.AllWhitespace : TrimAfter.None;
                    string raw = ReadRaw(tagLine, ref trimAfter);
                    if (raw.Length > 0) segments.Add(new JinjaSegment(JinjaSegmentKind.Text, raw, [], tagLine));
                    lineStarting = _pos > 0 && _src[_pos - 1] == '\n';
                    continue;
                }
                segments.Add(new JinjaSegment(kind == '{' ? JinjaSegmentKind.Output : JinjaSegmentKind.Statement, "", tokens, tagLine));
            }
            ApplyTrimAfter(closeModifier, kind != '{', ref trimAfter);
            lineStarting = PeekLineStarting(closeModifier, kind != '{');
        }
        return segments;
    }

    /// <summary>Whether the text consumed by a tag's end (including stripped whitespace) ends with a newline.</summary>
    private bool PeekLineStarting(char closeModifier, bool isBlock)
    {
        if (closeModifier == '-')
        {
            int p = _pos;
            while (p < _src.Length && char.IsWhiteSpace(_src[p])) p++;
            return p > _pos && _src[p - 1] == '\n';
        }
        return isBlock && _options.TrimBlocks && closeModifier != '+' && _pos < _src.Length && _src[_pos] == '\n';
    }

    private void ApplyTrimAfter(char closeModifier, bool isBlock, ref TrimAfter trimAfter)
    {
        if (closeModifier == '-') trimAfter = TrimAfter.AllWhitespace;
        else if (isBlock && _options.TrimBlocks && closeModifier != '+') trimAfter = TrimAfter.OneNewline;
        else trimAfter = TrimAfter.None;
    }

    /// <summary>Reads the body of a raw block up to <c>{% endraw %}</c>, leaving the position after that tag.</summary>
    private string ReadRaw(int line, ref TrimAfter trimAfter)
    {
        int search = _pos;
        while (true)
        {
            int open = _src.IndexOf("{%", search, StringComparison.Ordinal);
            if (open < 0) throw Error(line, "missing {% endraw %} for {% raw %}");
            int p = open + 2;
            char modifier = p < _src.Length && _src[p] is '-' or '+' ? _src[p] : '\0';
            if (modifier != '\0') p++;
            while (p < _src.Length && char.IsWhiteSpace(_src[p])) p++;
            if (string.CompareOrdinal(_src, p, "endraw", 0, 6) == 0)
            {
                p += 6;
                while (p < _src.Length && char.IsWhiteSpace(_src[p])) p++;
                char closeModifier = p < _src.Length && _src[p] is '-' or '+' ? _src[p] : '\0';
                if (closeModifier != '\0') p++;
                if (string.CompareOrdinal(_src, p, "%}", 0, 2) == 0)
                {
                    string body = _src[_pos..open];
                    if (trimAfter == TrimAfter.AllWhitespace) body = body.TrimStart();
                    else if (trimAfter == TrimAfter.OneNewline && body.StartsWith('\n')) body = body[1..];
                    if (modifier == '-') body = body.TrimEnd();
                    else if (modifier != '+' && _options.LStripBlocks)
                    {
                        int lpos = body.LastIndexOf('\n') + 1;
                        if (lpos > 0 && IsBlank(body.AsSpan(lpos))) body = body[..lpos];
                    }
                    _line += Count(_src.AsSpan(_pos, p + 2 - _pos), '\n');
                    _pos = p + 2;
                    ApplyTrimAfter(closeModifier, true, ref trimAfter);
                    return body;
                }
            }
            search = open + 2;
        }
    }

    private int FindTagStart(int from)
    {
        int i = from;
        while (true)
        {
            i = _src.IndexOf('{', i);
            if (i < 0 || i + 1 >= _src.Length) return -1;
            char c = _src[i + 1];
            if (c is '{' or '%' or '#') return i;
            i++;
        }
    }

    private static bool IsBlank(ReadOnlySpan<char> s)
    {
        foreach (char c in s)
            if (!char.IsWhiteSpace(c)) return false;
        return true;
    }

    private static int Count(ReadOnlySpan<char> s, char c)
    {
        int n = 0;
        foreach (char x in s)
            if (x == c) n++;
        return n;
    }

    private JinjaException Error(int line, string message) => new($"{_options.Name}, line {line}: {message}");

    private static readonly string[] Operators =
    [
        "//", "**", "==", "!=", ">=", "<=",
        "+", "-", "*", "/", "%", "~", "<", ">", "=", ".", ",", ":", "|", "(", ")", "[", "]", "{", "}",
    ];

    /// <summary>Lexes the tokens of a tag up to its end delimiter (only recognised outside brackets).</summary>
    private List<JinjaToken> LexTag(string end, int tagLine, out char closeModifier)
    {
        var tokens = new List<JinjaToken>();
        int depth = 0;
        while (true)
        {
            while (_pos < _src.Length && char.IsWhiteSpace(_src[_pos]))
            {
                if (_src[_pos] == '\n') _line++;
                _pos++;
            }
            if (_pos >= _src.Length) throw Error(tagLine, $"unclosed tag (missing '{end}')");
            if (depth == 0)
            {
                if (_src[_pos] is '-' or '+' && string.CompareOrdinal(_src, _pos + 1, end, 0, 2) == 0)
                {
                    closeModifier = _src[_pos];
                    _pos += 3;
                    return tokens;
                }
                if (string.CompareOrdinal(_src, _pos, end, 0, 2) == 0)
                {
                    closeModifier = '\0';
                    _pos += 2;
                    return tokens;
                }
            }
            char c = _src[_pos];
            if (c is '\'' or '"')
            {
                tokens.Add(new JinjaToken(JinjaTokenKind.String, ReadString(c), _line));
                continue;
            }
            if (char.IsAsciiDigit(c))
            {
                tokens.Add(ReadNumber());
                continue;
            }
            if (char.IsAsciiLetter(c) || c == '_')
            {
                int s = _pos;
                while (_pos < _src.Length && (char.IsAsciiLetterOrDigit(_src[_pos]) || _src[_pos] == '_')) _pos++;
                tokens.Add(new JinjaToken(JinjaTokenKind.Name, _src[s.._pos], _line));
                continue;
            }
            string? op = null;
            foreach (var candidate in Operators)
            {
                if (string.CompareOrdinal(_src, _pos, candidate, 0, candidate.Length) == 0)
                {
                    op = candidate;
                    break;
                }
            }
            if (op == null) throw Error(_line, $"unexpected character '{c}'");
            if (op is "(" or "[" or "{") depth++;
            else if (op is ")" or "]" or "}")
            {
                if (depth == 0) throw Error(_line, $"unexpected '{op}'");
                depth--;
            }
            tokens.Add(new JinjaToken(JinjaTokenKind.Operator, op, _line));
            _pos += op.Length;
        }
    }

    private JinjaToken ReadNumber()
    {
        int s = _pos;
        bool isFloat = false;
        while (_pos < _src.Length && (char.IsAsciiDigit(_src[_pos]) || _src[_pos] == '_')) _pos++;
        if (_pos + 1 < _src.Length && _src[_pos] == '.' && char.IsAsciiDigit(_src[_pos + 1]))
        {
            isFloat = true;
            _pos++;
            while (_pos < _src.Length && (char.IsAsciiDigit(_src[_pos]) || _src[_pos] == '_')) _pos++;
        }
        if (_pos < _src.Length && _src[_pos] is 'e' or 'E')
        {
            int p = _pos + 1;
            if (p < _src.Length && _src[p] is '+' or '-') p++;
            if (p < _src.Length && char.IsAsciiDigit(_src[p]))
            {
                isFloat = true;
                _pos = p;
                while (_pos < _src.Length && char.IsAsciiDigit(_src[_pos])) _pos++;
            }
        }
        string text = _src[s.._pos].Replace("_", "", StringComparison.Ordinal);
        return new JinjaToken(isFloat ? JinjaTokenKind.Float : JinjaTokenKind.Integer, text, _line);
    }

    /// <summary>Reads a quoted string literal with Python escapes.</summary>
    private string ReadString(char quote)
    {
        int startLine = _line;
        _pos++;
        var sb = new StringBuilder();
        while (true)
        {
            if (_pos >= _src.Length) throw Error(startLine, "unterminated string literal");
            char c = _src[_pos++];
            if (c == quote) return sb.ToString();
            if (c == '\n') _line++;
            if (c != '\\')
            {
                sb.Append(c);
                continue;
            }
            if (_pos >= _src.Length) throw Error(startLine, "unterminated string literal");
            char e = _src[_pos++];
            switch (e)
            {
                case 'n': sb.Append('\n'); break;
                case 't': sb.Append('\t'); break;
                case 'r': sb.Append('\r'); break;
                case '\\': sb.Append('\\'); break;
                case '\'': sb.Append('\''); break;
                case '"': sb.Append('"'); break;
                case 'a': sb.Append('\a'); break;
                case 'b': sb.Append('\b'); break;
                case 'f': sb.Append('\f'); break;
                case 'v': sb.Append('\v'); break;
                case '\n': _line++; break; // line continuation
                case 'x': sb.Append(ReadHexEscape(2, startLine)); break;
                case 'u': sb.Append(ReadHexEscape(4, startLine)); break;
                case 'U': sb.Append(ReadHexEscape(8, startLine)); break;
                case >= '0' and <= '7':
                {
                    int value = e - '0';
                    for (int k = 0; k < 2 && _pos < _src.Length && _src[_pos] is >= '0' and <= '7'; k++)
                        value = value * 8 + (_src[_pos++] - '0');
                    sb.Append((char)value);
                    break;
                }
                default:
                    sb.Append('\\').Append(e);
                    break;
            }
        }
    }

    private string ReadHexEscape(int digits, int line)
    {
        if (_pos + digits > _src.Length ||
            !int.TryParse(_src.AsSpan(_pos, digits), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out int code) ||
            !Rune.IsValid(code))
            throw Error(line, $"invalid \\{(digits == 2 ? 'x' : digits == 4 ? 'u' : 'U')} escape in string literal");
        _pos += digits;
        return new Rune(code).ToString();
    }
}
