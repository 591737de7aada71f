// JavaScript client of the dlm HTTP API (docs/http-api.md): no dependencies, Node 18+ and browsers.
//
// Uses only the platform: global fetch, ReadableStream, TextDecoder, AbortSignal. Server-sent events are parsed
// here (EventSource cannot POST) by `SSEParser`, a pure push parser that follows the WHATWG event-stream rules.
//
//   import { DiffusionLanguageModel } from "dlm-client";
//   const lm = new DiffusionLanguageModel({ baseUrl: "http://127.0.0.1:8000", apiKey, model: "dlm" });
//   const { text } = await lm.generate("The sea", { maxTokens: 32, steps: 32 });
//   for await (const ev of lm.stream("The sea", { maxTokens: 32 })) if (ev.type === "step") console.log(ev.tokens.join(""));

/** Every failure of a call: the OpenAI error shape `{error: {message, type, param, code}}` plus the HTTP status.
 *
 * `status` is the HTTP status (0 when no response arrived: network failure, abort, client-side check); `type`
 * is the error type sent by the server (or "connection_error", "invalid_response", "context_window_exceeded"). */
export class DLMError extends Error {
  constructor(message, { status = 0, type = "error", param = null, code = null, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "DLMError";
    this.status = status;
    this.type = type;
    this.param = param;
    this.code = code;
  }
}

// ----- server-sent events ----------------------------------------------------------------------------------------

/** Push parser of a text/event-stream: `push(text)` returns the events completed by that chunk.
 *
 * Chunks may split a line, an event or a CRLF pair anywhere; lines end with CRLF, LF or CR; `data:` lines of one
 * event are joined with "\n"; `:` lines are comments; a blank line dispatches. Each event is {event, data, id}.
 * Feed it text; `parseSSE` below decodes bytes first (a multi-byte character such as "░" may span two chunks). */
export class SSEParser {
  constructor() {
    this.buffer = "";
    this.skipLF = false; // the previous chunk ended in CR: a LF at the start of the next one belongs to it
    this.sawFirst = false;
    this.lastId = null; // persists across events, as the spec says
    this.reset();
  }

  reset() {
    this.data = [];
    this.event = "";
    this.hasData = false;
  }

  push(chunk) {
    let text = chunk;
    if (!this.sawFirst && text.length) {
      this.sawFirst = true;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1); // a BOM at the very start is ignored
    }
    if (this.skipLF && text.startsWith("\n")) text = text.slice(1);
    if (text.length) this.skipLF = false;
    this.buffer += text;
    const events = [];
    let start = 0;
    for (;;) {
      const cr = this.buffer.indexOf("\r", start);
      const lf = this.buffer.indexOf("\n", start);
      if (cr < 0 && lf < 0) break;
      let end;
      let next;
      if (cr >= 0 && (lf < 0 || cr < lf)) {
        end = cr;
        if (cr + 1 === this.buffer.length) {
          next = cr + 1; // a CR at the end of the buffer: its LF, if any, comes with the next chunk
          this.skipLF = true;
        } else {
          next = this.buffer[cr + 1] === "\n" ? cr + 2 : cr + 1;
        }
      } else {
        end = lf;
        next = lf + 1;
      }
      const ev = this.line(this.buffer.slice(start, end));
      if (ev) events.push(ev);
      start = next;
    }
    this.buffer = this.buffer.slice(start);
    return events;
  }

  /** End of stream: an unterminated last event is dropped (as browsers do); returns [] for symmetry with push. */
  end() {
    this.buffer = "";
    this.reset();
    return [];
  }

  line(line) {
    if (line === "") {
      if (!this.hasData) {
        this.reset();
        return null;
      }
      const ev = { event: this.event || "message", data: this.data.join("\n"), id: this.lastId };
      this.reset();
      return ev;
    }
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") {
      this.data.push(value);
      this.hasData = true;
    } else if (field === "event") {
      this.event = value;
    } else if (field === "id" && !value.includes("\0")) {
      this.lastId = value;
    } // "retry" and unknown fields are ignored: this client never reconnects
    return null;
  }
}

