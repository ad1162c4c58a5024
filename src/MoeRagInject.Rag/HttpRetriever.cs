using System.Globalization;
using System.Net.Http.Headers;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace MoeRagInject.Rag;

/// <summary>Wire protocol of an <see cref="HttpRetriever"/>.</summary>
public enum HttpRetrieverProtocol
{
    /// <summary>POST {"query", "top_k"}; answer {"passages": [...]}, {"results": [...]} or a bare array of strings or {"text", "id"?, "title"?, "score"?}.</summary>
    Generic,
    /// <summary>Elasticsearch/OpenSearch: POST &lt;base&gt;/&lt;index&gt;/_search with a match query; passages from hits.hits[]._source.</summary>
    Elasticsearch,
}

/// <summary>Settings of an <see cref="HttpRetriever"/>.</summary>
public sealed record HttpRetrieverOptions
{
    /// <summary>Generic: the URL to POST to. Elasticsearch: the cluster's base URL (the index is <see cref="Index"/>).</summary>
    public required Uri Endpoint { get; init; }
    public HttpRetrieverProtocol Protocol { get; init; } = HttpRetrieverProtocol.Generic;
    /// <summary>Elasticsearch index (or alias, or comma-separated list); required for that protocol.</summary>
    public string? Index { get; init; }
    /// <summary>Elasticsearch document field matched against the query and returned as passage text.</summary>
    public string TextField { get; init; } = "text";
    /// <summary>Elasticsearch document field read as the passage title.</summary>
    public string TitleField { get; init; } = "title";
    /// <summary>Bound on one whole call (connect, send, headers and body).</summary>
    public TimeSpan Timeout { get; init; } = TimeSpan.FromSeconds(10);
    /// <summary>Largest response body accepted.</summary>
    public int MaxResponseBytes { get; init; } = 16 * 1024 * 1024;
    /// <summary>Extra request headers (e.g. Authorization, an API key).</summary>
    public IReadOnlyDictionary<string, string>? Headers { get; init; }
}

/// <summary>Retrieval over HTTP: a generic JSON contract or an Elasticsearch/OpenSearch _search endpoint. Throws on any failure with a clear message.</summary>
public sealed class HttpRetriever : IRetriever
{
    private const int SnippetChars = 200;

    private readonly HttpClient _client;
    private readonly Uri _requestUri;

    /// <param name="options">Endpoint, protocol and limits.</param>
    /// <param name="handler">Optional message handler (owned by the retriever); null uses a new <see cref="SocketsHttpHandler"/>.</param>
    public HttpRetriever(HttpRetrieverOptions options, HttpMessageHandler? handler = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        if (!options.Endpoint.IsAbsoluteUri || (options.Endpoint.Scheme != Uri.UriSchemeHttp && options.Endpoint.Scheme != Uri.UriSchemeHttps))
        {
            throw new ArgumentException($"The retriever endpoint must be an absolute http(s) URL: {options.Endpoint}", nameof(options));
        }

        if (options.Timeout <= TimeSpan.Zero && options.Timeout != System.Threading.Timeout.InfiniteTimeSpan)
        {
            throw new ArgumentException($"The HTTP retriever timeout must be positive (got {options.Timeout}).", nameof(options));
        }

        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(options.MaxResponseBytes);
        Options = options;

        string endpoint = StripUserInfo(options.Endpoint).ToString();
        if (options.Protocol == HttpRetrieverProtocol.Elasticsearch)
        {
            if (string.IsNullOrWhiteSpace(options.Index))
            {
                throw new ArgumentException("The Elasticsearch protocol needs an index name.", nameof(options));
            }

            ArgumentException.ThrowIfNullOrWhiteSpace(options.TextField);
            string baseUrl = endpoint.TrimEnd('/');
            _requestUri = new Uri($"{baseUrl}/{Uri.EscapeDataString(options.Index).Replace("%2C", ",", StringComparison.OrdinalIgnoreCase)}/_search");
            Name = $"http:elasticsearch:{baseUrl}/{options.Index}";
        }
        else
        {
            _requestUri = new Uri(endpoint);
            Name = $"http:generic:{endpoint}";
        }

        _client = new HttpClient(handler ?? new SocketsHttpHandler { ConnectTimeout = Min(options.Timeout, TimeSpan.FromSeconds(10)) }, disposeHandler: true)
        {
            Timeout = System.Threading.Timeout.InfiniteTimeSpan, // the retriever's own timeout covers the body too
        };
        _client.DefaultRequestHeaders.Accept.Add(new MediaTypeWithQualityHeaderValue("application/json"));
        if (!string.IsNullOrEmpty(options.Endpoint.UserInfo))
        {
            string credentials = Uri.UnescapeDataString(options.Endpoint.UserInfo);
            _client.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Basic", Convert.ToBase64String(Encoding.UTF8.GetBytes(credentials)));
        }

        if (options.Headers is not null)
        {
            foreach (var (name, value) in options.Headers)
            {
                _client.DefaultRequestHeaders.TryAddWithoutValidation(name, value);
            }
        }
    }

