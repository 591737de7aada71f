"""Fill a canvas: the one primitive under infilling, constraints, repair, JSON, documents and augmentation.

A canvas (B, L) holds known tokens and [MASK] where tokens are to be generated. `fill_canvas` denoises every mask
with the whole canvas as one block (each gap sees both sides at every step) and never changes a known token.
`processors` are extra logits processors (e.g. `AllowedTokens(ids, where=positions)`): hard, per-position
constraints that run before any filtering. [PAD] may be generated (a gap of unknown length closes with it) unless
a processor bans it; callers drop it when they decode.

    canvas = torch.tensor([lm.tokenizer.encode("def f(x):\n    return ")]); ...
    out = fill_canvas(lm, canvas_with_masks, processors=[AllowedTokens(digit_ids, where=gap)], seed=0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from dlm.sampling import SamplingError, StepEvent
from dlm.sampling.processors import LogitsProcessor, build_processors

if TYPE_CHECKING:
    from dlm.pipeline import DiffusionLM


def token_texts(tokenizer: Any, vocab_size: int | None = None) -> list[str]:
    """The text of each token id alone ('' for specials and for ids that decode to nothing printable)."""
    V = vocab_size or tokenizer.vocab_size
    specials = tokenizer.special_ids
    out = []
    for i in range(V):
        text = "" if i in specials else tokenizer.decode([i])
        out.append("" if "\ufffd" in text else text)  # a lone UTF-8 continuation byte is not text
    return out


def fill_canvas(lm: DiffusionLM, canvas: torch.Tensor, processors: Sequence[LogitsProcessor] = (),
                steps: int | None = None, callback: Callable[[StepEvent], None] | None = None,
                **options: Any) -> torch.Tensor:
    """canvas (B, L) LongTensor with [MASK] gaps -> (B, L) with every mask filled; known tokens never change.

    `steps` defaults to the number of masks of the fullest row (one commit per step). Every GenerationConfig
    option is accepted; `defer_eos` defaults to True ([PAD] / [EOS] are committed after the text of a gap).
    """
    if lm.is_causal:
        raise SamplingError("this checkpoint is an autoregressive baseline; it cannot fill gaps")
    canvas = torch.as_tensor(canvas, dtype=torch.long)
    if canvas.dim() == 1:
        canvas = canvas[None]
    tok = lm.tokenizer
    n_masks = int((canvas == tok.mask_id).sum(1).max()) if canvas.numel() else 0
    if n_masks == 0:
        raise SamplingError("the canvas has no [MASK] to fill")
    if canvas.shape[1] > lm.max_len:
        raise SamplingError(f"the canvas needs {canvas.shape[1]} tokens but the model's context is {lm.max_len}")
    options.setdefault("defer_eos", True)
    opts = lm.options(None, steps=steps, **options)  # a given steps is checked with the rest (0 is refused)
    opts = opts.replace(steps=n_masks if steps is None else steps, block_length=0, max_new_tokens=1, num_samples=1,
                        cache="none")
    procs = build_processors(opts, tok, allow_pad=True, extra=list(processors))
    prompt_mask = canvas != tok.mask_id  # guidance (cfg_scale > 0) masks the known text, as LLaDA
    # Masked models fill with LLaDA's sampler; a SEDD / D3PM checkpoint with its own (its process names it).
    own = getattr(getattr(lm, "process", None), "sampling", {})
    sampler = opts.sampler if "sampler" in own else "llada"
    final = canvas
    for event in lm.denoise(canvas, 0, opts.replace(sampler=sampler), None, procs, prompt_mask):
        if callback is not None:
            callback(event)
        final = event.output.xt
    return final.cpu()
