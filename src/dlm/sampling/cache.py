"""The denoising loop with Fast-dLLM's KV caches (Wu et al. 2025, arXiv:2505.22618; NVlabs/Fast-dLLM
`llada/generate.py`: `generate_with_prefix_cache`, `generate_with_dual_cache`).

Blocks as in `denoise` (sampling/generate.py). At the start of each block a forward on the whole canvas refreshes
the cache (the K, V of every layer) and gives the block's first step, which is therefore exactly the uncached
step. The later steps of the block recompute only a slice of the canvas against the cached K/V of the rest:

- prefix: the slice [lo, L), the block and everything after it; the prefix [0, lo) is reused;
- dual: the slice [lo, hi), the block alone; the prefix and the suffix [hi, L) are reused.
A model whose logits are shifted (Dream: the state at i - 1 predicts token i; `cache_lookback = 1`) recomputes its
slice from one position earlier, so that the slice's first position has its predictor (Fast-dLLM's Dream cache).
The cached K/V are those of the canvas at the block's start, so within a block the result may differ slightly
from the uncached loop (the staleness the paper accepts for its speed). mode="none" recomputes the whole canvas
every step (no cache) with the same loop, for samplers with a variable number of steps.

It is the loop of `denoise_steps` (sampling/generate.py) itself, driving a `CachedForward` model_fn that the loop
tells when a block begins; every sampler attribute and the `eos_id` stopping rule work the same.

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
from dlm.sampling.generate import ModelFn, SamplingError, StepEvent, denoise_steps
from dlm.sampling.noise import Noise
from dlm.sampling.processors import LogitsProcessor
from dlm.sampling.sampler import Sampler

MODES = ("none", "prefix", "dual")


class CachedForward(ModelFn):
    """A model_fn for `denoise_steps` that keeps a KV cache across the steps of a block.

    `begin_block(a, lo, hi)` is called by the loop at each block's start: the next call refreshes the cache with a
    full forward; later calls recompute only [a, L) (prefix) or [a, hi) (dual) and take the rest of the (B, L, V)
    logits from the block's first forward.
    """

    def __init__(self, model: torch.nn.Module, mode: str, attention_mask: torch.Tensor | None = None,
                 time_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.model, self.mode, self.attention_mask, self.time_fn = model, mode, attention_mask, time_fn
        self.cached = mode != "none"
        self.cache = KVCache()
        self.block_first: torch.Tensor | None = None  # logits (B, L, V) of the block's full forward
        self.a = self.end = 0

    def _forward(self, x: torch.Tensor, xt: torch.Tensor, c: KVCache | None) -> torch.Tensor:
        t = self.time_fn(x) if self.time_fn is not None else None  # t of the whole canvas, also for a slice
        kwargs = {"cache": c} if c is not None else {}
        return self.model(xt, t, attention_mask=self.attention_mask, **kwargs).float()

    def begin_block(self, a: int, lo: int, hi: int) -> None:
        self.block_first = None
        self.a = a
        self.end = hi if self.mode == "dual" else None

    def __call__(self, x: torch.Tensor, window: tuple[int, int] | None = None, t=None) -> torch.Tensor:
        if self.mode == "none":
            return self._forward(x, x, None)
        if self.block_first is None:  # the block's first step refreshes the cache: exactly the uncached step
            self.block_first = self._forward(x, x, self.cache.refill())
            return self.block_first
        end = self.end if self.end is not None else x.shape[1]
        # A shifted model (Dream) predicts position a from the state of a - 1: the slice starts one place earlier.
        back = min(self.a, getattr(self.model, "cache_lookback", 0))
        lo = self.a - back
        raw = self.block_first.clone()
        raw[:, self.a:end] = self._forward(x, x[:, lo:end], self.cache.window(lo))[:, back:]
        return raw


def denoise_cached_steps(model: torch.nn.Module, x: torch.Tensor, start: int, steps: int, block_length: int | None,
                         sampler: Sampler, generator: Noise = None,
                         processors: Sequence[LogitsProcessor] = (), attention_mask: torch.Tensor | None = None,
                         mode: str = "prefix", time_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         eos_id: int | None = None) -> Iterator[StepEvent]:
    """`denoise_steps` with a `CachedForward`: the same events, fewer recomputed positions.

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
    forward = CachedForward(model, mode, attention_mask, time_fn)
    yield from denoise_steps(forward, x, start, steps, block_length, sampler, generator, processors, eos_id)


def denoise_cached(model: torch.nn.Module, x: torch.Tensor, start: int, steps: int, block_length: int | None,
                   sampler: Sampler, generator: Noise = None,
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
