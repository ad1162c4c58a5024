using System.Globalization;
using System.Security.Cryptography;
using System.Text;

namespace MoeRagInject.Rag;

public static class RetrieverFactory
{
    internal const string AcceptedForms =
        "an index file (*.db, *.sqlite, *.sqlite3), a JSONL corpus (*.jsonl or *.jsonl.gz), an http(s):// URL (generic JSON contract) " +
        "or es+http(s)://host:port/index[?field=text] (Elasticsearch/OpenSearch)";

    /// <summary>
    /// A retriever from a command-line spec: a .db/.sqlite file (an index built by `index`), a .jsonl corpus (indexed on the fly
    /// into a cache file under <paramref name="cacheDirectory"/>, rebuilt when the corpus changes), an http(s) URL (generic JSON
    /// contract), or es+http(s)://host:port/index (Elasticsearch/OpenSearch _search preset).
    /// </summary>
    /// <remarks>
    /// The ES form takes optional query parameters <c>field</c> (text field, default "text") and <c>title</c> (title field,
    /// default "title"); user:password@ in either URL form becomes HTTP basic authentication.
    /// </remarks>
    /// <exception cref="ArgumentException">The spec has none of the accepted forms.</exception>
    /// <exception cref="FileNotFoundException">The index or corpus file does not exist.</exception>
    public static IRetriever Create(string spec, string cacheDirectory)
    {
        if (string.IsNullOrWhiteSpace(spec))
        {
            throw new ArgumentException($"Empty retriever spec; expected {AcceptedForms}.", nameof(spec));
        }

        spec = spec.Trim();
        if (spec.StartsWith("es+http://", StringComparison.OrdinalIgnoreCase) || spec.StartsWith("es+https://", StringComparison.OrdinalIgnoreCase))
        {
            return new HttpRetriever(ParseElasticsearch(spec));
        }

        if (spec.StartsWith("http://", StringComparison.OrdinalIgnoreCase) || spec.StartsWith("https://", StringComparison.OrdinalIgnoreCase))
        {
            if (!Uri.TryCreate(spec, UriKind.Absolute, out var uri))
            {
                throw new ArgumentException($"Retriever spec '{spec}' is not a valid URL; expected {AcceptedForms}.", nameof(spec));
            }

            return new HttpRetriever(new HttpRetrieverOptions { Endpoint = uri });
        }

        if (CorpusIndex.IsJsonl(spec))
        {
            ArgumentException.ThrowIfNullOrWhiteSpace(cacheDirectory);
            return new SqliteFtsRetriever(EnsureCachedIndex(spec, cacheDirectory));
        }

        string extension = Path.GetExtension(spec).ToLowerInvariant();
        switch (extension)
        {
            case ".db" or ".sqlite" or ".sqlite3":
                if (!File.Exists(spec))
                {
                    throw new FileNotFoundException($"Retrieval index '{spec}' does not exist (build one with the `index` command).", spec);
                }

                return new SqliteFtsRetriever(spec);
            default:
                throw new ArgumentException($"Unrecognised retriever spec '{spec}'; expected {AcceptedForms}.", nameof(spec));
        }
    }

    /// <summary>
    /// The cached index of a JSONL corpus, built if missing: &lt;cache&gt;/corpus-&lt;hash of full path&gt;-&lt;size&gt;-&lt;mtime&gt;.db.
    /// Older caches of the same corpus are deleted; the index is built in a temporary file and moved into place.
    /// </summary>
    internal static string EnsureCachedIndex(string corpusPath, string cacheDirectory)
    {
        var corpus = new FileInfo(Path.GetFullPath(corpusPath));
        if (!corpus.Exists)
        {
            throw new FileNotFoundException($"Corpus '{corpusPath}' does not exist.", corpusPath);
        }

        Directory.CreateDirectory(cacheDirectory);
        string pathHash = Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(corpus.FullName)))[..16];
        string prefix = $"corpus-{pathHash}-";
        string name = string.Create(CultureInfo.InvariantCulture,
            $"{prefix}{corpus.Length}-{corpus.LastWriteTimeUtc.Ticks}-v{CorpusIndex.SchemaVersion}.db");
        string indexPath = Path.Combine(Path.GetFullPath(cacheDirectory), name);
        if (File.Exists(indexPath))
        {
            return indexPath;
        }

        string temporary = Path.Combine(Path.GetDirectoryName(indexPath)!, $".{name}.{Guid.NewGuid():N}.tmp");
        try
        {
            CorpusIndex.Build([corpus.FullName], temporary);
            File.Move(temporary, indexPath, overwrite: true);
        }
        finally
        {
            TryDelete(temporary);
            TryDelete(temporary + "-journal");
        }

        foreach (string stale in Directory.EnumerateFiles(Path.GetDirectoryName(indexPath)!, prefix + "*.db"))
        {
            if (!string.Equals(Path.GetFileName(stale), name, StringComparison.Ordinal))
            {
                TryDelete(stale);
            }
        }

        return indexPath;
    }

    private static HttpRetrieverOptions ParseElasticsearch(string spec)
    {
        string url = spec[3..]; // drop "es+"
        if (!Uri.TryCreate(url, UriKind.Absolute, out var uri))
        {
            throw new ArgumentException($"Retriever spec '{spec}' is not a valid URL; expected es+http(s)://host:port/index.", nameof(spec));
        }

        string path = uri.AbsolutePath.Trim('/');
        if (path.Length == 0)
        {
            throw new ArgumentException($"Retriever spec '{spec}' names no index; expected es+http(s)://host:port/index.", nameof(spec));
        }

        int slash = path.LastIndexOf('/');
        string index = Uri.UnescapeDataString(slash < 0 ? path : path[(slash + 1)..]);
        string basePath = slash < 0 ? "" : path[..slash];
        var builder = new UriBuilder(uri) { Path = basePath, Query = "", Fragment = "" };

        string field = "text";
        string title = "title";
        foreach (string pair in uri.Query.TrimStart('?').Split('&', StringSplitOptions.RemoveEmptyEntries))
        {
            int eq = pair.IndexOf('=', StringComparison.Ordinal);
            string key = Uri.UnescapeDataString(eq < 0 ? pair : pair[..eq]);
            string value = eq < 0 ? "" : Uri.UnescapeDataString(pair[(eq + 1)..]);
            switch (key)
            {
                case "field" when value.Length > 0:
                    field = value;
                    break;
                case "title" when value.Length > 0:
                    title = value;
                    break;
                default:
                    throw new ArgumentException($"Retriever spec '{spec}': unknown or empty parameter '{key}' (accepted: field, title).", nameof(spec));
            }
        }

        return new HttpRetrieverOptions
        {
            Endpoint = builder.Uri,
            Protocol = HttpRetrieverProtocol.Elasticsearch,
            Index = index,
            TextField = field,
            TitleField = title,
        };
    }

    private static void TryDelete(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
    }
}
