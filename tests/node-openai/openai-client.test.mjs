// The official openai npm client against a running moe-rag-inject server: parallel sampling (n), logprobs with
// top_logprobs, streaming with stream_options.include_usage, stop strings, seeds and the errors OpenAI gives.
// MOE_RAG_BASE_URL names the server's /v1 (the xunit test OpenAiNodeClientTests starts one and runs this file).
import { test } from "node:test";
import assert from "node:assert/strict";
import OpenAI from "openai";

const baseURL = process.env.MOE_RAG_BASE_URL;
assert.ok(baseURL, "set MOE_RAG_BASE_URL to the server's /v1 address");
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 120_000 });
const model = (await client.models.list()).data[0].id;

const utf8 = (text) => [...Buffer.from(text, "utf8")];

async function collect(stream) {
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  return chunks;
}

test("n gives n distinct choices indexed 0..n-1; usage counts the prompt once and every sampled token", async () => {
  const n = 4;
  const prompt = "Once upon a time there was a small fox who lived near the river and liked to";
  const result = await client.completions.create({
    model, prompt, n, max_tokens: 8, temperature: 1.0, seed: 11, logprobs: 2,
  });
  assert.deepEqual(result.choices.map((c) => c.index), [0, 1, 2, 3]);
  assert.ok(new Set(result.choices.map((c) => c.text)).size > 1, "samples with different seeds differ");
  const tokens = result.choices.map((c) => c.logprobs.tokens.length);
  assert.equal(result.usage.completion_tokens, tokens.reduce((a, b) => a + b, 0));
  const single = await client.completions.create({ model, prompt, max_tokens: 1, temperature: 0 });
  assert.equal(result.usage.prompt_tokens, single.usage.prompt_tokens);
  assert.equal(result.usage.total_tokens, result.usage.prompt_tokens + result.usage.completion_tokens);
  for (const choice of result.choices) {
    const { tokens: texts, token_logprobs: logprobs, top_logprobs: top } = choice.logprobs;
    assert.equal(top.length, texts.length);
    top.forEach((alternatives, i) => {
      // logprobs: k gives the k most likely tokens plus the chosen one: at most k + 1 entries.
      const entries = Object.entries(alternatives);
      assert.ok(entries.length >= 1 && entries.length <= 3, JSON.stringify(alternatives));
      assert.equal(alternatives[texts[i]], logprobs[i]);
      entries.forEach(([, lp]) => assert.ok(lp <= 0));
    });
  }
  // Sample j equals the same request with seed + j alone.
  for (let j = 0; j < n; j++) {
    const alone = await client.completions.create({ model, prompt, max_tokens: 8, temperature: 1.0, seed: 11 + j });
    assert.equal(alone.choices[0].text, result.choices[j].text, `choice ${j}`);
  }
});

test("chat top_logprobs are sorted, and under greedy the chosen token leads its list with the same logprob", async () => {
  const result = await client.chat.completions.create({
    model,
    messages: [{ role: "user", content: "What is a quantum?" }],
    max_tokens: 10, temperature: 0, logprobs: true, top_logprobs: 5,
  });
  const content = result.choices[0].logprobs.content;
  assert.equal(content.length, result.usage.completion_tokens);
  // The tokens' bytes joined are the message (a byte-fallback token's own text is U+FFFD; its bytes are the raw byte).
  assert.equal(Buffer.from(content.flatMap((t) => t.bytes)).toString("utf8"), result.choices[0].message.content);
  for (const token of content) {
    assert.equal(token.top_logprobs.length, 5);
    const values = token.top_logprobs.map((t) => t.logprob);
    assert.deepEqual(values, [...values].sort((a, b) => b - a));
    assert.ok(values.reduce((sum, lp) => sum + Math.exp(lp), 0) <= 1 + 1e-5);
    assert.equal(token.top_logprobs[0].token, token.token);
    assert.ok(Math.abs(token.top_logprobs[0].logprob - token.logprob) < 1e-6);
    for (const t of [token, ...token.top_logprobs]) if (t.token !== "\ufffd") assert.deepEqual(t.bytes, utf8(t.token));
  }
});

