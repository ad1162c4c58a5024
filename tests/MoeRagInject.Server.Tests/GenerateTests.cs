using System.Net;
using System.Text.Json.Nodes;

namespace MoeRagInject.Server.Tests;

/// <summary>sglang's native surface over real HTTP: /generate in all its input shapes, streaming, logprobs, entropy, stops, RAG.</summary>
public sealed class GenerateTests(ServerFixture server) : IClassFixture<ServerFixture>
{
    private HttpClient Client => server.Client;

    private static JsonObject Greedy(int maxNewTokens = TestData.ReferenceNewTokens) => new()
    {
        ["temperature"] = 0,
        ["max_new_tokens"] = maxNewTokens,
        ["ignore_eos"] = true,
    };

    private static JsonObject RagOff => new() { ["mode"] = "off" };

    [Fact]
    public async Task Health_IsOkOnceLoaded()
    {
        using var response = await Client.GetAsync("/health");
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        using var generate = await Client.GetAsync("/health_generate");
        Assert.Equal(HttpStatusCode.OK, generate.StatusCode);
    }

    [Fact]
    public async Task ModelAndServerInfo_DescribeTheCheckpoint()
    {
        var model = await Client.GetOkAsync("/get_model_info");
        Assert.Equal(TestData.CheckpointPath, model["model_path"]!.GetValue<string>().TrimEnd('/'));
        Assert.True(model["is_generation"]!.GetValue<bool>());
        Assert.NotNull(model["tokenizer_path"]);
        Assert.Equal(1000, model["vocab_size"]!.GetValue<int>());
        Assert.Equal(256, model["context_length"]!.GetValue<int>());
        Assert.Equal(2, model["num_moe_layers"]!.GetValue<int>());
        Assert.Equal(4, model["num_experts"]!.GetValue<int>());

        var info = await Client.GetOkAsync("/get_server_info");
        Assert.Equal(server.Host.BaseAddress.Port, info["port"]!.GetValue<int>());
        Assert.Equal("off", info["rag_mode"]!.GetValue<string>());
        Assert.Equal(0.8, info["entropy_threshold"]!.GetValue<double>(), 6);
        Assert.Equal("router-entropy", info["trigger_signal"]!.GetValue<string>());
        Assert.Equal("answer", info["prompt_rag_restart"]!.GetValue<string>());
        Assert.Equal("answer", info["latent_rag_restart"]!.GetValue<string>());
        Assert.False(info["retrieve_first"]!.GetValue<bool>());
        Assert.Equal("row-major", info["expert_layout"]!.GetValue<string>());
    }

    /// <summary>rag.retrieve_first per request: one retrieval with the prompt before it is computed, named so in the event, at answer token 0.</summary>
    [Fact]
    public async Task RetrieveFirstPerRequest_RetrievesOnceBeforeThePrompt()
    {
        var result = await Client.PostOkAsync("/generate", new JsonObject
        {
            ["text"] = "What is Quantum?",
            ["sampling_params"] = new JsonObject { ["temperature"] = 0, ["max_new_tokens"] = 3 },
            ["rag"] = new JsonObject { ["mode"] = "latent", ["threshold"] = 100, ["retrieve_first"] = true },
        });
        var e = Assert.Single(result["meta_info"]!["rag"]!.AsArray())!;
        Assert.Equal("retrieve-first", e["signal"]!.GetValue<string>());
        Assert.Equal(0, e["token_index"]!.GetValue<int>());
        Assert.Equal(0, e["batch_size"]!.GetValue<int>());
        Assert.Null(e["entropy"]);
        Assert.Equal(result["meta_info"]!["prompt_tokens"]!.GetValue<int>() - 1, e["position"]!.GetValue<int>());
        Assert.Equal(3, result["meta_info"]!["completion_tokens"]!.GetValue<int>());
    }

    /// <summary>rag.trigger_signal per request: output entropy at threshold 0 fires at the first token, over every layer, and the event names the signal.</summary>
    [Fact]
    public async Task TriggerSignalPerRequest_IsUsedAndNamedInTheEvent()
    {
        var result = await Client.PostOkAsync("/generate", new JsonObject
        {
            ["text"] = "What is Quantum?",
            ["sampling_params"] = new JsonObject { ["temperature"] = 0, ["max_new_tokens"] = 3 },
            ["rag"] = new JsonObject { ["mode"] = "latent", ["trigger_signal"] = "output-entropy", ["threshold"] = 0 },
        });
        var e = result["meta_info"]!["rag"]!.AsArray()[0]!;
        Assert.Equal("output-entropy", e["signal"]!.GetValue<string>());
        Assert.Equal(0, e["token_index"]!.GetValue<int>());
        Assert.Equal([0, 1], e["layers"]!.AsArray().Select(l => l!.GetValue<int>()));
        Assert.True(e["entropy"]!.GetValue<double>() > 0);
    }