/** Bytes (a ReadableStream, or any async iterable of Uint8Array / string chunks) -> async iterator of SSE events. */
export async function* parseSSE(body) {
  const parser = new SSEParser();
  const decoder = new TextDecoder("utf-8");
  const chunks = body && typeof body.getReader === "function" ? readerChunks(body) : body;
  for await (const chunk of chunks) {
    const text = typeof chunk === "string" ? chunk : decoder.decode(chunk, { stream: true });
    yield* parser.push(text);
  }
  yield* parser.push(decoder.decode());
  parser.end();
}

async function* readerChunks(stream) {
  const reader = stream.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return;
      yield value;
    }
  } finally {
    // Breaking out of a `for await` over the events lands here: cancel so the server stops decoding.
    reader.cancel().catch(() => {});
  }
}

/** SSE events -> parsed JSON payloads, ending at `data: [DONE]`; an `{"error": ...}` payload is thrown. */
export async function* parseJSONEvents(body, status = 200) {
  for await (const ev of parseSSE(body)) {
    if (ev.data === "[DONE]") return;
    let payload;
    try {
      payload = JSON.parse(ev.data);
    } catch (e) {
      throw new DLMError(`the server sent an event that is not JSON: ${ev.data.slice(0, 200)}`,
        { status, type: "invalid_response", cause: e });
    }
    if (payload && typeof payload === "object" && payload.error) throw errorFromBody(payload, status);
    yield payload;
  }
}

// ----- options ---------------------------------------------------------------------------------------------------

// camelCase names that are not the snake_case of the wire name.
const ALIASES = { samplingSteps: "steps", maxNewTokens: "max_tokens" };
// Client-side options, never sent.
const LOCAL = new Set(["signal", "contextWindow", "headers"]);

const snake = (k) => ALIASES[k] ?? k.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);

/** {maxTokens: 8, blockLength: 8, samplingSteps: 4} -> {max_tokens: 8, block_length: 8, steps: 4}; undefined dropped. */
export function toWire(options = {}) {
  const out = {};
  for (const [k, v] of Object.entries(options)) {
    if (v === undefined || LOCAL.has(k)) continue;
    out[snake(k)] = v;
  }
  return out;
}

const GAP = /\[MASK(?::(\d+))?\]/g;

/** Upper bound on the tokens of a document with gaps, for a byte-level tokenizer: UTF-8 bytes outside the gaps,
 * plus n per [MASK:n] and maxSpan per bare [MASK]. Byte-level BPE never needs more tokens than bytes. */
export function estimateInfillTokens(document, maxSpan = 64) {
  const bytes = (s) => new TextEncoder().encode(s).length;
  let total = 0;
  let pos = 0;
  for (const m of document.matchAll(GAP)) {
    total += bytes(document.slice(pos, m.index)) + (m[1] !== undefined ? Number(m[1]) : maxSpan);
    pos = m.index + m[0].length;
  }
  return total + bytes(document.slice(pos));
}

function errorFromBody(body, status) {
  const e = body && typeof body === "object" ? body.error : undefined;
  if (e && typeof e === "object") {
    return new DLMError(String(e.message ?? `HTTP ${status}`),
      { status, type: e.type ?? "error", param: e.param ?? null, code: e.code ?? null });
  }
  if (typeof e === "string") return new DLMError(e, { status, type: "error" });
  return new DLMError(`HTTP ${status}`, { status, type: "http_error" });
}

// ----- the client ------------------------------------------------------------------------------------------------

const CONSTRUCTOR_OPTIONS = ["baseUrl", "apiKey", "model", "modelPath", "device", "fetch", "headers"];

