using System.Text.Json.Nodes;

namespace MoeRagInject.Server.Tests;

/// <summary>Every kind of bad input gets a 4xx with sglang's error object, and the server goes on serving.</summary>
public sealed class ValidationTests(ServerFixture server) : IClassFixture<ServerFixture>
{
    public static TheoryData<string, string, string> BadRequests => new()
    {
        // route, body, a fragment the message must hold
        { "/generate", "{not json", "malformed JSON" },
        { "/generate", "", "malformed JSON" },
        { "/generate", "[1, 2]", "must be a JSON object" },
        { "/generate", "{}", "exactly one of text and input_ids" },
        { "/generate", """{"text": "a", "input_ids": [1]}""", "not both" },
        { "/generate", """{"text": ""}""", "text must not be empty" },
        { "/generate", """{"text": []}""", "must not be an empty list" },
        { "/generate", """{"text": ["ok", ""]}""", "text[1] must not be empty" },
        { "/generate", """{"text": 5}""", "text must be a string or a list of strings" },
        { "/generate", """{"text": ["a", 5]}""", "text[1] must be a string" },
        { "/generate", """{"input_ids": []}""", "input_ids must not be empty" },
        { "/generate", """{"input_ids": [[1, 2], []]}""", "input_ids[1] must not be empty" },
        { "/generate", """{"input_ids": [1, "a"]}""", "input_ids[1] must be an integer" },
        { "/generate", """{"input_ids": [1, 2.5]}""", "input_ids[1] must be an integer" },
        { "/generate", """{"input_ids": [[1], 2]}""", "input_ids[1] must be a list" },
        { "/generate", """{"input_ids": [1, 5000]}""", "outside the vocabulary [0, 1000)" },
        { "/generate", """{"input_ids": [-1]}""", "outside the vocabulary" },
        { "/generate", """{"input_ids": "1 2 3"}""", "input_ids must be a list" },
        { "/generate", """{"text": "hi", "bogus": 1}""", "unknown field bogus" },
        { "/generate", """{"text": "hi", "sampling_params": []}""", "sampling_params must be an object" },
        { "/generate", """{"text": "hi", "sampling_params": {"temperature": -1}}""", "temperature" },
        { "/generate", """{"text": "hi", "sampling_params": {"temperature": "hot"}}""", "sampling_params.temperature must be a number" },
        { "/generate", """{"text": "hi", "sampling_params": {"top_p": 0}}""", "top_p" },
        { "/generate", """{"text": "hi", "sampling_params": {"top_k": -5}}""", "top_k" },
        { "/generate", """{"text": "hi", "sampling_params": {"min_p": 2}}""", "min_p" },
        { "/generate", """{"text": "hi", "sampling_params": {"max_new_tokens": "ten"}}""", "sampling_params.max_new_tokens must be an integer" },
        { "/generate", """{"text": "hi", "sampling_params": {"max_new_tokens": -1}}""", "max_new_tokens" },
        { "/generate", """{"text": "hi", "sampling_params": {"max_new_tokens": 1000}}""", "exceeds the context length (256)" },
        { "/generate", """{"text": "hi", "sampling_params": {"min_new_tokens": 20, "max_new_tokens": 10}}""", "min_new_tokens" },
        { "/generate", """{"text": "hi", "sampling_params": {"repetition_penalty": 3}}""", "repetition_penalty" },
        { "/generate", """{"text": "hi", "sampling_params": {"frequency_penalty": 5}}""", "frequency_penalty" },
        { "/generate", """{"text": "hi", "sampling_params": {"presence_penalty": -3}}""", "presence_penalty" },
        { "/generate", """{"text": "hi", "sampling_params": {"stop": [""]}}""", "stop must not contain empty strings" },
        { "/generate", """{"text": "hi", "sampling_params": {"stop": 5}}""", "sampling_params.stop must be a string or a list of strings" },
        { "/generate", """{"text": "hi", "sampling_params": {"stop_token_ids": [99999]}}""", "outside the vocabulary" },
        { "/generate", """{"text": "hi", "sampling_params": {"ignore_eos": "yes"}}""", "sampling_params.ignore_eos must be a boolean" },
        { "/generate", """{"text": "hi", "sampling_params": {"seed": -4}}""", "non-negative integer" },
        { "/generate", """{"text": "hi", "sampling_params": {"n": 0}}""", "sampling_params.n must be an integer in [1, 128]" },
        { "/generate", """{"text": "hi", "sampling_params": [{}]}""", "sampling_params must be an object for a single input" },
        { "/generate", """{"text": ["a", "b"], "sampling_params": [{}]}""", "sampling_params has 1 objects for 2 inputs" },
        { "/generate", """{"text": ["a", "b"], "sampling_params": [{}, 3]}""", "sampling_params[1] must be an object" },
        { "/generate", """{"text": ["a", "b"], "sampling_params": [{"n": 2}, {"n": 3}]}""", "every input must ask for the same n" },
        { "/generate", """{"text": ["a", "b"], "sampling_params": [{}, {"top_p": 7}]}""", "top_p" },
        { "/generate", """{"text": "hi", "return_logprob": true, "top_logprobs_num": 21}""", "top_logprobs_num must be an integer in [0, 20]" },
        { "/generate", """{"text": ["a", "b"], "return_logprob": [true]}""", "return_logprob has 1 values for 2 inputs" },
        { "/generate", """{"text": "hi", "return_text_in_logprobs": "yes"}""", "return_text_in_logprobs must be a boolean" },
        { "/generate", """{"text": "hi", "sampling_params": {"regex": "a+"}}""", "not supported" },
        { "/generate", """{"text": "hi", "sampling_params": {"tempature": 0}}""", "unknown field sampling_params.tempature" },
        { "/generate", """{"text": "hi", "rag": {"mode": "sideways"}}""", "rag.mode must be one of off, latent, prompt" },
        { "/generate", """{"text": "hi", "rag": {"threshold": "high"}}""", "rag.threshold must be a number" },
        { "/generate", """{"text": "hi", "rag": {"threshold": -1}}""", "rag.threshold must be >= 0" },
        { "/generate", """{"text": "hi", "rag": {"trigger_signal": "vibes"}}""", "rag.trigger_signal must be one of router-entropy, output-entropy, router-probe" },
        { "/generate", """{"text": "hi", "rag": {"trigger_signal": "router-probe", "threshold": 1.5}}""", "rag.threshold must be in [0, 1] for rag.trigger_signal router-probe" },
        { "/generate", """{"text": "hi", "rag": {"trigger_signal": "router-probe"}}""", "this server has no router probe (run `./moe-rag-inject calibrate`" },
        { "/generate", """{"text": "hi", "rag": "latent"}""", "rag must be an object" },
        { "/generate", """{"text": "hi", "rag": {"retrieve_first": "yes"}}""", "rag.retrieve_first must be a boolean" },
        { "/generate", """{"text": "hi", "stream": "yes"}""", "stream must be a boolean" },
        { "/generate", """{"text": "hi", "return_logprob": 1}""", "return_logprob must be a boolean" },
        { "/generate", """{"text": "hi", "rid": ["a", "b"]}""", "rid must be a string for a single input" },
        { "/generate", """{"text": ["a", "b"], "rid": ["x"]}""", "rid has 1 ids for 2 inputs" },
        { "/v1/completions", "{}", "prompt is required" },
        { "/v1/completions", """{"prompt": "hi", "n": 0}""", "n must be an integer in [1, 128]" },
        { "/v1/completions", """{"prompt": "hi", "logprobs": 21}""", "logprobs must be an integer in [0, 20]" },
        { "/v1/completions", """{"prompt": "hi", "response_format": {"type": "json_object"}}""", "response_format.type 'json_object' is not supported" },
        { "/v1/completions", """{"prompt": "hi", "stream_options": {"include_usage": true}}""", "stream_options is only allowed with stream: true" },
        { "/v1/completions", """{"prompt": ""}""", "prompt must not be empty" },
        { "/v1/completions", """{"prompt": ["a", 1]}""", "prompt[1] must be a string" },
        { "/v1/completions", """{"prompt": "hi", "max_tokens": 300}""", "exceeds the context length" },
        { "/v1/completions", """{"prompt": "hi", "temperature": -0.5}""", "temperature" },
        { "/v1/completions", """{"prompt": "hi", "rag": {"mode": "loud"}}""", "rag.mode" },
        { "/v1/completions", """{"prompt": [7, 5000]}""", "outside the vocabulary" },
        { "/v1/chat/completions", "{}", "messages is required" },
        { "/v1/chat/completions", """{"messages": []}""", "messages must not be empty" },
        { "/v1/chat/completions", """{"messages": [{"role": "wizard", "content": "x"}]}""", "messages[0].role must be one of" },
        { "/v1/chat/completions", """{"messages": [{"content": "x"}]}""", "messages[0].role must be a string" },
        { "/v1/chat/completions", """{"messages": [{"role": "user", "content": 5}]}""", "messages[0].content must be a string" },
        { "/v1/chat/completions", """{"messages": [{"role": "user", "content": "x"}], "n": 200}""", "n must be an integer in [1, 128]" },
        { "/v1/chat/completions", """{"messages": [{"role": "user"}]}""", "messages[0].content is required for a user message" },
        { "/v1/chat/completions", """{"messages": [{"role": "user", "content": null}]}""", "messages[0].content is required for a user message" },
        { "/v1/chat/completions", """{"messages": [{"role": "system"}, {"role": "user", "content": "x"}]}""", "messages[0].content is required for a system message" },
        { "/v1/chat/completions", """{"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}""", "messages[1].content is required for an assistant message without tool_calls" },
        { "/v1/chat/completions", """{"messages": [{"role": "tool", "content": "42"}]}""", "messages[0].tool_call_id is required" },
        { "/v1/chat/completions", """{"messages": [{"role": "user", "content": "x", "name": 5}]}""", "messages[0].name must be a string" },
        { "/v1/chat/completions", """{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}""", "top_logprobs needs logprobs to be true" },
        { "/v1/chat/completions", """{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}""", "top_logprobs must be an integer in [0, 20]" },
        { "/v1/chat/completions", """{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}""", "response_format.type 'json_schema' is not supported" },
        { "/v1/tokenize", "{}", "prompt is required" },
        { "/v1/tokenize", """{"prompt": 5}""", "prompt must be a string" },
        { "/v1/detokenize", """{"tokens": [5000]}""", "outside the vocabulary" },
        { "/v1/detokenize", """{"tokens": "abc"}""", "tokens must be a list" },
        { "/abort_request", "{}", "rid is required" },
    };

