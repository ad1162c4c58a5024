using System.Collections.Concurrent;
using Microsoft.Data.Sqlite;

namespace MoeRagInject.Rag;

/// <summary>
/// BM25-ranked retrieval from an index built by <see cref="CorpusIndex.Build"/>. Free-text queries are turned into safe FTS5
/// expressions (each word quoted, words OR-ed), so no input is a syntax error; a query without words finds nothing.
/// Thread-safe: each call takes its own read-only connection from a small pool. Score = −bm25 with a title match weighted
/// twice a text match (higher is better).
/// </summary>
public sealed class SqliteFtsRetriever : IRetriever
{
    private const string SearchSql = """
        SELECT p.id, p.title, p.text, bm25(passages_fts, 2.0, 1.0) AS score
        FROM passages_fts JOIN passages AS p ON p.rowid = passages_fts.rowid
        WHERE passages_fts MATCH $match
        ORDER BY score
        LIMIT $limit
        """;

    private readonly ConcurrentBag<SqliteConnection> _idle = [];
    private volatile bool _disposed;

    /// <exception cref="FileNotFoundException">No file at <paramref name="indexPath"/>.</exception>
    /// <exception cref="InvalidDataException">The file is not an index built by <see cref="CorpusIndex.Build"/>.</exception>
    public SqliteFtsRetriever(string indexPath)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(indexPath);
        IndexPath = Path.GetFullPath(indexPath);
        if (!File.Exists(IndexPath))
        {
            throw new FileNotFoundException($"Retrieval index not found: {IndexPath}", IndexPath);
        }

        SqliteConnection connection;
        try
        {
            connection = CorpusIndex.Open(IndexPath, readOnly: true);
        }
        catch (SqliteException ex)
        {
            throw new InvalidDataException($"{IndexPath}: cannot open as a SQLite database ({ex.Message}).", ex);
        }

        try
        {
            using var command = connection.CreateCommand();
            command.CommandText = "SELECT count(*) FROM sqlite_master WHERE name IN ('passages', 'passages_fts')";
            if (Convert.ToInt64(command.ExecuteScalar(), System.Globalization.CultureInfo.InvariantCulture) != 2)
            {
                throw new InvalidDataException($"{IndexPath}: not a retrieval index (no passages/passages_fts tables); build one with the `index` command.");
            }
        }
        catch (SqliteException ex)
        {
            connection.Dispose();
            throw new InvalidDataException($"{IndexPath}: not a SQLite retrieval index ({ex.Message}).", ex);
        }
        catch
        {
            connection.Dispose();
            throw;
        }

        _idle.Add(connection);
    }

    public string IndexPath { get; }

    public string Name => "sqlite-fts5:" + IndexPath;

    public Task<IReadOnlyList<RetrievedPassage>> RetrieveAsync(string query, int topK, CancellationToken cancellationToken)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (cancellationToken.IsCancellationRequested)
        {
            return Task.FromCanceled<IReadOnlyList<RetrievedPassage>>(cancellationToken);
        }

        string? match = FtsQuery.Build(query);
        if (match is null || topK <= 0)
        {
            return Task.FromResult<IReadOnlyList<RetrievedPassage>>([]);
        }

        // SQLite calls are synchronous: run them on the pool so a caller's timeout is not blocked behind them.
        return Task.Run(() => Search(match, topK, cancellationToken), cancellationToken);
    }

    /// <summary>Total passages in the index.</summary>
    public long CountPassages()
    {
        var connection = Rent();
        try
        {
            using var command = connection.CreateCommand();
            command.CommandText = "SELECT count(*) FROM passages";
            return (long)command.ExecuteScalar()!;
        }
        finally
        {
            Return(connection);
        }
    }

    public void Dispose()
    {
        _disposed = true;
        while (_idle.TryTake(out var connection))
        {
            connection.Dispose();
        }
    }

    private IReadOnlyList<RetrievedPassage> Search(string match, int topK, CancellationToken cancellationToken)
    {
        var connection = Rent();
        try
        {
            using var interrupt = cancellationToken.Register(static state => SQLitePCL.raw.sqlite3_interrupt(((SqliteConnection)state!).Handle), connection);
            using var command = connection.CreateCommand();
            command.CommandText = SearchSql;
            command.Parameters.AddWithValue("$match", match);
            command.Parameters.AddWithValue("$limit", topK);
            var passages = new List<RetrievedPassage>(topK);
            using var reader = command.ExecuteReader();
            while (reader.Read())
            {
                cancellationToken.ThrowIfCancellationRequested();
                passages.Add(new RetrievedPassage(
                    reader.GetString(0),
                    reader.IsDBNull(1) ? null : reader.GetString(1),
                    reader.GetString(2),
                    -reader.GetDouble(3)));
            }

            return passages;
        }
        catch (SqliteException ex) when (cancellationToken.IsCancellationRequested)
        {
            throw new OperationCanceledException("The index search was interrupted.", ex, cancellationToken);
        }
        finally
        {
            Return(connection);
        }
    }

    private SqliteConnection Rent()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        return _idle.TryTake(out var connection) ? connection : CorpusIndex.Open(IndexPath, readOnly: true);
    }

    private void Return(SqliteConnection connection)
    {
        if (_disposed || _idle.Count >= Environment.ProcessorCount * 2)
        {
            connection.Dispose();
            return;
        }

        _idle.Add(connection);
        if (_disposed && _idle.TryTake(out var late))
        {
            late.Dispose();
        }
    }
}
