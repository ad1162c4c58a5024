using System.Globalization;
using System.Security.Cryptography;
using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace MoeRagInject.Rag;

/// <summary>One RAG event: written as one JSON line under the log dir and returned in meta_info.rag.</summary>
public sealed record RagEvent
{
    private const string TimeFormat = "yyyy-MM-dd'T'HH:mm:ss.fff'Z'";
    private static readonly uint s_idBase = BitConverter.ToUInt32(RandomNumberGenerator.GetBytes(4));
    private static int s_idCounter;

    internal static readonly JsonSerializerOptions LineOptions = new()
    {
        Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
        WriteIndented = false,
    };

    public required string EventId { get; init; }
    public required DateTimeOffset StartTime { get; init; }
    public DateTimeOffset EndTime { get; init; }
    public required string RequestId { get; init; }
    public required string Query { get; init; }
    public IReadOnlyList<string> Snippets { get; init; } = [];
    public IReadOnlyList<string> SnippetIds { get; init; } = [];
    /// <summary>Output-token index whose forward pass fired (0 = the last prompt position).</summary>
    public required int TokenIndex { get; init; }
    /// <summary>Sequence position of that token.</summary>
    public required int Position { get; init; }
    public required IReadOnlyList<int> Layers { get; init; }
    /// <summary>The <see cref="Signal"/> of a retrieval made with the prompt before it was computed (--retrieve-first): no signal fired it.</summary>
    public const string RetrieveFirstSignal = "retrieve-first";

    /// <summary>
    /// What the trigger watched (<see cref="TriggerSignals.Name"/>), <see cref="Entropy"/> being that signal's value; or
    /// <see cref="RetrieveFirstSignal"/> (entropy and threshold null, batch size 0).
    /// </summary>
    public string Signal { get; init; } = "router-entropy";
    public required double Entropy { get; init; }
    public required double Threshold { get; init; }
    public required int BatchSize { get; init; }
    public required string Retriever { get; init; }
    public double LatencyMs { get; init; }
    public required string Mode { get; init; }
    /// <summary>Prompt mode: "answer" when the answer so far was dropped and is generated again after the rebuilt context, "continue" when it was kept; null otherwise.</summary>
    public string? Restart { get; init; }
    public IReadOnlyList<int> InjectionLayers { get; init; } = [];
    public double Scale { get; init; }
    /// <summary>L2 norm of the vector added to the residual stream (latent mode).</summary>
    public double InjectionNorm { get; init; }
    public bool Cached { get; init; }
    public string? Error { get; init; }

    /// <summary>The event as a JSON object with snake_case names (event_id, start_time, end_time as ISO-8601 UTC with milliseconds, ...).</summary>
    /// <remarks>end_time is null while <see cref="EndTime"/> is unset (default); non-finite numbers are written as null.</remarks>
    public JsonObject ToJson() => new()
    {
        ["event_id"] = EventId,
        ["start_time"] = FormatTime(StartTime),
        ["end_time"] = EndTime == default ? null : FormatTime(EndTime),
        ["request_id"] = RequestId,
        ["query"] = Query,
        ["snippets"] = new JsonArray([.. Snippets.Select(s => (JsonNode?)JsonValue.Create(s))]),
        ["snippet_ids"] = new JsonArray([.. SnippetIds.Select(s => (JsonNode?)JsonValue.Create(s))]),
        ["token_index"] = TokenIndex,
        ["position"] = Position,
        ["layers"] = new JsonArray([.. Layers.Select(l => (JsonNode?)JsonValue.Create(l))]),
        ["signal"] = Signal,
        ["entropy"] = Number(Entropy),
        ["threshold"] = Number(Threshold),
        ["batch_size"] = BatchSize,
        ["retriever"] = Retriever,
        ["latency_ms"] = Number(LatencyMs),
        ["mode"] = Mode,
        ["restart"] = Restart,
        ["injection_layers"] = new JsonArray([.. InjectionLayers.Select(l => (JsonNode?)JsonValue.Create(l))]),
        ["scale"] = Number(Scale),
        ["injection_norm"] = Number(InjectionNorm),
        ["cached"] = Cached,
        ["error"] = Error,
    };

    /// <summary>The event as one line of JSON (no trailing newline).</summary>
    public string ToJsonLine() => ToJson().ToJsonString(LineOptions);

    /// <summary>Reads an event written by <see cref="ToJson"/>; missing optional fields take their defaults.</summary>
    public static RagEvent FromJson(JsonObject json)
    {
        ArgumentNullException.ThrowIfNull(json);
        return new RagEvent
        {
            EventId = RequiredString(json, "event_id"),
            StartTime = ParseTime(json["start_time"], "start_time") ?? throw new JsonException("Missing \"start_time\"."),
            EndTime = ParseTime(json["end_time"], "end_time") ?? default,
            RequestId = RequiredString(json, "request_id"),
            Query = RequiredString(json, "query"),
            Snippets = Strings(json["snippets"]),
            SnippetIds = Strings(json["snippet_ids"]),
            TokenIndex = json["token_index"]?.GetValue<int>() ?? 0,
            Position = json["position"]?.GetValue<int>() ?? 0,
            Layers = Ints(json["layers"]),
            Signal = json["signal"]?.GetValue<string>() ?? "router-entropy",
            Entropy = json["entropy"]?.GetValue<double>() ?? double.NaN,
            Threshold = json["threshold"]?.GetValue<double>() ?? double.NaN,
            BatchSize = json["batch_size"]?.GetValue<int>() ?? 0,
            Retriever = json["retriever"]?.GetValue<string>() ?? "",
            LatencyMs = json["latency_ms"]?.GetValue<double>() ?? 0,
            Mode = json["mode"]?.GetValue<string>() ?? "",
            Restart = json["restart"]?.GetValue<string>(),
            InjectionLayers = Ints(json["injection_layers"]),
            Scale = json["scale"]?.GetValue<double>() ?? 0,
            InjectionNorm = json["injection_norm"]?.GetValue<double>() ?? 0,
            Cached = json["cached"]?.GetValue<bool>() ?? false,
            Error = json["error"]?.GetValue<string>(),
        };
    }

