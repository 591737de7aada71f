"""Validators: checks run on a generated text; a failure names the character span to re-mask (repair.py).

A validator is `__call__(text) -> Failure | None`. The span is where the fix should happen: the line a
`SyntaxError` points at, the lines past a line limit, the place a required text is missing.

    PythonParses()("def f(:\\n    pass\\n")   # -> Failure('invalid syntax (line 1)', start=0, end=8)
"""

from __future__ import annotations

import ast
from dataclasses import dataclass


@dataclass
class Failure:
    message: str
    start: int  # character span [start, end) of the checked text
    end: int


def line_span(text: str, lineno: int) -> tuple[int, int]:
    """1-based line number -> its character span [start, end) (without the newline)."""
    lines = text.split("\n")
    lineno = min(max(lineno, 1), len(lines))
    start = sum(len(line) + 1 for line in lines[: lineno - 1])
    return start, start + len(lines[lineno - 1])


class Validator:
    name = "validator"

    def __call__(self, text: str) -> Failure | None:
        raise NotImplementedError


class PythonParses(Validator):
    """`ast.parse` succeeds; else the span is the line of the error (and the line before, when the error is at
    its start: an unclosed bracket or a missing colon shows on the next line)."""

    name = "parses"

    def __call__(self, text: str) -> Failure | None:
        try:
            ast.parse(text)
        except SyntaxError as e:
            lineno = e.lineno or 1
            start, end = line_span(text, lineno)
            if (e.offset or 1) <= 1 and lineno > 1:
                start = line_span(text, lineno - 1)[0]
            return Failure(f"{e.msg} (line {lineno})", start, end)
        return None


class MaxLines(Validator):
    """At most `n` lines (a trailing newline does not open a line); the span is everything past line n."""

    name = "max_lines"

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, text: str) -> Failure | None:
        lines = text.rstrip("\n").split("\n")
        if len(lines) <= self.n:
            return None
        start = line_span(text, self.n + 1)[0]
        return Failure(f"{len(lines)} lines, at most {self.n} allowed", start, len(text))


class HasDocstring(Validator):
    """The first function (or the module) has a docstring; the span is the line after the `def`."""

    name = "docstring"

    def __call__(self, text: str) -> Failure | None:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            return None  # PythonParses reports it
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        node = funcs[0] if funcs else tree
        if ast.get_docstring(node) is not None:
            return None
        lineno = getattr(node, "lineno", 0) + 1
        return Failure("no docstring", *line_span(text, lineno))


class Contains(Validator):
    """`snippet` occurs verbatim (a pinned signature, say); the span is the whole text."""

    name = "contains"

    def __init__(self, snippet: str) -> None:
        self.snippet = snippet

    def __call__(self, text: str) -> Failure | None:
        return None if self.snippet in text else Failure(f"missing {self.snippet!r}", 0, len(text))


def first_failure(text: str, validators: list[Validator]) -> Failure | None:
    for v in validators:
        failure = v(text)
        if failure is not None:
            return failure
    return None
