"""The wire format of docs/http-api.md: request bodies, their translation into GenerationConfig options and limit
checks, and the pieces of the responses (OpenAI objects, committed-prefix deltas, denoising events).

Everything here is a pure function of the request and the model's tokenizer; `app.py` wires it to the routes.

    overrides = sampling_overrides(body, OPENAI_NAMES); opts = resolve_options(lm, overrides, settings)
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dlm.config import GenerationConfig
from dlm.pipeline import GAP, DiffusionLM
from dlm.sampling import SAMPLERS, SamplingError, plan_blocks
from dlm.server.batching import StepUpdate
from dlm.server.settings import ServerSettings
from dlm.tokenizer import Tokenizer

MASK_GLYPH = "░"
GENERATION_FIELDS = frozenset(GenerationConfig.option_names())  # common fields and every sampler's own
OPENAI_NAMES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                "temperature": "temperature", "top_p": "top_p", "n": "num_samples",
                "seed": "seed"}  # request field -> GenerationConfig field (max_completion_tokens: chat's newer name)


class ApiError(Exception):
    """A response in the OpenAI error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ----- request bodies ----------------------------------------------------------------------------------------------
class _Body(BaseModel):
    # strict: "5" is not an int and true is not a number; extra fields are checked against GenerationConfig later.
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str | None = None
    stream: bool = False


