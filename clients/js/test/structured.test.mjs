// Structured outputs and the control endpoints against a live `dlm serve` (DLM_TEST_URL, as live.test.mjs).
// The tiny random model writes nonsense; the structure holds by construction, and that is what is checked.
import assert from "node:assert/strict";
import { test } from "node:test";

import { DLMError, DiffusionLanguageModel } from "../src/index.js";

const baseUrl = process.env.DLM_TEST_URL;
const apiKey = process.env.DLM_TEST_API_KEY || undefined;
const skip = baseUrl ? false : "DLM_TEST_URL is not set (see live.test.mjs)";
const lm = () => new DiffusionLanguageModel({ baseUrl, apiKey });

const PERSON = {
  type: "object",
  properties: { name: { type: "string", maxLength: 6 }, age: { type: "integer", minimum: 0, maximum: 99 },
    tags: { type: "array", items: { enum: ["x", "y"] }, minItems: 1, maxItems: 2 } },
  required: ["name", "age"],
  additionalProperties: false,
};
const WEATHER = { type: "function", function: { name: "get_weather",
  parameters: { type: "object", properties: { city: { type: "string", maxLength: 8 } }, required: ["city"] } } };

test("json: a value of the schema, from a prompt or from messages", { skip }, async () => {
  for (const input of ["Person: ", [{ role: "user", content: "A person?" }]]) {
    const v = await lm().json(input, PERSON, { seed: 0 });
    assert.deepEqual(Object.keys(v), ["name", "age", "tags"]);
    assert.ok(typeof v.name === "string" && v.name.length <= 6);
    assert.ok(Number.isInteger(v.age) && v.age >= 0 && v.age <= 99);
    assert.ok(v.tags.length >= 1 && v.tags.length <= 2 && v.tags.every((t) => t === "x" || t === "y"));
  }
  await assert.rejects(lm().json("x", { type: "string", format: "email" }),
    (e) => e instanceof DLMError && e.status === 400 && e.code === "unsupported_schema" && /format/.test(e.message));
});

test("toolCall: a forced call parses; none answers in text", { skip }, async () => {
  const call = await lm().toolCall([{ role: "user", content: "Weather?" }], [WEATHER], { toolChoice: "get_weather" });
  assert.equal(call.name, "get_weather");
  assert.ok(call.id.startsWith("call_") && typeof call.arguments.city === "string");
  const text = await lm().toolCall([{ role: "user", content: "Hi" }], [WEATHER], { toolChoice: "none", maxTokens: 8,
    steps: 8, blockLength: 8 });
  assert.equal(typeof text.content, "string");
});

test("regex, choose, pattern", { skip }, async () => {
  assert.match(await lm().regex("Date: ", "\\d{4}-\\d{2}"), /^\d{4}-\d{2}$/);
  assert.ok(["yes", "no"].includes(await lm().choose("Answer: ", ["yes", "no"])));
  assert.match(await lm().pattern("Code ", "[A-Z]{3}", "."), /^[A-Z]{3}$/);
});

test("code, document, report, augment", { skip }, async () => {
  const sig = "def f(x):";
  const out = await lm().code("double x", { function_signature: sig, max_lines: 3 }, { lineTokens: 6, seed: 0 });
  assert.ok(out.code.startsWith(sig + "\n") && out.checks.parses && out.checks.function_signature);
  const doc = await lm().document("# {t}\n[MASK:<=6]\n", { data: { t: "T" }, seed: 0 });
  assert.ok(doc.startsWith("# T\n"));
  const report = await lm().report("Notes", { format: "markdown", sections: ["key_points"], max_length: 30 });
  assert.ok(report.startsWith("## Key Points\n"));
  const variants = await lm().augment(["hello there"], { n: 2, noise: 0.5, seed: 0 });
  assert.equal(variants.length, 1);
  assert.equal(variants[0].length, 2);
  await assert.rejects(lm().pattern("", "a+"), (e) => e instanceof DLMError && e.param === "pattern");
});
