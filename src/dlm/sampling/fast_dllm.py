"""Fast-dLLM parallel decoding (Wu et al. 2025, arXiv:2505.22618; NVlabs/Fast-dLLM `llada/generate.py`).

Each step predicts every masked token as LLaDA does (argmax, Gumbel-max in float64 when temperature > 0), scores
it with the remasking rule, and commits, among the masked positions before the block's end:

- `factor` f (Fast-dLLM's `get_transfer_index_dynamic`): rank the masked positions by confidence; the i-th
  (i = 1, 2, ...) passes when c_i >= 1 - f / (i + 1), i.e. (i + 1)(1 - c_i) <= f, and the first always passes;
  commit the k positions before the first one that fails (all if none fails). As in the reference, when the
  first failure is the last masked position, all are committed too (so a block's last two masks go together).
- `threshold` tau (`get_transfer_index`): every position with c >= tau, and always the single most confident.
- neither: LLaDA's planned count (the base class plan), so the sampler then equals `llada`.
`factor` wins when both are set, as in the reference. The number of steps of a block is then variable: a driver
steps until the block holds no mask (`variable_steps`; denoise_steps and sampling.cache.denoise_cached do).

    sampler = SAMPLERS.build("fast_dllm", mask_id=tok.mask_id, threshold=0.9)
    sampler.set_timesteps(steps, is_masked[:, lo:hi]); out = sampler.step(logits, xt, lo, hi, generator)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.config import ConfigError
from dlm.sampling.llada import LLaDASampler
from dlm.sampling.sampler import SAMPLERS, SamplerOutput, ThresholdOptions


@dataclass
class FastDLLMOptions(ThresholdOptions):
    factor: float | None = None  # factor decoding: commit the n best with (n + 1)(1 - c_n) < factor

    def validate(self) -> FastDLLMOptions:
        super().validate()
        if self.factor is not None and self.factor <= 0:
            raise ConfigError(f"factor must be > 0, got {self.factor}")
        return self


def threshold_count(confidence: torch.Tensor, eligible: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, L) scores, (B, L) bool -> (B,) how many eligible positions reach the threshold, at least one if any."""
    n = (eligible & (confidence >= threshold)).sum(1)
    return torch.minimum(n.clamp_min(1), eligible.sum(1))


def factor_count(confidence: torch.Tensor, eligible: torch.Tensor, factor: float) -> torch.Tensor:
    """(B, L) scores, (B, L) bool -> (B,) the commit count of Fast-dLLM's factor rule (see the module docstring)."""
    B, L = confidence.shape
    ranked = torch.where(eligible, confidence, -torch.inf).sort(1, descending=True).values  # (B, L)
    n = eligible.sum(1)  # (B,)
    rank = torch.arange(L, device=confidence.device)  # 0-based: rank r holds the (r + 1)-th most confident
    bar = 1.0 - factor / (rank.to(confidence.dtype) + 2.0)
    bar[0] = -torch.inf  # the most confident always passes
    fails = (ranked < bar) & (rank < n[:, None])  # (B, L)
    first_fail = torch.where(fails.any(1), fails.int().argmax(1), n)  # argmax returns the first maximum
    # The reference cannot tell "no failure" from "the last one fails": both commit every masked position.
    return torch.where(first_fail == n - 1, n, first_fail)


@SAMPLERS.register("fast_dllm")
class FastDLLMSampler(LLaDASampler):
    """LLaDA's step with Fast-dLLM's commit count; without threshold and factor it is LLaDASampler exactly."""

    Options = FastDLLMOptions
    options: FastDLLMOptions
    variable_steps = True  # a driver steps until the block holds no mask, not a fixed number of times

    @property
    def adaptive(self) -> bool:
        """True when the logits decide how many tokens a step commits (threshold or factor)."""
        return self.options.threshold is not None or self.options.factor is not None

    @property
    def fixed_plan(self) -> bool:
        """Without threshold / factor, `commits_planned` is exact and a step planned to commit nothing is skipped."""
        return not self.adaptive

    def set_timesteps(self, steps: int, is_masked: torch.Tensor) -> None:
        super().set_timesteps(steps, is_masked)
        self.remaining = is_masked.sum(1)  # (B,) masks left in the block

    @property
    def commits_planned(self) -> torch.Tensor:
        """(B,) the planned count; with threshold / factor an upper bound (every mask left), 0 once done."""
        assert self.plan is not None, "call set_timesteps first"
        if self.adaptive or self.step_index >= self.plan.shape[1]:
            return self.remaining
        return self.plan[:, self.step_index]

    def step(self, logits, xt, lo, hi, generator=None, offset=0):
        """logits (B, L, V) (or windowed, as LLaDASampler), xt (B, L); commits masked positions inside [0, hi)
        only: earlier blocks are complete, so this is [lo, hi) except in the first block, which also owns masks
        inside the prompt (infilling). Fast-dLLM likewise gives positions past the block -inf confidence."""
        planned = None if self.adaptive else self.commits_planned  # a row planned to commit nothing draws nothing
        allowed = None if planned is None else (planned > 0)[:, None]
        candidate, x0, confidence = self.predict(logits, xt, hi, generator, offset, allowed)
        if self.options.factor is not None:
            n = factor_count(confidence, candidate, self.options.factor)
        elif self.options.threshold is not None:
            n = threshold_count(confidence, candidate, self.options.threshold)
        else:
            n = planned
        commit = self.remasking.select(confidence, candidate, n)
        self.step_index += 1
        self.remaining = (self.remaining - commit.sum(1).to(self.remaining.device)).clamp_min(0)
        return SamplerOutput(xt=torch.where(commit, x0, xt), committed=commit & (x0 != self.mask_id), x0=x0,
                             confidence=confidence)