    [Theory]
    [MemberData(nameof(TestData.PromptIndices), MemberType = typeof(TestData))]
    public async Task Greedy_InputIds_MatchesTransformersReference(int index)
    {
        var prompt = TestData.ReferencePrompts[index];
        var body = new JsonObject { ["input_ids"] = TestData.ToJson(prompt.InputIds), ["sampling_params"] = Greedy(), ["rag"] = RagOff };
        var result = await Client.PostOkAsync("/generate", body);
        Assert.Equal(prompt.GreedyIds, TestData.IntArray(result["output_ids"]));
        var meta = result["meta_info"]!;
        Assert.Equal(prompt.InputIds.Length, meta["prompt_tokens"]!.GetValue<int>());
        Assert.Equal(TestData.ReferenceNewTokens, meta["completion_tokens"]!.GetValue<int>());
        Assert.Equal(0, meta["cached_tokens"]!.GetValue<int>());
        Assert.Equal("length", meta["finish_reason"]!["type"]!.GetValue<string>());
        Assert.Equal(TestData.ReferenceNewTokens, meta["finish_reason"]!["length"]!.GetValue<int>());
        Assert.True(meta["e2e_latency"]!.GetValue<double>() > 0);
        Assert.False(string.IsNullOrEmpty(meta["id"]!.GetValue<string>()));
        Assert.Empty(meta["rag"]!.AsArray());
    }

    [Theory]
    [MemberData(nameof(TestData.PromptIndices), MemberType = typeof(TestData))]
    public async Task Greedy_Text_TokenizesAsTheReferenceAndMatches(int index)
    {
        var prompt = TestData.ReferencePrompts[index];
        var result = await Client.PostOkAsync("/generate", new JsonObject { ["text"] = prompt.Text, ["sampling_params"] = Greedy(), ["rag"] = RagOff });
        Assert.Equal(prompt.InputIds.Length, result["meta_info"]!["prompt_tokens"]!.GetValue<int>());
        Assert.Equal(prompt.GreedyIds, TestData.IntArray(result["output_ids"]));
        var byIds = await Client.PostOkAsync("/generate", new JsonObject { ["input_ids"] = TestData.ToJson(prompt.InputIds), ["sampling_params"] = Greedy(), ["rag"] = RagOff });
        Assert.Equal(byIds["text"]!.GetValue<string>(), result["text"]!.GetValue<string>());
    }

    [Fact]
    public async Task ListOfInputIds_AnswersAListInOrder_EachMatchingTheReference()
    {
        var prompts = TestData.ReferencePrompts;
        var body = new JsonObject
        {
            ["input_ids"] = new JsonArray(prompts.Select(p => (JsonNode?)TestData.ToJson(p.InputIds)).ToArray()),
            ["sampling_params"] = Greedy(),
            ["rag"] = RagOff,
        };
        var result = (await Client.PostOkAsync("/generate", body)).AsArray();
        Assert.Equal(prompts.Count, result.Count);
        for (var i = 0; i < prompts.Count; i++)
            Assert.Equal(prompts[i].GreedyIds, TestData.IntArray(result[i]!["output_ids"]));
        Assert.Equal(prompts.Count, result.Select(r => r!["meta_info"]!["id"]!.GetValue<string>()).Distinct().Count());
    }

    [Fact]
    public async Task ConcurrentRequests_EachMatchTheReference()
    {
        var calls = Enumerable.Range(0, 8).Select(async i =>
        {
            var prompt = TestData.ReferencePrompts[i % 4];
            var body = new JsonObject { ["input_ids"] = TestData.ToJson(prompt.InputIds), ["sampling_params"] = Greedy(), ["rag"] = RagOff };
            var result = await Client.PostOkAsync("/generate", body);
            return (prompt, ids: TestData.IntArray(result["output_ids"]));
        }).ToList();
        foreach (var (prompt, ids) in await Task.WhenAll(calls))
            Assert.Equal(prompt.GreedyIds, ids);
    }

