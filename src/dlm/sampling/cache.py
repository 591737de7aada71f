"""The denoising loop with Fast-dLLM's KV caches (Wu et al. 2025, arXiv:2505.22618; NVlabs/Fast-dLLM
`llada/generate.py`: `generate_with_prefix_cache`, `generate_with_dual_cache`).

Blocks as in `denoise` (sampling/generate.py). At the start of each block a forward on the whole canvas refreshes
the cache (the K, V of every layer) and gives the block's first step, which is therefore exactly the uncached
step. The later steps of the block recompute only a slice of the canvas against the cached K/V of the rest:

- prefix: the slice [lo, L), the block and everything after it; the prefix [0, lo) is reused;
- dual: the slice [lo, hi), the block alone; the prefix and the suffix [hi, L) are reused.
The cached K/V are those of the canvas at the block's start, so within a block the result may differ slightly
from the uncached loop (the staleness the paper accepts for its speed). mode="none" recomputes the whole canvas
every step (no cache) with the same loop, for samplers with a variable number of steps.

The loop honours the same sampler attributes as `denoise_steps` (sampling/generate.py): `variable_steps`
(fast_dllm: step until the block holds no mask, as the reference loops do), `fixed_plan` (skip a step planned to
commit nothing) and `reuse_logits_when_unchanged` (within a block), and the same `eos_id` stopping rule.

The samplers and processors always see full-canvas logits (B, L, V): the fresh logits of the slice, and outside
it the logits of the block's first (full) forward. A sampler commits only masked positions before the block's
end, and every one of them lies inside the slice, so those stale logits never decide a commit (processors still
transform them, at the same cost as in the uncached loop).

    x = denoise_cached(model, canvas, start=prompt_len, steps=64, block_length=32, sampler=sampler, mode="dual")
    for event in denoise_cached_steps(model, canvas, prompt_len, 64, 32, sampler, mode="prefix"): ...
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence

import torch

from dlm.models.common import KVCache
from dlm.sampling.generate import SamplingError, StepEvent, plan_blocks
from dlm.sampling.processors import LogitsProcessor, apply_processors
from dlm.sampling.sampler import Sampler

MODES = ("none", "prefix", "dual")


def denoise_cached_steps(model: torch.nn.Module, x: torch.Tensor, start: int, steps: int, block_length: int | None,
                         sampler: Sampler, generator: torch.Generator | None = None,
                         processors: Sequence[LogitsProcessor] = (), attention_mask: torch.Tensor | None = None,
                         mode: str = "prefix", time_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         eos_id: int | None = None) -> Iterator[StepEvent]:
    """The cached loop as a generator of StepEvents; the final canvas is the last event's `output.xt`.

    model: net(xt, t, attention_mask=, cache=) -> logits, with `supports_kv_cache` (else it runs uncached, with a
    warning). x: (B, L) canvas whose [start, L) is generated block by block. attention_mask: (B, L), 1 = real
    token (left-padded prompts: pads are never attended to). time_fn: canvas (B, L) -> t (B,) for time-conditioned
    networks (None passes t=None). eos_id: variable length, as in `denoise_steps`.
    """
    if mode not in MODES:
        raise SamplingError(f"cache mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "none" and not getattr(model, "supports_kv_cache", False):
        warnings.warn(f"{type(model).__name__} has no KV cache; running cache={mode!r} without one", stacklevel=2)
        mode = "none"
    x = x.clone()
    B, L = x.shape
    mask_id = sampler.mask_id
    block_length, n_blocks, steps_per_block = plan_blocks(L - start, steps, block_length)
    cache = KVCache()

    def forward(xt: torch.Tensor, c: KVCache | None) -> torch.Tensor:
        t = time_fn(x) if time_fn is not None else None  # t of the whole canvas, also for a slice
        kwargs = {"cache": c} if c is not None else {}
        return model(xt, t, attention_mask=attention_mask, **kwargs).float()

    global_step = 0
    with torch.no_grad():
        for b in range(n_blocks):
            lo, hi = start + b * block_length, start + (b + 1) * block_length
            # The first block also owns every mask before it (infilling gaps inside the prompt).
            region = slice(0 if b == 0 else lo, hi)
            if not (x[:, region] == mask_id).any():
                continue
            sampler.set_timesteps(steps_per_block, x[:, region] == mask_id)
            # The recomputed slice [a, end) starts at the block, or at the first gap inside the prompt.
            a = min(lo, region.start + int((x[:, region] == mask_id).any(0).nonzero()[0]))
            end = L if mode == "prefix" else hi
            block_first: torch.Tensor | None = None  # logits (B, L, V) of the block's full forward
            last: tuple[torch.Tensor, torch.Tensor] | None = None  # (canvas, logits) of the previous step
            budget = steps_per_block if not getattr(sampler, "variable_steps", False) else L + steps_per_block
            for _ in range(budget):
                if not (x[:, region] == mask_id).any():
                    break
                if getattr(sampler, "fixed_plan", False) and int(sampler.commits_planned.max()) == 0:
                    sampler.step_index += 1  # nothing to commit: skip the forward pass, the result is identical
                    global_step += 1
                    continue
                if getattr(sampler, "reuse_logits_when_unchanged", False) and last is not None and \
                        torch.equal(last[0], x):
                    raw = last[1]
                elif mode == "none":
                    raw = forward(x, None)
                elif block_first is None:  # the block's first step refreshes the cache: exactly the uncached step
                    raw = block_first = forward(x, cache.refill())
                else:
                    raw = block_first.clone()
                    raw[:, a:end] = forward(x[:, a:end], cache.window(a))
                last = (x, raw)
                logits = apply_processors(processors, raw, x)
                out = sampler.step(logits, x, lo, hi, generator)
                x = out.xt
                yield StepEvent(block=b, step=global_step, output=out)
                global_step += 1
            if eos_id is not None:
                done = (x[:, start:hi] == eos_id).any(1)  # (B,)
                if done.any():
                    x[done, hi:] = eos_id
                if bool(done.all()):
                    break


def denoise_cached(model: torch.nn.Module, x: torch.Tensor, start: int, steps: int, block_length: int | None,
                   sampler: Sampler, generator: torch.Generator | None = None,
                   processors: Sequence[LogitsProcessor] = (), callback: Callable[[StepEvent], None] | None = None,
                   attention_mask: torch.Tensor | None = None, mode: str = "prefix",
                   time_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   eos_id: int | None = None) -> torch.Tensor:
    """Run `denoise_cached_steps` to the end -> the final canvas (B, L); `callback` sees every StepEvent."""
    final = x
    for event in denoise_cached_steps(model, x, start, steps, block_length, sampler, generator, processors,
                                      attention_mask, mode, time_fn, eos_id):
        if callback is not None:
            callback(event)
        final = event.output.xt
    return final.clone() if final is x else final
