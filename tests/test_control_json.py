"""JSON from a schema: every fill of a layout parses and validates (random schemas, random and extreme fills, no
model), generation with random networks (one biased towards the characters that would break JSON) always validates,
choices follow the model's likelihood, unsupported schemas fail before any model call, and `dlm json`."""

from __future__ import annotations

import json
import math
import random

import pytest
from control_helpers import no_model, saved_model_dir, tiny
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dlm.cli import main
from dlm.control.canvas import token_texts
from dlm.control.json_schema import (
    Choice,
    Gap,
    JsonLayout,
    SchemaError,
    Slot,
    Text,
    TokenSets,
    canvas_of,
    compile_schema,
    generate_json,
    generate_json_text,
    render,
    validate,
)
from dlm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
SETS = TokenSets(token_texts(TOK), TOK.pad_id)


@pytest.fixture(scope="module")
def lm():
    return tiny()


NO_MODEL = no_model(TOK)  # any model call fails


# ----- schemas ----------------------------------------------------------------------------------------------------
KEYS = st.sampled_from(["a", "b c", 'q"uote', "back\\slash", "é", "tab\t", "x"])
BOUNDS = st.sampled_from([{}, {"minimum": 0}, {"minimum": 1}, {"minimum": 5}, {"exclusiveMinimum": 0},
                          {"maximum": 500}, {"minimum": -1000}, {"minimum": -3, "maximum": 40},
                          {"minimum": 0, "maximum": 1}, {"exclusiveMaximum": 100, "minimum": 0},
                          {"minimum": 0.5}, {"minimum": -200, "maximum": 10 ** 6}])
STRING = st.fixed_dictionaries({"type": st.just("string")},
                               optional={"maxLength": st.integers(0, 6), "minLength": st.integers(0, 3)}
                               ).filter(lambda s: s.get("maxLength", 99) >= s.get("minLength", 0))
NUMBER = st.builds(lambda kind, b: {"type": kind, **b}, st.sampled_from(["integer", "number"]), BOUNDS)
LITERAL = st.one_of(st.integers(-3, 3), st.text(max_size=3), st.booleans(), st.none(), st.floats(-2, 2))
LEAF = st.one_of(STRING, NUMBER, st.just({"type": "boolean"}), st.just({"type": "null"}),
                 st.lists(LITERAL, min_size=1, max_size=4, unique_by=json.dumps).map(lambda v: {"enum": v}),
                 LITERAL.map(lambda v: {"const": v}),
                 st.lists(st.text(max_size=3), min_size=1, max_size=3, unique=True).map(
                     lambda v: {"type": "string", "enum": v}))
SCHEMA = st.recursive(LEAF, lambda inner: st.one_of(
    st.builds(lambda props, closed: {"type": "object", "properties": props, "required": list(props)[:1],
                                     **({"additionalProperties": False} if closed else {})},
              st.dictionaries(KEYS, inner, min_size=1, max_size=3), st.booleans()),
    st.builds(lambda items, lo: {"type": "array", "items": items, "minItems": lo, "maxItems": lo + 1},
              inner, st.integers(0, 2))), max_leaves=6)


def random_fill(parts, rng: random.Random, mode: str) -> str:
    """A fill of the layout as a model might write it: random tokens, or extremes (longest, shortest)."""
    ids, starts = canvas_of(parts, TOK.encode, TOK.mask_id, {})
    chosen = {k: rng.choice(p.literals) for k, p in enumerate(parts) if isinstance(p, Choice)}
    ids, starts = canvas_of(parts, TOK.encode, TOK.mask_id, chosen)
    for p, start in zip(parts, starts, strict=True):
        for i, slot in enumerate(p.slots if isinstance(p, Gap) else ()):
            options = SETS.ids(slot)
            real = [t for t in options if t != TOK.pad_id]
            if mode == "random":
                ids[start + i] = rng.choice(options)
            elif mode == "short":  # every optional slot empty
                ids[start + i] = TOK.pad_id if slot.pad else min(real)
            else:  # "long": every slot its largest character ('9', '-', '~'), the sign slot as told
                ids[start + i] = TOK.pad_id if (mode == "long+" and slot.chars == "-") else max(real)
    return render(parts, starts, ids, chosen, SETS)


@given(SCHEMA, st.randoms(use_true_random=False))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_fill_of_a_layout_parses_and_validates(schema, rng):
    try:
        parts = compile_schema(schema)
    except SchemaError as e:  # only bounds a digit layout cannot keep (tested below) may be refused here
        assert "bounds" in str(e), e
        return
    for mode in ("random", "random", "short", "long", "long+"):
        text = random_fill(parts, rng, mode)
        assert validate(json.loads(text), schema) == [], (schema, text)


