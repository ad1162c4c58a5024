using System.Net;
using System.Text.Json.Nodes;

namespace MoeRagInject.Server.Tests;

/// <summary>
/// What an sglang client does beyond one /generate over real HTTP: top logprobs, a batch with one sampling_params per text,
/// parallel samples (n) whose prompt is prefilled once, /flush_cache and the /get_server_info fields clients read; and
/// OpenAI's n with its usage.
/// </summary>
public sealed class SglangClientTests(ServerFixture server) : IClassFixture<ServerFixture>
{
    private const int BlockSize = 16;

    private HttpClient Client => server.Client;

    private static JsonObject Greedy(int maxNewTokens) => new()
    {
        ["temperature"] = 0,
        ["max_new_tokens"] = maxNewTokens,
        ["ignore_eos"] = true,
    };

    /// <summary>A prompt of 40 ids: two full KV blocks to share, and 8 positions each sample computes.</summary>
    private static JsonArray LongPrompt() => TestData.ToJson(Enumerable.Range(0, 40).Select(i => 3 + i * 7 % 900));

    private async Task<long> PromptTokensComputedAsync()
    {
        for (var i = 0; i < 500; i++)
        {
            var status = (await Client.GetOkAsync("/get_server_info"))["status"]!;
            if (status["num_running"]!.GetValue<int>() == 0 && status["num_waiting"]!.GetValue<int>() == 0)
                return status["prompt_tokens_computed"]!.GetValue<long>();
            await Task.Delay(10);
        }
        throw new TimeoutException("the server did not become idle");
    }

    [Fact]
    public async Task TopLogprobsNum_GivesSortedTriples_LedByTheGreedyToken_WithTextOnlyWhenAsked()
    {
        foreach (var withText in new[] { false, true })
        {
            var result = await Client.PostOkAsync("/generate", new JsonObject
            {
                ["text"] = "The quick brown fox",
                ["sampling_params"] = Greedy(8),
                ["return_logprob"] = true,
                ["top_logprobs_num"] = 5,
                ["return_text_in_logprobs"] = withText,
            });
            var ids = TestData.IntArray(result["output_ids"]);
            var meta = result["meta_info"]!;
            var chosen = meta["output_token_logprobs"]!.AsArray();
            var top = meta["output_top_logprobs"]!.AsArray();
            Assert.Equal(8, ids.Length);
            Assert.Equal(ids.Length, top.Count);
            for (var t = 0; t < ids.Length; t++)
            {
                var row = top[t]!.AsArray();
                Assert.Equal(5, row.Count);
                var logprobs = row.Select(x => x![0]!.GetValue<double>()).ToArray();
                Assert.Equal(logprobs.OrderByDescending(x => x), logprobs);
                Assert.True(logprobs.Sum(Math.Exp) <= 1 + 1e-5, "the alternatives' probabilities sum to at most 1");
                Assert.Equal(5, row.Select(x => x![1]!.GetValue<int>()).Distinct().Count());
                // Greedy: the chosen token is the most likely one, with the same logprob in both lists.
                Assert.Equal(ids[t], row[0]![1]!.GetValue<int>());
                Assert.Equal(chosen[t]![0]!.GetValue<double>(), logprobs[0], 1e-6);
                foreach (var triple in row)
                {
                    if (!withText)
                    {
                        Assert.Null(triple![2]);
                        continue;
                    }
                    // The text is what /v1/detokenize makes of that one id.
                    var id = triple![1]!.GetValue<int>();
                    var text = await Client.PostOkAsync("/v1/detokenize",
                        new JsonObject { ["tokens"] = new JsonArray(id), ["skip_special_tokens"] = false });
                    Assert.Equal(text["prompt"]!.GetValue<string>(), triple[2]!.GetValue<string>());
                }
            }
        }
    }

