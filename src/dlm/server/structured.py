"""Structured outputs on the OpenAI routes: `response_format` (json_object, json_schema), `tools` + `tool_choice`,
and vLLM's extra fields `guided_json`, `guided_regex`, `guided_choice`, each built on the control engine.

Every request is checked here before it is queued (a schema feature the JSON layout cannot guarantee, a regex
without a bounded layout, an answer too long for the context: a 400 naming it); what it then needs of the model is
one function run on the worker thread as a "call" job (batching.py), one answer per row (prompts x n).

    JSON       dlm.control.json_schema.generate_json_text(prompt=...): keys and punctuation pinned, values under
               per-type token sets, enums and booleans chosen by likelihood; the text always validates.
               json_object (no schema) is the object {"response": "<a string of up to max_tokens tokens>"}.
    regex      dlm.control.constraints.fill_pattern: one slot per character of a bounded pattern.
    choice     the choice with the highest log-likelihood after the prompt (dlm.eval.conditional_loglik, the
               LLaDA estimator; exact for AR), or a draw from softmax(loglik / temperature) when temperature > 0.
    tools      the model is shown the tools (a system message) and asked to answer a call as the JSON object
               {"name": NAME, "arguments": ARGS}. "required" / a named function: a call is made; "auto": a call is
               made when the model's probability that its answer opens with `{` is at least 1/2 (at temperature
               > 0, with that probability); else it answers in text. Among several tools the name is chosen by
               likelihood (an enum of the JSON engine), then the arguments are generated under its schema.

    plan = Structurer(lm, settings).plan(body, prompts, overrides, opts)   # None: free generation
    answers = plan.fn(lm, callback)      # on the worker: one Answer per row
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from dlm.config import GenerationConfig
from dlm.control.canvas import token_texts
from dlm.control.constraints import compile_slots, fill_pattern
from dlm.control.json_schema import (
    ANNOTATIONS,
    JsonLayout,
    SchemaError,
    canvas_of,
    compile_schema,
    generate_json_text,
)
from dlm.eval.conditional import conditional_loglik
from dlm.pipeline import DiffusionLM
from dlm.sampling.noise import row_seed
from dlm.server.protocol import ApiError, ChatRequest, CompletionRequest, ToolSpec, cut_at_stop, stop_list
from dlm.server.settings import ServerSettings

CALL_OPEN = '{"name": '  # how the model is asked to open a tool call
CHOICE_SAMPLES = 16  # Monte Carlo samples of each choice's log-likelihood (a masked model; AR is exact)
MAX_CHOICES = 64
JSON_OBJECT = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
               "additionalProperties": False}  # response_format json_object: what it produces
# An integer range of up to 1024 values (a year, a percentage) is chosen among its literals by likelihood, which costs
# one forward pass per distinct literal length; the engine's default of 64 would give wider ranges a digit layout.
LAYOUT = JsonLayout(range_choices=1024)
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
# The overrides that are not fill options: the layout fixes the length, rows are looped, seeds are per row.
NOT_FILL = ("max_new_tokens", "num_samples", "seed")


@dataclass
class Answer:
    """One row's answer: text content, or a tool call (name, arguments as JSON text)."""

    content: str | None
    call: tuple[str, str] | None = None

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.call else "stop"

    def tool_calls(self) -> list[dict[str, Any]]:
        if self.call is None:
            return []
        name, arguments = self.call
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": name, "arguments": arguments}}]


Row = Callable[[DiffusionLM, str, "int | None", Callable[..., None]], Answer]  # (lm, prompt, seed, check)


@dataclass
class Plan:
    """What a structured request asks of the model: `fn(lm, callback)` -> one Answer per row (prompt-major)."""

    mode: str  # "json", "regex", "choice" or "tools"
    prompts: list[str]
    n: int
    seed: int | None
    row: Row

    def fn(self, lm: DiffusionLM, callback: Callable[..., None]) -> list[Answer]:
        out = []
        for i, prompt in enumerate(self.prompts):
            for j in range(self.n):
                r = i * self.n + j
                callback()  # a withdrawn request stops between rows
                out.append(self.row(lm, prompt, None if self.seed is None else row_seed(self.seed, r), callback))
        return out


