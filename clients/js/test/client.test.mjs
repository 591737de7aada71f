// The client against a small in-process mock of docs/http-api.md (node:http): request bodies, headers, the error
// shape, streaming across awkward chunk boundaries. No dlm server needed.
import assert from "node:assert/strict";
import http from "node:http";
import { after, before, test } from "node:test";

import { DLMError, DiffusionLanguageModel } from "../src/index.js";

const KEY = "sk-test";
const seen = []; // every request: {method, url, headers, body}
let server;
let baseUrl;

function send(res, status, obj) {
  res.writeHead(status, { "Content-Type": "application/json" });
  res.end(JSON.stringify(obj));
}

function error(res, status, message, type, param = null) {
  send(res, status, { error: { message, type, param, code: null } });
}

// Writes the events in uneven chunks (some splitting a "░" in the middle), each flushed separately.
async function sse(res, payloads) {
  res.writeHead(200, { "Content-Type": "text/event-stream", "Cache-Control": "no-cache" });
  const bytes = Buffer.from(payloads.map((p) => `data: ${typeof p === "string" ? p : JSON.stringify(p)}\r\n\r\n`).join(""));
  for (let i = 0; i < bytes.length; i += 7) {
    res.write(bytes.subarray(i, i + 7));
    await new Promise((r) => setImmediate(r));
  }
  res.end();
}

async function handle(req, res) {
  let raw = "";
  for await (const c of req) raw += c;
  const body = raw ? JSON.parse(raw) : undefined;
  seen.push({ method: req.method, url: req.url, headers: req.headers, body });
  if (req.url === "/health") return send(res, 200, { status: "ok", model: "mock" });
  if (req.headers.authorization !== `Bearer ${KEY}`) return error(res, 401, "invalid API key", "authentication_error");
  if (req.url === "/v1/models") {
    return send(res, 200, { object: "list", data: [{ id: "mock", object: "model", created: 1, owned_by: "dlm" }] });
  }
  if (req.method === "POST" && body?.model !== "mock") return error(res, 404, `model ${body?.model} not found`, "not_found_error", "model");
  if (req.url === "/v1/generate") {
    if (body.steps > 100) return error(res, 400, "steps must be <= 100", "invalid_request_error", "steps");
    if (!body.stream) return send(res, 200, { text: "ab", steps: body.steps, nfe: body.steps });
    return sse(res, [
      { type: "start", prompt: body.prompt, length: 2, mask: "░" },
      { type: "step", step: 0, block: 0, tokens: ["░", "b"], masked: [true, false], committed: [1], confidence: [0.9] },
      { type: "step", step: 1, block: 0, tokens: ["a", "b"], masked: [false, false], committed: [0], confidence: [0.4] },
      { type: "done", text: "ab", steps: 2 },
      "[DONE]",
    ]);
  }
  if (req.url === "/v1/infill") return send(res, 200, { text: body.text.replace(/\[MASK(:\d+)?\]/g, "x") });
  if (req.url === "/v1/completions") {
    if (!body.stream) {
      return send(res, 200, { object: "text_completion", choices: [{ index: 0, text: "ab", finish_reason: "length" }] });
    }
    return sse(res, [{ object: "text_completion", choices: [{ index: 0, text: "a" }] },
      { object: "text_completion", choices: [{ index: 0, text: "b" }] }, "[DONE]"]);
  }
  if (req.url === "/v1/chat/completions") {
    if (body.stream) {
      return sse(res, [{ object: "chat.completion.chunk", choices: [{ index: 0, delta: { content: "hi" } }] }, "[DONE]"]);
    }
    return send(res, 200, { object: "chat.completion",
      choices: [{ index: 0, message: { role: "assistant", content: "hi" }, finish_reason: "stop" }] });
  }
  if (req.url === "/v1/broken") return sse(res, ['{"error": {"message": "timed out", "type": "timeout_error"}}']);
  res.writeHead(500, { "Content-Type": "text/plain" });
  res.end("Internal Server Error");
}

before(async () => {
  server = http.createServer((req, res) => handle(req, res).catch((e) => error(res, 500, String(e), "server_error")));
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  baseUrl = `http://127.0.0.1:${server.address().port}`;
});

after(() => server.close());

const last = () => seen[seen.length - 1];

test("generate: the model name from /health, camelCase options on the wire, the bearer key", async () => {
  const lm = new DiffusionLanguageModel({ baseUrl: `${baseUrl}/`, apiKey: KEY });
  const out = await lm.generate("hi", { maxTokens: 2, steps: 2, blockLength: 2, temperature: 0, seed: 1 });
  assert.deepEqual(out, { text: "ab", steps: 2, nfe: 2 });
  assert.equal(lm.model, "mock");
  assert.deepEqual(last().body,
    { max_tokens: 2, steps: 2, block_length: 2, temperature: 0, seed: 1, model: "mock", prompt: "hi", stream: false });
  assert.equal(last().headers.authorization, `Bearer ${KEY}`);
  assert.equal(last().headers["content-type"], "application/json");
});

test("stream: denoising events in order, across chunk boundaries and CRLF", async () => {
  const lm = new DiffusionLanguageModel({ baseUrl, apiKey: KEY, model: "mock" });
  const events = [];
  for await (const ev of lm.stream("hi", { maxTokens: 2, steps: 2 })) events.push(ev);
  assert.deepEqual(events.map((e) => e.type), ["start", "step", "step", "done"]);
  assert.equal(events[0].mask, "░");
  assert.deepEqual(events[1].tokens, ["░", "b"]);
  assert.equal(events[3].text, "ab");
  assert.equal(last().body.stream, true);
  assert.equal(last().headers.accept, "text/event-stream");
});

