"""The denoising loop: a canvas (B, L) with masks -> a canvas without masks, block by block.

Semi-autoregressive blocks (LLaDA): the generated region [start, L) is cut into blocks of `block_length`; the
`steps` are split evenly over the blocks; each block is denoised fully before the next one starts. Positions
outside the generated region that hold [MASK] (infilling gaps) are denoised with the first block.

    x = denoise(model_fn, canvas, start=prompt_len, steps=64, block_length=32, sampler=sampler, generator=g)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    """-> (block_length, n_blocks, steps_per_block), with a clear error when they do not divide."""
    if gen_length < 1:
        raise SamplingError(f"max_new_tokens must be >= 1, got {gen_length}")
    if steps < 1:
        raise SamplingError(f"steps must be >= 1, got {steps}")
    block_length = gen_length if block_length is None or block_length <= 0 else min(block_length, gen_length)
    if gen_length % block_length:
        raise SamplingError(f"max_new_tokens={gen_length} must be a multiple of block_length={block_length} "
                            f"(e.g. block_length={_largest_divisor(gen_length, block_length)})")
    n_blocks = gen_length // block_length
    if steps % n_blocks:
        suggestion = max(n_blocks, steps // n_blocks * n_blocks)
        raise SamplingError(f"steps={steps} must be a multiple of the number of blocks "
                            f"(max_new_tokens/block_length = {n_blocks}), e.g. steps={suggestion}")
    return block_length, n_blocks, steps // n_blocks


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, at_most + 1) if n % d == 0)


@torch.no_grad()
def denoise(model_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, start: int, steps: int,
            block_length: int | None, sampler: Sampler, generator: torch.Generator | None = None,
            processors: Sequence[LogitsProcessor] = (), callback: Callable[[StepEvent], None] | None = None
            ) -> torch.Tensor:
    """model_fn: (B, L) -> float logits (B, L, V). x: (B, L) canvas; [start, L) is generated block by block."""
    x = x.clone()
    L = x.shape[1]
    block_length, n_blocks, steps_per_block = plan_blocks(L - start, steps, block_length)
    global_step = 0
    for b in range(n_blocks):
        lo, hi = start + b * block_length, start + (b + 1) * block_length
        # The first block also owns every mask before it (infilling gaps inside the prompt).
        region = slice(0 if b == 0 else lo, hi)
        sampler.set_timesteps(steps_per_block, x[:, region] == sampler.mask_id)
        for _ in range(steps_per_block):
            if int(sampler.commits_planned.max()) == 0:
                sampler.step_index += 1  # nothing to commit: skip the forward pass, the result is identical
                global_step += 1
                continue
            logits = apply_processors(processors, model_fn(x), x)
            out = sampler.step(logits, x, lo, hi, generator)
            x = out.xt
            if callback is not None:
                callback(StepEvent(block=b, step=global_step, output=out))
            global_step += 1
    return x
