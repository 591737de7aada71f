"""The denoising loop: a canvas (B, L) with masks -> a canvas without masks, block by block.

Semi-autoregressive blocks (LLaDA): the generated region [start, L) is cut into blocks of `block_length`; the
`steps` are split evenly over the blocks; each block is denoised fully before the next one starts. Positions
outside the generated region that hold [MASK] (infilling gaps) are denoised with the first block.

    x = denoise(model_fn, canvas, start=prompt_len, steps=64, block_length=32, sampler=sampler, generator=g)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from dlm.errors import SamplingError  # re-exported: dlm.sampling.SamplingError
from dlm.sampling.noise import Noise
from dlm.sampling.processors import LogitsProcessor, apply_processors
from dlm.sampling.sampler import Sampler, SamplerOutput


class ModelFn:
    """What the loops call: canvas (B, L) -> float logits (B, L, V), with its capabilities declared.

    supports_window: may compute the logits of [w0, hi) only, `fn(x, window=(w0, hi))` -> (B, hi - w0, V).
    accepts_time: takes a sampler's own time, `fn(x, t=t)` (SEDD, D3PM); otherwise the network's t is the
    process's reading of the canvas. cached: a KV-cached forward, told where each block starts by `begin_block`.
    A plain callable is wrapped with every capability off (`as_model_fn`).
    """

    supports_window = False
    accepts_time = False
    cached = False

    def __init__(self, fn: Callable[..., torch.Tensor], supports_window: bool = False,
                 accepts_time: bool = False) -> None:
        self.fn = fn
        self.supports_window, self.accepts_time = supports_window, accepts_time

    def __call__(self, x: torch.Tensor, window: tuple[int, int] | None = None, t=None) -> torch.Tensor:
        kwargs = {k: v for k, v in (("window", window), ("t", t)) if v is not None}
        return self.fn(x, **kwargs)

    def begin_block(self, a: int, lo: int, hi: int) -> None:
        """A block [lo, hi) starts (its first gap at a): a cached forward refreshes there; others ignore it."""


def as_model_fn(fn: Callable[..., torch.Tensor]) -> ModelFn:
    return fn if isinstance(fn, ModelFn) else ModelFn(fn)


@dataclass
class StepEvent:
    block: int
    step: int  # global step index
    output: SamplerOutput


def plan_blocks(gen_length: int, steps: int, block_length: int | None) -> tuple[int, int, int]:
    """-> (block_length, n_blocks, steps_per_block), with a clear error when the steps do not split evenly.

    When `block_length` does not divide `gen_length` the last block is shorter (ceil(gen_length / block_length)
    blocks); its masks are spread over the same number of steps as every other block's, so any max_new_tokens
    works. When it divides, this is LLaDA's plan exactly."""
    if gen_length < 1:
        raise SamplingError(f"max_new_tokens must be >= 1, got {gen_length}")
    if steps < 1:
        raise SamplingError(f"steps must be >= 1, got {steps}")
    block_length, n_blocks = _blocks(gen_length, block_length)
    if steps % n_blocks:
        raise SamplingError(f"steps={steps} must be a multiple of the number of blocks "
                            f"(ceil(max_new_tokens/block_length) = {n_blocks}), e.g. "
                            f"steps={fit_steps(gen_length, steps, block_length)}")
    return block_length, n_blocks, steps // n_blocks


def fit_steps(gen_length: int, steps: int, block_length: int | None) -> int:
    """The step count nearest to `steps` that splits evenly over the blocks (at least one step per block): what a
    call uses when the user left `steps` to the checkpoint's default."""
    n_blocks = _blocks(max(gen_length, 1), block_length)[1]
    return max(n_blocks, round(steps / n_blocks) * n_blocks)


