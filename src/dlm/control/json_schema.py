"""JSON from a schema: keys, braces, commas, colons and quotes pinned; values generated under per-type constraints.

A schema compiles to a layout of parts: pinned `Text` (`{"name": "`), value `Gap`s whose every canvas position
(`Slot`) has a set of allowed tokens (an `AllowedTokens` processor built from `token_texts`, so byte and BPE
tokenizers work alike), and `Choice`s (enum, boolean, small integer ranges) decided by the model's likelihood of
each literal in place. Every fill of a layout, with [PAD]s dropped, is JSON that parses and validates against the
schema, so the result always does (it is checked once more before it is returned). A schema feature a layout
cannot guarantee (pattern, format, oneOf, $ref, ...) is an error before any model call; `SUPPORTED` says what is.

Layouts (slot by slot; `|PAD` marks a slot that may vanish):
    string     "  [any JSON-safe token|PAD] x n  "     n = maxLength (capped by string_tokens), no PAD in the first
                                                       minLength slots; with maxLength a token is <= maxLength // n
                                                       chars; JSON-safe: no quote, backslash or control character
    integer    [-|PAD] [1-9] [0-9|PAD] x (a - 1)       a = integer_digits, fewer if maximum asks; no sign slot if
                                                       minimum asks; the leading digit is never 0 (so 0 itself is
                                                       not produced: use a range or enum when 0 matters)
    number     integer layout . [0-9] [0-9|PAD] x (b - 1)   b = fraction_digits; "0." then digits when only [0, 1)
                                                       fits the bounds
    range      an integer with both bounds and <= range_choices values: a Choice among the literals
    enum, boolean: a Choice; const, null and one-value enums: pinned text

    value = generate_json(lm, {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                             "age": {"type": "integer", "minimum": 0}}}, seed=0)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch

from dlm.control.canvas import fill_canvas, token_texts
from dlm.sampling import SamplingError
from dlm.sampling.processors import AllowedTokens

if TYPE_CHECKING:
    from dlm.pipeline import DiffusionLM


class SchemaError(SamplingError):
    """A schema the layout cannot express, or one that is malformed; raised before any model call."""


SUPPORTED = ("supported: type object (properties, required, additionalProperties), array (items, minItems, "
             "maxItems), string (minLength, maxLength), integer and number (minimum, maximum, exclusiveMinimum, "
             "exclusiveMaximum, as far as a digit layout guarantees them), boolean, null; enum and const on any of "
             "them; title, description, default, examples, $schema, $id and $comment are ignored")
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment"})
BOUNDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
KEYWORDS: dict[str, frozenset[str]] = {
    "object": frozenset({"properties", "required", "additionalProperties"}),
    "array": frozenset({"items", "minItems", "maxItems"}),
    "string": frozenset({"minLength", "maxLength"}),
    "integer": BOUNDS,
    "number": BOUNDS,
    "boolean": frozenset(),
    "null": frozenset(),
}
DIGITS = "0123456789"


@dataclass(frozen=True)
class JsonLayout:
    """Sizes of the value gaps, in tokens, where the schema does not fix them."""

    string_tokens: int = 16  # a string gap's length (maxLength, when smaller, wins; minLength, when larger)
    integer_digits: int = 6  # digit slots of an integer and of a number's integer part
    fraction_digits: int = 2  # digit slots after a number's '.'
    array_items: int = 2  # items of an array, clamped to [minItems, maxItems]
    range_choices: int = 64  # an integer range with at most this many values is chosen among its literals


@dataclass(frozen=True)
class Slot:
    """What one canvas position may hold: a single character from `chars`, or (chars None) any token whose text is
    safe inside a JSON string and at most `width` characters long; `pad`: [PAD] too (the slot may vanish)."""

    chars: str | None = None
    width: int | None = None
    pad: bool = False


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Gap:
    path: str
    slots: tuple[Slot, ...]


@dataclass(frozen=True)
class Choice:
    path: str
    literals: tuple[str, ...]


Part = Text | Gap | Choice

MAX_DEPTH = 64  # nesting of objects and arrays; deeper schemas are refused (a layout that deep fits no context)
MAX_LAYOUT = 1 << 17  # canvas positions of any layout: the longest contexts (128k tokens) hold no more


class _Parts(list):
    """The parts of a layout as they are compiled, with a running lower bound on the canvas tokens they need: one
    per Gap slot and Choice, and a Text's characters over the most characters any token holds. Going past `stop`
    ends the compilation at once, so minLength / minItems of 1e9 fail in microseconds; a layout that is merely too
    long for the context is built (cheaply) and refused with its exact length by generate_json_text."""

    def __init__(self, stop: int, chars_per_token: int, context: int | None) -> None:
        super().__init__()
        self.stop, self.chars_per_token, self.context = stop, max(1, chars_per_token), context
        self.positions, self.chars = 0, 0

    def tokens(self) -> float:
        return self.positions + self.chars / self.chars_per_token

    def need(self, n: int, path: str) -> None:
        """Refuse before building `n` more positions at `path` when they cannot fit."""
        if self.tokens() + n > self.stop:
            where = f"but the model's context is {self.context}" if self.context else "(the most a layout holds)"
            raise SchemaError(f"{path}: the JSON layout needs more than {self.stop} tokens {where}; lower "
                              "minLength / maxLength / minItems / maxItems or the layout's string_tokens / array_items")

    def append(self, p: Part) -> None:  # type: ignore[override]
        if isinstance(p, Text):
            self.chars += len(p.text)
        else:
            self.positions += len(p.slots) if isinstance(p, Gap) else 1
        self.need(0, getattr(p, "path", "$"))
        super().append(p)

    def __iadd__(self, parts):  # type: ignore[override]
        for p in parts:
            self.append(p)
        return self


# ----- schema -> layout -----------------------------------------------------------------------------------------

def compile_schema(schema: Any, layout: JsonLayout | None = None, max_tokens: int | None = None,
                   chars_per_token: int = 1) -> list[Part]:
    """A JSON schema -> the parts of its layout (pinned text merged). Raises SchemaError naming the path.

    `max_tokens` (the model's context) bounds the layout while it is built (at 16 times it, so a layout only a little
    too long still gets its exact length); `chars_per_token`, the most characters of any token, makes the count of
    pinned text a lower bound for that tokenizer."""
    parts = _Parts(MAX_LAYOUT, 1, None) if max_tokens is None else \
        _Parts(min(MAX_LAYOUT, 16 * max_tokens), chars_per_token, max_tokens)
    _compile(schema, "$", layout or JsonLayout(), parts)
    merged: list[Part] = []
    for p in parts:
        if isinstance(p, Text) and merged and isinstance(merged[-1], Text):
            merged[-1] = Text(merged[-1].text + p.text)
        elif not (isinstance(p, Text) and not p.text):
            merged.append(p)
    return merged


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def _count(s: dict, key: str, path: str, default: int | None = None) -> int | None:
    v = s.get(key, default)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
        raise SchemaError(f"{path}: {key} must be a non-negative integer, got {v!r}")
    return v


def _check_keywords(s: Any, path: str) -> str | None:
    """The schema's type (None for a bare enum / const); an error for anything the layout cannot guarantee."""
    if not isinstance(s, dict):
        raise SchemaError(f"{path}: a schema must be a JSON object, got {s!r}")
    kind = s.get("type")
    if kind is not None and (not isinstance(kind, str) or kind not in KEYWORDS):
        raise SchemaError(f"{path}: type {kind!r} is not supported (one type per schema); {SUPPORTED}")
    unknown = sorted(set(s) - ANNOTATIONS - {"type", "enum", "const"} - KEYWORDS.get(kind, frozenset()))
    if unknown:
        where = f" on type {kind}" if kind else ""
        raise SchemaError(f"{path}: cannot guarantee {', '.join(unknown)}{where}; {SUPPORTED}")
    if kind is None and not ({"enum", "const"} & s.keys()):
        raise SchemaError(f"{path}: the schema needs a `type` (or an enum / const); {SUPPORTED}")
    return kind


