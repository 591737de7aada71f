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

from dlm.sampling.processors import LogitsProcessor, apply_processors
from dlm.sampling.sampler import Sampler, SamplerOutput


class SamplingError(ValueError):
    """Sampling options that cannot work together; the message says how to fix them."""


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
    block_length = gen_length if block_length is None or block_length <= 0 else min(block_length, gen_length)
    n_blocks = -(-gen_length // block_length)
    if steps % n_blocks:
        raise SamplingError(f"steps={steps} must be a multiple of the number of blocks "
                            f"(ceil(max_new_tokens/block_length) = {n_blocks}), e.g. "
                            f"steps={fit_steps(gen_length, steps, block_length)}")
    return block_length, n_blocks, steps // n_blocks


def fit_steps(gen_length: int, steps: int, block_length: int | None) -> int:
    """The step count nearest to `steps` that splits evenly over the blocks (at least one step per block): what a
    call uses when the user left `steps` to the checkpoint's default."""
    block_length = gen_length if block_length is None or block_length <= 0 else min(block_length, gen_length)
    n_blocks = -(-max(gen_length, 1) // block_length)
    return max(n_blocks, round(steps / n_blocks) * n_blocks)


def denoise_steps(model_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, start: int, steps: int,
                  block_length: int | None, sampler: Sampler, generator: torch.Generator | None = None,
                  processors: Sequence[LogitsProcessor] = (), eos_id: int | None = None) -> Iterator[StepEvent]:
    """The denoising loop as a generator of StepEvents; the final canvas is the last event's `output.xt`.

    model_fn: (B, L) -> float logits (B, L, V); one with a `begin_block(a, lo, hi)` method (a KV-cached forward,
    sampling/cache.py) is told where each block starts. x: (B, L) canvas whose [start, L) is generated block by block.
    Sampler attributes the loop honours:
      `fixed_plan`: the sampler's `commits_planned` is exact, so a step that commits nothing skips its forward.
      `variable_steps`: keep stepping until the block has no mask (threshold decoding), not a fixed count.
      `reuse_logits_when_unchanged`: reuse the last logits when the canvas did not change (MDLM's cache).
      `begin(x, region, generator) -> x`: called once a block is planned (a uniform graph draws its prior there).
      `pending(x, region) -> bool`: whether the block needs another step (default: it still holds a mask).
      `model_time`: the time t of the next forward, passed as `t=` to a model_fn marked `accepts_time`
      (SEDD, D3PM); samplers without it leave a time-conditioned network's t to the model_fn.
    With `eos_id` (variable length), a row whose finished block holds [EOS] has the rest of its canvas filled with
    [EOS] and takes no further commits; the loop ends when every row has stopped.
    """
    x = x.clone()
    B, L = x.shape
    block_length, n_blocks, steps_per_block = plan_blocks(L - start, steps, block_length)
    mask_id = sampler.mask_id
    last_x: torch.Tensor | None = None
    last_logits: torch.Tensor | None = None
    global_step = 0
    # Windowed steps: the sampler can take logits of [w0, hi) only, the model_fn can compute just those, and no
    # processor looks at positions (a `where` mask) or at the rest of the canvas (repetition penalty).
    window = (getattr(sampler, "windowed", False) and getattr(model_fn, "supports_window", False)
              and not hasattr(model_fn, "begin_block") and all(getattr(p, "window_safe", False) for p in processors))
    with torch.no_grad():
        for b in range(n_blocks):
            lo, hi = start + b * block_length, min(start + (b + 1) * block_length, L)  # the last may be shorter
            # The first block also owns every mask before it (infilling gaps inside the prompt).
            region = slice(0 if b == 0 else lo, hi)
            region_masked = x[:, region] == mask_id
            if not region_masked.any():
                continue
            sampler.set_timesteps(steps_per_block, region_masked)
            if hasattr(sampler, "begin"):
                x = sampler.begin(x, region, generator)
            if hasattr(model_fn, "begin_block"):  # a cached forward: the slice starts at the block or first gap
                first_gap = int(region_masked.any(0).nonzero()[0]) + region.start
                model_fn.begin_block(min(lo, first_gap), lo, hi)
                last_x = None  # reuse logits only within a block
            budget = steps_per_block if not getattr(sampler, "variable_steps", False) else L + steps_per_block
            timed = getattr(model_fn, "accepts_time", False) and hasattr(type(sampler), "model_time")
            for _ in range(budget):
                if not (sampler.pending(x, region) if hasattr(sampler, "pending") else (x[:, region] == mask_id).any()):
                    break
                if getattr(sampler, "fixed_plan", False) and int(sampler.commits_planned.max()) == 0:
                    sampler.step_index += 1  # nothing to commit: skip the forward pass, the result is identical
                    global_step += 1
                    continue
                seen, kwargs = x, {}
                t_kw = {"t": sampler.model_time} if timed else {}
                if window:
                    # Only [w0, hi) can be committed: the head, the processors and the sampler see just that.
                    w0 = min(lo, int((x[:, :hi] == mask_id).any(0).nonzero()[0]))
                    raw, seen, kwargs = model_fn(x, window=(w0, hi), **t_kw), x[:, w0:hi], {"offset": w0}
                elif getattr(sampler, "reuse_logits_when_unchanged", False) and last_x is not None and \
                        torch.equal(last_x, x):
                    raw = last_logits
                else:
                    raw = model_fn(x, **t_kw)
                    last_x, last_logits = x, raw
                logits = apply_processors(processors, raw, seen)
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
            block_length: int | None, sampler: Sampler, generator: torch.Generator | None = None,
            processors: Sequence[LogitsProcessor] = (), callback: Callable[[StepEvent], None] | None = None,
            eos_id: int | None = None) -> torch.Tensor:
    """Run `denoise_steps` to the end -> the final canvas (B, L); `callback` sees every StepEvent."""
    final = x
    for event in denoise_steps(model_fn, x, start, steps, block_length, sampler, generator, processors, eos_id):
        if callback is not None:
            callback(event)
        final = event.output.xt
    return final.clone() if final is x else final