    [Fact]
    public async Task BatchedSamplingParams_EachTextGetsItsOwn_AndEqualsTheSameRequestSentAlone()
    {
        string[] texts = ["What is Quantum?", "The red fox", "Coffee is"];
        var parameters = new[]
        {
            Greedy(5),
            new JsonObject { ["temperature"] = 0, ["max_new_tokens"] = 9, ["ignore_eos"] = true, ["repetition_penalty"] = 1.3 },
            new JsonObject { ["temperature"] = 0.9, ["top_k"] = 20, ["max_new_tokens"] = 3, ["ignore_eos"] = true, ["sampling_seed"] = 77 },
        };
        var batch = (await Client.PostOkAsync("/generate", new JsonObject
        {
            ["text"] = new JsonArray(texts.Select(t => (JsonNode)JsonValue.Create(t)).ToArray()),
            ["sampling_params"] = new JsonArray(parameters.Select(p => p.DeepClone()).ToArray()),
        })).AsArray();
        Assert.Equal(3, batch.Count);
        for (var i = 0; i < texts.Length; i++)
        {
            var alone = await Client.PostOkAsync("/generate", new JsonObject { ["text"] = texts[i], ["sampling_params"] = parameters[i].DeepClone() });
            Assert.Equal(TestData.IntArray(alone["output_ids"]), TestData.IntArray(batch[i]!["output_ids"]));
            Assert.Equal(alone["text"]!.GetValue<string>(), batch[i]!["text"]!.GetValue<string>());
            Assert.Equal(parameters[i]["max_new_tokens"]!.GetValue<int>(), batch[i]!["meta_info"]!["completion_tokens"]!.GetValue<int>());
        }
    }

    [Fact]
    public async Task GenerateWithN_PrefillsThePromptOnce_AndSampleJEqualsSeedPlusJAlone()
    {
        const int n = 4, seed = 4242;
        var shared = (40 - 1) / BlockSize * BlockSize;
        var before = await PromptTokensComputedAsync();
        var samples = (await Client.PostOkAsync("/generate", new JsonObject
        {
            ["input_ids"] = LongPrompt(),
            ["sampling_params"] = new JsonObject { ["n"] = n, ["temperature"] = 1.0, ["max_new_tokens"] = 8, ["ignore_eos"] = true, ["sampling_seed"] = seed },
        })).AsArray();
        var after = await PromptTokensComputedAsync();
        Assert.Equal(n, samples.Count);
        Assert.Equal(shared + n * (40 - shared), after - before);
        Assert.All(samples.Skip(1), s => Assert.Equal(shared, s!["meta_info"]!["cached_tokens"]!.GetValue<int>()));
        Assert.Equal(0, samples[0]!["meta_info"]!["cached_tokens"]!.GetValue<int>());

        var outputs = samples.Select(s => TestData.IntArray(s!["output_ids"])).ToArray();
        for (var j = 0; j < n; j++)
        {
            var alone = await Client.PostOkAsync("/generate", new JsonObject
            {
                ["input_ids"] = LongPrompt(),
                ["sampling_params"] = new JsonObject { ["temperature"] = 1.0, ["max_new_tokens"] = 8, ["ignore_eos"] = true, ["sampling_seed"] = seed + j },
            });
            Assert.Equal(TestData.IntArray(alone["output_ids"]), outputs[j]);
        }
        Assert.True(outputs.Select(o => string.Join(',', o)).Distinct().Count() > 1, "different seeds give different samples");
    }

