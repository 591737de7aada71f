"""Helpers shared by the sampler tests: run the loop recording events, build canvases, check the invariants."""

from __future__ import annotations

import torch

from dlm.sampling import StepEvent, denoise


class FixedModel:
    """A model_fn with fixed logits (B, L, V) that counts its calls."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.logits.clone()


def run(model, canvas, start, steps, block_length, sampler, seed=0):
    events: list[StepEvent] = []
    out = denoise(model, canvas, start, steps, block_length, sampler, torch.Generator().manual_seed(seed),
                  callback=events.append)
    return out, events


def canvas_of(prompts: list[list[int]], n_new: int, mask_id: int) -> torch.Tensor:
    return torch.tensor([p + [mask_id] * n_new for p in prompts])


def check_invariants(canvas, out, events, start, mask_id: int, block_length=None):
    """Prompt kept, no mask left, each mask committed exactly once, never past the current block's end."""
    was_masked = canvas == mask_id
    assert torch.equal(out[~was_masked], canvas[~was_masked]), "the prompt is never changed"
    assert not (out == mask_id).any(), "no mask left"
    seen = torch.zeros_like(was_masked)
    bl = block_length or canvas.shape[1] - start
    for ev in events:
        c = ev.output.committed
        assert not (c & seen).any() and not (c & ~was_masked).any()
        assert not c[:, start + (ev.block + 1) * bl:].any(), "commits stay before the block's end"
        assert ev.output.confidence.dtype == torch.float64
        seen |= c
    assert torch.equal(seen, was_masked)