test("infill: samplingSteps -> steps, maxSpan -> max_span, contextWindow never sent", async () => {
  const lm = new DiffusionLanguageModel({ baseUrl, apiKey: KEY, model: "mock" });
  const text = await lm.infill("a[MASK]b[MASK:2]", { samplingSteps: 4, maxSpan: 3, contextWindow: 100, seed: 0 });
  assert.equal(text, "axbx");
  assert.deepEqual(last().body, { steps: 4, max_span: 3, seed: 0, model: "mock", text: "a[MASK]b[MASK:2]", stream: false });
});

test("infill: a document over contextWindow is refused before any request", async () => {
  const lm = new DiffusionLanguageModel({ baseUrl, apiKey: KEY, model: "mock" });
  const n = seen.length;
  await assert.rejects(lm.infill("abcd[MASK:8]", { contextWindow: 10 }),
    (e) => e instanceof DLMError && e.type === "context_window_exceeded" && e.status === 0);
  assert.equal(seen.length, n);
});

test("complete and chat over the OpenAI-compatible routes, plain and streamed", async () => {
  const lm = new DiffusionLanguageModel({ baseUrl, apiKey: KEY, model: "mock" });
  assert.equal((await lm.complete("hi", { maxTokens: 2 })).choices[0].text, "ab");
  const deltas = [];
  for await (const c of lm.completeStream("hi")) deltas.push(c.choices[0].text);
  assert.deepEqual(deltas, ["a", "b"]);
  const messages = [{ role: "user", content: "hello" }];
  assert.equal((await lm.chat(messages)).choices[0].message.content, "hi");
  assert.deepEqual(last().body.messages, messages);
  const chunks = [];
  for await (const c of lm.chatStream(messages)) chunks.push(c.choices[0].delta.content);
  assert.deepEqual(chunks, ["hi"]);
  assert.equal((await lm.models())[0].id, "mock");
});

test("errors: the OpenAI error shape becomes a DLMError with status, type, message, param", async () => {
  const lm = new DiffusionLanguageModel({ baseUrl, apiKey: KEY, model: "mock" });
  await assert.rejects(lm.generate("hi", { steps: 1000 }), (e) => {
    assert.ok(e instanceof DLMError);
    assert.deepEqual([e.status, e.type, e.param, e.message], [400, "invalid_request_error", "steps", "steps must be <= 100"]);
    return true;
  });
  const noKey = new DiffusionLanguageModel({ baseUrl, model: "mock" });
  await assert.rejects(noKey.generate("hi"), { name: "DLMError", status: 401, type: "authentication_error" });
  await assert.rejects(lm._json("GET", "/nowhere"), { name: "DLMError", status: 500, type: "http_error" });
  await assert.rejects(async () => {
    for await (const _ of lm._sse("/v1/broken", { model: "mock" })) { /* the error arrives inside the stream */ }
  }, { name: "DLMError", type: "timeout_error", message: "timed out" });
  const gone = new DiffusionLanguageModel({ baseUrl: "http://127.0.0.1:1", model: "mock" });
  await assert.rejects(gone.generate("hi"), { name: "DLMError", status: 0, type: "connection_error" });
});

test("abort: an AbortSignal cancels the call with a DLMError of type aborted", async () => {
  const lm = new DiffusionLanguageModel({ baseUrl, apiKey: KEY, model: "mock" });
  const ac = new AbortController();
  ac.abort();
  await assert.rejects(lm.generate("hi", { signal: ac.signal }), { name: "DLMError", type: "aborted" });
});

test("the guide's constructor: modelPath names the model to request, unknown options throw", async () => {
  const lm = new DiffusionLanguageModel({ modelPath: "models/llada-8b", baseUrl, apiKey: KEY });
  await assert.rejects(lm.generate("x", { maxTokens: 2 }), (e) => e instanceof DLMError && e.status === 404 && e.param === "model");
  assert.equal(seen.at(-1).body.model, "models/llada-8b");
  const ok = new DiffusionLanguageModel({ modelPath: "mock", baseUrl, apiKey: KEY });
  assert.equal((await ok.generate("x", { maxTokens: 2, steps: 2 })).text, "ab");
  assert.throws(() => new DiffusionLanguageModel({ modelpath: "x" }), (e) => e instanceof DLMError && /unknown option\(s\) modelpath/.test(e.message));
  assert.throws(() => new DiffusionLanguageModel({ model: "a", modelPath: "b" }), DLMError);
});

test("the guide's device option is checked against the server's when it reports one", async () => {
  // The mock's /health reports no device: the option is accepted (the server chose it) and the call goes on.
  const lm = new DiffusionLanguageModel({ modelPath: "mock", device: "cuda", baseUrl, apiKey: KEY });
  assert.equal((await lm.generate("x", { maxTokens: 2, steps: 2 })).text, "ab");
});

test("the guide's infill options: contextWindow caps the canvas, samplingSteps is steps", async () => {
  const lm = new DiffusionLanguageModel({ baseUrl, apiKey: KEY });
  assert.equal(await lm.infill("a [MASK:4] b", { contextWindow: 2048, samplingSteps: 128 }), "a x b");
  assert.equal(seen.at(-1).body.steps, 128);
  assert.equal(seen.at(-1).body.contextWindow, undefined);
  await assert.rejects(lm.infill("a [MASK] b", { contextWindow: 16 }), (e) => e.type === "context_window_exceeded");
});
