using System.Globalization;
using System.Text.Json;
using Microsoft.Data.Sqlite;

namespace MoeRagInject.Rag;

/// <summary>Builds the embedded default retrieval index: SQLite FTS5 with BM25 ranking.</summary>
/// <remarks>
/// Schema: <c>passages(rowid, id UNIQUE, title, text, source)</c> and the external-content FTS5 table
/// <c>passages_fts(title, text)</c> (unicode61 tokenizer, diacritics removed), plus <c>rag_meta(key, value)</c>.
/// Adding a passage whose id is already in the index replaces it.
/// </remarks>
public static class CorpusIndex
{
    internal const string SchemaVersion = "1";
    internal const int MinPassageChars = 16;

    private const string Schema = """
        CREATE TABLE IF NOT EXISTS rag_meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS passages(
            rowid INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            title TEXT,
            text TEXT NOT NULL,
            source TEXT);
        CREATE VIRTUAL TABLE IF NOT EXISTS passages_fts USING fts5(
            title, text, content='passages', content_rowid='rowid', tokenize='unicode61 remove_diacritics 2');
        INSERT OR IGNORE INTO rag_meta(key, value) VALUES ('schema', '1');
        """;

    /// <summary>
    /// Adds passages from <paramref name="inputs"/> to the index at <paramref name="indexPath"/> (created if missing):
    /// .jsonl files carry one object per line with "text" and optional "id", "title"; any other file is plain text split
    /// into passages (blank-line paragraphs, long ones cut near <paramref name="maxPassageChars"/>). Returns the number of passages added.
    /// A malformed JSONL line is an error naming the file and line.
    /// </summary>
    /// <remarks>
    /// All inputs are added in one transaction: on any error nothing is added. JSONL lines without "id" get
    /// <c>&lt;filename&gt;#&lt;line&gt;</c>; plain-text passages get <c>&lt;filename&gt;#&lt;n&gt;</c> (n from 1). Blank lines and
    /// objects whose text is blank are skipped.
    /// </remarks>
    /// <exception cref="FileNotFoundException">An input does not exist.</exception>
    /// <exception cref="InvalidDataException">A JSONL line is malformed (the message starts with "file:line:").</exception>
    public static int Build(IEnumerable<string> inputs, string indexPath, int maxPassageChars = 800)
    {
        ArgumentNullException.ThrowIfNull(inputs);
        ArgumentException.ThrowIfNullOrWhiteSpace(indexPath);
        if (maxPassageChars < MinPassageChars)
        {
            throw new ArgumentOutOfRangeException(nameof(maxPassageChars), maxPassageChars, $"maxPassageChars must be at least {MinPassageChars}.");
        }

        var files = inputs.ToList();
        foreach (string file in files)
        {
            if (!File.Exists(file))
            {
                throw new FileNotFoundException($"Corpus file not found: {file}", file);
            }
        }

        string fullIndexPath = Path.GetFullPath(indexPath);
        string? directory = Path.GetDirectoryName(fullIndexPath);
        if (!string.IsNullOrEmpty(directory))
        {
            Directory.CreateDirectory(directory);
        }

        using var connection = Open(fullIndexPath, readOnly: false);
        using var transaction = connection.BeginTransaction();
        using (var schema = connection.CreateCommand())
        {
            schema.Transaction = transaction;
            schema.CommandText = Schema;
            schema.ExecuteNonQuery();
        }

        using var writer = new PassageWriter(connection, transaction);
        int added = 0;
        foreach (string file in files)
        {
            string source = Path.GetFullPath(file);
            IEnumerable<(string Id, string? Title, string Text)> passages =
                IsJsonl(file) ? ReadJsonl(file) : ReadPlainText(file, maxPassageChars);
            foreach (var (id, title, text) in passages)
            {
                writer.Write(id, title, text, source);
                added++;
            }
        }

        using (var optimize = connection.CreateCommand())
        {
            optimize.Transaction = transaction;
            optimize.CommandText = "INSERT INTO passages_fts(passages_fts) VALUES ('optimize');";
            optimize.ExecuteNonQuery();
        }

        transaction.Commit();

        return added;
    }

    internal static SqliteConnection Open(string path, bool readOnly)
    {
        var builder = new SqliteConnectionStringBuilder
        {
            DataSource = path,
            Mode = readOnly ? SqliteOpenMode.ReadOnly : SqliteOpenMode.ReadWriteCreate,
            Pooling = false,
        };
        var connection = new SqliteConnection(builder.ToString());
        connection.Open();
        return connection;
    }

    /// <summary>A JSONL corpus, plain (.jsonl) or gzip-compressed (.jsonl.gz).</summary>
    public static bool IsJsonl(string file) =>
        file.EndsWith(".jsonl", StringComparison.OrdinalIgnoreCase) || file.EndsWith(".jsonl.gz", StringComparison.OrdinalIgnoreCase);

    /// <summary>The lines of a text file, decompressed when its name ends in .gz.</summary>
    public static IEnumerable<string> ReadLines(string file)
    {
        if (!file.EndsWith(".gz", StringComparison.OrdinalIgnoreCase))
        {
            foreach (var line in File.ReadLines(file)) yield return line;
            yield break;
        }
        using var stream = new System.IO.Compression.GZipStream(File.OpenRead(file), System.IO.Compression.CompressionMode.Decompress);
        using var reader = new StreamReader(stream);
        while (reader.ReadLine() is { } line) yield return line;
    }

