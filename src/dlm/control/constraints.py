"""Per-position token constraints: a regular expression of bounded length becomes allowed-token sets, one per slot.

A DLM fills all positions of a gap in any order, so a constraint must hold whatever the order: here it is a set of
permitted tokens per position. A pattern made of literals, character classes (`[a-z]`, `\\d`, `\\w`, `\\s`, `.`)
and bounded repeats (`x{n}`, `x{m,n}`, `x?`) compiles to one slot per character: a required slot allows the
single-character tokens of its class; an optional slot (beyond m of `{m,n}`) also allows [PAD]. Dropping the
[PAD]s leaves a string that always matches, because the optional slots of a repeat are interchangeable. Alternation
and unbounded repeats (`|`, `*`, `+`) have no fixed layout and are refused with a message saying what works.

    gap = PatternGap(r"\\d{4}-\\d{2}-\\d{2}")            # an ISO date: 10 slots
    fill_pattern(lm, "Date of the battle: ", r"\\d{4}-\\d{2}-\\d{2}", "\\n")   # -> "1415-10-25" (always matches)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from dlm.control.canvas import fill_canvas, token_texts
from dlm.sampling import SamplingError
from dlm.sampling.processors import AllowedTokens, LogitsProcessor

try:  # the stdlib's regex parser (re._parser since 3.11, sre_parse before)
    from re import _constants as sre_c  # type: ignore[attr-defined]
    from re import _parser as sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_constants as sre_c  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

if TYPE_CHECKING:
    from dlm.pipeline import DiffusionLM

MAX_SLOTS = 256
_CATEGORIES: dict[Any, Callable[[str], bool]] = {
    sre_c.CATEGORY_DIGIT: str.isdigit, sre_c.CATEGORY_NOT_DIGIT: lambda c: not c.isdigit(),
    sre_c.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
    sre_c.CATEGORY_NOT_WORD: lambda c: not (c.isalnum() or c == "_"),
    sre_c.CATEGORY_SPACE: str.isspace, sre_c.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
}


@dataclass
class Slot:
    accepts: Callable[[str], bool]  # one character -> allowed here?
    optional: bool  # [PAD] allowed (the slot may stay empty)


def _char_test(op: Any, av: Any, pattern: str) -> Callable[[str], bool]:
    if op in (sre_c.LITERAL, sre_c.NOT_LITERAL):
        ch, equal = chr(av), op is sre_c.LITERAL
        return lambda c: (c == ch) == equal
    if op is sre_c.ANY:
        return lambda c: c != "\n"
    if op is sre_c.IN:
        tests, negate = [], False
        for sub_op, sub_av in av:
            if sub_op is sre_c.NEGATE:
                negate = True
            elif sub_op is sre_c.RANGE:
                tests.append(lambda c, lo=sub_av[0], hi=sub_av[1]: lo <= ord(c) <= hi)
            elif sub_op is sre_c.CATEGORY and sub_av in _CATEGORIES:
                tests.append(_CATEGORIES[sub_av])
            else:
                tests.append(_char_test(sub_op, sub_av, pattern))
        return lambda c: any(t(c) for t in tests) != negate
    raise ValueError(f"pattern {pattern!r}: {op} is not supported in a gap pattern; use literals, classes "
                     "([a-z], \\d, \\w, \\s, .) and bounded repeats ({n}, {m,n}, ?)")


def compile_slots(pattern: str) -> list[Slot]:
    """A regex of bounded length -> its slots (see the module docstring); ValueError with the reason otherwise."""
    try:
        parsed = sre_parse.parse(pattern)
    except re.error as e:
        raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {e}") from e
    slots: list[Slot] = []
    for op, av in parsed:
        if op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT):
            lo, hi, item = av
            if hi is sre_c.MAXREPEAT or hi > MAX_SLOTS:
                raise ValueError(f"pattern {pattern!r}: an unbounded repeat (*, +, {{m,}}) has no fixed layout; "
                                 "give a bound, e.g. \\d{1,6}")
            if len(item) != 1:
                raise ValueError(f"pattern {pattern!r}: repeat a single character or class, not a group")
            test = _char_test(*item[0], pattern)
            slots += [Slot(test, optional=i >= lo) for i in range(hi)]
        elif op is sre_c.AT:  # ^ and $: the gap is matched whole anyway
            continue
        else:
            slots.append(Slot(_char_test(op, av, pattern), optional=False))
        if len(slots) > MAX_SLOTS:
            raise ValueError(f"pattern {pattern!r} needs more than {MAX_SLOTS} slots")
    if not slots:
        raise ValueError(f"pattern {pattern!r} matches only the empty string")
    return slots


class PatternGap:
    """A gap whose fill always matches `pattern`: its length and the allowed tokens of each slot."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.slots = compile_slots(pattern)

    def __len__(self) -> int:
        return len(self.slots)

    def allowed_ids(self, tokenizer: Any, vocab_size: int | None = None) -> list[list[int]]:
        """Per slot, the ids of the one-character tokens it accepts (+ [PAD] when optional)."""
        texts = token_texts(tokenizer, vocab_size)
        out = []
        for k, slot in enumerate(self.slots):
            ids = [i for i, t in enumerate(texts) if len(t) == 1 and slot.accepts(t)]
            if not ids:
                raise ValueError(f"pattern {self.pattern!r}: no token of this tokenizer can fill slot {k}")
            out.append(ids + ([tokenizer.pad_id] if slot.optional else []))
        return out

    def processors(self, tokenizer: Any, start: int, length: int, vocab_size: int | None = None
                   ) -> list[LogitsProcessor]:
        """One AllowedTokens per distinct slot set, placed at canvas positions [start, start + len) of a canvas
        of `length` positions."""
        by_set: dict[tuple[int, ...], list[int]] = {}
        for k, ids in enumerate(self.allowed_ids(tokenizer, vocab_size)):
            by_set.setdefault(tuple(ids), []).append(start + k)
        procs: list[LogitsProcessor] = []
        for ids, positions in by_set.items():
            where = torch.zeros(1, length, dtype=torch.bool)
            where[0, positions] = True
            procs.append(AllowedTokens(list(ids), where=where))
        return procs


def fill_pattern(lm: DiffusionLM, before: str, pattern: str, after: str = "",
                 extra: Sequence[LogitsProcessor] = (), **options: Any) -> str:
    """Generate the text between `before` and `after` that matches `pattern` (always: it is built in)."""
    gap = PatternGap(pattern)
    tok = lm.tokenizer
    left, right = tok.encode(before), tok.encode(after)
    canvas = torch.tensor([left + [tok.mask_id] * len(gap) + right])
    if canvas.shape[1] > lm.max_len:
        raise SamplingError(f"the text and the pattern's {len(gap)} slots need {canvas.shape[1]} tokens; the "
                            f"model's context is {lm.max_len}")
    procs = gap.processors(tok, len(left), canvas.shape[1], lm.config.model.vocab_size)
    out = fill_canvas(lm, canvas, [*procs, *extra], **options)[0, len(left): len(left) + len(gap)].tolist()
    return tok.decode([i for i in out if i != tok.pad_id])