test("streaming with include_usage ends with a chunk of empty choices carrying the usage; the text equals the unstreamed one", async () => {
  const request = {
    model, messages: [{ role: "user", content: "Tell me about the red fox." }], max_tokens: 12, temperature: 0,
  };
  const whole = await client.chat.completions.create(request);
  const chunks = await collect(await client.chat.completions.create({
    ...request, stream: true, stream_options: { include_usage: true }, logprobs: true,
  }));
  const last = chunks.at(-1);
  assert.deepEqual(last.choices, []);
  assert.equal(last.usage.prompt_tokens, whole.usage.prompt_tokens);
  assert.equal(last.usage.completion_tokens, whole.usage.completion_tokens);
  assert.equal(last.usage.total_tokens, last.usage.prompt_tokens + last.usage.completion_tokens);
  chunks.slice(0, -1).forEach((c) => assert.ok(!c.usage, "only the last chunk carries usage"));
  const body = chunks.slice(0, -1).flatMap((c) => c.choices);
  assert.equal(body.map((c) => c.delta?.content ?? "").join(""), whole.choices[0].message.content);
  const streamedTokens = body.reduce((n, c) => n + (c.logprobs?.content?.length ?? 0), 0);
  assert.equal(streamedTokens, last.usage.completion_tokens);
  assert.deepEqual(body.filter((c) => c.finish_reason).map((c) => c.finish_reason), [whole.choices[0].finish_reason]);
});

test("a streamed n: every choice opens with its role, streams its own deltas and finishes once", async () => {
  const n = 3;
  const request = {
    model, messages: [{ role: "user", content: "Name an animal." }], max_tokens: 6, temperature: 0.9, seed: 3, n,
  };
  const whole = await client.chat.completions.create(request);
  const chunks = await collect(await client.chat.completions.create({ ...request, stream: true, stream_options: { include_usage: true } }));
  const choices = chunks.flatMap((c) => c.choices);
  for (let i = 0; i < n; i++) {
    const mine = choices.filter((c) => c.index === i);
    assert.equal(mine[0].delta.role, "assistant");
    assert.equal(mine.filter((c) => c.finish_reason).length, 1);
    assert.equal(mine.map((c) => c.delta?.content ?? "").join(""), whole.choices[i].message.content, `choice ${i}`);
  }
  assert.deepEqual(chunks.at(-1).usage, whole.usage);
});

test("stop strings end the text before the stop, streamed or not", async () => {
  const prompt = "The capital of the country is";
  const free = (await client.completions.create({ model, prompt, max_tokens: 16, temperature: 0 })).choices[0].text;
  assert.ok(free.length >= 6, `need some text to cut: ${JSON.stringify(free)}`);
  const stop = free.slice(Math.floor(free.length / 2), Math.floor(free.length / 2) + 2);
  const expected = free.slice(0, free.indexOf(stop));
  const stopped = await client.completions.create({ model, prompt, max_tokens: 16, temperature: 0, stop: [stop] });
  assert.equal(stopped.choices[0].text, expected);
  assert.equal(stopped.choices[0].finish_reason, "stop");
  const chunks = await collect(await client.completions.create({ model, prompt, max_tokens: 16, temperature: 0, stop: stop, stream: true }));
  assert.equal(chunks.flatMap((c) => c.choices).map((c) => c.text).join(""), expected);
});

test("a seed makes sampling reproducible", async () => {
  const request = { model, messages: [{ role: "user", content: "Say something." }], max_tokens: 10, temperature: 1.0, seed: 1234 };
  const a = await client.chat.completions.create(request);
  const b = await client.chat.completions.create(request);
  assert.equal(a.choices[0].message.content, b.choices[0].message.content);
});

test("what this server does not do is refused with a 400, as OpenAI refuses bad input", async () => {
  const refused = async (body, fragment) => {
    await assert.rejects(client.chat.completions.create({ model, max_tokens: 2, ...body }), (e) => {
      assert.ok(e instanceof OpenAI.BadRequestError, String(e));
      assert.equal(e.status, 400);
      assert.match(e.message, fragment);
      return true;
    });
  };
  await refused({ messages: [{ role: "user", content: "x" }], response_format: { type: "json_object" } }, /response_format/);
  await refused({ messages: [{ role: "user" }] }, /content is required/);
  await refused({ messages: [{ role: "oracle", content: "x" }] }, /role must be one of/);
  await refused({ messages: [{ role: "user", content: "x" }], top_logprobs: 2 }, /top_logprobs needs logprobs/);
});
