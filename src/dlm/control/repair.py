"""Repair the DLM way: find what a validator rejects, re-mask only the tokens of that region, denoise them again.

An autoregressive model must regenerate everything after an error; a DLM can re-mask just the failing line and
fill it with both sides in view. Each round re-masks the editable tokens whose characters overlap the failure's
span (widened a line at a time when the span holds no editable token, e.g. an error reported on a pinned line)
and fills them with `fill_canvas`. Rounds sample (`repair_temperature`, a different seed each round): at
temperature 0 the same context would give back the same tokens.

    canvas, report = repair(lm, canvas, editable, region, [PythonParses()], rounds=3, seed=0)
    report.valid_before, report.valid_after, report.remasked   # positions re-masked in each round
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from dlm.control.canvas import fill_canvas
from dlm.control.validators import Failure, Validator, first_failure, line_span
from dlm.sampling.processors import LogitsProcessor

if TYPE_CHECKING:
    from dlm.pipeline import DiffusionLM


@dataclass
class RepairReport:
    valid_before: bool
    valid_after: bool = False
    rounds: int = 0  # rounds run
    remasked: list[list[int]] = field(default_factory=list)  # canvas positions re-masked in each round
    failures: list[str] = field(default_factory=list)  # the failure each round addressed


def render(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """Token ids -> the text (pads and other specials dropped) and each token's character span in it."""
    spans, text = [], ""
    kept: list[int] = []
    for i in ids:
        if int(i) not in tokenizer.special_ids:
            kept.append(int(i))
        new = tokenizer.decode(kept)
        # A partial UTF-8 sequence decodes to a replacement character that the next byte may complete: keep
        # the spans monotone.
        spans.append((min(len(text), len(new)), max(len(text), len(new))))
        text = new
    return text, spans


def failing_positions(failure: Failure, text: str, spans: list[tuple[int, int]], editable: Sequence[bool],
                      offset: int = 0, max_widen: int = 3) -> list[int]:
    """Canvas positions (offset + index) of editable tokens in the failure's span, widened by a line on each
    side (up to `max_widen` times) while the span holds none.

    A token with text is in the span when its characters overlap [start, end); an empty one (a [PAD]) when it sits
    inside [start, end]: re-masking it lets the region grow.
    """
    start, end = failure.start, failure.end
    for _ in range(max_widen + 1):
        hits = [offset + k for k, (a, b) in enumerate(spans) if editable[k] and
                ((a < b and a < end and b > start) or (a == b and start <= a <= end))]
        if hits:
            return hits
        first, last = text.count("\n", 0, start) + 1, text.count("\n", 0, end) + 1
        start, end = line_span(text, max(first - 1, 1))[0], line_span(text, last + 1)[1]
    return []


def repair(lm: DiffusionLM, canvas: torch.Tensor, editable: torch.Tensor, region: tuple[int, int],
           validators: list[Validator], rounds: int = 3, processors: Sequence[LogitsProcessor] = (),
           repair_temperature: float = 0.7, seed: int | None = None, **options: Any
           ) -> tuple[torch.Tensor, RepairReport]:
    """canvas (L,) filled; editable (L,) bool; the validators check the text of canvas[region[0]:region[1]].

    -> the repaired canvas (L,) and a RepairReport. Only editable positions ever change.
    """
    canvas = canvas.clone()
    lo, hi = region
    tok = lm.tokenizer
    text, spans = render(tok, canvas[lo:hi].tolist())
    failure = first_failure(text, validators)
    report = RepairReport(valid_before=failure is None)
    for r in range(rounds):
        if failure is None:
            break
        positions = failing_positions(failure, text, spans, editable[lo:hi].tolist(), offset=lo)
        if not positions:
            break
        report.rounds += 1
        report.remasked.append(positions)
        report.failures.append(failure.message)
        canvas[positions] = tok.mask_id
        options = {**options, "temperature": max(options.get("temperature") or 0.0, repair_temperature)}
        canvas = fill_canvas(lm, canvas[None], processors,
                             seed=None if seed is None else seed + 1 + r, **options)[0]
        text, spans = render(tok, canvas[lo:hi].tolist())
        failure = first_failure(text, validators)
    report.valid_after = failure is None
    return canvas, report