    private static IEnumerable<(string Id, string? Title, string Text)> ReadJsonl(string file)
    {
        string name = Path.GetFileName(file);
        int lineNumber = 0;
        foreach (string line in ReadLines(file))
        {
            lineNumber++;
            if (string.IsNullOrWhiteSpace(line))
            {
                continue;
            }

            JsonDocument document;
            try
            {
                document = JsonDocument.Parse(line);
            }
            catch (JsonException ex)
            {
                throw LineError(file, lineNumber, $"invalid JSON ({ex.Message})", ex);
            }

            string? id;
            string? title;
            string text;
            using (document)
            {
                var root = document.RootElement;
                if (root.ValueKind != JsonValueKind.Object)
                {
                    throw LineError(file, lineNumber, $"expected a JSON object, got {root.ValueKind}");
                }

                if (!root.TryGetProperty("text", out var textElement) || textElement.ValueKind != JsonValueKind.String)
                {
                    throw LineError(file, lineNumber, "missing string field \"text\"");
                }

                text = textElement.GetString()!;
                id = root.TryGetProperty("id", out var idElement) ? idElement.ValueKind switch
                {
                    JsonValueKind.String => idElement.GetString(),
                    JsonValueKind.Number => idElement.GetRawText(),
                    JsonValueKind.Null => null,
                    _ => throw LineError(file, lineNumber, "field \"id\" must be a string or a number"),
                } : null;
                title = root.TryGetProperty("title", out var titleElement) ? titleElement.ValueKind switch
                {
                    JsonValueKind.String => titleElement.GetString(),
                    JsonValueKind.Null => null,
                    _ => throw LineError(file, lineNumber, "field \"title\" must be a string"),
                } : null;
            }

            if (string.IsNullOrWhiteSpace(text))
            {
                continue;
            }

            yield return (string.IsNullOrWhiteSpace(id) ? string.Create(CultureInfo.InvariantCulture, $"{name}#{lineNumber}") : id, title, text.Trim());
        }
    }

    private static IEnumerable<(string Id, string? Title, string Text)> ReadPlainText(string file, int maxPassageChars)
    {
        string name = Path.GetFileName(file);
        int n = 0;
        foreach (string passage in PassageSplitter.Split(File.ReadAllText(file), maxPassageChars))
        {
            n++;
            yield return (string.Create(CultureInfo.InvariantCulture, $"{name}#{n}"), null, passage);
        }
    }

    private static InvalidDataException LineError(string file, int line, string problem, Exception? inner = null) =>
        new(string.Create(CultureInfo.InvariantCulture, $"{file}:{line}: {problem}"), inner);

    /// <summary>Inserts passages, replacing (in both tables) any passage with the same id.</summary>
    private sealed class PassageWriter : IDisposable
    {
        private readonly SqliteCommand _find;
        private readonly SqliteCommand _unindex;
        private readonly SqliteCommand _delete;
        private readonly SqliteCommand _insert;
        private readonly SqliteCommand _index;

        public PassageWriter(SqliteConnection connection, SqliteTransaction transaction)
        {
            SqliteCommand Command(string sql, params string[] parameters)
            {
                var command = connection.CreateCommand();
                command.Transaction = transaction;
                command.CommandText = sql;
                foreach (string parameter in parameters)
                {
                    command.Parameters.AddWithValue(parameter, DBNull.Value);
                }

                return command;
            }

            _find = Command("SELECT rowid, title, text FROM passages WHERE id = $id", "$id");
            _unindex = Command("INSERT INTO passages_fts(passages_fts, rowid, title, text) VALUES ('delete', $rowid, $title, $text)", "$rowid", "$title", "$text");
            _delete = Command("DELETE FROM passages WHERE rowid = $rowid", "$rowid");
            _insert = Command("INSERT INTO passages(id, title, text, source) VALUES ($id, $title, $text, $source) RETURNING rowid", "$id", "$title", "$text", "$source");
            _index = Command("INSERT INTO passages_fts(rowid, title, text) VALUES ($rowid, $title, $text)", "$rowid", "$title", "$text");
        }

        public void Write(string id, string? title, string text, string source)
        {
            _find.Parameters["$id"].Value = id;
            using (var reader = _find.ExecuteReader())
            {
                if (reader.Read())
                {
                    long oldRowid = reader.GetInt64(0);
                    object oldTitle = reader.IsDBNull(1) ? DBNull.Value : reader.GetString(1);
                    string oldText = reader.GetString(2);
                    reader.Close();
                    _unindex.Parameters["$rowid"].Value = oldRowid;
                    _unindex.Parameters["$title"].Value = oldTitle;
                    _unindex.Parameters["$text"].Value = oldText;
                    _unindex.ExecuteNonQuery();
                    _delete.Parameters["$rowid"].Value = oldRowid;
                    _delete.ExecuteNonQuery();
                }
            }

            _insert.Parameters["$id"].Value = id;
            _insert.Parameters["$title"].Value = (object?)title ?? DBNull.Value;
            _insert.Parameters["$text"].Value = text;
            _insert.Parameters["$source"].Value = source;
            long rowid = (long)_insert.ExecuteScalar()!;
            _index.Parameters["$rowid"].Value = rowid;
            _index.Parameters["$title"].Value = (object?)title ?? DBNull.Value;
            _index.Parameters["$text"].Value = text;
            _index.ExecuteNonQuery();
        }

        public void Dispose()
        {
            _find.Dispose();
            _unindex.Dispose();
            _delete.Dispose();
            _insert.Dispose();
            _index.Dispose();
        }
    }
}
