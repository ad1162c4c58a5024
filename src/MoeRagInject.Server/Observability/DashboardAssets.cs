using System.Collections.Frozen;

namespace MoeRagInject.Server.Observability;

/// <summary>
/// The dashboard's static files, embedded in this assembly (Dashboard/ in the source tree, logical names
/// <c>dashboard/NAME</c>): a page, its script and style, and the vendored uPlot charting library with its licence.
/// Read once; nothing is built at run time.
/// </summary>
internal static class DashboardAssets
{
    private const string Prefix = "dashboard/";

    private static readonly FrozenDictionary<string, string> s_contentTypes = new Dictionary<string, string>(StringComparer.Ordinal)
    {
        [".html"] = "text/html; charset=utf-8",
        [".js"] = "text/javascript; charset=utf-8",
        [".css"] = "text/css; charset=utf-8",
        [".LICENSE"] = "text/plain; charset=utf-8",
    }.ToFrozenDictionary();

    private static readonly Lazy<FrozenDictionary<string, (byte[] Bytes, string ContentType)>> s_files = new(Load);

    /// <summary>The file at <paramref name="path"/> (relative to the dashboard, e.g. <c>vendor/uPlot.min.css</c>), or false.</summary>
    public static bool TryGet(string path, out byte[] bytes, out string contentType)
    {
        if (s_files.Value.TryGetValue(path, out var file))
        {
            (bytes, contentType) = file;
            return true;
        }
        (bytes, contentType) = ([], "");
        return false;
    }

    private static FrozenDictionary<string, (byte[], string)> Load()
    {
        var assembly = typeof(DashboardAssets).Assembly;
        var files = new Dictionary<string, (byte[], string)>(StringComparer.Ordinal);
        foreach (var name in assembly.GetManifestResourceNames())
        {
            if (!name.StartsWith(Prefix, StringComparison.Ordinal)) continue;
            using var stream = assembly.GetManifestResourceStream(name)!;
            using var copy = new MemoryStream();
            stream.CopyTo(copy);
            var type = s_contentTypes.GetValueOrDefault(Path.GetExtension(name), "application/octet-stream");
            files[name[Prefix.Length..]] = (copy.ToArray(), type);
        }
        return files.ToFrozenDictionary(StringComparer.Ordinal);
    }
}