    [Fact]
    public async Task ZeroNewTokens_FinishesAtOnce()
    {
        var result = await Client.PostOkAsync("/generate", new JsonObject { ["text"] = "hello", ["sampling_params"] = Greedy(0) });
        Assert.Equal(0, result["meta_info"]!["completion_tokens"]!.GetValue<int>());
        Assert.Empty(result["output_ids"]!.AsArray());
        Assert.Equal("", result["text"]!.GetValue<string>());
    }

    [Fact]
    public async Task ListOfTexts_AnswersAList()
    {
        var body = new JsonObject
        {
            ["text"] = new JsonArray("What is Quantum？", "The quick brown fox"),
            ["sampling_params"] = Greedy(4),
            ["rid"] = "batch",
        };
        var result = (await Client.PostOkAsync("/generate", body)).AsArray();
        Assert.Equal(2, result.Count);
        Assert.Equal("batch-0", result[0]!["meta_info"]!["id"]!.GetValue<string>());
        Assert.Equal("batch-1", result[1]!["meta_info"]!["id"]!.GetValue<string>());
        Assert.All(result, r => Assert.Equal(4, r!["output_ids"]!.AsArray().Count));
        Assert.Equal(TestData.ReferencePrompts[3].GreedyIds[..4], TestData.IntArray(result[0]!["output_ids"]));
    }

    [Fact]
    public async Task Rid_IsEchoedAsMetaInfoId()
    {
        var result = await Client.PostOkAsync("/generate", new JsonObject { ["text"] = "hello", ["rid"] = "my-request-1", ["sampling_params"] = Greedy(2) });
        Assert.Equal("my-request-1", result["meta_info"]!["id"]!.GetValue<string>());
    }

    [Fact]
    public async Task Streaming_SendsGrowingTextAndEndsWithDone_FinalTextEqualsNonStreamed()
    {
        var prompt = TestData.ReferencePrompts[0];
        var whole = await Client.PostOkAsync("/generate", new JsonObject { ["text"] = prompt.Text, ["sampling_params"] = Greedy() });

        var events = Http.JsonEvents(await Client.PostSseAsync("/generate",
            new JsonObject { ["text"] = prompt.Text, ["sampling_params"] = Greedy(), ["stream"] = true }));
        Assert.True(events.Count >= 2, $"expected several events, got {events.Count}");
        var last = events[^1];
        // The text is the text so far (sglang's default); output ids come new-only, so together they are the whole output.
        Assert.Equal(whole["text"]!.GetValue<string>(), last["text"]!.GetValue<string>());
        Assert.Equal(prompt.GreedyIds, events.SelectMany(e => TestData.IntArray(e["output_ids"])).ToArray());
        Assert.Equal("length", last["meta_info"]!["finish_reason"]!["type"]!.GetValue<string>());
        // Every event before the last is unfinished, and completion_tokens never goes down.
        Assert.All(events.SkipLast(1), e => Assert.Null(e["meta_info"]!["finish_reason"]));
        var counts = events.Select(e => e["meta_info"]!["completion_tokens"]!.GetValue<int>()).ToList();
        Assert.Equal(counts.Order(), counts);
    }

    [Fact]
    public async Task Streaming_ListInput_TagsEventsWithTheirIndex()
    {
        var events = Http.JsonEvents(await Client.PostSseAsync("/generate", new JsonObject
        {
            ["text"] = new JsonArray("one", "two"),
            ["sampling_params"] = Greedy(3),
            ["stream"] = true,
        }));
        Assert.Equal([0, 1], events.Select(e => e["index"]!.GetValue<int>()).Distinct().Order());
        Assert.Equal(2, events.Count(e => e["meta_info"]!["finish_reason"] is not null));
    }

    [Fact]
    public async Task ReturnLogprob_GivesOneTripleForEachOutputToken()
    {
        var prompt = TestData.ReferencePrompts[1];
        var result = await Client.PostOkAsync("/generate", new JsonObject
        {
            ["input_ids"] = TestData.ToJson(prompt.InputIds),
            ["sampling_params"] = Greedy(),
            ["return_logprob"] = true,
        });
        var ids = TestData.IntArray(result["output_ids"]);
        var triples = result["meta_info"]!["output_token_logprobs"]!.AsArray();
        Assert.Equal(ids.Length, triples.Count);
        for (var i = 0; i < ids.Length; i++)
        {
            var triple = triples[i]!.AsArray();
            Assert.Equal(3, triple.Count);
            var logprob = triple[0]!.GetValue<double>();
            Assert.True(logprob <= 1e-6 && double.IsFinite(logprob), $"logprob {logprob} of token {i}");
            Assert.Equal(ids[i], triple[1]!.GetValue<int>());
            // As sglang: the token's text only with return_text_in_logprobs.
            Assert.Null(triple[2]);
        }
    }

