// The client against a live `dlm serve` whose URL is DLM_TEST_URL (and key DLM_TEST_API_KEY, if it has one).
// tests/test_js_client.py starts one on a tiny random model and runs these; without DLM_TEST_URL they skip.
import assert from "node:assert/strict";
import { test } from "node:test";

import { DLMError, DiffusionLanguageModel } from "../src/index.js";

const baseUrl = process.env.DLM_TEST_URL;
const apiKey = process.env.DLM_TEST_API_KEY || undefined;
const skip = baseUrl ? false : "DLM_TEST_URL is not set: start `dlm serve` and set DLM_TEST_URL=http://127.0.0.1:8000 " +
  "(and DLM_TEST_API_KEY if it has --api-key), or run `pytest tests/test_js_client.py`";

// Small and fast on a tiny CPU model: 16 tokens in two blocks of 8, 8 steps.
const OPTS = { maxTokens: 16, steps: 8, blockLength: 8, temperature: 0, seed: 0 };
const lm = () => new DiffusionLanguageModel({ baseUrl, apiKey });

async function collect(iter) {
  const out = [];
  for await (const x of iter) out.push(x);
  return out;
}

test("health and models name the served model", { skip }, async () => {
  const client = lm();
  const health = await client.health();
  assert.equal(health.status, "ok");
  const models = await client.models();
  assert.ok(models.some((m) => m.id === health.model && m.object === "model" && m.owned_by === "dlm"));
});

test("the guide's device option is checked against the device the server reports", { skip }, async () => {
  const served = (await lm().health()).device;
  assert.equal(served, "cpu");
  const ok = new DiffusionLanguageModel({ baseUrl, apiKey, device: "cpu" });
  assert.equal(typeof (await ok.generate("The sea", OPTS)).text, "string");
  const wrong = new DiffusionLanguageModel({ baseUrl, apiKey, device: "cuda" });
  await assert.rejects(wrong.generate("The sea", OPTS), (e) => e instanceof DLMError && e.param === "device");
});

test("generate -> {text, steps, nfe}", { skip }, async () => {
  const out = await lm().generate("Once upon a time", OPTS);
  assert.equal(typeof out.text, "string");
  assert.equal(out.steps, 8);
  assert.ok(Number.isInteger(out.nfe) && out.nfe >= 1, `nfe ${out.nfe}`);
});

test("stream: start, one step event per step with every mask resolved, done with the generated text", { skip }, async () => {
  const client = lm();
  const events = await collect(client.stream("Once upon a time", OPTS));
  const [start, ...rest] = events;
  const done = rest.pop();
  assert.equal(start.type, "start");
  assert.equal(start.length, 16);
  assert.equal(start.mask, "░");
  assert.equal(done.type, "done");
  assert.equal(done.steps, 8);
  assert.equal(rest.length, 8);
  let masked = 16;
  for (const ev of rest) {
    assert.equal(ev.type, "step");
    assert.equal(ev.tokens.length, 16);
    assert.equal(ev.masked.length, 16);
    assert.equal(ev.committed.length, ev.confidence.length);
    for (const j of ev.committed) assert.ok(j >= 0 && j < 16 && !ev.masked[j]);
    ev.masked.forEach((m, j) => { if (m) assert.equal(ev.tokens[j], "░"); });
    const now = ev.masked.filter(Boolean).length;
    assert.equal(masked - now, ev.committed.length, "each step commits exactly the positions it lists");
    masked = now;
  }
  assert.equal(masked, 0);
  assert.deepEqual(rest.map((e) => e.block), [0, 0, 0, 0, 1, 1, 1, 1]);
  // Greedy with a seed: the stream ends on the same text as a plain generate.
  assert.equal(done.text, (await client.generate("Once upon a time", OPTS)).text);
});

test("infill keeps the text around the gaps; samplingSteps and maxSpan reach the server", { skip }, async () => {
  const client = lm();
  const text = await client.infill("The [MASK:4] sat on the [MASK].", { samplingSteps: 4, maxSpan: 4, seed: 0,
    contextWindow: 128 });
  assert.ok(text.startsWith("The ") && text.endsWith("."), JSON.stringify(text));
  const events = await collect(client.streamInfill("ab[MASK:3]cd", { samplingSteps: 3, seed: 0 }));
  assert.equal(events[0].type, "start");
  const steps = events.filter((e) => e.type === "step");
  assert.equal(steps.length, 3);
  assert.equal(steps[0].tokens.length, events[0].length); // the whole canvas
  assert.equal(events.at(-1).type, "done");
  assert.ok(events.at(-1).text.startsWith("ab") && events.at(-1).text.endsWith("cd"));
  await assert.rejects(client.infill("x".repeat(200) + "[MASK]", { contextWindow: 128 }),
    { name: "DLMError", type: "context_window_exceeded" });
});

test("complete and completeStream: the streamed deltas add up to the completion", { skip }, async () => {
  const client = lm();
  const out = await client.complete("Once upon a time", OPTS);
  assert.equal(out.object, "text_completion");
  assert.equal(typeof out.choices[0].text, "string");
  assert.ok(["stop", "length"].includes(out.choices[0].finish_reason));
  assert.ok(out.usage.completion_tokens >= 0 && out.usage.prompt_tokens > 0);
  const chunks = await collect(client.completeStream("Once upon a time", OPTS));
  assert.ok(chunks.length >= 1);
  assert.equal(chunks.map((c) => c.choices[0].text ?? "").join(""), out.choices[0].text);
});

test("chat and chatStream", { skip }, async () => {
  const client = lm();
  const messages = [{ role: "user", content: "Hello" }];
  const out = await client.chat(messages, OPTS);
  assert.equal(out.object, "chat.completion");
  assert.equal(out.choices[0].message.role, "assistant");
  assert.equal(typeof out.choices[0].message.content, "string");
  const chunks = await collect(client.chatStream(messages, OPTS));
  assert.ok(chunks.every((c) => c.object === "chat.completion.chunk"));
  const text = chunks.map((c) => c.choices[0]?.delta?.content ?? "").join("");
  assert.equal(text, out.choices[0].message.content);
});

test("errors arrive as DLMError with the status and type of the OpenAI error shape", { skip }, async () => {
  const client = lm();
  await assert.rejects(client.generate("hi", { ...OPTS, steps: 0 }), (e) => {
    assert.ok(e instanceof DLMError, String(e));
    assert.equal(e.status, 400);
    assert.equal(typeof e.type, "string");
    assert.ok(e.message.length > 0);
    return true;
  });
  await assert.rejects(client.generate("hi", { ...OPTS, model: "no-such-model" }), { name: "DLMError", status: 404 });
  await assert.rejects(client._json("GET", "/v1/no-such-route"), (e) => e instanceof DLMError &&
    (e.status === 404 || e.status === 401));
  if (apiKey) {
    const anonymous = new DiffusionLanguageModel({ baseUrl, model: "x" });
    await assert.rejects(anonymous.generate("hi", OPTS), { name: "DLMError", status: 401 });
    const wrong = new DiffusionLanguageModel({ baseUrl, apiKey: `${apiKey}-wrong`, model: "x" });
    await assert.rejects(wrong.models(), { name: "DLMError", status: 401 });
  }
});

test("leaving a stream early cancels it and the server keeps serving", { skip }, async () => {
  const client = lm();
  for await (const ev of client.stream("Once upon a time", { ...OPTS, maxTokens: 64, blockLength: 64, steps: 64 })) {
    if (ev.type === "step") break;
  }
  const out = await client.generate("again", OPTS);
  assert.equal(typeof out.text, "string");
});