def _compile(s: Any, path: str, layout: JsonLayout, out: _Parts, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise SchemaError(f"{path[:60]}...: the schema nests deeper than {MAX_DEPTH} levels, which no layout fits")
    kind = _check_keywords(s, path)
    if "const" in s or "enum" in s:
        values = [s["const"]] if "const" in s else s["enum"]
        if not isinstance(values, list) or not values:
            raise SchemaError(f"{path}: enum must be a non-empty list")
        try:
            literals = tuple(dict.fromkeys(_dumps(v) for v in values))
        except (TypeError, ValueError) as e:  # NaN, infinity, a non-JSON object
            raise SchemaError(f"{path}: enum / const values must be JSON values ({e})") from e
        rest = {k: v for k, v in s.items() if k not in ("enum", "const")}
        for v in values:
            if validate(v, rest, path):
                raise SchemaError(f"{path}: enum / const value {_dumps(v)} does not match the rest of the schema")
        out.append(Text(literals[0]) if len(literals) == 1 else Choice(path, literals))
    elif kind == "object":
        _object(s, path, layout, out, depth)
    elif kind == "array":
        items = s.get("items")
        if not isinstance(items, dict):
            raise SchemaError(f"{path}: an array needs `items`, one schema for every item; {SUPPORTED}")
        lo, hi = _count(s, "minItems", path, 0), _count(s, "maxItems", path)
        if hi is not None and hi < lo:
            raise SchemaError(f"{path}: maxItems {hi} < minItems {lo}")
        n = max(lo, layout.array_items) if hi is None else min(max(lo, layout.array_items), hi)
        out.append(Text("["))
        for i in range(n):
            out.append(Text(", " if i else ""))
            _compile(items, f"{path}[{i}]", layout, out, depth + 1)
        out.append(Text("]"))
    elif kind == "string":
        out += [Text('"'), *_string(s, path, layout, out), Text('"')]
    elif kind in ("integer", "number"):
        out += _number(s, path, layout, integer=kind == "integer")
    elif kind == "boolean":
        out.append(Choice(path, ("true", "false")))
    else:  # null
        out.append(Text("null"))


def _object(s: dict, path: str, layout: JsonLayout, out: _Parts, depth: int) -> None:
    props = s.get("properties", {})
    if not isinstance(props, dict):
        raise SchemaError(f"{path}: properties must be an object of schemas")
    extra = s.get("additionalProperties", True)
    if not isinstance(extra, bool):
        raise SchemaError(f"{path}: additionalProperties must be true or false (extra keys are never generated)")
    if not props and extra:
        raise SchemaError(f"{path}: an object needs `properties` to generate (additionalProperties without "
                          f"properties is open-ended; use additionalProperties: false for {{}}); {SUPPORTED}")
    if not all(isinstance(k, str) for k in props):
        raise SchemaError(f"{path}: property names must be strings")
    required = s.get("required", [])
    missing = [k for k in required if k not in props] if isinstance(required, list) else None
    if missing is None or missing:
        raise SchemaError(f"{path}: required must list keys of properties; no schema for {missing or required!r}")
    out.append(Text("{"))
    for i, (key, sub) in enumerate(props.items()):
        out.append(Text((", " if i else "") + _dumps(key) + ": "))
        _compile(sub, f"{path}.{key}", layout, out, depth + 1)
    out.append(Text("}"))


def _string(s: dict, path: str, layout: JsonLayout, out: _Parts) -> list[Part]:
    lo, hi = _count(s, "minLength", path, 0), _count(s, "maxLength", path)
    if hi is not None and hi < lo:
        raise SchemaError(f"{path}: maxLength {hi} < minLength {lo}")
    n = max(lo, layout.string_tokens if hi is None else min(hi, layout.string_tokens))
    out.need(n, path)  # before n slots are built
    if n == 0:
        return []
    width = None if hi is None else hi // n  # n tokens of <= width chars each stay within maxLength
    # Every token has >= 1 character, so no [PAD] in the first minLength slots gives >= minLength characters.
    return [Gap(path, tuple(Slot(width=width, pad=i >= lo) for i in range(n)))]


# ----- numbers ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Bound:
    value: Fraction | None = None
    strict: bool = False

    def below(self, x: Fraction) -> bool:  # x satisfies this as an upper bound
        return self.value is None or (x < self.value if self.strict else x <= self.value)

    def above(self, x: Fraction) -> bool:  # x satisfies this as a lower bound
        return self.value is None or (x > self.value if self.strict else x >= self.value)


def _bound(s: dict, inclusive: str, exclusive: str, path: str, upper: bool) -> _Bound:
    found = []
    for key, strict in ((inclusive, False), (exclusive, True)):
        v = s.get(key)
        if v is None:
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise SchemaError(f"{path}: {key} must be a finite number, got {v!r}")
        found.append(_Bound(Fraction(v), strict))
    if not found:
        return _Bound()
    # The tighter of the two: the smaller upper / larger lower bound; on a tie the strict one.
    return sorted(found, key=lambda b: (b.value if upper else -b.value, not b.strict))[0]


def _number(s: dict, path: str, layout: JsonLayout, integer: bool) -> list[Part]:
    lo = _bound(s, "minimum", "exclusiveMinimum", path, upper=False)
    hi = _bound(s, "maximum", "exclusiveMaximum", path, upper=True)
    if integer and lo.value is not None and hi.value is not None:
        first = math.floor(lo.value) + 1 if lo.strict or lo.value != math.floor(lo.value) else int(lo.value)
        last = math.ceil(hi.value) - 1 if hi.strict or hi.value != math.ceil(hi.value) else int(hi.value)
        if last < first:
            raise SchemaError(f"{path}: no integer lies within the bounds")
        if last - first + 1 <= layout.range_choices:
            return [Choice(path, tuple(str(v) for v in range(first, last + 1)))]
    b = 0 if integer else layout.fraction_digits
    if not integer and b < 1:
        raise SchemaError(f"{path}: a number needs fraction_digits >= 1")

    def top(a: int) -> Fraction:  # the largest fill with a integer digits: 99..9.99..9
        return Fraction(10 ** a) - Fraction(1, 10 ** b)

    fraction = [Text("."), Gap(path, (Slot(DIGITS), *[Slot(DIGITS, pad=True)] * (b - 1)))] if b else []
    fits = [a for a in range(1, layout.integer_digits + 1) if hi.below(top(a))]
    signed = [a for a in fits if lo.above(-top(a))]
    lead = next((d for d in range(1, 10) if lo.above(Fraction(d))), None)
    if signed or (fits and lead is not None):
        a = max(signed or fits)
        lead_digits = DIGITS[1:] if signed else DIGITS[lead:]
        slots = [Slot("-", pad=True)] if signed else []
        slots += [Slot(lead_digits), *[Slot(DIGITS, pad=True)] * (a - 1)]
        return [Gap(path, tuple(slots)), *fraction]
    # Only [0, 1) fits: "0." then the fraction digits (with a sign slot where negatives fit too).
    if not integer and hi.below(top(0)) and lo.above(Fraction(0)):
        sign = [Gap(path, (Slot("-", pad=True),))] if lo.above(-top(0)) else []
        return [*sign, Text("0"), *fraction]
    raise SchemaError(f"{path}: a {'integer' if integer else 'number'} layout of at most {layout.integer_digits} "
                      f"digits cannot stay within these bounds (a range of <= {layout.range_choices} integers is "
                      "chosen among its values; a lower bound must be <= 9 or leave room for negative values)")


# ----- validation (the subset compile_schema supports) ---------------------------------------------------------

TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _same(a: Any, b: Any) -> bool:  # JSON equality (True is not 1)
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def validate(value: Any, schema: dict, path: str = "$") -> list[str]:
    """The ways `value` breaks `schema` (empty: it validates), for the keywords compile_schema supports."""
    errors: list[str] = []
    if "const" in schema and not _same(value, schema["const"]):
        errors.append(f"{path}: {_dumps(value)} is not the const {_dumps(schema['const'])}")
    if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
        errors.append(f"{path}: {_dumps(value)} is not one of the enum")
    kind = schema.get("type")
    if kind is None:
        return errors
    if not TYPES[kind](value):
        return [*errors, f"{path}: {_dumps(value)} is not of type {kind}"]
    if kind == "object":
        props = schema.get("properties", {})
        errors += [f"{path}: missing required key {k!r}" for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties", True) is False:
            errors += [f"{path}: unexpected key {k!r}" for k in value if k not in props]
        for k, sub in props.items():
            if k in value:
                errors += validate(value[k], sub, f"{path}.{k}")
    elif kind == "array":
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            errors.append(f"{path}: {len(value)} items, outside [minItems, maxItems]")
        for i, item in enumerate(value):
            errors += validate(item, schema.get("items", {}), f"{path}[{i}]")
    elif kind == "string":
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            errors.append(f"{path}: length {len(value)} outside [minLength, maxLength]")
    elif kind in ("integer", "number"):
        checks = (("minimum", lambda b: value >= b), ("maximum", lambda b: value <= b),
                  ("exclusiveMinimum", lambda b: value > b), ("exclusiveMaximum", lambda b: value < b))
        errors += [f"{path}: {value} breaks {k} {schema[k]}" for k, ok in checks if k in schema and not ok(schema[k])]
    return errors


# ----- tokens ---------------------------------------------------------------------------------------------------

def _json_safe(text: str) -> bool:
    """Text that may stand unescaped inside a JSON string."""
    return bool(text) and all(c not in '"\\' and ord(c) >= 0x20 and c not in "\x7f\ufffd" for c in text)


class TokenSets:
    """The token ids each kind of Slot allows, from the text of every token (`token_texts`)."""

    def __init__(self, texts: list[str], pad_id: int) -> None:
        self.texts = texts
        self.pad_id = pad_id
        self._safe = [i for i, t in enumerate(texts) if _json_safe(t)]
        self._cache: dict[Slot, list[int]] = {}

    def ids(self, slot: Slot) -> list[int]:
        if slot not in self._cache:
            if slot.chars is not None:
                ids = [i for i, t in enumerate(self.texts) if len(t) == 1 and t in slot.chars]
            else:
                ids = [i for i in self._safe if slot.width is None or len(self.texts[i]) <= slot.width]
            if not ids:
                what = f"single-character tokens for {slot.chars!r}" if slot.chars else "JSON-safe string tokens"
                raise SchemaError(f"the tokenizer has no {what}; this layout cannot be generated with it")
            self._cache[slot] = ids + ([self.pad_id] if slot.pad else [])
        return self._cache[slot]


# ----- generation -----------------------------------------------------------------------------------------------

def canvas_of(parts: list[Part], encode: Any, mask_id: int, chosen: dict[int, str]) -> tuple[list[int], list[int]]:
    """The canvas ids and where each part starts; an unchosen Choice is masks as long as its longest literal."""
    ids: list[int] = []
    starts = []
    for k, p in enumerate(parts):
        starts.append(len(ids))
        if isinstance(p, Text):
            ids += encode(p.text)
        elif isinstance(p, Gap):
            ids += [mask_id] * len(p.slots)
        elif k in chosen:
            ids += encode(chosen[k])
        else:
            ids += [mask_id] * max(len(encode(lit)) for lit in p.literals)
    return ids, starts


def _choose(lm: DiffusionLM, parts: list[Part], temperature: float, generator: torch.Generator) -> dict[int, str]:
    """Decide every Choice in order by the model's log-likelihood of each literal at its place.

    A literal's score is sum_i log p(token_i) with its slot masked (one forward per distinct literal length;
    the not yet generated values masked too, the choices made so far pinned). Greedy at temperature 0, else a
    draw from softmax(score / temperature).
    """
    tok = lm.tokenizer
    chosen: dict[int, str] = {}
    for k, p in enumerate(parts):
        if not isinstance(p, Choice):
            continue
        encoded = [tok.encode(lit) for lit in p.literals]
        scores = torch.empty(len(p.literals), dtype=torch.float64)
        for n in sorted({len(e) for e in encoded}):
            trial = [*parts[:k], Gap(p.path, (Slot(),) * n), *parts[k + 1:]]  # this choice's slot: n masks
            ids, starts = canvas_of(trial, tok.encode, tok.mask_id, chosen)
            at = starts[k]
            logp = lm.logits(torch.tensor([ids]))[0, at: at + n].double().log_softmax(-1)  # (n, V)
            for j, e in enumerate(encoded):
                if len(e) == n:
                    scores[j] = logp[torch.arange(n), torch.tensor(e)].sum()
        if temperature > 0:
            j = int(torch.multinomial((scores / temperature).softmax(0), 1, generator=generator))
        else:
            j = int(scores.argmax())
        chosen[k] = p.literals[j]
    return chosen


def generate_json_text(lm: DiffusionLM, schema: dict, layout: JsonLayout | None = None, prompt: str = "",
                       **options: Any) -> str:
    """The JSON text of a value generated to `schema` (every GenerationConfig option is accepted, e.g. seed,
    temperature, steps). The text always parses with json.loads and validates against the schema. `prompt`: fixed
    text before the value on the canvas (the model conditions on it; it is not part of the result)."""
    tok = lm.tokenizer
    texts = token_texts(tok)
    parts = compile_schema(schema, layout, max_tokens=lm.max_len, chars_per_token=max(map(len, texts), default=1))
    if prompt:
        parts = [Text(prompt), *parts]  # its own part (encoded alone), dropped from the rendered result below
    sets = TokenSets(texts, tok.pad_id)
    for p in parts:  # a tokenizer without the tokens a slot needs: an error before any model call
        for slot in p.slots if isinstance(p, Gap) else ():
            sets.ids(slot)
    longest, _ = canvas_of(parts, tok.encode, tok.mask_id, {})  # choices at their longest literal
    if len(longest) > lm.max_len:
        raise SchemaError(f"the JSON layout needs {len(longest)} tokens but the model's context is {lm.max_len}; "
                          "lower maxLength / maxItems or the layout's string_tokens / array_items")
    if getattr(lm, "is_causal", False):
        raise SchemaError("this checkpoint is an autoregressive baseline; it cannot fill a JSON layout")
    chosen: dict[int, str] = {}
    if any(isinstance(p, Choice) for p in parts):
        opts = lm.options(None, **{k: v for k, v in options.items() if k in ("temperature", "seed")})
        generator = torch.Generator()
        if opts.seed is not None:
            generator.manual_seed(opts.seed)
        else:
            generator.seed()
        chosen = _choose(lm, parts, opts.temperature, generator)
    ids, starts = canvas_of(parts, tok.encode, tok.mask_id, chosen)
    canvas = torch.tensor([ids], dtype=torch.long)
    if any(isinstance(p, Gap) for p in parts):
        where: dict[Slot, torch.Tensor] = {}
        for p, start in zip(parts, starts, strict=True):
            for i, slot in enumerate(p.slots if isinstance(p, Gap) else ()):
                where.setdefault(slot, torch.zeros(1, len(ids), dtype=torch.bool))[0, start + i] = True
        processors = [AllowedTokens(sets.ids(slot), where=w) for slot, w in where.items()]
        canvas = fill_canvas(lm, canvas, processors=processors, **options)
    text = render(parts, starts, canvas[0].tolist(), chosen, sets)[len(prompt):]
    errors = validate(json.loads(text), schema)
    if errors:  # cannot happen for a supported schema: every fill of the layout validates
        raise RuntimeError(f"generated JSON breaks the schema ({'; '.join(errors)}): {text}")
    return text


def render(parts: list[Part], starts: list[int], ids: list[int], chosen: dict[int, str], sets: TokenSets) -> str:
    """The text of a filled canvas: pinned text as written, each gap's tokens' texts with [PAD]s dropped."""
    out = []
    for k, (p, start) in enumerate(zip(parts, starts, strict=True)):
        if isinstance(p, Text):
            out.append(p.text)
        elif isinstance(p, Choice):
            out.append(chosen[k])
        else:
            out += [sets.texts[i] for i in ids[start: start + len(p.slots)] if i != sets.pad_id]
    return "".join(out)


def generate_json(lm: DiffusionLM, schema: dict, layout: JsonLayout | None = None, prompt: str = "",
                  **options: Any) -> Any:
    """A value generated to `schema` (a dict for an object schema) after `prompt`; it always validates against the
    schema. `generate_json_text` gives the text itself."""
    return json.loads(generate_json_text(lm, schema, layout, prompt, **options))