@given(st.sampled_from(["integer", "number"]),
       st.one_of(st.none(), st.integers(-10 ** 7, 10 ** 7), st.floats(-1e7, 1e7)), st.booleans(),
       st.one_of(st.none(), st.integers(-10 ** 7, 10 ** 7), st.floats(-1e7, 1e7)), st.booleans(),
       st.randoms(use_true_random=False))
@settings(max_examples=300, deadline=None)
def test_numeric_bounds_are_refused_or_always_kept(kind, lo, lo_strict, hi, hi_strict, rng):
    schema = {"type": kind}
    if lo is not None:
        schema["exclusiveMinimum" if lo_strict else "minimum"] = lo
    if hi is not None:
        schema["exclusiveMaximum" if hi_strict else "maximum"] = hi
    try:
        parts = compile_schema(schema)
    except SchemaError as e:
        assert "bounds" in str(e) or "no integer" in str(e)
        return
    for mode in ("random", "short", "long", "long+"):
        text = random_fill(parts, rng, mode)
        assert validate(json.loads(text), schema) == [], (schema, text)


def test_number_layouts():
    def slots(schema):
        return [s for p in compile_schema(schema) if isinstance(p, Gap) for s in p.slots]

    signed = slots({"type": "integer"})
    assert signed[0] == Slot("-", pad=True) and signed[1] == Slot("123456789") and len(signed) == 1 + 6
    assert all(s.chars != "-" for s in slots({"type": "integer", "minimum": 0}))
    assert slots({"type": "integer", "minimum": 5})[0].chars == "56789"
    assert len(slots({"type": "integer", "maximum": 500})) == 1 + 2  # sign, 2 digits: never above 99
    assert compile_schema({"type": "integer", "minimum": 0, "maximum": 10}) == [
        Choice("$", tuple(str(i) for i in range(11)))]
    assert compile_schema({"type": "number", "minimum": 0, "maximum": 1})[0] == Text("0.")
    number = compile_schema({"type": "number"})
    assert [type(p) for p in number] == [Gap, Text, Gap] and number[1] == Text(".")
    assert compile_schema({"type": "string", "maxLength": 12}, JsonLayout(string_tokens=4))[1].slots[0].width == 3


def test_strings_follow_min_and_max_length():
    gap = compile_schema({"type": "string", "minLength": 2, "maxLength": 5})[1]
    assert [s.pad for s in gap.slots] == [False, False, True, True, True]
    assert compile_schema({"type": "string", "maxLength": 0}) == [Text('""')]


# ----- generation -------------------------------------------------------------------------------------------------
@given(SCHEMA, st.integers(0, 3))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_generated_json_always_validates(lm, schema, seed):
    try:
        parts = compile_schema(schema)
    except SchemaError:
        assume(False)
    assume(len(canvas_of(parts, TOK.encode, TOK.mask_id, {})[0]) <= lm.max_len)
    text = generate_json_text(lm, schema, seed=seed, temperature=1.0)
    assert validate(json.loads(text), schema) == []


HOSTILE = [ord(c) for c in '"\\\n}],{:'] + [TOK.pad_id, TOK.eos_id, 0x80, 0xC3]


def test_a_model_that_loves_json_breaking_tokens_still_gives_valid_json():
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 10}, "bio": {"type": "string", "minLength": 3},
        "age": {"type": "integer", "minimum": 0}, "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 3},
        "ok": {"type": "boolean"}, "nested": {"type": "object", "properties": {"x": {"type": "integer"}},
                                              "additionalProperties": False}}}
    value = generate_json(tiny(HOSTILE), schema, seed=0)
    assert validate(value, schema) == [] and len(value["tags"]) == 3 and len(value["bio"]) >= 3
    assert list(value) == list(schema["properties"])  # keys pinned, in order


@pytest.mark.parametrize("favoured, expected", [("false", False), ("tru", True)])
def test_choices_follow_the_models_likelihood(favoured, expected):
    lm = tiny([ord(c) for c in favoured])
    assert generate_json(lm, {"type": "boolean"}) is expected
    colour = {"enum": ["red", "green", "blue"]}
    assert generate_json(tiny([ord(c) for c in '"gren']), colour) == "green"


def test_seeded_generation_is_deterministic(lm):
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 8}, "b": {"type": "boolean"},
                                               "e": {"enum": [1, 2, 3]}}}
    runs = {generate_json_text(lm, schema, seed=7, temperature=1.0) for _ in range(2)}
    assert len(runs) == 1