def _blocks(gen_length: int, block_length: int | None) -> tuple[int, int]:
    """-> (block_length, n_blocks): None or 0 is one block; a block longer than the generation is clipped."""
    block_length = gen_length if block_length is None or block_length <= 0 else min(block_length, gen_length)
    return block_length, -(-gen_length // block_length)


def denoise_steps(model_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, start: int, steps: int,
                  block_length: int | None, sampler: Sampler, generator: Noise = None,
                  processors: Sequence[LogitsProcessor] = (), eos_id: int | None = None) -> Iterator[StepEvent]:
    """The denoising loop as a generator of StepEvents; the final canvas is the last event's `output.xt`.

    model_fn: (B, L) -> float logits (B, L, V), a `ModelFn` (or a plain callable, wrapped with no capabilities).
    x: (B, L) canvas whose [start, L) is generated block by block. The sampler's declared hooks (dlm.sampling.
    sampler.Sampler: `fixed_plan`, `variable_steps`, `windowed`, `reuse_logits_when_unchanged`, `begin`, `pending`,
    `model_time`, `skip_step`) are what the loop uses; it probes nothing.
    With `eos_id` (variable length), a row whose finished block holds [EOS] has the rest of its canvas filled with
    [EOS] and takes no further commits; the loop ends when every row has stopped.
    """
    model_fn = as_model_fn(model_fn)
    x = x.clone()
    B, L = x.shape
    block_length, n_blocks, steps_per_block = plan_blocks(L - start, steps, block_length)
    mask_id = sampler.mask_id
    last_x: torch.Tensor | None = None
    last_logits: torch.Tensor | None = None
    global_step = 0
    # Windowed steps: the sampler can take logits of [w0, hi) only, the model_fn can compute just those, and no
    # processor looks at positions (a `where` mask); one that reads the rest of the canvas (repetition penalty)
    # must declare `reads_canvas` and is given the whole canvas. A plain callable given as a processor is not known to
    # be window-safe.
    window = (sampler.windowed and model_fn.supports_window and not model_fn.cached
              and all(getattr(p, "window_safe", False) or getattr(p, "reads_canvas", False) for p in processors))
    with torch.no_grad():
        for b in range(n_blocks):
            lo, hi = start + b * block_length, min(start + (b + 1) * block_length, L)  # the last may be shorter
            # The first block also owns every mask before it (infilling gaps inside the prompt).
            region = slice(0 if b == 0 else lo, hi)
            region_masked = x[:, region] == mask_id
            if not region_masked.any():
                continue
            sampler.set_timesteps(steps_per_block, region_masked)
            x = sampler.begin(x, region, generator)
            first_gap = int(region_masked.any(0).nonzero()[0]) + region.start
            model_fn.begin_block(min(lo, first_gap), lo, hi)  # a cached forward: the slice starts at the first gap
            if model_fn.cached:
                last_x = None  # a cached forward's logits are reused only within a block
            budget = steps_per_block if not sampler.variable_steps else L + steps_per_block
            for _ in range(budget):
                if not sampler.pending(x, region):
                    break
                if sampler.fixed_plan and int(sampler.commits_planned.max()) == 0:
                    sampler.skip_step()  # nothing to commit: skip the forward pass, the result is identical
                    global_step += 1
                    continue
                seen, kwargs = x, {}
                t = sampler.model_time if model_fn.accepts_time else None
                t_kw = {"t": t} if t is not None else {}
                if window:
                    # Only [w0, hi) can be committed: the head, the processors and the sampler see just that.
                    w0 = min(lo, int((x[:, :hi] == mask_id).any(0).nonzero()[0]))
                    raw, seen, kwargs = model_fn(x, window=(w0, hi), **t_kw), x[:, w0:hi], {"offset": w0}
                elif sampler.reuse_logits_when_unchanged and last_x is not None and torch.equal(last_x, x):
                    raw = last_logits
                else:
                    raw = model_fn(x, **t_kw)
                    last_x, last_logits = x, raw
                logits = apply_processors(processors, raw, seen, canvas=x if window else None)
                out = sampler.step(logits, x, lo, hi, generator, **kwargs)
                x = out.xt
                yield StepEvent(block=b, step=global_step, output=out)
                global_step += 1
            if eos_id is not None:
                done = (x[:, start:hi] == eos_id).any(1)  # (B,)
                if done.any():
                    x[done, hi:] = eos_id
                if bool(done.all()):
                    break


def denoise(model_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, start: int, steps: int,
            block_length: int | None, sampler: Sampler, generator: Noise = None,
            processors: Sequence[LogitsProcessor] = (), callback: Callable[[StepEvent], None] | None = None,
            eos_id: int | None = None) -> torch.Tensor:
    """Run `denoise_steps` to the end -> the final canvas (B, L); `callback` sees every StepEvent."""
    final = x
    for event in denoise_steps(model_fn, x, start, steps, block_length, sampler, generator, processors, eos_id):
        if callback is not None:
            callback(event)
        final = event.output.xt
    return final.clone() if final is x else final