export class DiffusionLanguageModel {
  /** @param {{baseUrl?: string, apiKey?: string, model?: string, modelPath?: string, device?: string,
   *   fetch?: typeof fetch, headers?: object}} opts
   * `model` defaults to the one the server reports at GET /health (looked up once, lazily). `modelPath` (the
   * guide's name) is the same as `model`: the served model to request; the server answers 404 when it serves
   * another, so a pasted `modelPath: "models/llada-8b"` cannot silently talk to a different model. `device` is the
   * server's choice (`dlm serve --device`): when given, the first call checks it against the device GET /health
   * reports and throws a DLMError if they differ. Unknown options throw. */
  constructor(opts = {}) {
    const unknown = Object.keys(opts).filter((k) => !CONSTRUCTOR_OPTIONS.includes(k));
    if (unknown.length) {
      throw new DLMError(`unknown option(s) ${unknown.join(", ")}; supported: ${CONSTRUCTOR_OPTIONS.join(", ")}`,
        { type: "invalid_request_error", param: unknown[0] });
    }
    const { baseUrl = "http://127.0.0.1:8000", apiKey, model, modelPath, device, fetch: fetchImpl, headers } = opts;
    if (model !== undefined && modelPath !== undefined && model !== modelPath) {
      throw new DLMError("model and modelPath name the same thing: give one", { type: "invalid_request_error", param: "modelPath" });
    }
    this.baseUrl = String(baseUrl).replace(/\/+$/, "");
    this.apiKey = apiKey;
    this.model = model ?? modelPath;
    this.device = device;
    this._deviceChecked = device === undefined;
    this.headers = headers ?? {};
    this._fetch = fetchImpl ?? globalThis.fetch?.bind(globalThis);
    if (!this._fetch) throw new DLMError("no global fetch: use Node 18+ or pass {fetch}", { type: "invalid_request_error" });
  }

  // --- what only a DLM offers ---

  /** One generation: Promise<{text, steps, nfe}>. Options: maxTokens, steps, blockLength, sampler, remasking,
   * temperature, threshold, cache, seed, ... (any GenerationConfig field, camelCase or snake_case), signal. */
  async generate(prompt, options = {}) {
    const body = { ...(await this._body(options)), prompt, stream: false };
    const out = await this._json("POST", "/v1/generate", body, options.signal);
    return { text: out.text, steps: out.steps, nfe: out.nfe };
  }

  /** Fill every [MASK] / [MASK:n] gap: Promise<string>, the whole document with the gaps filled.
   * Options: samplingSteps (-> steps), maxSpan (-> max_span), temperature, seed, signal, and contextWindow: a
   * client-side cap in tokens; when `estimateInfillTokens(document, maxSpan)` exceeds it the call throws a
   * DLMError of type "context_window_exceeded" before any request is sent. The server applies its own limits. */
  async infill(document, options = {}) {
    this._checkContext(document, options);
    const body = { ...(await this._body(options)), text: document, stream: false };
    const out = await this._json("POST", "/v1/infill", body, options.signal);
    return out.text;
  }

  /** Denoising events of one generation, as they happen: an async iterator of
   * {type: "start", prompt, length, mask} / {type: "step", step, block, tokens, masked, committed, confidence} /
   * {type: "done", text, steps}. Breaking out of the loop cancels the request. */
  async *stream(prompt, options = {}) {
    const body = { ...(await this._body(options)), prompt, stream: true };
    yield* this._sse("/v1/generate", body, options.signal);
  }

  /** Denoising events of one infill (`tokens` is then the whole canvas); same options as infill. */
  async *streamInfill(document, options = {}) {
    this._checkContext(document, options);
    const body = { ...(await this._body(options)), text: document, stream: true };
    yield* this._sse("/v1/infill", body, options.signal);
  }

  // --- OpenAI-compatible ---

  /** POST /v1/completions: Promise<the OpenAI text_completion object> (choices[i].text, finish_reason, usage). */
  async complete(prompt, options = {}) {
    const body = { ...(await this._body(options)), prompt, stream: false };
    return this._json("POST", "/v1/completions", body, options.signal);
  }

  /** Streamed completion: async iterator of text_completion chunks; choices[0].text is the delta of the
   * committed left-to-right prefix. */
  async *completeStream(prompt, options = {}) {
    const body = { ...(await this._body(options)), prompt, stream: true };
    yield* this._sse("/v1/completions", body, options.signal);
  }

  /** POST /v1/chat/completions: Promise<the chat.completion object>; messages are [{role, content}]. */
  async chat(messages, options = {}) {
    const body = { ...(await this._body(options)), messages, stream: false };
    return this._json("POST", "/v1/chat/completions", body, options.signal);
  }