    public HttpRetrieverOptions Options { get; }

    public string Name { get; }

    /// <summary>The URL each query is POSTed to.</summary>
    public Uri RequestUri => _requestUri;

    /// <exception cref="TimeoutException">The server did not answer within <see cref="HttpRetrieverOptions.Timeout"/>.</exception>
    /// <exception cref="HttpRequestException">The server could not be reached or answered a non-2xx status.</exception>
    /// <exception cref="InvalidDataException">The answer was not JSON of an accepted shape.</exception>
    public async Task<IReadOnlyList<RetrievedPassage>> RetrieveAsync(string query, int topK, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(query);
        if (topK <= 0)
        {
            return [];
        }

        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        if (Options.Timeout != System.Threading.Timeout.InfiniteTimeSpan)
        {
            timeout.CancelAfter(Options.Timeout);
        }

        try
        {
            using var request = new HttpRequestMessage(HttpMethod.Post, _requestUri)
            {
                Content = new StringContent(BuildRequestBody(query, topK), Encoding.UTF8, "application/json"),
            };
            using var response = await _client.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, timeout.Token).ConfigureAwait(false);
            byte[] body = await ReadBodyAsync(response.Content, timeout.Token).ConfigureAwait(false);
            if (!response.IsSuccessStatusCode)
            {
                throw new HttpRequestException(
                    $"{_requestUri} answered HTTP {(int)response.StatusCode} {response.ReasonPhrase}: {Snippet(body)}", null, response.StatusCode);
            }

            var passages = Options.Protocol == HttpRetrieverProtocol.Elasticsearch
                ? ParseElasticsearch(body, response.Content.Headers.ContentType?.MediaType)
                : ParseGeneric(body, response.Content.Headers.ContentType?.MediaType);
            return passages.Count > topK ? passages.Take(topK).ToList() : passages;
        }
        catch (OperationCanceledException ex) when (!cancellationToken.IsCancellationRequested && timeout.IsCancellationRequested)
        {
            throw new TimeoutException(string.Create(CultureInfo.InvariantCulture,
                $"{_requestUri} did not answer within the timeout of {Options.Timeout.TotalMilliseconds:0.###} ms"), ex);
        }
        catch (HttpRequestException ex) when (ex.StatusCode is null && !cancellationToken.IsCancellationRequested)
        {
            throw new HttpRequestException($"{_requestUri} could not be reached: {ex.Message}", ex.InnerException ?? ex);
        }
    }

    public void Dispose() => _client.Dispose();

    internal string BuildRequestBody(string query, int topK)
    {
        JsonObject body = Options.Protocol == HttpRetrieverProtocol.Elasticsearch
            ? new JsonObject
            {
                ["size"] = topK,
                ["query"] = new JsonObject { ["match"] = new JsonObject { [Options.TextField] = query } },
            }
            : new JsonObject { ["query"] = query, ["top_k"] = topK };
        return body.ToJsonString();
    }

    private async Task<byte[]> ReadBodyAsync(HttpContent content, CancellationToken cancellationToken)
    {
        if (content.Headers.ContentLength is long declared && declared > Options.MaxResponseBytes)
        {
            throw new InvalidDataException($"{_requestUri} answered {declared} bytes, more than the limit of {Options.MaxResponseBytes}");
        }

        using var stream = await content.ReadAsStreamAsync(cancellationToken).ConfigureAwait(false);
        using var buffer = new MemoryStream();
        byte[] chunk = new byte[16 * 1024];
        int read;
        while ((read = await stream.ReadAsync(chunk, cancellationToken).ConfigureAwait(false)) > 0)
        {
            if (buffer.Length + read > Options.MaxResponseBytes)
            {
                throw new InvalidDataException($"{_requestUri} answered more than the limit of {Options.MaxResponseBytes} bytes");
            }

            buffer.Write(chunk, 0, read);
        }

        return buffer.ToArray();
    }

    private JsonElement ParseJson(byte[] body, string? mediaType, out JsonDocument document)
    {
        if (body.Length == 0 || body.AsSpan().Trim(" \t\r\n"u8).IsEmpty)
        {
            throw new InvalidDataException($"{_requestUri} answered an empty body instead of JSON");
        }

        try
        {
            document = JsonDocument.Parse(body);
        }
        catch (JsonException ex)
        {
            string kind = mediaType is not null && mediaType.Contains("html", StringComparison.OrdinalIgnoreCase)
                || body.AsSpan().TrimStart(" \t\r\n"u8).StartsWith("<"u8)
                ? "HTML/markup"
                : $"non-JSON ({mediaType ?? "no content type"})";
            throw new InvalidDataException($"{_requestUri} answered {kind} instead of JSON: {Snippet(body)}", ex);
        }

        return document.RootElement;
    }

    private List<RetrievedPassage> ParseGeneric(byte[] body, string? mediaType)
    {
        var root = ParseJson(body, mediaType, out var document);
        using (document)
        {
            JsonElement items;
            if (root.ValueKind == JsonValueKind.Array)
            {
                items = root;
            }
            else if (root.ValueKind == JsonValueKind.Object
                && (TryGetArray(root, "passages", out items) || TryGetArray(root, "results", out items)))
            {
            }
            else
            {
                string got = root.ValueKind == JsonValueKind.Object
                    ? "an object with keys [" + string.Join(", ", root.EnumerateObject().Select(p => p.Name).Take(10)) + "]"
                    : $"a JSON {root.ValueKind.ToString().ToLowerInvariant()}";
                throw new InvalidDataException(
                    $"{_requestUri} answered {got}; expected {{\"passages\": [...]}}, {{\"results\": [...]}} or an array of passages");
            }

            var passages = new List<RetrievedPassage>(items.GetArrayLength());
            int index = 0;
            foreach (var item in items.EnumerateArray())
            {
                string fallbackId = index.ToString(CultureInfo.InvariantCulture);
                switch (item.ValueKind)
                {
                    case JsonValueKind.String:
                        passages.Add(new RetrievedPassage(fallbackId, null, item.GetString()!, 0));
                        break;
                    case JsonValueKind.Object:
                        if (!item.TryGetProperty("text", out var text) || text.ValueKind != JsonValueKind.String)
                        {
                            throw new InvalidDataException($"{_requestUri} answered passage {index} without a string \"text\": {Snippet(item.GetRawText())}");
                        }

                        passages.Add(new RetrievedPassage(
                            IdOf(item, "id") ?? fallbackId,
                            StringOf(item, "title"),
                            text.GetString()!,
                            NumberOf(item, "score") ?? 0));
                        break;
                    default:
                        throw new InvalidDataException($"{_requestUri} answered passage {index} as a JSON {item.ValueKind.ToString().ToLowerInvariant()}; expected a string or an object");
                }

                index++;
            }

            return passages;
        }
    }

    private List<RetrievedPassage> ParseElasticsearch(byte[] body, string? mediaType)
    {
        var root = ParseJson(body, mediaType, out var document);
        using (document)
        {
            if (root.ValueKind != JsonValueKind.Object
                || !root.TryGetProperty("hits", out var outer) || outer.ValueKind != JsonValueKind.Object
                || !TryGetArray(outer, "hits", out var hits))
            {
                throw new InvalidDataException($"{_requestUri} answered JSON without hits.hits[] (not an Elasticsearch _search response): {Snippet(body)}");
            }

            var passages = new List<RetrievedPassage>(hits.GetArrayLength());
            int index = 0;
            foreach (var hit in hits.EnumerateArray())
            {
                if (hit.ValueKind == JsonValueKind.Object
                    && hit.TryGetProperty("_source", out var source) && source.ValueKind == JsonValueKind.Object
                    && FieldText(source, Options.TextField) is string text)
                {
                    passages.Add(new RetrievedPassage(
                        IdOf(hit, "_id") ?? index.ToString(CultureInfo.InvariantCulture),
                        FieldText(source, Options.TitleField),
                        text,
                        NumberOf(hit, "_score") ?? 0));
                }

                index++;
            }

            if (index > 0 && passages.Count == 0)
            {
                throw new InvalidDataException($"none of the {index} hits from {_requestUri} has a string _source.{Options.TextField}; is the text field name right?");
            }

            return passages;
        }
    }

    private static bool TryGetArray(JsonElement element, string name, out JsonElement array)
    {
        if (element.TryGetProperty(name, out array) && array.ValueKind == JsonValueKind.Array)
        {
            return true;
        }

        array = default;
        return false;
    }

    /// <summary>A string field, or an array of strings joined by newlines.</summary>
    private static string? FieldText(JsonElement source, string field)
    {
        if (!source.TryGetProperty(field, out var value))
        {
            return null;
        }

        return value.ValueKind switch
        {
            JsonValueKind.String => value.GetString(),
            JsonValueKind.Array when value.EnumerateArray().All(v => v.ValueKind == JsonValueKind.String) && value.GetArrayLength() > 0 =>
                string.Join("\n", value.EnumerateArray().Select(v => v.GetString())),
            _ => null,
        };
    }

    private static string? IdOf(JsonElement element, string name) =>
        element.TryGetProperty(name, out var id) ? id.ValueKind switch
        {
            JsonValueKind.String => id.GetString(),
            JsonValueKind.Number => id.GetRawText(),
            _ => null,
        } : null;

    private static string? StringOf(JsonElement element, string name) =>
        element.TryGetProperty(name, out var value) && value.ValueKind == JsonValueKind.String ? value.GetString() : null;

    private static double? NumberOf(JsonElement element, string name) =>
        element.TryGetProperty(name, out var value) && value.ValueKind == JsonValueKind.Number && value.TryGetDouble(out double number) ? number : null;

    private static string Snippet(byte[] body) => Snippet(Encoding.UTF8.GetString(body, 0, Math.Min(body.Length, SnippetChars * 4)));

    private static string Snippet(string text)
    {
        string flat = text.ReplaceLineEndings(" ").Trim();
        if (flat.Length == 0)
        {
            return "(empty body)";
        }

        return flat.Length <= SnippetChars ? flat : flat[..SnippetChars] + "…";
    }

    private static Uri StripUserInfo(Uri uri) =>
        string.IsNullOrEmpty(uri.UserInfo) ? uri : new UriBuilder(uri) { UserName = "", Password = "" }.Uri;

    private static TimeSpan Min(TimeSpan a, TimeSpan b) => a == System.Threading.Timeout.InfiniteTimeSpan ? b : (a < b ? a : b);
}
