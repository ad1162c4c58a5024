using System.Text;

namespace MoeRagInject.Rag;

/// <summary>Splits plain text into passages: blank-line paragraphs, long ones cut near a length at sentence or word boundaries.</summary>
internal static class PassageSplitter
{
    internal static IEnumerable<string> Split(string text, int maxChars)
    {
        var paragraph = new StringBuilder();
        foreach (string rawLine in text.ReplaceLineEndings("\n").Split('\n'))
        {
            string line = rawLine.Trim();
            if (line.Length == 0)
            {
                foreach (string piece in Cut(paragraph.ToString(), maxChars))
                {
                    yield return piece;
                }

                paragraph.Clear();
                continue;
            }

            if (paragraph.Length > 0)
            {
                paragraph.Append(' ');
            }

            paragraph.Append(line);
        }

        foreach (string piece in Cut(paragraph.ToString(), maxChars))
        {
            yield return piece;
        }
    }

    /// <summary>Cuts one paragraph into pieces of at most <paramref name="maxChars"/> characters.</summary>
    internal static IEnumerable<string> Cut(string paragraph, int maxChars)
    {
        string rest = paragraph.Trim();
        while (rest.Length > maxChars)
        {
            int cut = FindCut(rest, maxChars);
            string piece = rest[..cut].TrimEnd();
            if (piece.Length > 0)
            {
                yield return piece;
            }

            rest = rest[cut..].TrimStart();
        }

        if (rest.Length > 0)
        {
            yield return rest;
        }
    }

    /// <summary>Where to cut: after the last sentence end in the second half of the window, else at the last space there, else at the limit.</summary>
    private static int FindCut(string text, int maxChars)
    {
        int floor = maxChars / 2;
        for (int i = maxChars - 1; i >= floor; i--)
        {
            char ch = text[i];
            bool sentenceEnd = ch is '。' or '！' or '？'
                || (ch is '.' or '!' or '?' or ';' && i + 1 < text.Length && char.IsWhiteSpace(text[i + 1]));
            if (sentenceEnd)
            {
                return i + 1;
            }
        }

        for (int i = maxChars; i >= floor; i--)
        {
            if (char.IsWhiteSpace(text[i]))
            {
                return i;
            }
        }

        // No boundary: hard cut, but never between the halves of a surrogate pair.
        return char.IsLowSurrogate(text[maxChars]) ? maxChars - 1 : maxChars;
    }
}