def test_a_prompt_is_context_before_the_value_not_part_of_it():
    schema = {"type": "object", "properties": {"c": {"enum": ["red", "green", "blue"]},
                                               "s": {"type": "string", "maxLength": 4}}}
    text = generate_json_text(tiny([ord(c) for c in '"gren']), schema, prompt="Colour: ", seed=0)
    assert text.startswith('{"c": "green", "s": "') and validate(json.loads(text), schema) == []
    with pytest.raises(SchemaError, match="context is 64"):  # prompt + layout: checked before any model call
        generate_json_text(no_model(max_len=64), schema, prompt="x" * 40)


def test_a_pinned_schema_needs_no_model():
    assert generate_json(NO_MODEL, {"type": "object", "properties": {"k": {"const": [1, "a"]}, "n": {"type": "null"},
                                                                     "s": {"type": "string", "maxLength": 0}}}) == \
        {"k": [1, "a"], "n": None, "s": ""}


def test_bpe_tokenizer(text_file):
    from dlm.tokenizer import BPETokenizer

    bpe = BPETokenizer.train([text_file.read_text()[:20000]], vocab_size=400)
    sets = TokenSets(token_texts(bpe), bpe.pad_id)
    assert any(len(sets.texts[i]) > 1 for i in sets.ids(Slot()))  # an unbounded string writes whole words
    assert all(len(sets.texts[i]) <= 2 for i in sets.ids(Slot(width=2)) if i != bpe.pad_id)
    lm = tiny(tokenizer=bpe, vocab_size=bpe.vocab_size)
    schema = {"type": "object", "properties": {"w": {"type": "string"}, "short": {"type": "string", "maxLength": 5},
                                               "n": {"type": "number"}, "i": {"type": "integer", "maximum": 999},
                                               "e": {"enum": ["alpha", "beta"]}}}
    for seed in range(2):
        assert validate(generate_json(lm, schema, seed=seed, temperature=1.0), schema) == []


# ----- refused before any model call ------------------------------------------------------------------------------
@pytest.mark.parametrize("schema, message", [
    ({"type": "string", "pattern": "^a+$"}, "cannot guarantee pattern"),
    ({"type": "string", "format": "date"}, "cannot guarantee format"),
    ({"oneOf": [{"type": "string"}, {"type": "null"}]}, "cannot guarantee oneOf"),
    ({"type": "object", "properties": {"a": {"$ref": "#/defs/a"}}}, "$.a: cannot guarantee $ref"),
    ({"type": "object", "properties": {"a": {"title": "no type"}}}, "$.a: the schema needs a `type`"),
    ({"type": "object"}, "needs `properties`"),
    ({"type": "object", "additionalProperties": True}, "needs `properties`"),
    ({"type": ["string", "null"]}, "one type per schema"),
    ({"type": "integer", "multipleOf": 5}, "multipleOf"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "array"}, "needs `items`"),
    ({"type": "integer", "minimum": 100}, "bounds"),
    ({"type": "integer", "minimum": 3, "maximum": 2}, "no integer"),
    ({"type": "object", "properties": {"a": {"type": "null"}}, "required": ["b"]}, "no schema for ['b']"),
    ({"type": "string", "enum": ["a", 1]}, "does not match"),
    ({"enum": [math.nan]}, "JSON values"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "maxLength 2 < minLength 5"),
    ({"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 20},
     "needs 400 tokens but the model's context is 256"),
])
def test_unsupported_schemas_fail_before_any_model_call(schema, message):
    with pytest.raises(SchemaError) as e:
        generate_json(NO_MODEL, schema)  # a model call would fail with AttributeError
    assert message in str(e.value)


# ----- dlm json -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, lm):
    return saved_model_dir(tmp_path_factory, lm, "json")


def test_cli_json_round_trip_and_errors(model_dir, tmp_path, capsys):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                               "rain": {"type": "boolean"}, "mm": {"type": "number"}}}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    main(["json", str(tmp_path / "s.json"), "--model", str(model_dir), "--temperature", "1"])
    assert validate(json.loads(capsys.readouterr().out), schema) == []
    (tmp_path / "bad.json").write_text('{"type": "string", "pattern": "x"}')
    for path in ("bad.json", "missing.json"):
        with pytest.raises(SystemExit) as e:
            main(["json", str(tmp_path / path), "--model", str(model_dir)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("dlm: error: ") and err.count("\n") == 1