def tools_prompt(tools: list[ToolSpec]) -> str:
    """The system text that shows the model its tools and the call format."""
    lines = ["Functions you can call (name, description, JSON schema of the arguments):"]
    for t in tools:
        f = t.function
        spec = {"name": f.name, **({"description": f.description} if f.description else {}),
                "parameters": f.parameters or NO_ARGUMENTS}
        lines.append(json.dumps(spec, ensure_ascii=False))
    lines.append('To call one, answer with only {"name": NAME, "arguments": ARGUMENTS}.')
    return "\n".join(lines)


NULL_BRANCH = ("anyOf", "oneOf")
SUBSCHEMAS = frozenset({"items", "anyOf", "oneOf", "allOf", "not", "additionalProperties", "prefixItems",
                        "contains"})  # keywords whose values are schemas (the others hold data: enum, default, ...)
DEFS = ("$defs", "definitions")


def narrow(schema: Any, param: str) -> Any:
    """A schema whose every value validates the given one, in the subset the JSON engine supports where the given
    one only strays from it in the ways JSON-schema generators write (pydantic, the openai client):
    - local `$ref`s (`#/$defs/Name`, `#/definitions/Name`) are inlined; a recursive one is a 400;
    - a nullable type is generated as its non-null type: `type: [T, "null"]` and `anyOf` / `oneOf` of one schema and
      `{"type": "null"}` (a value of T validates the union; null is never produced).
    Anything else is left as it is, for the engine to accept or refuse by name."""
    defs: dict[str, Any] = {}
    if isinstance(schema, dict):
        for key in DEFS:
            if isinstance(schema.get(key), dict):
                defs.update({f"#/{key}/{name}": sub for name, sub in schema[key].items()})

    def walk(s: Any, seen: frozenset[str]) -> Any:
        if isinstance(s, list):
            return [walk(x, seen) for x in s]
        if not isinstance(s, dict):
            return s
        if isinstance(s.get("$ref"), str):
            ref = s["$ref"]
            if ref not in defs:
                raise ApiError(400, f"{param}: $ref {ref!r} cannot be resolved: only local references into $defs "
                                    "or definitions are inlined", param=param.split(".")[0], code="unsupported_schema")
            if ref in seen or len(seen) > 32:
                raise ApiError(400, f"{param}: $ref {ref!r} is recursive; a layout has a fixed size, so a recursive "
                                    "schema cannot be generated", param=param.split(".")[0], code="unsupported_schema")
            return walk({**defs[ref], **{k: v for k, v in s.items() if k != "$ref"}}, seen | {ref})
        out = {k: walk(v, seen) if k in SUBSCHEMAS else v for k, v in s.items() if k not in DEFS}
        if isinstance(out.get("properties"), dict):  # a dict of schemas (its keys are names, not keywords)
            out["properties"] = {k: walk(v, seen) for k, v in out["properties"].items()}
        kind = out.get("type")
        if isinstance(kind, list) and len(kind) == 2 and "null" in kind and None not in out.get("enum", ()):
            out["type"] = next(t for t in kind if t != "null")
        for key in NULL_BRANCH:
            branches = out.get(key)
            if not (isinstance(branches, list) and len(branches) == 2 and all(isinstance(b, dict) for b in branches)):
                continue
            others = [b for b in branches if b.get("type") != "null" or set(b) - ANNOTATIONS - {"type"}]
            rest = {k: v for k, v in out.items() if k != key}
            if len(others) == 1 and not (set(rest) & set(others[0]) - ANNOTATIONS):
                out = {**rest, **others[0]}
        return out

    return walk(schema, frozenset())


def arguments_schema(tool: ToolSpec) -> dict[str, Any]:
    """A tool's parameters schema; none, or an object without properties, means no arguments ({})."""
    params = tool.function.parameters
    if not params or (params.get("type") == "object" and not params.get("properties")):
        return NO_ARGUMENTS
    return params


