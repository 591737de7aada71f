// Pure unit tests of the SSE parser and the option mapping: no server needed.
import assert from "node:assert/strict";
import { test } from "node:test";

import { DLMError, SSEParser, estimateInfillTokens, parseJSONEvents, parseSSE, toWire } from "../src/index.js";

const STREAM =
  'data: {"type": "start", "prompt": "hi", "length": 2, "mask": "░"}\n\n' +
  'data: {"type": "step", "step": 0, "block": 0, "tokens": ["░", "a"], "masked": [true, false], ' +
  '"committed": [1], "confidence": [0.5]}\n\n' +
  ": a comment line\n\n" +
  'data: {"type": "done", "text": "ba", "steps": 2}\n\n' +
  "data: [DONE]\n\n";

function feed(chunks) {
  const p = new SSEParser();
  return chunks.flatMap((c) => p.push(c)).map((e) => e.data);
}

async function collect(iter) {
  const out = [];
  for await (const x of iter) out.push(x);
  return out;
}

function bytesStream(chunks) {
  return new ReadableStream({
    start(controller) {
      for (const c of chunks) controller.enqueue(c);
      controller.close();
    },
  });
}

const whole = feed([STREAM]);

test("one chunk: every data event, comments skipped, [DONE] kept as data", () => {
  assert.equal(whole.length, 4);
  assert.equal(JSON.parse(whole[0]).type, "start");
  assert.deepEqual(JSON.parse(whole[1]).committed, [1]);
  assert.equal(whole[3], "[DONE]");
});

test("split at every position into two chunks gives the same events", () => {
  for (let i = 0; i <= STREAM.length; i++) {
    assert.deepEqual(feed([STREAM.slice(0, i), STREAM.slice(i)]), whole, `split at ${i}`);
  }
});

test("one character per chunk gives the same events", () => {
  assert.deepEqual(feed([...STREAM]), whole);
});

test("CRLF and lone CR line endings, with the CR/LF pair split across chunks", () => {
  const crlf = STREAM.replaceAll("\n", "\r\n");
  assert.deepEqual(feed([crlf]), whole);
  for (let i = 0; i <= crlf.length; i++) assert.deepEqual(feed([crlf.slice(0, i), crlf.slice(i)]), whole, `split at ${i}`);
  assert.deepEqual(feed([STREAM.replaceAll("\n", "\r")]), whole);
  // "\r" then "\n" in the next chunk is one line ending, not an empty line that would dispatch early.
  assert.deepEqual(feed(["data: a\r", "\ndata: b\r", "\n\r", "\n"]), ["a\nb"]);
});

test("multi-line data, no space after the colon, event and id fields, BOM, unterminated tail", () => {
  const p = new SSEParser();
  const evs = p.push("\ufeffevent: delta\nid: 7\ndata:one\ndata: two\n\ndata: tail");
  assert.deepEqual(evs, [{ event: "delta", data: "one\ntwo", id: "7" }]);
  assert.deepEqual(p.end(), []); // an event without its blank line is dropped
  assert.deepEqual(feed(["data\n\n"]), [""]); // a field name alone is an empty value
  assert.deepEqual(feed(["event: x\n\n"]), []); // no data: nothing dispatched
});

test("parseSSE over bytes: a multi-byte character split across chunks", async () => {
  const bytes = new TextEncoder().encode(STREAM);
  const mask = new TextEncoder().encode("░"); // 3 bytes
  const at = bytes.indexOf(mask[0]) + 1; // inside the first "░"
  const chunks = [bytes.slice(0, at), bytes.slice(at, at + 1), bytes.slice(at + 1)];
  const events = await collect(parseSSE(bytesStream(chunks)));
  assert.deepEqual(events.map((e) => e.data), whole);
  assert.equal(JSON.parse(events[0].data).mask, "░");
});

test("parseJSONEvents stops at [DONE] and ignores what follows", async () => {
  const body = bytesStream([new TextEncoder().encode(STREAM + 'data: {"type": "late"}\n\n')]);
  const payloads = await collect(parseJSONEvents(body));
  assert.deepEqual(payloads.map((p) => p.type), ["start", "step", "done"]);
});

test("parseJSONEvents throws a DLMError for an error event and for non-JSON data", async () => {
  const err = 'data: {"error": {"message": "timed out", "type": "timeout_error", "param": null, "code": "timeout"}}\n\n';
  await assert.rejects(collect(parseJSONEvents([err], 200)), (e) => {
    assert.ok(e instanceof DLMError);
    assert.equal(e.type, "timeout_error");
    assert.equal(e.message, "timed out");
    assert.equal(e.code, "timeout");
    return true;
  });
  await assert.rejects(collect(parseJSONEvents(["data: nope\n\n"])), { name: "DLMError", type: "invalid_response" });
});

test("toWire maps camelCase options to the wire names and drops client-side ones", () => {
  assert.deepEqual(
    toWire({ maxTokens: 8, blockLength: 4, samplingSteps: 2, maxSpan: 3, cfgScale: 0.5, stopAtEos: true,
      contextWindow: 100, signal: null, seed: undefined, top_p: 0.9 }),
    { max_tokens: 8, block_length: 4, steps: 2, max_span: 3, cfg_scale: 0.5, stop_at_eos: true, top_p: 0.9 },
  );
});

test("estimateInfillTokens counts UTF-8 bytes outside the gaps plus the gap lengths", () => {
  assert.equal(estimateInfillTokens("ab[MASK:3]c", 64), 6);
  assert.equal(estimateInfillTokens("é[MASK]", 10), 12);
  assert.equal(estimateInfillTokens("no gap"), 6);
});
