namespace MoeRagInject.Model.Tokenization;

/// <summary>An entry of <c>added_tokens</c>.</summary>
internal sealed record AddedToken(int Id, string Content, bool SingleWord, bool LStrip, bool RStrip, bool Normalized, bool Special);

/// <summary>A span of text: either plain text (<see cref="Id"/> &lt; 0) or an added token.</summary>
internal readonly record struct TextSegment(int Start, int End, int Id);

/// <summary>
/// Finds added tokens in text the way Hugging Face does: leftmost-longest, non-overlapping matches, honouring
/// <c>single_word</c>, <c>lstrip</c> and <c>rstrip</c>.
/// </summary>
internal sealed class AddedTokenMatcher
{
    private sealed class Node
    {
        public Dictionary<char, Node>? Children;
        public AddedToken? Token;
    }

    private readonly Node _root = new();

    public AddedTokenMatcher(IEnumerable<(string Pattern, AddedToken Token)> tokens)
    {
        foreach (var (pattern, token) in tokens)
        {
            if (pattern.Length == 0) continue;
            var node = _root;
            foreach (char c in pattern)
            {
                node.Children ??= new Dictionary<char, Node>();
                if (!node.Children.TryGetValue(c, out var child)) node.Children[c] = child = new Node();
                node = child;
            }
            node.Token ??= token;
            IsEmpty = false;
        }
    }

    public bool IsEmpty { get; } = true;

    /// <summary>Splits <paramref name="text"/> into plain and added-token segments that cover it (empty text: nothing).</summary>
    public void Split(string text, List<TextSegment> output)
    {
        if (text.Length == 0) return;
        if (IsEmpty)
        {
            output.Add(new TextSegment(0, text.Length, -1));
            return;
        }
        int startOffset = 0;
        int i = 0;
        while (i < text.Length)
        {
            // Longest match starting at i.
            var node = _root;
            AddedToken? found = null;
            int foundEnd = -1;
            for (int j = i; j < text.Length && node.Children != null && node.Children.TryGetValue(text[j], out var next); j++)
            {
                node = next;
                if (node.Token != null)
                {
                    found = node.Token;
                    foundEnd = j + 1;
                }
            }
            if (found == null)
            {
                i++;
                continue;
            }

            int start = i, stop = foundEnd;
            i = foundEnd; // matching resumes after the raw match, as with HF's Aho-Corasick iterator
            if (found.SingleWord)
            {
                bool startOk = start == 0 || !IsWordChar(text[start - 1]);
                bool stopOk = stop == text.Length || !IsWordChar(text[stop]);
                if (!startOk || !stopOk) continue;
            }
            if (found.LStrip)
            {
                int s = start;
                while (s > 0 && char.IsWhiteSpace(text[s - 1])) s--;
                start = Math.Max(s, startOffset);
            }
            if (found.RStrip)
            {
                while (stop < text.Length && char.IsWhiteSpace(text[stop])) stop++;
            }
            if (startOffset < start) output.Add(new TextSegment(startOffset, start, -1));
            output.Add(new TextSegment(start, stop, found.Id));
            startOffset = stop;
            if (i < startOffset) i = startOffset;
        }
        if (startOffset < text.Length) output.Add(new TextSegment(startOffset, text.Length, -1));
    }

    private static bool IsWordChar(char c) => char.IsLetterOrDigit(c) || c == '_' ||
        char.GetUnicodeCategory(c) is System.Globalization.UnicodeCategory.NonSpacingMark
            or System.Globalization.UnicodeCategory.SpacingCombiningMark
            or System.Globalization.UnicodeCategory.ConnectorPunctuation;
}