class _Strict(BaseModel):
    """A nested object of a request: its fields only, of exactly their types."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False  # a last chunk with `choices: []` and the request's `usage`


class _OpenAISampling(_Body):
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored (OpenAI uses it for abuse monitoring)
    # Fields of the OpenAI API that a DLM cannot honour: accepted at their neutral value, else 400 (not_for_dlm).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None  # completions: an int; chat: a bool
    top_logprobs: int | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(populate_by_name=True)  # merged with _Strict's
    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # accepted; the answer always validates (the layout guarantees it)
    description: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Structured(_OpenAISampling):
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | None = None  # vLLM's names for the same constraints as extra body fields
    guided_regex: str | None = None
    guided_choice: list[str] | None = None


class CompletionRequest(_Structured):
    prompt: str | list[str] | list[int] | list[list[int]]  # text, texts, or token ids (one prompt or several)
    echo: bool = False  # the prompt is sent back before each completion
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None  # None: an assistant turn that only called tools
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls, sent back by the client
    tool_call_id: str | None = None  # role "tool": the call this message answers
    refusal: str | None = None  # the client echoes these keys of an answer's message back (null)
    function_call: None = None
    audio: None = None
    annotations: list[Any] | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            text = ""
        else:
            text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        for call in self.tool_calls or ():  # written as the model is asked to write a call (structured.py)
            text += ("\n" if text else "") + f'{{"name": {json.dumps(call.function.name)}, "arguments": ' \
                                              f'{call.function.arguments}}}'
        return text


class FunctionSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments (None: no arguments)
    strict: bool | None = None  # accepted; the arguments always validate


class ToolSpec(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(_Structured):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; at most one call is made per answer


class InfillRequest(_Body):
    text: str
    steps: int | None = None
    max_span: int | None = None
    temperature: float | None = None
    seed: int | None = None


class GenerateRequest(_Body):
    prompt: str
    max_tokens: int | None = None


class _Control(_Body):
    """The control endpoints: the sampling options every one of them takes (+ any GenerationConfig option)."""

    seed: int | None = None
    temperature: float | None = None
    steps: int | None = None


class CodeRequest(_Control):
    prompt: str
    constraints: dict[str, Any] = Field(default_factory=dict)  # language, function_signature, ...
    line_tokens: int | None = Field(None, ge=1)
    docstring_tokens: int | None = Field(None, ge=1)
    repair_rounds: int | None = Field(None, ge=0, le=16)


class DocumentRequest(_Control):
    template: str | None = None  # a Markdown template with {field} and [MASK] gaps
    data: dict[str, str | int | float] | None = None
    budgets: dict[str, int] | None = None
    new_headings: bool = False
    prompt: str | None = None  # or: a prompt and constraints {"format": "markdown", "sections", "max_length"}
    constraints: dict[str, Any] | None = None
    max_span: int | None = None


class AugmentRequest(_Control):
    texts: list[str] = Field(min_length=1)
    noise: float = 0.3
    n: int = 4


class PatternRequest(_Control):
    pattern: str
    before: str = ""
    after: str = ""


B = TypeVar("B", bound=_Body)
CONTROL_NAMES = {"seed": "seed", "temperature": "temperature", "steps": "steps"}
INFILL_NAMES = {"steps": "steps", "max_span": "max_span", "temperature": "temperature", "seed": "seed"}
GENERATE_NAMES = {"max_tokens": "max_new_tokens"}


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none)$|\[")  # pydantic's union-member names in an error's loc


def describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """pydantic's (or FastAPI's 422) error details -> one message and the offending top-level field."""
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body" and not _TYPE_TAG.search(str(x))]
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    if e.get("type") == "json_invalid":
        return f"the body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    if not loc:
        return "the body must be a JSON object", None
    return f"{'.'.join(loc)}: {e.get('msg', 'invalid')}{more}", loc[0]


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_unicode(data: Any) -> None:
    """ApiError 400 at the first string (value or field name) with a lone surrogate, e.g. from "a\\ud800".

    JSON may escape half of a surrogate pair alone (and json.loads decodes bytes with surrogatepass); Python keeps
    the code point, but no UTF-8 tokenizer can encode it. The walk is iterative (json.loads already bounded the
    depth) and the message never echoes the bad string back.
    """
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            m = _SURROGATE.search(value)
            if m:
                raise ApiError(400, f"{where or 'the body'}: the text holds a lone surrogate "
                                    f"U+{ord(m.group()):04X} (an escape such as \\ud800) at character {m.start()}; "
                                    "text must be valid Unicode (send a character outside the BMP as UTF-8 or as a "
                                    "full surrogate pair)",
                               param=where.split(".")[0] or None, code="invalid_unicode")
        elif isinstance(value, dict):
            for key in value:
                m = _SURROGATE.search(key)
                if m:
                    raise ApiError(400, f"a field name {'in ' + where + ' ' if where else ''}holds a lone "
                                        f"surrogate U+{ord(m.group()):04X}; field names must be valid "
                                        "Unicode", param=where.split(".")[0] or None, code="invalid_unicode")
            stack.extend((v, f"{where}.{k}" if where else k) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, f"{where}.{i}") for i, v in reversed(list(enumerate(value))))


def parse_body(raw: bytes, model: type[B]) -> B:
    """JSON bytes -> a request model. Any content type is read as JSON (`curl -d` sends form-urlencoded)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, invalid UTF-8, absurd nesting
        raise ApiError(400, f"the body is not valid JSON: {e}"[:500], code="invalid_json") from e
    check_unicode(data)  # json.loads passes "\\ud800" escapes, and UTF-8-encoded surrogates too (surrogatepass)
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}", code="invalid_request")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = describe_validation(e.errors(include_input=False))
        raise ApiError(400, message, param=param, code="invalid_request") from e


# ----- options and limits ------------------------------------------------------------------------------------------
def sampling_overrides(body: _Body, names: dict[str, str]) -> dict[str, Any]:
    """The request's GenerationConfig overrides: extra fields that name one, plus the declared fields in `names`."""
    extras = dict(body.model_extra or {})
    unknown = sorted(set(extras) - GENERATION_FIELDS)
    if unknown:
        declared = sorted(type(body).model_fields)
        raise ApiError(400, f"unknown field(s) {unknown}: this route takes {declared} and any GenerationConfig "
                            f"option ({', '.join(sorted(GENERATION_FIELDS))})", param=unknown[0])
    out = {k: v for k, v in extras.items() if v is not None}  # null means: the model's default
    given = {k: k for k in out}  # GenerationConfig field -> the request field that set it
    for name, target in names.items():
        value = getattr(body, name)
        if value is None:
            continue
        if target in out and out[target] != value:
            raise ApiError(400, f"{name}={value!r} and {given[target]}={out[target]!r} disagree; give one of them",
                           param=name)
        out[target], given[target] = value, name
    for k, v in out.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ApiError(400, f"{k} must be a finite number, got {v}", param=k)
    return out