class Structurer:
    """The checks (before queueing) and the worker functions of structured requests for one model."""

    def __init__(self, lm: DiffusionLM, settings: ServerSettings) -> None:
        self.lm, self.settings = lm, settings
        self._widest: int | None = None
        self._opens: list[int] | None = None  # ids of the tokens whose text opens a JSON object

    @property
    def widest(self) -> int:
        """The most characters of any token (a lower bound on a layout's tokens; computed once)."""
        if self._widest is None:
            self._widest = max(map(len, token_texts(self.lm.tokenizer)), default=1)
        return self._widest

    # ----- checks ---------------------------------------------------------------------------------------------
    def layout_tokens(self, schema: Any, layout: JsonLayout, param: str) -> tuple[int, int]:
        """(canvas tokens, masked tokens) of a schema's layout; 400 for a schema the engine refuses."""
        tok = self.lm.tokenizer
        try:
            parts = compile_schema(schema, layout, max_tokens=self.lm.max_len, chars_per_token=self.widest)
        except SchemaError as e:
            raise ApiError(400, f"{param}: {e}", param=param.split(".")[0].split("[")[0],
                           code="unsupported_schema") from e
        ids, _ = canvas_of(parts, tok.encode, tok.mask_id, {})
        return len(ids), ids.count(tok.mask_id)

    def fits(self, prompts: list[str], need: int, masks: int, what: str, param: str) -> None:
        """Each prompt + `need` answer tokens within the context; `masks` generated tokens within --max-tokens."""
        if masks > self.settings.max_tokens:
            raise ApiError(400, f"{what} generates {masks} tokens, over this server's limit of "
                                f"{self.settings.max_tokens} (--max-tokens)", param=param)
        for i, p in enumerate(prompts):
            n = len(self.lm.tokenizer.encode(p))
            if n + need > self.lm.max_len:
                where = "the prompt" if len(prompts) == 1 else f"prompt {i}"
                raise ApiError(400, f"{where} ({n} tokens) + {what} ({need} tokens) exceed the model's context of "
                                    f"{self.lm.max_len} tokens", param=param)

    def fill_options(self, overrides: dict[str, Any], masks: int) -> dict[str, Any]:
        """The request's options for a canvas fill; steps default to one per masked token, capped by --max-steps."""
        out = {k: v for k, v in overrides.items() if k not in NOT_FILL}
        if "steps" not in out and masks > self.settings.max_steps:
            out["steps"] = self.settings.max_steps
        return out

    def no_ar(self, what: str, param: str) -> None:
        if self.lm.is_causal:
            raise ApiError(400, f"{what} needs a diffusion checkpoint (it fills a layout); this one is an "
                                "autoregressive baseline", param=param)

    # ----- plans ----------------------------------------------------------------------------------------------
    def plan(self, body: CompletionRequest | ChatRequest, prompts: list[str], overrides: dict[str, Any],
             opts: GenerationConfig) -> Plan | None:
        """The request's structured mode, checked, or None for free generation."""
        fmt = body.response_format
        json_mode = fmt is not None and fmt.type != "text"
        tools = isinstance(body, ChatRequest) and bool(body.tools) and body.tool_choice != "none"
        modes = [name for name, on in (("response_format", json_mode), ("guided_json", body.guided_json is not None),
                                       ("guided_regex", body.guided_regex is not None),
                                       ("guided_choice", body.guided_choice is not None), ("tools", tools)) if on]
        if isinstance(body, ChatRequest):
            check_tools(body)
        if len(modes) > 1:
            raise ApiError(400, f"{' and '.join(modes)} cannot be combined: give one constraint per request",
                           param=modes[1])
        if not modes:
            return None
        mode = modes[0]
        if mode != "tools" and body.stop is not None:
            raise ApiError(400, f"stop cannot be combined with {mode} (cutting the answer would break its "
                                "structure)", param="stop")
        n, seed = opts.num_samples, opts.seed
        if mode in ("response_format", "guided_json"):
            return self._json(body, prompts, overrides, opts, mode)
        if mode == "guided_regex":
            return self._regex(body.guided_regex or "", prompts, overrides, n, seed)
        if mode == "guided_choice":
            return self._choice(body.guided_choice or [], prompts, opts, n, seed)
        assert isinstance(body, ChatRequest)
        return self._tools(body, prompts, overrides, opts)

    def _json(self, body: CompletionRequest | ChatRequest, prompts: list[str], overrides: dict[str, Any],
              opts: GenerationConfig, mode: str) -> Plan:
        self.no_ar(mode, mode)
        fmt = body.response_format
        layout = LAYOUT
        if mode == "guided_json":
            schema, param = body.guided_json, "guided_json"
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise ApiError(400, 'response_format type "json_schema" needs json_schema: {"name": ..., '
                                    '"schema": {...}}', param="response_format")
            schema, param = fmt.json_schema.schema_, "response_format.json_schema.schema"
        else:  # json_object: one string field as long as max_tokens
            schema, param = JSON_OBJECT, "response_format"
            layout = replace(LAYOUT, string_tokens=opts.max_new_tokens)
        schema = narrow(schema, param)
        need, masks = self.layout_tokens(schema, layout, param)
        self.fits(prompts, need, masks, "the JSON layout", param.split(".")[0])
        fill = self.fill_options(overrides, masks)

        def row(lm: DiffusionLM, prompt: str, seed: int | None, check: Callable[..., None]) -> Answer:
            return Answer(generate_json_text(lm, schema, layout, prompt=prompt, seed=seed, callback=check, **fill))

        return Plan("json", prompts, opts.num_samples, opts.seed, row)

    def _regex(self, pattern: str, prompts: list[str], overrides: dict[str, Any], n: int,
               seed: int | None) -> Plan:
        self.no_ar("guided_regex", "guided_regex")
        try:
            slots = len(compile_slots(pattern))
        except ValueError as e:
            raise ApiError(400, f"guided_regex: {e}", param="guided_regex", code="unsupported_pattern") from e
        self.fits(prompts, slots, slots, "the pattern", "guided_regex")
        fill = self.fill_options(overrides, slots)

        def row(lm: DiffusionLM, prompt: str, seed: int | None, check: Callable[..., None]) -> Answer:
            return Answer(fill_pattern(lm, prompt, pattern, "", seed=seed, callback=check, **fill))

        return Plan("regex", prompts, n, seed, row)

    def _choice(self, choices: list[str], prompts: list[str], opts: GenerationConfig, n: int,
                seed: int | None) -> Plan:
        if not choices or len(choices) > MAX_CHOICES or not all(choices):
            raise ApiError(400, f"guided_choice takes 1 to {MAX_CHOICES} non-empty strings", param="guided_choice")
        tok = self.lm.tokenizer
        encoded = [tok.encode(c) for c in choices]
        longest = max(map(len, encoded))
        self.fits(prompts, longest, longest, "the longest choice", "guided_choice")
        process = getattr(getattr(self.lm.config, "process", None), "process", "masked")
        if not self.lm.is_causal and process != "masked":
            raise ApiError(400, f"guided_choice scores choices by likelihood, which needs a masked-diffusion or AR "
                                f"model, not a {process!r} model", param="guided_choice")
        temperature = opts.temperature

        def row(lm: DiffusionLM, prompt: str, seed: int | None, check: Callable[..., None]) -> Answer:
            ids = lm.tokenizer.encode(prompt)
            scores = []
            for e in encoded:
                check()
                scores.append(conditional_loglik(lm, ids, e, n_samples=CHOICE_SAMPLES, seed=seed or 0).nats)
            return Answer(choices[pick(torch.tensor(scores, dtype=torch.float64), temperature, seed)])

        return Plan("choice", prompts, n, seed, row)

    def _tools(self, body: ChatRequest, prompts: list[str], overrides: dict[str, Any],
               opts: GenerationConfig) -> Plan:
        self.no_ar("tools", "tools")
        tools = body.tools or []
        choice = body.tool_choice or "auto"
        if not isinstance(choice, str):
            tools = [t for t in tools if t.function.name == choice.function.name]
        schemas, need, masks = {}, 0, 0
        for i, t in enumerate(body.tools or []):
            args = narrow(arguments_schema(t), f"tools[{i}].function.parameters")
            call = {"type": "object", "properties": {"name": {"const": t.function.name}, "arguments": args},
                    "required": ["name", "arguments"], "additionalProperties": False}
            _, n_masks = self.layout_tokens(args, LAYOUT, f"tools[{i}].function.parameters")
            full, _ = self.layout_tokens(call, LAYOUT, f"tools[{i}].function.parameters")
            schemas[t.function.name] = call
            if t in tools:
                need, masks = max(need, full), max(masks, n_masks)
        self.fits(prompts, need, masks, "the tool call", "tools")
        fill = self.fill_options(overrides, masks)
        auto, chosen = choice == "auto", [t.function.name for t in tools]
        temperature, stop = opts.temperature, body.stop

        def row(lm: DiffusionLM, prompt: str, seed: int | None, check: Callable[..., None]) -> Answer:
            if auto and not self.wants_call(lm, prompt, temperature, seed):
                text = lm.generate(prompt, config=opts.replace(num_samples=1, seed=seed), callback=check)
                return Answer(cut_at_stop(text, stop_list(stop))[0])
            name = chosen[0]
            if len(chosen) > 1:  # the name by likelihood, right after the call's opening
                name = json.loads(generate_json_text(lm, {"enum": chosen}, prompt=prompt + CALL_OPEN,
                                                     temperature=temperature, seed=seed))
            check()
            text = generate_json_text(lm, schemas[name], LAYOUT, prompt=prompt, seed=seed, callback=check, **fill)
            return Answer(None, (name, json.dumps(json.loads(text)["arguments"], ensure_ascii=False)))

        return Plan("tools", prompts, opts.num_samples, opts.seed, row)

    def wants_call(self, lm: DiffusionLM, prompt: str, temperature: float, seed: int | None) -> bool:
        """tool_choice "auto": the probability that the answer's first token opens a call (its text starts with
        `{`), from the model's logits at the first answer position with the call's length masked after the prompt.
        A call at >= 1/2 (temperature 0), else drawn with that probability."""
        if self._opens is None:
            self._opens = [i for i, t in enumerate(token_texts(lm.tokenizer)) if t.lstrip().startswith("{")]
        p = call_probability(lm, prompt, self._opens)
        if temperature > 0:
            g = torch.Generator()
            g.manual_seed(seed) if seed is not None else g.seed()
            return bool(torch.rand(1, generator=g, dtype=torch.float64).item() < p)
        return p >= 0.5


