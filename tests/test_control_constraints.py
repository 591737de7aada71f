"""Constraints that hold by construction (pattern gaps, pinned code skeletons), validators, and repair that
re-masks only the failing region. The guarantees are checked with random networks: they must hold whatever the
model writes."""

from __future__ import annotations

import ast
import re

import pytest
import torch
from control_helpers import no_model, tiny
from hypothesis import given, settings
from hypothesis import strategies as st

from dlm.control import repair as repair_mod
from dlm.control.code import check_constraints, generate_with_constraints
from dlm.control.constraints import PatternGap, compile_slots, fill_pattern
from dlm.control.repair import failing_positions, render, repair
from dlm.control.validators import Contains, HasDocstring, MaxLines, PythonParses
from dlm.sampling import SamplingError
from dlm.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def lm():
    return tiny()


# ----- pattern gaps -----------------------------------------------------------------------------------------------
def test_pattern_slots():
    assert len(compile_slots(r"\d{4}-\d{2}-\d{2}")) == 10
    slots = compile_slots(r"[A-Z]\d{1,3}")
    assert [s.optional for s in slots] == [False, False, True, True]
    assert slots[0].accepts("Q") and not slots[0].accepts("q") and slots[1].accepts("7")
    assert compile_slots(r"[^a-z]")[0].accepts("A") and not compile_slots(r"[^a-z]")[0].accepts("b")


@pytest.mark.parametrize("pattern, reason", [(r"\d+", "unbounded"), (r"a*", "unbounded"), (r"(ab){2}", "not supported"),
                                             (r"ab|cd", "not supported"), (r"[", "not a valid")])
def test_patterns_without_a_fixed_layout_are_refused(pattern, reason):
    with pytest.raises(ValueError, match=reason):
        PatternGap(pattern)


@settings(max_examples=12, deadline=None)
@given(pattern=st.sampled_from([r"\d{4}-\d{2}-\d{2}", r"[A-Z][a-z]{2,8}", r"\d{1,3}", r"[a-f0-9]{8}",
                                r"\w{3}\s\w{2}", r"x?y{0,2}z"]), seed=st.integers(0, 10_000))
def test_pattern_fills_always_match(lm, pattern, seed):
    value = fill_pattern(lm, "The code is ", pattern, ".\n", seed=seed, temperature=1.0)
    assert re.fullmatch(pattern, value), (pattern, value)


# ----- validators -----------------------------------------------------------------------------------------------
def test_validators_name_the_failing_span():
    code = "def f(x):\n    y = (x +\n    return y\n"
    failure = PythonParses()(code)
    assert failure is not None and "line" in failure.message
    assert code[failure.start:failure.end].strip() in {"y = (x +", "return y", "y = (x +\n    return y"}
    assert PythonParses()("def f(x):\n    return x\n") is None
    long = "a = 1\nb = 2\nc = 3\n"
    f = MaxLines(2)(long)
    assert f is not None and long[f.start:f.end] == "c = 3\n"
    assert MaxLines(3)(long) is None
    assert HasDocstring()('def f():\n    """doc"""\n') is None
    assert HasDocstring()("def f():\n    pass\n") is not None
    assert Contains("def f")("def f(): pass") is None and Contains("def g")("def f(): pass") is not None


def test_failing_positions_are_the_tokens_of_the_span():
    tok = ByteTokenizer()
    text = "ab\ncd\nef"
    ids = tok.encode(text)
    rendered, spans = render(tok, ids)
    assert rendered == text and spans[3] == (3, 4)
    failure = PythonParses.__new__(PythonParses)  # any validator's Failure will do
    from dlm.control.validators import Failure

    failure = Failure("x", 3, 5)  # "cd"
    assert failing_positions(failure, text, spans, [True] * len(ids)) == [3, 4]
    # Nothing editable in the span: widened line by line to the nearest editable tokens.
    editable = [True, True, False, False, False, False, False, False]
    assert failing_positions(failure, text, spans, editable) == [0, 1]