NOT_FOR_DLM = "is not supported for diffusion models"


def _not_for_dlm(field: str, why: str) -> ApiError:
    return ApiError(400, f"{field} {NOT_FOR_DLM}: {why}", param=field, code="unsupported_parameter")


def check_openai_fields(body: _OpenAISampling) -> None:
    """The OpenAI fields that do not map onto a DLM: accepted at their neutral value, else one clear 400."""
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value is not None and not -2 <= value <= 2:
            raise ApiError(400, f"{name} must be in [-2, 2], got {value}", param=name)
        if value:
            raise _not_for_dlm(name, "it is accepted only at 0 (ignored); a DLM fills every position at once, so "
                                     "use the dlm option repetition_penalty (> 1 discourages repeated tokens)")
    wants_logprobs = body.logprobs is not None and body.logprobs is not False  # completions' 0 asks for some
    if wants_logprobs or body.top_logprobs not in (None, 0):
        raise _not_for_dlm("logprobs" if wants_logprobs else "top_logprobs",
                           "tokens are committed in any order over many denoising steps, so there is no "
                           "left-to-right log-probability per token (`dlm eval` scores a text by its ELBO)")
    if body.best_of not in (None, 1) and body.best_of != body.n:
        raise _not_for_dlm("best_of", "ranking samples needs their log-probabilities; use n for several samples")
    if body.logit_bias:
        raise _not_for_dlm("logit_bias", "this server has no per-token bias; the token controls it offers are the "
                                         "dlm options ban_eos and suppress_special")
    if isinstance(body, CompletionRequest) and body.suffix:
        raise _not_for_dlm("suffix", "on /v1/completions; a DLM fills text between a prefix and a suffix with "
                                     "/v1/infill: {\"text\": \"PREFIX[MASK]SUFFIX\"}")