  /** Streamed chat: async iterator of chat.completion.chunk objects (choices[0].delta.content). */
  async *chatStream(messages, options = {}) {
    const body = { ...(await this._body(options)), messages, stream: true };
    yield* this._sse("/v1/chat/completions", body, options.signal);
  }

  // --- structured outputs (docs/http-api.md, "Structured outputs"): the answer always has the structure ---

  /** A value that validates against a JSON schema: Promise<the parsed value>. `input` is a prompt string
   * (/v1/completions) or chat messages (/v1/chat/completions); options as for chat, plus `name` (the schema's
   * name, default "answer"). Unsupported schema keywords are a DLMError 400 (code "unsupported_schema"). */
  async json(input, schema, options = {}) {
    const { name = "answer", ...rest } = options;
    const responseFormat = { type: "json_schema", json_schema: { name, schema, strict: true } };
    const out = await this._structured(input, { ...rest, responseFormat });
    const text = typeof input === "string" ? out.choices[0].text : out.choices[0].message.content;
    return JSON.parse(text);
  }

  /** Function calling: Promise<{id, name, arguments (parsed), content: null} | {content: string}> for the first
   * choice. `tools` in the OpenAI shape [{type: "function", function: {name, description, parameters}}];
   * options.toolChoice: "auto" (default), "required", "none", or a function name (string). */
  async toolCall(messages, tools, options = {}) {
    const { toolChoice, ...rest } = options;
    const choice = typeof toolChoice === "string" && !["auto", "required", "none"].includes(toolChoice)
      ? { type: "function", function: { name: toolChoice } } : toolChoice;
    const out = await this.chat(messages, { ...rest, tools, toolChoice: choice });
    const message = out.choices[0].message;
    const call = message.tool_calls?.[0];
    if (!call) return { content: message.content };
    return { id: call.id, name: call.function.name, arguments: JSON.parse(call.function.arguments), content: null };
  }

  /** Text after a prompt that matches a bounded regex in full (guided_regex): Promise<string>. */
  async regex(prompt, pattern, options = {}) {
    return (await this.complete(prompt, { ...options, guidedRegex: pattern })).choices[0].text;
  }

  /** The most likely of `choices` after the prompt (guided_choice; a draw at temperature > 0): Promise<string>. */
  async choose(prompt, choices, options = {}) {
    return (await this.complete(prompt, { ...options, guidedChoice: choices })).choices[0].text;
  }

  // --- the control endpoints ---

  /** POST /v1/code: Promise<{code, checks, valid_before_repair, repair_rounds, fallback, note, repair}>.
   * constraints: {language: "python", function_signature, includes_docstring, max_lines} (the library's names);
   * options: lineTokens, docstringTokens, repairRounds, seed, temperature, steps, ... */
  async code(prompt, constraints = {}, options = {}) {
    const body = { ...(await this._body(options)), prompt, constraints };
    return this._json("POST", "/v1/code", body, options.signal);
  }

  /** POST /v1/documents with a template ({field}, [MASK], [MASK:n], [MASK:<=n]): Promise<string>.
   * options: data, budgets, newHeadings, maxSpan, seed, temperature, steps, ... */
  async document(template, options = {}) {
    const body = { ...(await this._body(options)), template };
    return (await this._json("POST", "/v1/documents", body, options.signal)).text;
  }

  /** POST /v1/documents with {format: "markdown", sections: [...], max_length}: Promise<string>, a Markdown
   * document whose headings are exactly the sections (titled), after `prompt`. */
  async report(prompt, constraints, options = {}) {
    const body = { ...(await this._body(options)), prompt, constraints };
    return (await this._json("POST", "/v1/documents", body, options.signal)).text;
  }

  /** POST /v1/augment: Promise<[[variant x n] per text]>. options: n (4), noise (0.3), seed, temperature, ... */
  async augment(texts, options = {}) {
    const body = { ...(await this._body(options)), texts };
    return (await this._json("POST", "/v1/augment", body, options.signal)).variants;
  }