def test_repair_remasks_only_the_failing_line(lm, monkeypatch):
    tok = lm.tokenizer
    pinned_head, bad, pinned_tail = "def f(x):\n    ", "y = ((((", "\n    return x\n"
    ids = tok.encode(pinned_head + bad + pinned_tail)
    editable = torch.zeros(len(ids), dtype=torch.bool)
    lo = len(tok.encode(pinned_head))
    editable[lo: lo + len(bad)] = True
    seen = []
    real_fill = repair_mod.fill_canvas

    def spy(lm_, canvas, *a, **kw):
        seen.append((canvas[0] == tok.mask_id).nonzero().flatten().tolist())
        return real_fill(lm_, canvas, *a, **kw)

    monkeypatch.setattr(repair_mod, "fill_canvas", spy)
    out, report = repair(lm, torch.tensor(ids), editable, (0, len(ids)), [PythonParses()], rounds=2, seed=0)
    assert report.valid_before is False and report.rounds >= 1
    assert seen[0] == list(range(lo, lo + len(bad)))  # exactly the editable tokens of the failing line
    assert report.remasked[0] == seen[0]
    assert torch.equal(out[~editable], torch.tensor(ids)[~editable])  # pinned text never changes


# ----- code under constraints ---------------------------------------------------------------------------------------
CONSTRAINTS = {"language": "python", "function_signature": "def process_data(df: list) -> list:",
               "includes_docstring": True, "max_lines": 6}


@pytest.mark.parametrize("seed", range(4))
def test_constraints_always_hold(lm, seed):
    r = generate_with_constraints(lm, "Clean a table", CONSTRAINTS, line_tokens=16, docstring_tokens=16,
                                  repair_rounds=1, seed=seed, temperature=1.0)
    assert all(r.checks.values()), r
    assert r.code.startswith(CONSTRAINTS["function_signature"] + "\n")
    tree = ast.parse(r.code)
    assert ast.get_docstring(tree.body[0]) is not None
    assert len(r.code.rstrip("\n").split("\n")) <= CONSTRAINTS["max_lines"]
    assert r.valid_before_repair or r.repair_rounds >= 1 or r.fallback


@pytest.mark.parametrize("constraints, match", [
    ({"language": "rust"}, "only 'python'"),
    ({"function_signature": "def f(:"}, "not a Python def line"),
    ({"function_signature": "x = 1"}, "one `def ...:` line"),
    ({"function_signature": "def f():", "includes_docstring": True, "max_lines": 2}, "impossible"),
    ({"includes_docstring": True}, "needs a function_signature"),
    ({"max_line": 3}, "unknown constraint"),
])
def test_impossible_or_unsupported_constraints_fail_before_the_model(constraints, match):
    lm = no_model()
    with pytest.raises(SamplingError, match=match):
        generate_with_constraints(lm, "x", constraints)


def test_no_room_in_the_context_is_a_clear_error():
    lm = no_model(max_len=64)
    with pytest.raises(SamplingError, match="leaves no room"):
        generate_with_constraints(lm, "a long prompt " * 3, CONSTRAINTS)
    assert check_constraints({})["max_lines"] == 50


def test_cli_code_and_pattern(tmp_path, lm, capsys):
    import json

    from dlm.checkpoint import save_pretrained
    from dlm.cli import main

    save_pretrained(tmp_path / "m", lm.model, lm.config, lm.tokenizer)
    main(["code", "Add two numbers", "--model", str(tmp_path / "m"), "--signature", "def add(a, b):",
          "--docstring", "--max-lines", "5", "--line-tokens", "12", "--docstring-tokens", "12", "--steps", "24",
          "--repair-rounds", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert all(out["checks"].values()) and out["code"].startswith("def add(a, b):\n")
    main(["pattern", "Born on ", r"\d{4}-\d{2}-\d{2}", ".", "--model", str(tmp_path / "m"), "--json"])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", json.loads(capsys.readouterr().out)["value"])
    with pytest.raises(SystemExit) as e:
        main(["pattern", "x", r"\d+", "--model", str(tmp_path / "m")])
    assert e.value.code == 2 and "unbounded" in capsys.readouterr().err