    /// <summary>A new id like rag-20251109-085350-1a2b3c4d: UTC time plus a unique suffix.</summary>
    /// <remarks>The suffix is a per-process random base plus an odd multiple of a counter, so ids never repeat within a process (for 2^32 ids) and rarely across processes.</remarks>
    public static string NewEventId(DateTimeOffset now)
    {
        uint n = unchecked((uint)Interlocked.Increment(ref s_idCounter));
        uint suffix = unchecked(s_idBase + (n * 0x9E3779B9u));
        return string.Create(CultureInfo.InvariantCulture, $"rag-{now.UtcDateTime:yyyyMMdd-HHmmss}-{suffix:x8}");
    }

    internal static string FormatTime(DateTimeOffset time) => time.UtcDateTime.ToString(TimeFormat, CultureInfo.InvariantCulture);

    private static JsonValue? Number(double value) => double.IsFinite(value) ? JsonValue.Create(value) : null;

    private static string RequiredString(JsonObject json, string name) =>
        json[name]?.GetValue<string>() ?? throw new JsonException($"Missing \"{name}\".");

    private static DateTimeOffset? ParseTime(JsonNode? node, string name)
    {
        if (node is null)
        {
            return null;
        }

        string text = node.GetValue<string>();
        return DateTimeOffset.TryParse(text, CultureInfo.InvariantCulture, DateTimeStyles.AssumeUniversal | DateTimeStyles.AdjustToUniversal, out var time)
            ? time
            : throw new JsonException($"\"{name}\" is not an ISO-8601 time: {text}");
    }

    private static string[] Strings(JsonNode? node) =>
        node is JsonArray array ? [.. array.Select(n => n?.GetValue<string>() ?? "")] : [];

    private static int[] Ints(JsonNode? node) =>
        node is JsonArray array ? [.. array.Select(n => n?.GetValue<int>() ?? 0)] : [];
}

/// <summary>Appends events as JSONL to &lt;dir&gt;/rag-events.jsonl: each line written whole and flushed; safe from many threads.</summary>
public sealed class RagEventLog : IDisposable
{
    public const string FileName = "rag-events.jsonl";

    private readonly Lock _gate = new();
    private readonly FileStream _stream;
    private bool _disposed;

    public RagEventLog(string directory)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(directory);
        Directory.CreateDirectory(directory);
        FilePath = Path.GetFullPath(Path.Combine(directory, FileName));
        // bufferSize 0: every Write goes straight to the OS as one write call, no partial line sits in a user-space buffer.
        _stream = new FileStream(FilePath, FileMode.Append, FileAccess.Write, FileShare.Read, bufferSize: 0);
    }

    public string FilePath { get; }

    /// <summary>Serialises the event to one line in memory, then appends it with a single write and a flush.</summary>
    /// <param name="fsync">Also force the line to the disk (fsync) before returning.</param>
    public void Append(RagEvent ragEvent, bool fsync = false)
    {
        ArgumentNullException.ThrowIfNull(ragEvent);
        string line = ragEvent.ToJsonLine();
        byte[] bytes = new byte[Encoding.UTF8.GetMaxByteCount(line.Length) + 1];
        int length = Encoding.UTF8.GetBytes(line, bytes);
        bytes[length++] = (byte)'\n';
        lock (_gate)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            _stream.Write(bytes, 0, length);
            _stream.Flush(flushToDisk: fsync);
        }
    }

    public void Dispose()
    {
        lock (_gate)
        {
            if (_disposed)
            {
                return;
            }

            _disposed = true;
            _stream.Dispose();
        }
    }

    /// <summary>
    /// Reads every event of a log file. A final line without its newline that does not parse (a write torn by a crash) is skipped;
    /// a malformed line anywhere else is an <see cref="InvalidDataException"/> naming the file and line.
    /// </summary>
    public static IReadOnlyList<RagEvent> ReadAll(string path)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(path);
        string content;
        using (var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete))
        using (var reader = new StreamReader(stream, Encoding.UTF8))
        {
            content = reader.ReadToEnd();
        }

        var events = new List<RagEvent>();
        int lineNumber = 0;
        int start = 0;
        while (start < content.Length)
        {
            int end = content.IndexOf('\n', start);
            bool complete = end >= 0;
            string line = complete ? content[start..end] : content[start..];
            start = complete ? end + 1 : content.Length;
            lineNumber++;
            if (string.IsNullOrWhiteSpace(line))
            {
                continue;
            }

            try
            {
                var node = JsonNode.Parse(line) as JsonObject ?? throw new JsonException("the line is not a JSON object");
                events.Add(RagEvent.FromJson(node));
            }
            catch (Exception ex) when (ex is JsonException or InvalidOperationException or FormatException)
            {
                if (!complete)
                {
                    break; // torn final line
                }

                throw new InvalidDataException($"{path}:{lineNumber}: malformed RAG event: {ex.Message}", ex);
            }
        }

        return events;
    }
}
