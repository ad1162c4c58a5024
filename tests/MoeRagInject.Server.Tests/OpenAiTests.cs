using System.Text;
using System.Text.Json.Nodes;
using MoeRagInject.Model.Tokenization;

namespace MoeRagInject.Server.Tests;

/// <summary>The OpenAI-compatible /v1 routes over real HTTP.</summary>
public sealed class OpenAiTests(ServerFixture server) : IClassFixture<ServerFixture>
{
    private HttpClient Client => server.Client;

    private static JsonObject Completion(JsonNode prompt, int maxTokens = 12) => new()
    {
        ["model"] = "anything",
        ["prompt"] = prompt,
        ["max_tokens"] = maxTokens,
        ["temperature"] = 0,
        ["ignore_eos"] = true,
    };

    private static JsonObject Chat(string content, int maxTokens = 8) => new()
    {
        ["model"] = "anything",
        ["messages"] = new JsonArray(new JsonObject { ["role"] = "user", ["content"] = content }),
        ["max_tokens"] = maxTokens,
        ["temperature"] = 0,
        ["ignore_eos"] = true,
    };

    private async Task<string> GenerateTextAsync(int[] ids, int maxNewTokens)
    {
        var result = await Client.PostOkAsync("/generate", new JsonObject
        {
            ["input_ids"] = TestData.ToJson(ids),
            ["sampling_params"] = new JsonObject { ["temperature"] = 0, ["max_new_tokens"] = maxNewTokens, ["ignore_eos"] = true },
        });
        return result["text"]!.GetValue<string>();
    }

    [Fact]
    public async Task Models_ListsTheServedModel()
    {
        var models = await Client.GetOkAsync("/v1/models");
        Assert.Equal("list", models["object"]!.GetValue<string>());
        var card = models["data"]!.AsArray().Single()!;
        Assert.Equal("model", card["object"]!.GetValue<string>());
        Assert.Equal("a-fp32", card["id"]!.GetValue<string>());
        Assert.Equal(256, card["max_model_len"]!.GetValue<int>());
    }

    [Fact]
    public async Task Completions_String_MatchesGenerate()
    {
        var prompt = TestData.ReferencePrompts[0];
        var result = await Client.PostOkAsync("/v1/completions", Completion(prompt.Text));
        Assert.Equal("text_completion", result["object"]!.GetValue<string>());
        Assert.StartsWith("cmpl-", result["id"]!.GetValue<string>());
        var choice = result["choices"]!.AsArray().Single()!;
        Assert.Equal(0, choice["index"]!.GetValue<int>());
        Assert.Equal("length", choice["finish_reason"]!.GetValue<string>());
        Assert.Equal(await GenerateTextAsync(prompt.InputIds, 12), choice["text"]!.GetValue<string>());
        var usage = result["usage"]!;
        Assert.Equal(prompt.InputIds.Length, usage["prompt_tokens"]!.GetValue<int>());
        Assert.Equal(12, usage["completion_tokens"]!.GetValue<int>());
        Assert.Equal(prompt.InputIds.Length + 12, usage["total_tokens"]!.GetValue<int>());
    }

    [Fact]
    public async Task Completions_MaxTokensDefaultsTo16()
    {
        var body = Completion("hello");
        body.Remove("max_tokens");
        var result = await Client.PostOkAsync("/v1/completions", body);
        Assert.Equal(16, result["usage"]!["completion_tokens"]!.GetValue<int>());
    }

    [Fact]
    public async Task Completions_ListOfStrings_AndTokenIds()
    {
        var prompts = TestData.ReferencePrompts;
        var list = await Client.PostOkAsync("/v1/completions", Completion(new JsonArray(prompts[0].Text, prompts[3].Text), 4));
        var choices = list["choices"]!.AsArray();
        Assert.Equal([0, 1], choices.Select(c => c!["index"]!.GetValue<int>()));
        Assert.Equal(await GenerateTextAsync(prompts[3].InputIds, 4), choices[1]!["text"]!.GetValue<string>());

        var ids = await Client.PostOkAsync("/v1/completions", Completion(TestData.ToJson(prompts[2].InputIds), 4));
        Assert.Equal(await GenerateTextAsync(prompts[2].InputIds, 4), ids["choices"]![0]!["text"]!.GetValue<string>());

        var idLists = await Client.PostOkAsync("/v1/completions",
            Completion(new JsonArray(TestData.ToJson(prompts[0].InputIds), TestData.ToJson(prompts[1].InputIds)), 4));
        Assert.Equal(2, idLists["choices"]!.AsArray().Count);
    }