  /** POST /v1/patterns: Promise<string>, the text between before and after that matches the pattern in full. */
  async pattern(before, pattern, after = "", options = {}) {
    const body = { ...(await this._body(options)), before, pattern, after };
    return (await this._json("POST", "/v1/patterns", body, options.signal)).text;
  }

  async _structured(input, options) {
    return typeof input === "string" ? this.complete(input, options) : this.chat(input, options);
  }

  /** GET /v1/models -> [{id, object, created, owned_by}]. */
  async models(options = {}) {
    return (await this._json("GET", "/v1/models", undefined, options.signal)).data;
  }

  /** GET /health -> {status, model}; needs no key. */
  async health(options = {}) {
    return this._json("GET", "/health", undefined, options.signal);
  }

  // --- plumbing ---

  _checkContext(document, options) {
    const cap = options.contextWindow;
    if (cap === undefined || cap === null) return;
    const n = estimateInfillTokens(document, options.maxSpan ?? options.max_span ?? 64);
    if (n > cap) {
      throw new DLMError(`the document needs up to ${n} tokens (text outside the gaps in UTF-8 bytes plus the gap ` +
        `lengths), more than contextWindow=${cap}: shorten it or lower maxSpan`,
        { status: 0, type: "context_window_exceeded", param: "contextWindow" });
    }
  }

  async _body(options) {
    const body = toWire(options);
    if (!this._deviceChecked) await this._checkDevice(options.signal);
    if (body.model === undefined) body.model = await this._modelName(options.signal);
    return body;
  }

  async _checkDevice(signal) {
    const h = await this._json("GET", "/health", undefined, signal);
    const served = h.device;
    if (served !== undefined && String(served).split(":")[0] !== String(this.device).split(":")[0]) {
      throw new DLMError(`the server runs on ${served}, not ${this.device}: the device is the server's choice ` +
        "(dlm serve --device)", { type: "invalid_request_error", param: "device" });
    }
    if (this.model === undefined) this.model = h.model;
    this._deviceChecked = true;
  }

  async _modelName(signal) {
    if (this.model === undefined) {
      const h = await this._json("GET", "/health", undefined, signal);
      this.model = h.model;
    }
    return this.model;
  }

  async _request(method, path, body, signal, accept) {
    const headers = { Accept: accept, ...this.headers };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (this.apiKey) headers.Authorization = `Bearer ${this.apiKey}`;
    let res;
    try {
      res = await this._fetch(this.baseUrl + path,
        { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal });
    } catch (e) {
      const aborted = e?.name === "AbortError";
      throw new DLMError(aborted ? "the request was aborted" : `cannot reach ${this.baseUrl}: ${e?.message ?? e}`,
        { status: 0, type: aborted ? "aborted" : "connection_error", cause: e });
    }
    if (!res.ok) {
      const text = await res.text().catch(() => "");
      let parsed;
      try {
        parsed = JSON.parse(text);
      } catch {
        throw new DLMError(`HTTP ${res.status}: ${text.slice(0, 200) || res.statusText}`,
          { status: res.status, type: "http_error" });
      }
      throw errorFromBody(parsed, res.status);
    }
    return res;
  }

  async _json(method, path, body, signal) {
    const res = await this._request(method, path, body, signal, "application/json");
    const text = await res.text();
    try {
      return JSON.parse(text);
    } catch (e) {
      throw new DLMError(`the server did not answer JSON: ${text.slice(0, 200)}`,
        { status: res.status, type: "invalid_response", cause: e });
    }
  }

  async *_sse(path, body, signal) {
    const res = await this._request("POST", path, body, signal, "text/event-stream");
    if (!res.body) throw new DLMError("the response has no body to stream", { status: res.status, type: "invalid_response" });
    try {
      yield* parseJSONEvents(res.body, res.status);
    } catch (e) {
      if (e instanceof DLMError) throw e;
      const aborted = e?.name === "AbortError";
      throw new DLMError(aborted ? "the stream was aborted" : `the stream broke: ${e?.message ?? e}`,
        { status: 0, type: aborted ? "aborted" : "connection_error", cause: e });
    }
  }
}

export default DiffusionLanguageModel;
