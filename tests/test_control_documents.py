"""Structured documents: with random networks (one that loves '#'), random templates come back with the text
outside the gaps byte for byte, fields substituted (never parsed for gaps), gaps within their sizes and budgets and
free of '#'; bad templates, data and budgets fail before any model call; `dlm document`."""

from __future__ import annotations

import json
import re

import pytest
from control_helpers import no_model, saved_model_dir, tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlm.cli import main
from dlm.control.documents import TemplateError, gap_sizes, generate_document, parse_template


@pytest.fixture(scope="module")
def lm():
    return tiny()


NO_MODEL = no_model()  # any model call fails

# ----- random templates: what must come back unchanged ----------------------------------------------------------------
GAPS = {"[MASK]": (5, False), "[MASK:1]": (1, True), "[MASK:3]": (3, True), "[MASK:<=4]": (4, False)}  # max_span 5
VALUES = {"a": st.sampled_from(["", "Acme", "[MASK]", "{b}", "x}}{{y", "é ü", "# not a heading"]),
          "b": st.sampled_from(["1", "line\nbreak", "[MASK:3]"])}
SEGMENT = st.one_of(
    st.text(st.characters(blacklist_characters="{}[", blacklist_categories=("Cs",)), max_size=12).map(
        lambda s: ("text", s)),
    st.sampled_from([("text", "\n## Section\n"), ("brace", "{{"), ("brace", "}}"), ("field", "a"), ("field", "b")]),
    st.sampled_from(sorted(GAPS)).map(lambda g: ("gap", g)))


@st.composite
def templates(draw):
    segments = draw(st.lists(SEGMENT, min_size=1, max_size=8).filter(lambda s: any(k == "gap" for k, _ in s)))
    fields = {v for k, v in segments if k == "field"}
    data = {f: draw(VALUES[f]) for f in sorted(fields)}
    return segments, data


def expected_pattern(segments, data) -> re.Pattern:
    """The template's text as a regex: fixed text literal, each gap any text of at most its size without '#'."""
    parts = []
    for kind, v in segments:
        if kind == "gap":
            n, exact = GAPS[v]
            parts.append(f"([^#]{{{1 if exact else 0},{n}}})")  # a byte token decodes to at most one character
        else:
            parts.append(re.escape({"text": v, "brace": v[:1], "field": data.get(v, "")}[kind]))
    return re.compile("".join(parts), re.DOTALL)


@given(templates(), st.integers(0, 2), st.sampled_from([0.0, 1.0]))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_text_outside_gaps_is_unchanged_and_fields_substituted(lm, case, seed, temperature):
    segments, data = case
    template = "".join("{" + v + "}" if k == "field" else v for k, v in segments)
    out = generate_document(lm, template, data=data, max_span=5, seed=seed, temperature=temperature)
    assert expected_pattern(segments, data).fullmatch(out), (template, data, out)


def test_gaps_never_write_hash_unless_allowed():
    hashy = tiny([ord("#")])
    template = "# Title\n\n## Body\n[MASK:8]\n\n## End\n[MASK]\n"
    out = generate_document(hashy, template, max_span=8, seed=0)
    assert out.count("#") == template.count("#")
    assert "#" in generate_document(hashy, template, max_span=8, seed=0, new_headings=True).split("## Body\n")[1]


# ----- budgets --------------------------------------------------------------------------------------------------------
def test_budgets_share_a_section_and_match_headings_as_written_or_filled():
    template = "# {name}\n[MASK]\n## About {name}\nA: [MASK] B: [MASK] C: [MASK:<=3]\n## Plan\n[MASK:2]\n"
    data = {"name": "Acme"}
    _, gaps = parse_template(template, data)
    assert gap_sizes(gaps, None, 64, data) == [64, 64, 64, 3, 2]
    for key in ("## About {name}", "About {name}", "## About Acme", "About Acme"):
        assert gap_sizes(gaps, {key: 10}, 64, data) == [64, 4, 3, 3, 2]  # 10 - 3 = 7 -> 4 + 3
    assert gap_sizes(gaps, {"# Acme": 6, "Plan": 2}, 64, data) == [6, 64, 64, 3, 2]


def test_budgeted_document_respects_the_budget(lm):
    template = "## Summary\n[MASK]\n[MASK]\n## Details\n[MASK:<=5]\n"
    out = generate_document(lm, template, budgets={"Summary": 7}, seed=0, temperature=1.0)
    m = re.fullmatch(r"## Summary\n(.*)\n## Details\n(.*)\n", out, re.DOTALL)  # gaps write no '#'
    assert m and len(m.group(1)) <= 4 + 1 + 3 and len(m.group(2)) <= 5, out  # gaps of 4 and 3 tokens, then 5


# ----- refused before any model call ----------------------------------------------------------------------------------
@pytest.mark.parametrize("template, data, budgets, message", [
    ("# Title\nno gap here\n", None, None, "no gap"),
    ("# {title}\n[MASK]", {}, None, "field {title} (line 1) has no value"),
    ("# T\n[MASK]", {"title": "x", "extra": 1}, None, "data key(s) extra, title are not fields"),
    ("# T {\n[MASK]", None, None, "a lone '{' at line 1"),
    ("# T\nx }[MASK]", None, None, "a lone '}' at line 2"),
    ("# T\n[MASK:abc]", None, None, "malformed gap '[MASK:abc]' at line 2"),
    ("# T\n[MASK:0]", None, None, "at least 1 token"),
    ("# {t}\n[MASK]", {"t": True}, None, "must be a str, int or float"),
    ("## A\n[MASK]", None, {"## B": 5}, "budget for '## B' names no section"),
    ("## A\n[MASK] [MASK:4]", None, {"A": 4}, "leaving 0 for 1 bare [MASK]"),
    ("## A\n[MASK]", None, {"A": 0}, "positive number of tokens"),
    ("## A\n" + "x" * 200 + "[MASK:100]", None, None, "needs 305 tokens (205 of fixed text, 100 in gaps) but the "
                                                      "model's context is 256"),
])
def test_bad_input_fails_before_any_model_call(template, data, budgets, message):
    with pytest.raises(TemplateError) as e:
        generate_document(NO_MODEL, template, data=data, budgets=budgets)  # a model call: AttributeError
    assert message in str(e.value)


# ----- dlm document -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, lm):
    return saved_model_dir(tmp_path_factory, lm, "doc")


def test_cli_document_round_trip_and_errors(model_dir, tmp_path, capsys):
    (tmp_path / "t.md").write_text("# Report: {company}\n\n## Summary\n[MASK]\n\n## Outlook {{Q3}}\n[MASK:<=6]\n")
    (tmp_path / "d.json").write_text(json.dumps({"company": "Acme"}))
    main(["document", str(tmp_path / "t.md"), "--data", str(tmp_path / "d.json"), "--budget", "## Summary=12",
          "--model", str(model_dir), "--json"])
    text = json.loads(capsys.readouterr().out)["text"]
    assert re.fullmatch(r"# Report: Acme\n\n## Summary\n[^#]{0,12}\n\n## Outlook \{Q3\}\n[^#]{0,6}\n", text,
                        re.DOTALL), text
    for extra, message in [([], "field {company} (line 1) has no value in data"),
                           (["--data", str(tmp_path / "d.json"), "--budget", "Summary"], "write HEADING=TOKENS"),
                           (["--data", str(tmp_path / "missing.json")], "cannot read the data")]:
        with pytest.raises(SystemExit) as e:
            main(["document", str(tmp_path / "t.md"), "--model", str(model_dir), *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("dlm: error: ") and message in err, err