    [Fact]
    public async Task Completions_Logprobs_OnePerToken()
    {
        var body = Completion("What is Quantum？", 6);
        body["logprobs"] = 1;
        var result = await Client.PostOkAsync("/v1/completions", body);
        var logprobs = result["choices"]![0]!["logprobs"]!;
        Assert.Equal(6, logprobs["tokens"]!.AsArray().Count);
        Assert.Equal(6, logprobs["token_logprobs"]!.AsArray().Count);
        Assert.All(logprobs["token_logprobs"]!.AsArray(), lp => Assert.True(lp!.GetValue<double>() <= 1e-6));
    }

    [Fact]
    public async Task Completions_Streaming_DeltasAddUpToTheText()
    {
        var prompt = TestData.ReferencePrompts[3];
        var whole = await Client.PostOkAsync("/v1/completions", Completion(prompt.Text));
        var body = Completion(prompt.Text);
        body["stream"] = true;
        body["stream_options"] = new JsonObject { ["include_usage"] = true };
        var events = Http.JsonEvents(await Client.PostSseAsync("/v1/completions", body));
        var chunks = events.Where(e => e["choices"]!.AsArray().Count > 0).ToList();
        var text = string.Concat(chunks.Select(c => c["choices"]![0]!["text"]!.GetValue<string>()));
        Assert.Equal(whole["choices"]![0]!["text"]!.GetValue<string>(), text);
        Assert.Equal("length", chunks[^1]["choices"]![0]!["finish_reason"]!.GetValue<string>());
        Assert.All(chunks.SkipLast(1), c => Assert.Null(c["choices"]![0]!["finish_reason"]));
        Assert.Equal(12, events[^1]["usage"]!["completion_tokens"]!.GetValue<int>());
    }

    [Fact]
    public async Task Chat_UsesTheTemplate_WithOneBos()
    {
        const string question = "What is Quantum?";
        var tokenizer = server.Engine.Tokenizer;
        var rendered = tokenizer.ApplyChatTemplate([new ChatMessage("user", question)], addGenerationPrompt: true);
        Assert.StartsWith("<s>", rendered);
        var expected = tokenizer.Encode(rendered, addSpecialTokens: false);
        Assert.Equal(1, expected.Count(id => id == tokenizer.BosTokenId));

        var result = await Client.PostOkAsync("/v1/chat/completions", Chat(question));
        Assert.Equal("chat.completion", result["object"]!.GetValue<string>());
        Assert.StartsWith("chatcmpl-", result["id"]!.GetValue<string>());
        var choice = result["choices"]![0]!;
        Assert.Equal("assistant", choice["message"]!["role"]!.GetValue<string>());
        Assert.Equal("length", choice["finish_reason"]!.GetValue<string>());
        Assert.Equal(expected.Length, result["usage"]!["prompt_tokens"]!.GetValue<int>());
        Assert.Equal(8, result["usage"]!["completion_tokens"]!.GetValue<int>());
        Assert.Equal(await GenerateTextAsync(expected, 8), choice["message"]!["content"]!.GetValue<string>());
    }

    [Fact]
    public async Task Chat_Streaming_RoleThenContentThenFinish()
    {
        var whole = await Client.PostOkAsync("/v1/chat/completions", Chat("Tell me about foxes", 10));
        var body = Chat("Tell me about foxes", 10);
        body["stream"] = true;
        var events = Http.JsonEvents(await Client.PostSseAsync("/v1/chat/completions", body));
        Assert.All(events, e => Assert.Equal("chat.completion.chunk", e["object"]!.GetValue<string>()));
        Assert.Equal("assistant", events[0]["choices"]![0]!["delta"]!["role"]!.GetValue<string>());
        var content = new StringBuilder();
        foreach (var e in events)
            if (e["choices"]![0]!["delta"]!["content"] is { } piece) content.Append(piece.GetValue<string>());
        Assert.Equal(whole["choices"]![0]!["message"]!["content"]!.GetValue<string>(), content.ToString());
        Assert.Equal("length", events[^1]["choices"]![0]!["finish_reason"]!.GetValue<string>());
        Assert.Single(events, e => e["choices"]![0]!["finish_reason"] is not null);
    }

    [Fact]
    public async Task Chat_AcceptsOurExtensions()
    {
        var body = Chat("What is Quantum?", 6);
        body["return_router_entropy"] = true;
        body["rag"] = new JsonObject { ["mode"] = "latent", ["threshold"] = 0.0 };
        var result = await Client.PostOkAsync("/v1/chat/completions", body);
        var choice = result["choices"]![0]!;
        Assert.Equal(6, choice["router_entropy"]!.AsArray().Count);
        Assert.NotEmpty(choice["rag"]!.AsArray());
    }
}
