"""Structured documents: a Markdown template whose headings and text are fixed, fields filled from data, and gaps
generated, all on one canvas (every gap sees the whole document at every step; seed §8's report generator).

Template syntax
    {field}        replaced by data["field"] (a str, int or float), written as text, never parsed for gaps; a field
                   missing from `data`, or a `data` key the template never uses, is an error naming it.
                   {{ and }} are a literal { and }.
    [MASK:n]       a gap of exactly n tokens.
    [MASK:<=n]     a gap of up to n tokens (the model closes it with [PAD], which is dropped).
    [MASK]         a gap of up to max_span tokens (GenerationConfig.max_span, default 64), or its share of its
                   section's budget.
    budgets        {"## Risks": 120} (the heading line, or its title "Risks", as written or with fields filled):
                   the gaps of that section (its heading line to the next heading line) generate at most 120
                   tokens together; its bare [MASK] gaps share what its [MASK:n] / [MASK:<=n] gaps leave.

Guarantees: the text outside the gaps (fields substituted) is returned byte for byte; a gap never writes '#', so
the result's headings are the template's (`new_headings=True` lifts this); a gap holds at most its size in tokens.
Errors before any model call: no gap, a malformed gap or brace, a missing or unused field, a budget too small or
naming no heading, a canvas longer than the model's context.

    text = generate_document(lm, "# {title}\\n\\n## Summary\\n[MASK]\\n\\n## Risks\\n[MASK:<=40]\\n",
                             data={"title": "Q3 report"}, budgets={"Summary": 80}, seed=0)
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from dlm.control.canvas import fill_canvas, token_texts
from dlm.sampling import SamplingError
from dlm.sampling.processors import BannedTokens

if TYPE_CHECKING:
    from dlm.pipeline import DiffusionLM


class TemplateError(SamplingError):
    """A template, data or budgets that cannot make a document; raised before any model call."""


# {{, }}, {field}, a well-formed gap, a malformed gap, a lone brace
TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_]\w*)\}|\[MASK(?::(<=)?(\d+))?\]|\[MASK:[^\]\n]*\]?|[{}]")
HEADING = re.compile(r"^#{1,6}[ \t]+\S.*$", re.MULTILINE)


@dataclass(frozen=True)
class DocGap:
    offset: int  # where it starts in the template (for messages)
    section: str | None  # the heading line above it, as written; None before the first heading
    size: int | None  # None: a bare [MASK]
    exact: bool  # [MASK:n]: exactly n tokens


def _line(template: str, offset: int) -> int:
    return template.count("\n", 0, offset) + 1


def _value(name: str, data: dict[str, Any]) -> str:
    v = data[name]
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise TemplateError(f"field {{{name}}}: the value must be a str, int or float, got {type(v).__name__}")
    return str(v)


def parse_template(template: str, data: dict[str, Any] | None = None) -> tuple[list[str], list[DocGap]]:
    """template -> the text pieces between gaps (fields substituted; one more piece than gaps) and the gaps."""
    if not isinstance(template, str):
        raise TemplateError(f"the template must be a str, got {type(template).__name__}")
    data = dict(data or {})
    if any(not isinstance(k, str) for k in data):
        raise TemplateError("data keys must be strings (the template's field names)")
    headings = [(m.start(), m.group(0).rstrip()) for m in HEADING.finditer(template)]
    starts = [h[0] for h in headings]
    pieces, gaps, used = [""], [], set()
    pos = 0
    for m in TOKEN.finditer(template):
        pieces[-1] += template[pos: m.start()]
        pos = m.end()
        tok, where = m.group(0), f"line {_line(template, m.start())}"
        if tok in ("{{", "}}"):
            pieces[-1] += tok[0]
        elif m.group(1) is not None:
            if m.group(1) not in data:
                raise TemplateError(f"field {tok} ({where}) has no value in data")
            used.add(m.group(1))
            pieces[-1] += _value(m.group(1), data)
        elif tok in ("{", "}"):
            raise TemplateError(f"a lone {tok!r} at {where}: write {tok * 2} for a literal brace, or {{name}} "
                                "for a field")
        elif tok == "[MASK]" or m.group(3) is not None:
            size = None if m.group(3) is None else int(m.group(3))
            if size == 0:
                raise TemplateError(f"gap {tok} ({where}) must have at least 1 token")
            k = bisect.bisect_right(starts, m.start()) - 1
            section = headings[k][1] if k >= 0 else None
            gaps.append(DocGap(m.start(), section, size, exact=size is not None and m.group(2) is None))
            pieces.append("")
        else:
            raise TemplateError(f"malformed gap {tok!r} at {where}: write [MASK], [MASK:n] or [MASK:<=n]")
    pieces[-1] += template[pos:]
    unused = sorted(set(data) - used)
    if unused:
        raise TemplateError(f"data key(s) {', '.join(unused)} are not fields of the template "
                            f"(its fields: {', '.join(sorted(used)) or 'none'})")
    if not gaps:
        raise TemplateError("the template has no gap: mark text to generate with [MASK], [MASK:n] or [MASK:<=n]")
    return pieces, gaps


def _fill_fields(text: str, data: dict[str, Any]) -> str:
    """{{ / }} -> a brace and {field} -> its value; anything else (gaps, unknown fields) stays as written."""
    def one(m: re.Match) -> str:
        if m.group(0) in ("{{", "}}"):
            return m.group(0)[0]
        return _value(m.group(1), data) if m.group(1) in data else m.group(0)

    return TOKEN.sub(one, text)


def _heading_names(line: str, data: dict[str, Any]) -> set[str]:
    """The names a budget may use for a heading: the line and its title, as written and with fields filled."""
    return {form for text in (line, _fill_fields(line, data)) for form in (text.strip(), text.lstrip("#").strip())}


def gap_sizes(gaps: list[DocGap], budgets: dict[str, int] | None, max_span: int,
              data: dict[str, Any] | None = None) -> list[int]:
    """The token count of each gap: its own size, a bare [MASK]'s share of its section's budget, or max_span."""
    sections = {g.section for g in gaps if g.section is not None}
    names = {s: _heading_names(s, data or {}) for s in sections}
    budget_of: dict[str | None, int] = {}
    for key, n in (budgets or {}).items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise TemplateError(f"budget for {key!r} must be a positive number of tokens, got {n!r}")
        hits = [s for s in sections if key.strip() in names[s]]
        if not hits:
            raise TemplateError(f"budget for {key!r} names no section with a gap; sections with gaps: "
                                f"{', '.join(repr(s) for s in sorted(sections)) or 'none'}")
        for s in hits:
            budget_of[s] = n
    sizes = [g.size if g.size is not None else max_span for g in gaps]
    for section, budget in budget_of.items():
        mine = [i for i, g in enumerate(gaps) if g.section == section]
        bare = [i for i in mine if gaps[i].size is None]
        left = budget - sum(sizes[i] for i in mine if i not in bare)
        if left < len(bare):
            raise TemplateError(f"section {section!r}: its sized gaps take {budget - left} tokens of its budget "
                                f"{budget}, leaving {left} for {len(bare)} bare [MASK] gap(s)")
        for j, i in enumerate(bare):  # an even share, the remainder to the first gaps
            sizes[i] = left // len(bare) + (j < left % len(bare))
    return sizes


def generate_document(lm: DiffusionLM, template: str, data: dict[str, Any] | None = None,
                      budgets: dict[str, int] | None = None, new_headings: bool = False, **options: Any) -> str:
    """Fill a template's gaps (syntax in the module docstring); every GenerationConfig option is accepted (seed,
    temperature, steps, max_span, ...). The text outside the gaps comes back byte for byte."""
    pieces, gaps = parse_template(template, data)
    max_span = options.get("max_span") or lm.sampling.max_span
    sizes = gap_sizes(gaps, budgets, max_span, data)
    if sum(sizes) > lm.max_len:  # before any list is built: [MASK:10**20] must not reach `[mask_id] * n`
        raise TemplateError(f"the gaps need {sum(sizes)} tokens but the model's context is {lm.max_len}; lower the "
                            "gaps' sizes / budgets")
    tok = lm.tokenizer
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for piece, n in zip(pieces[:-1], sizes, strict=True):
        ids += tok.encode(piece)
        spans.append((len(ids), len(ids) + n))
        ids += [tok.mask_id] * n
    ids += tok.encode(pieces[-1])
    if len(ids) > lm.max_len:
        raise TemplateError(f"the document needs {len(ids)} tokens ({len(ids) - sum(sizes)} of fixed text, "
                            f"{sum(sizes)} in gaps) but the model's context is {lm.max_len}; shorten the template "
                            "or lower the gaps' sizes / budgets")
    canvas = torch.tensor([ids], dtype=torch.long)
    in_gap = torch.zeros_like(canvas, dtype=torch.bool)
    exact = torch.zeros_like(in_gap)
    for g, (a, b) in zip(gaps, spans, strict=True):
        in_gap[0, a:b] = True
        exact[0, a:b] = g.exact
    processors = []
    if bool(exact.any()):  # [MASK:n] holds n real tokens; the other gaps may close with [PAD]
        processors.append(BannedTokens([tok.pad_id, tok.eos_id], where=exact))
    if not new_headings:
        hashes = [i for i, t in enumerate(token_texts(tok)) if "#" in t]
        if hashes:
            processors.append(BannedTokens(hashes, where=in_gap))
    out = fill_canvas(lm, canvas, processors=processors, **options)[0].tolist()
    drop = {tok.pad_id, tok.eos_id}
    result = [pieces[0]]
    for (a, b), after in zip(spans, pieces[1:], strict=True):
        result += [tok.decode([i for i in out[a:b] if i not in drop]), after]
    return "".join(result)


# ----- constraints={"format": "markdown", ...} (DiffusionLM.generate) ---------------------------------------------
MARKDOWN_CONSTRAINTS = ("format", "sections", "max_length")


def section_title(key: str) -> str:
    """"executive_summary" -> "Executive Summary": a section key, titled."""
    return " ".join(w[:1].upper() + w[1:] for w in re.split(r"[_\-\s]+", key.strip()) if w)


def generate_markdown(lm: DiffusionLM, prompt: str, constraints: dict[str, Any], **options: Any) -> str:
    """A Markdown document after `prompt` whose headings are exactly `sections`, in order (titled from the keys),
    with generated bodies, `max_length` tokens at most in all (and within the model's context with the prompt).

    constraints: {"format": "markdown", "sections": ["executive_summary", ...], "max_length": 2000}. The prompt
    is fixed context before the document and not part of the result."""
    unknown = sorted(set(constraints) - set(MARKDOWN_CONSTRAINTS))
    if unknown:
        raise TemplateError(f"unknown markdown constraint(s) {unknown}; supported: {list(MARKDOWN_CONSTRAINTS)}")
    sections = constraints.get("sections")
    if not isinstance(sections, (list, tuple)) or not sections or not all(
            isinstance(k, str) and section_title(k) for k in sections):
        raise TemplateError('"sections" must be a non-empty list of section names, e.g. ["summary", "analysis"]')
    max_length = constraints.get("max_length", lm.max_len)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise TemplateError(f'"max_length" must be a positive number of tokens, got {max_length!r}')
    tok = lm.tokenizer
    context = prompt.rstrip() + "\n\n" if prompt else ""
    headings = [f"## {section_title(k)}\n" for k in sections]
    n_context = len(tok.encode(context))
    fixed = n_context + sum(len(tok.encode(h + "\n\n")) for h in headings)
    budget = min(max_length + n_context, lm.max_len) - fixed  # tokens left for the bodies
    per_section = budget // len(sections)
    if per_section < 1:
        raise TemplateError(f"{len(sections)} sections need more room: the prompt and headings take {fixed} of the "
                            f"{min(max_length, lm.max_len)} tokens available; shorten the prompt or give fewer "
                            "sections")
    esc = context.replace("{", "{{").replace("}", "}}")
    body = "".join(h.replace("{", "{{").replace("}", "}}") + f"[MASK:<={per_section}]\n\n" for h in headings)
    text = generate_document(lm, esc + body, **options)
    return text[len(context):].rstrip("\n") + "\n"