def prompt_texts(tokenizer: Tokenizer, prompt: str | list[str] | list[int] | list[list[int]]) -> list[str]:
    """A completion's prompt -> its texts. Token ids are taken when they round-trip through the tokenizer (the
    pipeline encodes text, so ids it would encode differently cannot be served exactly)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt or isinstance(prompt[0], str):
        return list(prompt)  # type: ignore[arg-type]
    rows: list[list[int]] = [prompt] if isinstance(prompt[0], int) else prompt  # type: ignore[list-item,assignment]
    texts = []
    for i, ids in enumerate(rows):
        where = "the prompt" if len(rows) == 1 else f"prompt {i}"
        if not ids:
            raise ApiError(400, f"{where} is an empty list of token ids", param="prompt")
        bad = next((t for t in ids if not 0 <= t < tokenizer.vocab_size or t in tokenizer.special_ids), None)
        if bad is not None:
            raise ApiError(400, f"{where}: token id {bad} is not a text token of this model's tokenizer (ids 0.."
                                f"{tokenizer.vocab_size - 1}, special tokens excluded)", param="prompt")
        text = tokenizer.decode(ids)
        if tokenizer.encode(text) != ids:
            raise ApiError(400, f"{where}: these token ids do not round-trip through the tokenizer (decoding then "
                                "encoding them gives other ids, e.g. a split UTF-8 character); send the text",
                           param="prompt")
        texts.append(text)
    return texts


def library_check(lm: DiffusionLM, overrides: dict[str, Any]) -> GenerationConfig:
    try:
        opts = lm.options(None, **overrides)
        # Building the sampler checks the remasking rule the way that sampler reads it (dream takes "origin").
        SAMPLERS.build(opts.sampler, mask_id=lm.tokenizer.mask_id, config=opts)
    except ValueError as e:  # ConfigError (types, ranges, unknown names): the library's message says what works
        raise ApiError(400, str(e)) from e  # GenerationConfig.validate holds the seed rule too ([0, 2**63))
    return opts


def cap_value(value: int, cap: int, what: str, flag: str, param: str | None = None) -> None:
    if value > cap:
        raise ApiError(400, f"{what}={value} exceeds this server's limit of {cap} ({flag})",
                       param=param or what)


def resolve_options(lm: DiffusionLM, overrides: dict[str, Any], settings: ServerSettings) -> GenerationConfig:
    """The checkpoint's defaults + the overrides, validated as the library would, then the server's caps."""
    opts = library_check(lm, overrides)
    cap_value(opts.max_new_tokens, settings.max_tokens, "max_tokens", "--max-tokens")
    cap_value(opts.steps, settings.max_steps, "steps", "--max-steps")
    cap_value(opts.num_samples, settings.max_n, "n", "--max-n")
    try:
        plan_blocks(opts.max_new_tokens, opts.steps, opts.block_length)
    except SamplingError as e:
        raise ApiError(400, str(e)) from e
    return opts


def check_prompts(lm: DiffusionLM, prompts: list[str], opts: GenerationConfig, settings: ServerSettings) -> list[int]:
    """Every prompt non-empty, within --max-prompt-tokens and, with the generated tokens, the model's context."""
    if not prompts:
        raise ApiError(400, "prompt is an empty list: give at least one string", param="prompt")
    cap_value(len(prompts) * opts.num_samples, settings.max_n, "prompts x n", "--max-n", "n")
    counts = []
    for i, p in enumerate(prompts):
        where = "the prompt" if len(prompts) == 1 else f"prompt {i}"
        if not p:
            raise ApiError(400, f"{where} is empty: give at least one character of text", param="prompt")
        n = len(lm.tokenizer.encode(p))
        if n > settings.max_prompt_tokens:
            raise ApiError(400, f"{where} has {n} tokens; this server takes at most {settings.max_prompt_tokens} "
                                "(--max-prompt-tokens)", param="prompt")
        if n + opts.max_new_tokens > lm.max_len:
            raise ApiError(400, f"{where} ({n} tokens) + max_tokens ({opts.max_new_tokens}) exceeds the model's "
                                f"context of {lm.max_len} tokens; shorten the prompt or lower max_tokens",
                           param="prompt")
        counts.append(n)
    return counts


def check_infill(lm: DiffusionLM, text: str, overrides: dict[str, Any], settings: ServerSettings) -> int:
    """Gaps and sizes of an infill request, checked before its canvas is built -> the canvas length."""
    opts = library_check(lm, overrides)
    cap_value(opts.max_span, settings.max_tokens, "max_span", "--max-tokens")
    gaps = list(GAP.finditer(text))
    if not gaps:
        raise ApiError(400, "no gap in the text: mark each gap with [MASK] (unknown length) or [MASK:n]",
                       param="text")
    sizes = [int(m.group(1)) if m.group(1) is not None else opts.max_span for m in gaps]
    if min(sizes) < 1:
        raise ApiError(400, "a gap [MASK:n] must have n >= 1", param="text")
    cap_value(sum(sizes), settings.max_tokens, "the gaps' tokens", "--max-tokens", "text")
    ids, _, _ = lm.parse_gaps(text, opts.max_span)  # the canvas, built only now that its gaps are capped
    n = len(ids) - sum(sizes)
    if n > settings.max_prompt_tokens:
        raise ApiError(400, f"the text has {n} tokens; this server takes at most {settings.max_prompt_tokens} "
                            "(--max-prompt-tokens)", param="text")
    if n + sum(sizes) > lm.max_len:
        raise ApiError(400, f"the text ({n} tokens) and its gaps ({sum(sizes)} tokens) exceed the model's context "
                            f"of {lm.max_len} tokens", param="text")
    cap_value(overrides.get("steps") or sum(sizes), settings.max_steps, "steps", "--max-steps")
    return len(ids)