def check_tools(body: ChatRequest) -> None:
    """tool_choice without tools, a named function that is not among them, two tools of one name: 400."""
    if body.tool_choice is not None and not body.tools:
        raise ApiError(400, "tool_choice needs tools", param="tool_choice")
    names = [t.function.name for t in body.tools or ()]
    if len(set(names)) != len(names):
        raise ApiError(400, f"tools: function names must be unique, got {names}", param="tools")
    if body.tool_choice is not None and not isinstance(body.tool_choice, str) and \
            body.tool_choice.function.name not in names:
        raise ApiError(400, f"tool_choice names {body.tool_choice.function.name!r}, which is not among the tools "
                            f"{names}", param="tool_choice")


def call_probability(lm: DiffusionLM, prompt: str, opens: list[int]) -> float:
    """P(the answer after `prompt` opens with one of the tokens `opens` (text starting with `{`)), [MASK]
    excluded from the distribution."""
    tok = lm.tokenizer
    ids = tok.encode(prompt)
    canvas = torch.tensor([ids + [tok.mask_id] * len(tok.encode(CALL_OPEN))])  # (1, P + k)
    logits = lm.logits(canvas)[0, len(ids)].double()  # (V,)
    logits[tok.mask_id] = -torch.inf
    return float(logits.softmax(-1)[opens].sum()) if opens else 0.0


def pick(scores: torch.Tensor, temperature: float, seed: int | None) -> int:
    """argmax at temperature 0, else a draw from softmax(scores / temperature)."""
    if temperature <= 0:
        return int(scores.argmax())
    g = torch.Generator()
    g.manual_seed(seed) if seed is not None else g.seed()
    return int(torch.multinomial((scores / temperature).softmax(0), 1, generator=g))