    [Fact]
    public async Task ReturnRouterEntropy_IsTokensByMoeLayers_WithinZeroToLnE()
    {
        var result = await Client.PostOkAsync("/generate", new JsonObject
        {
            ["text"] = "What is Quantum？",
            ["sampling_params"] = Greedy(),
            ["return_router_entropy"] = true,
        });
        var rows = result["meta_info"]!["output_router_entropy"]!.AsArray();
        Assert.Equal(result["meta_info"]!["completion_tokens"]!.GetValue<int>(), rows.Count);
        var lnE = Math.Log(4);
        foreach (var row in rows)
        {
            var values = row!.AsArray().Select(v => v!.GetValue<double>()).ToArray();
            Assert.Equal(2, values.Length);
            Assert.All(values, v => Assert.InRange(v, 0, lnE + 1e-5));
        }
        // The output distribution's entropy, one per token, within [0, ln V].
        var outputEntropy = result["meta_info"]!["output_token_entropy"]!.AsArray().Select(v => v!.GetValue<double>()).ToArray();
        Assert.Equal(rows.Count, outputEntropy.Length);
        Assert.All(outputEntropy, v => Assert.InRange(v, 0, Math.Log(1000) + 1e-4));
        // Without the flag the field is absent.
        var plain = await Client.PostOkAsync("/generate", new JsonObject { ["text"] = "What is Quantum？", ["sampling_params"] = Greedy(2) });
        Assert.Null(plain["meta_info"]!["output_router_entropy"]);
        Assert.Null(plain["meta_info"]!["output_token_entropy"]);
        Assert.Null(plain["meta_info"]!["output_token_logprobs"]);
    }

    [Fact]
    public async Task StopString_EndsTheTextBeforeIt_AndReportsTheMatch()
    {
        var prompt = TestData.ReferencePrompts[0];
        var full = await Client.PostOkAsync("/generate", new JsonObject { ["input_ids"] = TestData.ToJson(prompt.InputIds), ["sampling_params"] = Greedy() });
        var text = full["text"]!.GetValue<string>();
        // A stop string taken from the middle of the greedy text: the first three non-space characters after the first few.
        var start = Enumerable.Range(3, Math.Max(0, text.Length - 6)).FirstOrDefault(i => !text.AsSpan(i, 3).ContainsAny(" \uFFFD"), -1);
        Assert.True(start > 0, $"no usable stop string in greedy text '{text}'");
        var stop = text.Substring(start, 3);
        var cut = text.IndexOf(stop, StringComparison.Ordinal);

        var sampling = Greedy();
        sampling["stop"] = stop;
        var stopped = await Client.PostOkAsync("/generate", new JsonObject { ["input_ids"] = TestData.ToJson(prompt.InputIds), ["sampling_params"] = sampling });
        Assert.True(text[..cut] == stopped["text"]!.GetValue<string>(),
            $"greedy text {System.Text.Json.JsonSerializer.Serialize(text)}, stop {System.Text.Json.JsonSerializer.Serialize(stop)} at {cut}: got {stopped.ToJsonString()}");
        var finish = stopped["meta_info"]!["finish_reason"]!;
        Assert.Equal("stop", finish["type"]!.GetValue<string>());
        Assert.Equal(stop, finish["matched"]!.GetValue<string>());

        // no_stop_trim keeps the stop string (and, as in sglang, the rest of the token that completed it); a list of stops works the same way.
        var noTrim = Greedy();
        noTrim["stop"] = new JsonArray("\u0001never", stop);
        noTrim["no_stop_trim"] = true;
        var untrimmed = await Client.PostOkAsync("/generate", new JsonObject { ["input_ids"] = TestData.ToJson(prompt.InputIds), ["sampling_params"] = noTrim });
        var kept = untrimmed["text"]!.GetValue<string>();
        Assert.StartsWith(text[..(cut + stop.Length)], kept, StringComparison.Ordinal);
        Assert.StartsWith(kept, text, StringComparison.Ordinal);
        Assert.Equal("stop", untrimmed["meta_info"]!["finish_reason"]!["type"]!.GetValue<string>());
    }

