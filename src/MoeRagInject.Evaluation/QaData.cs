using System.Globalization;
using System.Text.Json;
using Microsoft.Data.Sqlite;
using MoeRagInject.Rag;

namespace MoeRagInject.Evaluation;

/// <summary>One QA line: {id, question, answer, passage_id, split, reading_only?}.</summary>
public sealed record QaItem(string Id, string Question, string Answer, string? PassageId, string Split, bool ReadingOnly);

public static class QaData
{
    /// <summary>Reads a QA JSONL file (.jsonl or .jsonl.gz). A malformed line is an error naming the file and line.</summary>
    public static List<QaItem> Load(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"QA file not found: {path}", path);
        var items = new List<QaItem>();
        var lineNumber = 0;
        foreach (var line in CorpusIndex.ReadLines(path))
        {
            lineNumber++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            try
            {
                using var doc = JsonDocument.Parse(line);
                var root = doc.RootElement;
                string Str(string name, string? fallback = null) =>
                    root.TryGetProperty(name, out var e) && e.ValueKind == JsonValueKind.String ? e.GetString()!
                    : root.TryGetProperty(name, out var n) && n.ValueKind == JsonValueKind.Number ? n.GetRawText()
                    : fallback ?? throw new InvalidDataException($"missing string field \"{name}\"");
                var readingOnly = root.TryGetProperty("reading_only", out var r) && r.ValueKind == JsonValueKind.True;
                items.Add(new QaItem(
                    Str("id", string.Create(CultureInfo.InvariantCulture, $"{Path.GetFileName(path)}#{lineNumber}")),
                    Str("question"), Str("answer"),
                    root.TryGetProperty("passage_id", out var p) && p.ValueKind == JsonValueKind.String ? p.GetString() : null,
                    Str("split", "unknown"), readingOnly));
            }
            catch (Exception e) when (e is JsonException or InvalidDataException)
            {
                throw new InvalidDataException(string.Create(CultureInfo.InvariantCulture, $"{path}:{lineNumber}: {e.Message}"), e);
            }
        }
        return items;
    }

    /// <summary>
    /// All items in file order when <paramref name="limit"/> is null or not below the count; else the first
    /// <paramref name="limit"/> after a deterministic shuffle with <paramref name="seed"/> (so the splits keep their proportions),
    /// returned in file order.
    /// </summary>
    public static List<QaItem> Sample(IReadOnlyList<QaItem> items, int? limit, int seed)
    {
        if (limit is not { } n || n >= items.Count) return [.. items];
        if (n < 0) throw new ArgumentOutOfRangeException(nameof(limit), limit, "limit must be >= 0");
        var order = Enumerable.Range(0, items.Count).ToArray();
        new Random(seed).Shuffle(order);
        return [.. order.Take(n).Order().Select(i => items[i])];
    }

    /// <summary>Passage text by id from a JSONL corpus (.jsonl/.jsonl.gz, fields id and text) or an index built by `index` (.db).</summary>
    public static Dictionary<string, string> LoadPassages(string corpus)
    {
        if (!File.Exists(corpus)) throw new FileNotFoundException($"corpus not found: {corpus}", corpus);
        var passages = new Dictionary<string, string>(StringComparer.Ordinal);
        if (CorpusIndex.IsJsonl(corpus))
        {
            var lineNumber = 0;
            foreach (var line in CorpusIndex.ReadLines(corpus))
            {
                lineNumber++;
                if (string.IsNullOrWhiteSpace(line)) continue;
                using var doc = JsonDocument.Parse(line);
                var root = doc.RootElement;
                if (!root.TryGetProperty("text", out var text) || text.ValueKind != JsonValueKind.String) continue;
                var id = root.TryGetProperty("id", out var idElement)
                    ? idElement.ValueKind == JsonValueKind.String ? idElement.GetString() : idElement.GetRawText()
                    : null;
                id ??= string.Create(CultureInfo.InvariantCulture, $"{Path.GetFileName(corpus)}#{lineNumber}");
                passages[id] = text.GetString()!.Trim();
            }
            return passages;
        }
        var builder = new SqliteConnectionStringBuilder { DataSource = corpus, Mode = SqliteOpenMode.ReadOnly, Pooling = false };
        using var connection = new SqliteConnection(builder.ToString());
        connection.Open();
        using var command = connection.CreateCommand();
        command.CommandText = "SELECT id, text FROM passages";
        using var reader = command.ExecuteReader();
        while (reader.Read()) passages[reader.GetString(0)] = reader.GetString(1);
        return passages;
    }
}
