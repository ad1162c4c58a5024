using System.Globalization;
using System.Text;

namespace MoeRagInject.Rag;

/// <summary>Turns arbitrary free text into a safe FTS5 MATCH expression: every term quoted, terms OR-ed.</summary>
internal static class FtsQuery
{
    /// <summary>Most terms kept from one query (long model-generated queries would otherwise make slow expressions).</summary>
    internal const int MaxTerms = 64;

    private static readonly HashSet<string> s_stopWords = new(StringComparer.Ordinal)
    {
        "a", "an", "and", "are", "as", "at", "be", "but", "by", "do", "does", "for", "from", "had", "has", "have",
        "how", "i", "in", "is", "it", "its", "of", "on", "or", "that", "the", "this", "to", "was", "were", "what",
        "when", "where", "which", "who", "why", "will", "with",
    };

    /// <summary>The words of <paramref name="text"/>: runs of letters, digits and combining marks, lower-cased, de-duplicated, in order.</summary>
    internal static List<string> Terms(string? text)
    {
        var terms = new List<string>();
        if (string.IsNullOrEmpty(text))
        {
            return terms;
        }

        var seen = new HashSet<string>(StringComparer.Ordinal);
        var word = new StringBuilder();
        bool hasAlphanumeric = false;

        void Flush()
        {
            if (word.Length > 0 && hasAlphanumeric)
            {
                string term = word.ToString().ToLowerInvariant();
                if (seen.Add(term))
                {
                    terms.Add(term);
                }
            }

            word.Clear();
            hasAlphanumeric = false;
        }

        for (int i = 0; i < text.Length; i++)
        {
            char ch = text[i];
            if (char.IsHighSurrogate(ch) && i + 1 < text.Length && char.IsLowSurrogate(text[i + 1]))
            {
                int codePoint = char.ConvertToUtf32(ch, text[i + 1]);
                var category = CharUnicodeInfo.GetUnicodeCategory(codePoint);
                if (IsWordCategory(category))
                {
                    word.Append(ch).Append(text[i + 1]);
                    hasAlphanumeric |= !IsMark(category);
                }
                else
                {
                    Flush();
                }

                i++;
                continue;
            }

            var cat = char.GetUnicodeCategory(ch);
            if (!char.IsSurrogate(ch) && IsWordCategory(cat))
            {
                word.Append(ch);
                hasAlphanumeric |= !IsMark(cat);
            }
            else
            {
                Flush();
            }
        }

        Flush();
        return terms;
    }

    /// <summary>
    /// The MATCH expression for <paramref name="text"/>, or null when it has no searchable word. English stop words are
    /// dropped unless nothing else is left.
    /// </summary>
    internal static string? Build(string? text)
    {
        var terms = Terms(text);
        if (terms.Count == 0)
        {
            return null;
        }

        var content = terms.Where(t => !s_stopWords.Contains(t)).ToList();
        if (content.Count > 0)
        {
            terms = content;
        }

        return string.Join(" OR ", terms.Take(MaxTerms).Select(Quote));
    }

    /// <summary>An FTS5 string literal: the term in double quotes, inner quotes doubled.</summary>
    internal static string Quote(string term) => "\"" + term.Replace("\"", "\"\"", StringComparison.Ordinal) + "\"";

    private static bool IsWordCategory(UnicodeCategory category) => category switch
    {
        UnicodeCategory.UppercaseLetter or UnicodeCategory.LowercaseLetter or UnicodeCategory.TitlecaseLetter
            or UnicodeCategory.ModifierLetter or UnicodeCategory.OtherLetter
            or UnicodeCategory.DecimalDigitNumber or UnicodeCategory.LetterNumber or UnicodeCategory.OtherNumber
            or UnicodeCategory.NonSpacingMark or UnicodeCategory.SpacingCombiningMark or UnicodeCategory.EnclosingMark => true,
        _ => false,
    };

    private static bool IsMark(UnicodeCategory category) =>
        category is UnicodeCategory.NonSpacingMark or UnicodeCategory.SpacingCombiningMark or UnicodeCategory.EnclosingMark;
}
