using System.Diagnostics;
using System.Globalization;

namespace MoeRagInject.Rag;

public sealed record RetrievedPassage(string Id, string? Title, string Text, double Score);

/// <summary>A source of passages. Implementations throw on failure; <see cref="RetrievalService"/> turns failures into results.</summary>
public interface IRetriever : IDisposable
{
    /// <summary>Short description for logs and events, e.g. "sqlite-fts5:/path/index.db" or "http:elasticsearch:http://host:9200/idx".</summary>
    string Name { get; }

    Task<IReadOnlyList<RetrievedPassage>> RetrieveAsync(string query, int topK, CancellationToken cancellationToken);
}

/// <summary>Why a retrieval brought no passages back (what the retrieval-errors metric counts by).</summary>
public enum RetrievalFailure
{
    /// <summary>The retriever did not answer within the retrieval timeout.</summary>
    Timeout,
    /// <summary>The retriever threw (unreachable, HTTP error, corrupt index).</summary>
    Failed,
    /// <summary>It answered, but with no list or only empty passages.</summary>
    BadResponse,
    /// <summary>The query was blank: nothing was asked.</summary>
    EmptyQuery,
}

/// <summary>Outcome of one retrieval: never throws; a failure is an <see cref="Error"/>, its <see cref="Failure"/> kind and no passages.</summary>
public sealed record RetrievalResult(IReadOnlyList<RetrievedPassage> Passages, string? Error, TimeSpan Latency)
{
    public bool Succeeded => Error is null;

    /// <summary>The kind of failure; null when the retrieval succeeded.</summary>
    public RetrievalFailure? Failure { get; init; }
}

/// <summary>Wraps a retriever with a per-call timeout and turns every failure (down, slow, garbage) into a result.</summary>
/// <remarks>
/// A <see cref="Timeout"/> of zero, a negative value or <see cref="System.Threading.Timeout.InfiniteTimeSpan"/> means no timeout.
/// A result with zero passages and no error is a successful retrieval that found nothing.
/// </remarks>
public sealed class RetrievalService(IRetriever retriever, TimeSpan timeout, int topK)
{
    public IRetriever Retriever { get; } = retriever ?? throw new ArgumentNullException(nameof(retriever));
    public TimeSpan Timeout { get; } = timeout;
    public int TopK { get; } = topK > 0 ? topK : throw new ArgumentOutOfRangeException(nameof(topK), topK, "topK must be positive.");

    /// <summary>Retrieves up to <see cref="TopK"/> passages; throws only <see cref="OperationCanceledException"/> when <paramref name="cancellationToken"/> is cancelled.</summary>
    public async Task<RetrievalResult> RetrieveAsync(string query, CancellationToken cancellationToken)
    {
        cancellationToken.ThrowIfCancellationRequested();
        var clock = Stopwatch.StartNew();
        if (string.IsNullOrWhiteSpace(query))
        {
            return new RetrievalResult([], "empty query", clock.Elapsed) { Failure = RetrievalFailure.EmptyQuery };
        }

        using var linked = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        bool hasTimeout = Timeout > TimeSpan.Zero && Timeout != System.Threading.Timeout.InfiniteTimeSpan;
        if (hasTimeout)
        {
            linked.CancelAfter(Timeout);
        }

        try
        {
            // WaitAsync also bounds retrievers that ignore their token.
            var passages = await Retriever.RetrieveAsync(query, TopK, linked.Token).WaitAsync(linked.Token).ConfigureAwait(false);
            if (passages is null)
            {
                return Fail("the retriever returned no result list", clock, RetrievalFailure.BadResponse);
            }

            var kept = new List<RetrievedPassage>(Math.Min(passages.Count, TopK));
            foreach (var passage in passages)
            {
                if (passage is not null && !string.IsNullOrWhiteSpace(passage.Text))
                {
                    kept.Add(passage);
                    if (kept.Count == TopK)
                    {
                        break;
                    }
                }
            }

            if (passages.Count > 0 && kept.Count == 0)
            {
                return Fail($"all {passages.Count} passages returned were empty", clock, RetrievalFailure.BadResponse);
            }

            return new RetrievalResult(kept, null, clock.Elapsed);
        }
        catch (Exception) when (cancellationToken.IsCancellationRequested)
        {
            throw new OperationCanceledException("The retrieval was cancelled by the caller.", cancellationToken);
        }
        catch (OperationCanceledException) when (linked.IsCancellationRequested)
        {
            return Fail($"timed out after {Timeout.TotalMilliseconds.ToString("0.###", CultureInfo.InvariantCulture)} ms (retrieval timeout)", clock, RetrievalFailure.Timeout);
        }
        catch (Exception ex) when (hasTimeout && linked.IsCancellationRequested)
        {
            return Fail($"timed out after {Timeout.TotalMilliseconds.ToString("0.###", CultureInfo.InvariantCulture)} ms (retrieval timeout; {Describe(ex)})", clock, RetrievalFailure.Timeout);
        }
        catch (Exception ex)
        {
            return Fail(Describe(ex), clock, RetrievalFailure.Failed);
        }
    }

    private RetrievalResult Fail(string message, Stopwatch clock, RetrievalFailure failure) =>
        new([], $"{Retriever.Name}: {message}", clock.Elapsed) { Failure = failure };

    /// <summary>The exception's type and message plus its inner exceptions' messages, on one line.</summary>
    internal static string Describe(Exception ex)
    {
        var parts = new List<string>();
        for (var e = ex; e is not null && parts.Count < 4; e = e.InnerException)
        {
            string text = e is TimeoutException or HttpRequestException or InvalidDataException or System.Text.Json.JsonException
                ? e.Message
                : $"{e.GetType().Name}: {e.Message}";
            if (parts.Count == 0 || !parts[^1].Contains(e.Message, StringComparison.Ordinal))
            {
                parts.Add(text);
            }
        }

        return string.Join(" -> ", parts).ReplaceLineEndings(" ");
    }
}
