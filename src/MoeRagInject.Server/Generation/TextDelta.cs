namespace MoeRagInject.Server.Generation;

/// <summary>
/// Turns "the whole text so far" (what the engine reports) into the increments OpenAI streams carry.
/// The engine re-decodes the whole output each step, so the text is not always append-only: a run of byte-fallback tokens
/// that is not (yet) valid UTF-8 decodes as U+FFFD per byte, and a later byte can turn an earlier valid character into
/// U+FFFD (as Hugging Face's ByteFallback decoder does). A trailing U+FFFD is therefore held back until the final update;
/// when the text was revised behind what was already sent, the stream goes on from the same length (sent text cannot be
/// taken back), so the deltas may differ from the final text only where such bytes were revised.
/// </summary>
public sealed class TextDelta
{
    private string _sent = "";

    /// <summary>The text as of the last delta, from the engine's side.</summary>
    public string Sent => _sent;

    public string Next(string textSoFar, bool final)
    {
        ArgumentNullException.ThrowIfNull(textSoFar);
        var candidate = final ? textSoFar : textSoFar.TrimEnd('\uFFFD');
        if (candidate.Length <= _sent.Length) return "";
        var delta = candidate[_sent.Length..];
        _sent = candidate;
        return delta;
    }
}
