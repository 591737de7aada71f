"""Code under constraints: a pinned signature, a docstring, a line limit, and code that parses, always.

The canvas is built so that most constraints hold by construction, whatever the model writes:

    # <prompt>                                  pinned context, not part of the result
    def process_data(df: pd.DataFrame) -> ...:  pinned signature
        \"\"\"[docstring gap]\"\"\"                  pinned quotes; the gap may not hold a quote, backslash or newline
        [line gap]                               one gap per body line after 4 pinned spaces, newline banned
        [line gap]                               ... as many lines as `max_lines` (and the context) allow

so the signature, the docstring and the line limit cannot fail; a gap may close with [PAD] (an empty line is
dropped). Whether the body parses is checked with `ast.parse`; a failure is repaired the DLM way (repair.py:
re-mask the failing line, fill it again, up to `repair_rounds`), and if it still fails, the last resort drops body
lines from the end (adding `pass` if nothing is left) so the result always parses. The result says which path it
took, so the benchmark can report validity before and after repair.

    result = generate_with_constraints(lm, "Clean and preprocess tabular data", {
        "language": "python", "function_signature": "def process_data(df: pd.DataFrame) -> pd.DataFrame:",
        "includes_docstring": True, "max_lines": 50})
    result.code, result.checks, result.valid_before_repair, result.repair_rounds, result.fallback
"""

from __future__ import annotations

import ast
from typing import TYPE_CHECKING, Any

import torch

from dlm.control.canvas import fill_canvas, token_texts
from dlm.control.repair import RepairReport, render, repair
from dlm.control.validators import HasDocstring, MaxLines, PythonParses
from dlm.sampling import SamplingError
from dlm.sampling.processors import BannedTokens

if TYPE_CHECKING:
    from dlm.pipeline import DiffusionLM

CONSTRAINTS = ("language", "function_signature", "includes_docstring", "max_lines")
INDENT = "    "


class ConstrainedResult(str):
    """The generated code, as a `str` (so `print(result)` prints the code), with what was checked and repaired:
    `checks` (each requested constraint -> met), `valid_before_repair` (the first fill parsed), `repair_rounds`,
    `fallback` (body lines had to be dropped to parse) and the full `report`."""

    checks: dict[str, bool]
    valid_before_repair: bool
    repair_rounds: int
    fallback: bool
    report: RepairReport

    def __new__(cls, code: str, checks: dict[str, bool], valid_before_repair: bool, repair_rounds: int,
                fallback: bool, report: RepairReport) -> ConstrainedResult:
        self = super().__new__(cls, code)
        self.checks, self.valid_before_repair, self.repair_rounds = checks, valid_before_repair, repair_rounds
        self.fallback, self.report = fallback, report
        return self

    @property
    def code(self) -> str:
        return str(self)

    @property
    def note(self) -> str | None:
        """One line for the plain output when the guarantee needed the last resort, else None."""
        if not self.fallback:
            return None
        return (f"note: the body did not parse after {self.repair_rounds} repair round(s); trailing lines were "
                "dropped so that it parses")


def check_constraints(constraints: dict[str, Any]) -> dict[str, Any]:
    """Validate a constraint set before any model call -> it with defaults filled in."""
    unknown = sorted(set(constraints) - set(CONSTRAINTS))
    if unknown:
        raise SamplingError(f"unknown constraint(s) {unknown}; supported: {list(CONSTRAINTS)}")
    c = {"language": "python", "function_signature": None, "includes_docstring": False, "max_lines": 50,
         **constraints}
    if c["language"] != "python":
        raise SamplingError(f"language {c['language']!r} is not supported; only 'python' has a parser here")
    sig = c["function_signature"]
    if sig is not None:
        sig = sig.rstrip()
        if not sig.startswith(("def ", "async def ")) or "\n" in sig:
            raise SamplingError(f"function_signature must be one `def ...:` line, got {sig!r}")
        try:
            tree = ast.parse(sig + "\n" + INDENT + "pass\n")
        except SyntaxError as e:
            raise SamplingError(f"function_signature {sig!r} is not a Python def line: {e.msg}") from e
        if len(tree.body) != 1 or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
            raise SamplingError(f"function_signature must be one `def ...:` line, got {sig!r}")
        c["function_signature"] = sig
    if not isinstance(c["max_lines"], int) or isinstance(c["max_lines"], bool):
        raise SamplingError(f"max_lines must be an int, got {c['max_lines']!r}")
    fixed = (1 if sig is not None else 0) + (1 if c["includes_docstring"] else 0)
    if c["includes_docstring"] and sig is None:
        raise SamplingError("includes_docstring needs a function_signature (the docstring goes under it)")
    if c["max_lines"] < fixed + 1:
        raise SamplingError(f"max_lines={c['max_lines']} is impossible: the signature and docstring take {fixed} "
                            f"line(s) and the body needs at least one")
    return c


