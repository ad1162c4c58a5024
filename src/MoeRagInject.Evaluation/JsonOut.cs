using System.Globalization;
using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace MoeRagInject.Evaluation;

/// <summary>JsonNode helpers: non-finite numbers become null, percentile summaries, writing files.</summary>
internal static class JsonOut
{
    public static readonly JsonSerializerOptions Indented = new()
    {
        WriteIndented = true,
        Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
    };

    public static readonly JsonSerializerOptions Line = new()
    {
        WriteIndented = false,
        Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
    };

    public static JsonNode? Num(double value, int digits = 6) =>
        double.IsFinite(value) ? JsonValue.Create(Math.Round(value, digits)) : null;

    public static JsonArray Array(IEnumerable<double> values, int digits = 6) => new([.. values.Select(v => Num(v, digits))]);

    public static JsonArray Array(IEnumerable<int> values) => new([.. values.Select(v => (JsonNode?)JsonValue.Create(v))]);

    public static JsonArray Array(IEnumerable<string> values) => new([.. values.Select(v => (JsonNode?)JsonValue.Create(v))]);

    /// <summary>{n, mean, min, p5, p10, p25, p50, p75, p90, p95, max}.</summary>
    public static JsonObject Summary(IEnumerable<double> values)
    {
        var sorted = values.Where(v => !double.IsNaN(v)).Order().ToArray();
        var o = new JsonObject
        {
            ["n"] = sorted.Length,
            ["mean"] = Num(Stats.Mean(sorted)),
            ["min"] = Num(sorted.Length == 0 ? double.NaN : sorted[0]),
        };
        foreach (var p in Stats.ReportedPercentiles)
            o[string.Create(CultureInfo.InvariantCulture, $"p{p}")] = Num(Stats.QuantileSorted(sorted, p / 100.0));
        o["max"] = Num(sorted.Length == 0 ? double.NaN : sorted[^1]);
        return o;
    }

    public static void Write(string path, JsonNode node)
    {
        var directory = Path.GetDirectoryName(Path.GetFullPath(path));
        if (!string.IsNullOrEmpty(directory)) Directory.CreateDirectory(directory);
        File.WriteAllText(path, node.ToJsonString(Indented) + "\n");
    }

    /// <summary>
    /// Writes <paramref name="node"/> indented, except that each item of its top-level array <paramref name="lineItems"/> is
    /// written on one line (a long per-question array stays one line per question).
    /// </summary>
    public static void WriteWithLineItems(string path, JsonObject node, string lineItems)
    {
        if (node[lineItems] is not JsonArray items)
        {
            Write(path, node);
            return;
        }
        // The array leaves the tree for a moment; a placeholder string marks its place in the indented text.
        var placeholder = $"\u0001{lineItems}\u0001";
        node[lineItems] = placeholder;
        string text;
        try
        {
            text = node.ToJsonString(Indented);
        }
        finally
        {
            node[lineItems] = items;
        }
        var lines = items.Select(item => "    " + (item?.ToJsonString(Line) ?? "null"));
        var array = items.Count == 0 ? "[]" : "[\n" + string.Join(",\n", lines) + "\n  ]";
        var marker = JsonValue.Create(placeholder).ToJsonString(Indented);
        text = text.Replace(marker, array, StringComparison.Ordinal);
        var directory = Path.GetDirectoryName(Path.GetFullPath(path));
        if (!string.IsNullOrEmpty(directory)) Directory.CreateDirectory(directory);
        File.WriteAllText(path, text + "\n");
    }

    public static string F(double value, string format = "F3") =>
        double.IsFinite(value) ? value.ToString(format, CultureInfo.InvariantCulture) : "n/a";
}