    [Theory]
    [MemberData(nameof(BadRequests))]
    public async Task BadInput_Is400WithMessage_AndTheServerKeepsServing(string route, string body, string fragment)
    {
        using (var response = await server.Client.PostAsync(route, Http.Json(body)))
        {
            var text = await response.Content.ReadAsStringAsync();
            Assert.True((int)response.StatusCode is >= 400 and < 500, $"{route} {body} -> {(int)response.StatusCode}: {text}");
            var error = JsonNode.Parse(text)!["error"]!;
            var message = error["message"]!.GetValue<string>();
            Assert.Contains(fragment, message, StringComparison.Ordinal);
            Assert.Equal("invalid_request_error", error["type"]!.GetValue<string>());
            Assert.Equal((int)response.StatusCode, error["code"]!.GetValue<int>());
        }

        var good = await server.Client.PostOkAsync("/generate", new JsonObject
        {
            ["text"] = "still there?",
            ["sampling_params"] = new JsonObject { ["max_new_tokens"] = 2, ["temperature"] = 0, ["ignore_eos"] = true },
        });
        Assert.Equal(2, good["meta_info"]!["completion_tokens"]!.GetValue<int>());
    }

    [Fact]
    public async Task LaxIntegers_AndNullsAsDefaults_AreAccepted()
    {
        // pydantic takes 4.0 for an int and null for "not given"; so do we.
        var result = await server.Client.PostOkAsync("/generate", JsonNode.Parse("""
            {"text": "hi", "rid": null, "sampling_params": {"max_new_tokens": 4.0, "temperature": 0, "top_k": null, "ignore_eos": true, "stop": null}}
            """)!);
        Assert.Equal(4, result["meta_info"]!["completion_tokens"]!.GetValue<int>());
    }

    [Fact]
    public async Task TheContextLimitIsInclusive()
    {
        var prompt = TestData.ReferencePrompts[3];
        var body = new JsonObject
        {
            ["input_ids"] = TestData.ToJson(prompt.InputIds),
            ["sampling_params"] = new JsonObject { ["max_new_tokens"] = 256 - prompt.InputIds.Length, ["temperature"] = 0, ["ignore_eos"] = true },
        };
        var result = await server.Client.PostOkAsync("/generate", body);
        Assert.Equal(256 - prompt.InputIds.Length, result["meta_info"]!["completion_tokens"]!.GetValue<int>());
    }
}