def _ids_with(texts: list[str], chars: str) -> list[int]:
    return [i for i, t in enumerate(texts) if any(ch in t for ch in chars)]


def generate_with_constraints(lm: DiffusionLM, prompt: str, constraints: dict[str, Any], line_tokens: int = 32,
                              docstring_tokens: int = 48, repair_rounds: int = 3, seed: int | None = None,
                              **options: Any) -> ConstrainedResult:
    """Python code for `prompt` meeting `constraints` (see the module docstring); errors before any model call
    for an impossible or unsupported constraint set."""
    c = check_constraints(constraints)
    tok = lm.tokenizer
    sig, doc = c["function_signature"], c["includes_docstring"]
    canvas: list[int] = tok.encode(f"# {prompt}\n")
    start = len(canvas)  # the result begins here
    editable: list[bool] = [False] * len(canvas)
    doc_gap: list[int] = []
    line_gaps: list[int] = []

    def pin(text: str) -> None:
        ids = tok.encode(text)
        canvas.extend(ids)
        editable.extend([False] * len(ids))

    def gap(n: int, into: list[int]) -> None:
        into.extend(range(len(canvas), len(canvas) + n))
        canvas.extend([tok.mask_id] * n)
        editable.extend([True] * n)

    if sig is not None:
        pin(sig + "\n")
    if doc:
        pin(INDENT + '"""')
        gap(docstring_tokens, doc_gap)
        pin('"""\n')
    indent = INDENT if sig is not None else ""
    per_line = len(tok.encode(indent + "\n")) + line_tokens
    n_lines = min(c["max_lines"] - (sig is not None) - doc, (lm.max_len - len(canvas)) // per_line)
    if n_lines < 1:
        raise SamplingError(f"the model's context ({lm.max_len} tokens) leaves no room for a body line of "
                            f"{line_tokens} tokens after {len(canvas)} tokens of prompt, signature and docstring; "
                            "shorten the prompt or lower line_tokens / docstring_tokens")
    for _ in range(n_lines):
        pin(indent)
        gap(line_tokens, line_gaps)
        pin("\n")

    L = len(canvas)
    texts = token_texts(tok, lm.config.model.vocab_size)
    processors = []
    for positions, chars in ((line_gaps, "\n"), (doc_gap, '"\\\n')):
        if positions:
            where = torch.zeros(1, L, dtype=torch.bool)
            where[0, positions] = True
            processors.append(BannedTokens(_ids_with(texts, chars), where=where))
    filled = fill_canvas(lm, torch.tensor([canvas]), processors, seed=seed, **options)[0]
    validators = [PythonParses()]
    filled, report = repair(lm, filled, torch.tensor(editable), (start, L), validators, rounds=repair_rounds,
                            processors=processors, seed=seed, **options)
    code = "\n".join(line for line in render(tok, filled[start:].tolist())[0].split("\n") if line.strip()) + "\n"
    code, fallback = _parse_or_drop_lines(code, first_body_line=(sig is not None) + doc)
    checks = {"parses": PythonParses()(code) is None, "max_lines": MaxLines(c["max_lines"])(code) is None}
    if sig is not None:
        checks["function_signature"] = code.startswith(sig + "\n")
    if doc:
        checks["includes_docstring"] = HasDocstring()(code) is None
    return ConstrainedResult(code, checks, report.valid_before, report.rounds, fallback, report)


def _parse_or_drop_lines(code: str, first_body_line: int) -> tuple[str, bool]:
    """The last resort: drop body lines from the end until the code parses; `pass` if no statement is left."""
    if PythonParses()(code) is None:
        return code, False
    lines = code.rstrip("\n").split("\n")
    while len(lines) > first_body_line:
        lines.pop()
        for tail in ([], [INDENT + "pass"] if first_body_line else ["pass"]):
            candidate = "\n".join(lines + tail) + "\n"
            if PythonParses()(candidate) is None:
                return candidate, True
    return "\n".join(lines + [INDENT + "pass"]) + "\n", True