    [Fact]
    public async Task StopTokenId_EndsAtThatToken()
    {
        var prompt = TestData.ReferencePrompts[2];
        var stopId = prompt.GreedyIds[4];
        var first = Array.IndexOf(prompt.GreedyIds, stopId);
        var sampling = Greedy();
        sampling["stop_token_ids"] = new JsonArray(stopId);
        var result = await Client.PostOkAsync("/generate", new JsonObject { ["input_ids"] = TestData.ToJson(prompt.InputIds), ["sampling_params"] = sampling });
        var ids = TestData.IntArray(result["output_ids"]);
        Assert.Equal(prompt.GreedyIds[..(first + 1)], ids);
        Assert.Equal("stop", result["meta_info"]!["finish_reason"]!["type"]!.GetValue<string>());
        Assert.Equal(stopId, result["meta_info"]!["finish_reason"]!["matched"]!.GetValue<int>());
    }

    [Theory]
    [InlineData("latent")]
    [InlineData("prompt")]
    public async Task RagOverride_WithJsonlRetriever_ReturnsEventsWithAllFields(string mode)
    {
        var result = await Client.PostOkAsync("/generate", new JsonObject
        {
            ["text"] = "What is Quantum？",
            ["sampling_params"] = Greedy(),
            // Threshold 0 fires on the first token; router entropy is never negative.
            ["rag"] = new JsonObject { ["mode"] = mode, ["threshold"] = 0.0, ["scale"] = 1.0 },
        });
        var meta = result["meta_info"]!;
        var events = meta["rag"]!.AsArray();
        Assert.NotEmpty(events);
        var rid = meta["id"]!.GetValue<string>();
        foreach (var e in events.Select(e => e!.AsObject()))
        {
            foreach (var field in (string[])["event_id", "start_time", "end_time", "request_id", "query", "snippets", "token_index",
                                               "position", "layers", "entropy", "threshold", "batch_size", "retriever", "mode"])
                Assert.True(e.ContainsKey(field), $"event lacks {field}: {e.ToJsonString()}");
            Assert.Equal(rid, e["request_id"]!.GetValue<string>());
            Assert.Equal(mode, e["mode"]!.GetValue<string>());
            Assert.Equal(0.0, e["threshold"]!.GetValue<double>());
            Assert.False(string.IsNullOrWhiteSpace(e["query"]!.GetValue<string>()));
            Assert.NotEmpty(e["layers"]!.AsArray());
            Assert.InRange(e["entropy"]!.GetValue<double>(), 0, Math.Log(4) + 1e-5);
        }
        var first = events[0]!;
        Assert.True(first["error"] is null, $"retrieval failed: {first.ToJsonString()}");
        Assert.NotEmpty(first["snippets"]!.AsArray());

        // The engine also logs every event as one JSON line under the log dir.
        var log = Path.Combine(server.LogDirectory, "rag-events.jsonl");
        Assert.True(File.Exists(log), $"no {log}");
        Assert.Contains(first["event_id"]!.GetValue<string>(), await File.ReadAllTextAsync(log));
    }

    [Fact]
    public async Task Tokenize_Detokenize_RoundTrip()
    {
        var prompt = TestData.ReferencePrompts[1];
        var tokens = await Client.PostOkAsync("/v1/tokenize", new JsonObject { ["prompt"] = prompt.Text });
        Assert.Equal(prompt.InputIds, TestData.IntArray(tokens["tokens"]));
        Assert.Equal(prompt.InputIds.Length, tokens["count"]!.GetValue<int>());
        Assert.Equal(256, tokens["max_model_len"]!.GetValue<int>());

        var text = await Client.PostOkAsync("/v1/detokenize", new JsonObject { ["tokens"] = tokens["tokens"]!.DeepClone() });
        Assert.Equal(prompt.Text, text["prompt"]!.GetValue<string>());

        var noBos = await Client.PostOkAsync("/v1/tokenize", new JsonObject { ["prompt"] = prompt.Text, ["add_special_tokens"] = false });
        Assert.Equal(prompt.InputIds[1..], TestData.IntArray(noBos["tokens"]));
    }

    [Fact]
    public async Task UnknownRoute_Is404WithErrorObject()
    {
        using var response = await Client.GetAsync("/no/such/route");
        Assert.Equal(HttpStatusCode.NotFound, response.StatusCode);
        var body = JsonNode.Parse(await response.Content.ReadAsStringAsync())!;
        Assert.Contains("/no/such/route", body["error"]!["message"]!.GetValue<string>());
    }
}
