using System.Text;

namespace MoeRagInject.Engine.Output;

/// <summary>
/// Finds stop strings in text as it streams, releasing text only once it can no longer be the start of a match: the longest
/// tail that is a prefix of some stop string is held back. So the text a stream releases is exactly what a non-streamed
/// request returns: everything before the first stop string (or up to its end with no_stop_trim).
/// </summary>
internal sealed class StopMatcher(IReadOnlyList<string> stops, bool noStopTrim)
{
    private readonly StringBuilder _held = new();

    /// <summary>The stop string found, once one is.</summary>
    public string? Matched { get; private set; }

    /// <summary>Adds text; returns what may be released now. After a match, returns the text up to it and ignores what follows.</summary>
    public string Push(string text)
    {
        if (Matched is not null) return "";
        if (stops.Count == 0) return text;
        _held.Append(text);
        var held = _held.ToString();
        var best = -1;
        foreach (var stop in stops)
        {
            var at = held.IndexOf(stop, StringComparison.Ordinal);
            if (at >= 0 && (best < 0 || at < best))
            {
                best = at;
                Matched = stop;
            }
        }
        if (Matched is not null)
        {
            _held.Clear();
            return noStopTrim ? held[..(best + Matched.Length)] : held[..best];
        }
        var keep = 0;
        foreach (var stop in stops)
            for (var length = Math.Min(stop.Length - 1, held.Length); length > keep; length--)
                if (held.AsSpan(held.Length - length).SequenceEqual(stop.AsSpan(0, length)))
                {
                    keep = length;
                    break;
                }
        _held.Remove(0, held.Length - keep);
        return held[..^keep];
    }

    /// <summary>The held-back tail, at the end of a request that matched no stop string.</summary>
    public string Flush()
    {
        var rest = _held.ToString();
        _held.Clear();
        return rest;
    }
}