    [Fact]
    public async Task OpenAiN_GivesNChoicesIndexedInOrder_AndUsageCountsThePromptOnce()
    {
        const int n = 3;
        var shared = (40 - 1) / BlockSize * BlockSize;
        var result = await Client.PostOkAsync("/v1/completions", new JsonObject
        {
            ["model"] = "m", ["prompt"] = LongPrompt(), ["n"] = n, ["max_tokens"] = 6, ["temperature"] = 1.0, ["seed"] = 9, ["ignore_eos"] = true,
        });
        var choices = result["choices"]!.AsArray();
        Assert.Equal([0, 1, 2], choices.Select(c => c!["index"]!.GetValue<int>()));
        var usage = result["usage"]!;
        Assert.Equal(40, usage["prompt_tokens"]!.GetValue<int>());
        Assert.Equal(n * 6, usage["completion_tokens"]!.GetValue<int>());
        Assert.Equal(40 + n * 6, usage["total_tokens"]!.GetValue<int>());
        Assert.Equal(shared, usage["prompt_tokens_details"]!["cached_tokens"]!.GetValue<int>());  // a part of the prompt counted once
        // Choice j is the request with seed + j alone.
        for (var j = 0; j < n; j++)
        {
            var alone = await Client.PostOkAsync("/v1/completions", new JsonObject
            {
                ["model"] = "m", ["prompt"] = LongPrompt(), ["max_tokens"] = 6, ["temperature"] = 1.0, ["seed"] = 9 + j, ["ignore_eos"] = true,
            });
            Assert.Equal(alone["choices"]![0]!["text"]!.GetValue<string>(), choices[j]!["text"]!.GetValue<string>());
        }
    }

    [Fact]
    public async Task FlushCache_SucceedsWhenIdle_AndIsRefusedWhileARequestRuns()
    {
        await PromptTokensComputedAsync();
        var idle = await Client.PostOkAsync("/flush_cache", new JsonObject());
        Assert.True(idle["success"]!.GetValue<bool>());
        Assert.Contains("no prefix cache", idle["message"]!.GetValue<string>());

        using var streaming = new HttpRequestMessage(HttpMethod.Post, "/generate")
        {
            // 64 samples of 240 tokens, 8 at a time: seconds of work, so the server is surely busy when the flush arrives.
            Content = Http.Json("""{"text": "hi", "stream": true, "sampling_params": {"n": 64, "max_new_tokens": 240, "ignore_eos": true}}"""),
        };
        using var response = await Client.SendAsync(streaming, HttpCompletionOption.ResponseHeadersRead);
        using var reader = new StreamReader(await response.Content.ReadAsStreamAsync());
        Assert.StartsWith("data: ", await reader.ReadLineAsync()); // the request is running
        using (var busy = await Client.PostAsync("/flush_cache", Http.Json("{}")))
        {
            Assert.Equal(HttpStatusCode.BadRequest, busy.StatusCode);
            Assert.False(JsonNode.Parse(await busy.Content.ReadAsStringAsync())!["success"]!.GetValue<bool>());
        }
    }

    [Fact]
    public async Task ServerInfo_HasTheFieldsSglangClientsRead()
    {
        var info = await Client.GetOkAsync("/get_server_info");
        Assert.Equal(TestData.CheckpointPath, info["model_path"]!.GetValue<string>());
        Assert.Equal(TestData.CheckpointPath, info["tokenizer_path"]!.GetValue<string>());
        Assert.False(string.IsNullOrEmpty(info["version"]!.GetValue<string>()));
        Assert.Equal(255, info["max_req_input_len"]!.GetValue<int>());
        var status = info["status"]!;
        var kvTokens = status["total_kv_blocks"]!.GetValue<int>() * status["kv_block_size"]!.GetValue<int>();
        Assert.Equal(kvTokens, info["max_total_num_tokens"]!.GetValue<int>());
        Assert.Equal(BlockSize, info["page_size"]!.GetValue<int>());
        Assert.Equal(1, info["tp_size"]!.GetValue<int>());
        var state = info["internal_states"]![0]!;
        Assert.Equal(1.0, state["avg_spec_accept_length"]!.GetValue<double>());
        Assert.True(state["last_gen_throughput"]!.GetValue<double>() >= 0);
        Assert.Equal(8, state["max_running_requests"]!.GetValue<int>());
    }
}
