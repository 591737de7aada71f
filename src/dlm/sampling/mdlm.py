"""MDLM / SEDD ancestral sampling of an absorbing (masked) diffusion: the exact reverse step from t to s.

MDLM (Sahoo et al. 2024; kuleshov-group/mdlm `diffusion.py`: `_sample`, `_ddpm_update`, `_ddpm_caching_update`).
Time runs over linspace(1, eps, steps + 1). From t to s, under the SUBS parameterisation (the mask logit is -inf,
committed tokens are carried over), each still-masked token is unmasked with probability
(alpha_s - alpha_t) / (1 - alpha_t), which is (t - s) / t for the log-linear schedule, and its token is drawn from
the model's categorical softmax(logits / temperature) with Gumbel noise in float64 (argmax at temperature 0).
The reference draws both at once from q(x_s) = [p_x0 (t - s), s] / t; drawing "unmask?" and "which token?" apart
is the same distribution. At the last step, every mask still left after that draw is committed by the argmax of
the same logits: MDLM's noise-removal step, without spending an extra forward pass on it.

`mdlm_cache` is MDLM's `ddpm_cache`: a step that unmasks nothing leaves the canvas unchanged, so the loop reuses
the previous logits instead of calling the model (`reuse_logits_when_unchanged`). The result is identical whenever
the network's output depends on the canvas only (as here: a time-conditioned net gets t = the fraction of masks).
MDLM ranks nothing, so the `remasking` option does not apply; `top_k` / `top_p` are left to the processors.

    sampler = SAMPLERS.build("mdlm", mask_id=tok.mask_id, config=GenerationConfig(temperature=1.0, block_length=0))
"""

from __future__ import annotations

import torch

from dlm.sampling.noise import for_items, uniform
from dlm.sampling.sampler import SAMPLERS, Sampler, SamplerOutput, TimestepOptions, gumbel_argmax
from dlm.schedules import LogLinear, NoiseSchedule


@SAMPLERS.register("mdlm")
class MDLMSampler(Sampler):
    """Ancestral sampling; the number of commits per step is random, so `commits_planned` is the masks left."""

    Options = TimestepOptions
    options: TimestepOptions
    reuse_logits_when_unchanged = False
    # MDLM's move_chance = t. The schedule's own eps only scales move_chance, so it cancels in the unmask ratio.
    schedule: NoiseSchedule = LogLinear(eps=0.0)

    def set_timesteps(self, steps: int, is_masked: torch.Tensor) -> None:
        """is_masked: (B, Lr) masks of the region about to be denoised."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.timesteps = torch.linspace(1, self.options.eps, steps + 1, dtype=torch.float64)
        self.remaining = is_masked.sum(1)  # (B,)
        self.step_index = 0

    @property
    def commits_planned(self) -> torch.Tensor:
        """(B,) an upper bound (what is still masked): 0 means the block is done."""
        return self.remaining

    def unmask_probability(self, i: int) -> float:
        """(alpha_s - alpha_t) / (1 - alpha_t) for the step from ts[i] to ts[i + 1]."""
        alpha_t, alpha_s = self.schedule.alpha(self.timesteps[i: i + 2])
        return float((alpha_s - alpha_t) / (1 - alpha_t))

    def step(self, logits, xt, lo, hi, generator=None, offset=0):
        """logits (B, L, V), xt (B, L); commits at masked positions < hi only."""
        B, L = xt.shape
        i = self.step_index
        candidate = (xt == self.mask_id) & (torch.arange(L, device=xt.device) < hi)  # (B, L): may commit now
        gen = for_items(generator, candidate.sum(1))  # each row draws for its own candidates only
        commit = candidate.clone()
        commit[candidate] = uniform(gen, (int(candidate.sum()),), device=xt.device) < self.unmask_probability(i)
        last = i == self.timesteps.numel() - 2
        x0 = xt.clone()
        confidence = torch.full(xt.shape, -torch.inf, dtype=torch.float64, device=xt.device)
        if bool(candidate.any()):
            cand = logits[candidate].double()  # (N, V) float64
            cand[:, self.mask_id] = -torch.inf  # SUBS: [MASK] is never a prediction
            pred = gumbel_argmax(cand, self.temperature, gen)  # (N,)
            if last:  # noise removal: what the ancestral draw leaves masked takes the argmax
                pred = torch.where(commit[candidate], pred, cand.argmax(-1))
            x0[candidate] = pred
            confidence[candidate] = cand.softmax(-1).gather(-1, pred[:, None])[:, 0]
        if last:
            commit = candidate
        self.remaining = self.remaining - commit.sum(1).to(self.remaining.device)
        self.step_index += 1
        return SamplerOutput(xt=torch.where(commit, x0, xt), committed=commit, x0=x0, confidence=confidence)


@SAMPLERS.register("mdlm_cache")
class MDLMCacheSampler(MDLMSampler):
    """MDLM's `ddpm_cache`: the loop reuses the last logits when no token was unmasked since the last forward."""

    reuse_logits_when_unchanged = True