def render_chat(tokenizer: Tokenizer, messages: list[ChatMessage], system: str | None = None) -> str:
    """The tokenizer's chat template when it has one, else the plain format `dlm sft` trains on (plain_chat).
    `system`: text added to the conversation's system message (one is put first when it has none)."""
    for i, m in enumerate(messages):
        if m.content is None and not m.tool_calls:
            raise ApiError(400, f"messages.{i}: content is null; only an assistant message with tool_calls may "
                                "leave it out", param="messages")
    turns = [{"role": m.role, "content": m.text} for m in messages]
    if system:
        if turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{system}"}
        else:
            turns.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(turns)


# ----- responses ---------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the earliest stop sequence, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
    return stops


class PrefixDelta:
    """One row's committed left-to-right prefix (the generated tokens before the first mask), as text deltas.

    A diffusion model commits tokens anywhere in the block; a client of the OpenAI stream can only append, so it
    is sent the text of the longest unmasked prefix as it grows. Text that may still change is held back: a
    trailing replacement character (half a UTF-8 sequence) and, with stop sequences, the last len(stop) - 1 chars.
    """

    def __init__(self, tokenizer: Tokenizer, stops: list[str]) -> None:
        self.tok = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.sent = ""
        self.stopped = False  # a stop sequence ended the text
        self._n = -1  # length of the committed prefix last decoded: committed tokens never change

    def update(self, region: list[int]) -> str:
        """region: the row's generated token ids (masks included) -> the new text to send ('' if none)."""
        tok = self.tok
        prefix = []
        ends = {tok.mask_id, *tok.stop_ids}
        for i in region:
            if i in ends:
                break
            if i != tok.pad_id:
                prefix.append(i)
        if len(prefix) == self._n:  # the prefix did not grow: nothing new to decode
            return ""
        self._n = len(prefix)
        return self._advance(tok.decode(prefix), final=False)

    def finish(self, text: str) -> str:
        """The final text (no masks left) -> the rest to send."""
        return self._advance(text, final=True)

    def _advance(self, text: str, final: bool) -> str:
        if self.stopped:
            return ""
        text, self.stopped = cut_at_stop(text, self.stops)
        if not final and not self.stopped:
            text = text.rstrip("\ufffd")
            text = text[: max(len(self.sent), len(text) - self.hold)]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""  # nothing new (or a re-decoded prefix changed: a stream cannot take text back)
        delta, self.sent = text[len(self.sent):], text
        return delta


def finish_text(text: str, eos: bool, stops: list[str]) -> tuple[str, str]:
    """-> (text cut at the first stop sequence, finish_reason): "stop" after [EOS] or a stop sequence."""
    text, stopped = cut_at_stop(text, stops)
    return text, ("stop" if eos or stopped else "length")


class CanvasView:
    """Denoising events of docs/http-api.md: the canvas decoded token by token, masks shown as MASK_GLYPH."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self._pieces: dict[int, str] = {tokenizer.mask_id: MASK_GLYPH}

    def piece(self, i: int) -> str:
        if i not in self._pieces:
            self._pieces[i] = self.tok.decode([i])
        return self._pieces[i]

    def step(self, update: StepUpdate, row: int = 0) -> dict[str, Any]:
        ids = update.xt[row, update.start:].tolist()
        committed = update.committed[row, update.start:]
        scores = update.confidence[row, update.start:][committed].tolist()
        return {"type": "step", "step": update.step, "block": update.block, "tokens": [self.piece(i) for i in ids],
                "masked": [i == self.tok.mask_id for i in ids], "committed": committed.nonzero().flatten().tolist(),
                "confidence": [round(c, 4) if math.isfinite(c) else None for c in scores]}
