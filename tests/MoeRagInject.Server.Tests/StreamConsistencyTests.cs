using System.Text;
using System.Text.Json.Nodes;
using MoeRagInject.Model;

namespace MoeRagInject.Server.Tests;

/// <summary>
/// Streamed text equals non-streamed text, for 50 random prompts with random stop strings (cut from the request's own
/// output so that they match, across token boundaries, and multi-byte ones), on /generate, /v1/completions and
/// /v1/chat/completions; and the non-streamed text is the unstopped output cut before the stop string.
/// </summary>
public sealed class StreamConsistencyTests(ServerFixture server) : IClassFixture<ServerFixture>
{
    private const int NewTokens = 24;

    private static string RandomPrompt(SplitMix64 rng)
    {
        string[] words = ["the", "quick", "fox", "café", "naïve", "東京", "🦊", "jumps", "über", "—", "lazy", "dog", "→", "12"];
        var text = new StringBuilder();
        for (var n = 2 + (int)(rng.NextUInt64() % 8); n > 0; n--) text.Append(words[rng.NextUInt64() % (ulong)words.Length]).Append(' ');
        return text.ToString().Trim();
    }

    private static JsonObject Sampling(string? stop) => new()
    {
        ["max_new_tokens"] = NewTokens,
        ["temperature"] = 0,
        ["ignore_eos"] = true,
        ["stop"] = stop is null ? new JsonArray() : new JsonArray(stop),
    };

    [Fact]
    public async Task StreamedTextEqualsNonStreamedTextOnEveryRoute()
    {
        var rng = new SplitMix64(2026);
        var matched = 0;
        for (var i = 0; i < 50; i++)
        {
            var prompt = RandomPrompt(rng);
            var full = (await server.Client.PostOkAsync("/generate", new JsonObject { ["text"] = prompt, ["sampling_params"] = Sampling(null) }))["text"]!
                .GetValue<string>();
            var stop = ChooseStop(rng, full, i);
            var expected = full.Contains(stop, StringComparison.Ordinal) ? full[..full.IndexOf(stop, StringComparison.Ordinal)] : full;
            if (expected.Length < full.Length) matched++;

            var generate = new JsonObject { ["text"] = prompt, ["sampling_params"] = Sampling(stop) };
            var whole = (await server.Client.PostOkAsync("/generate", generate))["text"]!.GetValue<string>();
            Assert.Equal(expected, whole);
            var events = Http.JsonEvents(await server.Client.PostSseAsync("/generate", With(generate, "stream", true)));
            Assert.Equal(whole, events[^1]["text"]!.GetValue<string>());

            var completion = new JsonObject { ["model"] = "m", ["prompt"] = prompt, ["max_tokens"] = NewTokens, ["temperature"] = 0, ["stop"] = new JsonArray(stop), ["ignore_eos"] = true };
            var completionText = (await server.Client.PostOkAsync("/v1/completions", completion))["choices"]![0]!["text"]!.GetValue<string>();
            Assert.Equal(expected, completionText);
            var chunks = Http.JsonEvents(await server.Client.PostSseAsync("/v1/completions", With(completion, "stream", true)));
            Assert.Equal(completionText, string.Concat(chunks.Select(c => c["choices"]![0]!["text"]!.GetValue<string>())));

            var chat = new JsonObject
            {
                ["model"] = "m", ["messages"] = new JsonArray(new JsonObject { ["role"] = "user", ["content"] = prompt }),
                ["max_tokens"] = NewTokens, ["temperature"] = 0, ["stop"] = new JsonArray(stop), ["ignore_eos"] = true,
            };
            var chatText = (await server.Client.PostOkAsync("/v1/chat/completions", chat))["choices"]![0]!["message"]!["content"]!.GetValue<string>();
            var chatChunks = Http.JsonEvents(await server.Client.PostSseAsync("/v1/chat/completions", With(chat, "stream", true)));
            Assert.Equal(chatText, string.Concat(chatChunks.Select(c => c["choices"]![0]!["delta"]?["content"]?.GetValue<string>() ?? "")));
        }
        Assert.True(matched >= 30, $"only {matched} of 50 stop strings occurred in the output");
    }

    /// <summary>A stop string cut from the output (2–6 characters, so usually across a token boundary), or every fifth a multi-byte one.</summary>
    private static string ChooseStop(SplitMix64 rng, string text, int i)
    {
        var multibyte = text.EnumerateRunes().Where(r => r.Utf8SequenceLength > 1).Select(r => r.ToString()).Distinct().ToList();
        if (i % 5 == 4 && multibyte.Count > 0) return multibyte[(int)(rng.NextUInt64() % (ulong)multibyte.Count)];
        if (text.Length < 3) return "é→";
        var length = 2 + (int)(rng.NextUInt64() % 5);
        var at = (int)(rng.NextUInt64() % (ulong)Math.Max(1, text.Length - length));
        if (char.IsLowSurrogate(text[at])) at--;
        var end = Math.Min(text.Length, at + length);
        if (end < text.Length && char.IsLowSurrogate(text[end])) end++;
        return text[at..end];
    }

    private static JsonObject With(JsonObject body, string name, bool value)
    {
        var copy = body.DeepClone().AsObject();
        copy[name] = value;
        return copy;
    }
}
