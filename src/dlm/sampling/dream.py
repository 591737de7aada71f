"""Dream's reverse process (MaskGIT-style confidence decoding) and its three confidence rules.

Dream 7B (Ye et al. 2025; HKUNLP/Dream, `generation_utils.py`: `DreamGenerationMixin._sample`, `sample_tokens`).
Time runs over linspace(1, eps, steps + 1). At step i, from t = ts[i] to s = ts[i + 1], every masked position gets
a prediction from `sample_tokens`: logits / temperature, then top-p, then top-k filtering; a draw from the
categorical when temperature > 0, else the argmax. Then `remasking` decides what is committed:

  maskgit_plus | topk_margin | entropy (and any REMASKING rule): a confidence per masked position; the step
      commits int(num_mask * (1 - s / t)) positions, num_mask being the number of masks averaged over the batch
      (all that is left at the last step), chosen by top-k of the confidence, or, when alg_temp > 0, drawn
      without replacement from softmax(confidence / alg_temp).
  origin (Dream's default `alg`): no ranking; each masked position is unmasked independently with probability
      1 - s / t (1 at the last step): the exact reverse step of the masked diffusion process.

A user picks Dream's `alg` through `remasking`, e.g. `GenerationConfig(sampler="dream", remasking="entropy",
block_length=0)`; `origin` is understood by this sampler only (it ranks nothing, so it is no REMASKING rule).
One block (block_length = 0 or max_new_tokens) is Dream's setting; with several blocks each block runs the
schedule 1 -> eps over its own steps. Dream's logits are shifted by one position (token i is predicted at i - 1):
that shift belongs to the model adapter, so this sampler receives logits already aligned with the canvas.

    sampler = SAMPLERS.build("dream", mask_id=tok.mask_id, config=GenerationConfig(remasking="entropy"))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dlm.config import ConfigError, GenerationConfig
from dlm.sampling.noise import for_items, uniform
from dlm.sampling.remasking import REMASKING, LowConfidence, Remasking
from dlm.sampling.sampler import SAMPLERS, Sampler, SamplerOutput, TimestepOptions, gumbel_argmax

ORIGIN = "origin"  # Dream's alg="origin": independent unmasking with probability 1 - s/t, no confidence ranking


# ----- the confidence rules (Dream's `alg`) ---------------------------------------------------------------------

@REMASKING.register("maskgit_plus")
class MaskGITPlus(LowConfidence):
    """MaskGIT's rule: the probability of the predicted token (the top-1 probability at temperature 0)."""


@REMASKING.register("topk_margin")
class TopKMargin(Remasking):
    """Top-1 minus top-2 probability (Kim et al. 2025): sure *and* unambiguous positions commit first."""

    def confidence(self, probs, x0, generator):
        top2 = probs.topk(2, dim=-1).values  # (B, L, 2)
        return top2[..., 0] - top2[..., 1]


@REMASKING.register("entropy")
class NegEntropy(Remasking):
    """Negative entropy sum p log(p + eps) of the predicted distribution: peaked distributions commit first."""

    eps = 1e-10  # Dream's epsilon inside the log

    def confidence(self, probs, x0, generator):
        return (probs * torch.log(probs + self.eps)).sum(-1)


# ----- Dream's `sample_tokens` filtering ------------------------------------------------------------------------

def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probability reaches top_p (the first one always); others -> -inf."""
    sorted_logits, order = logits.sort(-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    # A token is dropped once the tokens strictly before it already exceed top_p.
    drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
    drop_sorted[..., 1:] = cumulative[..., :-1] > top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -torch.inf)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Drop every logit below the k-th largest (ties with it are kept, as the reference); -> -inf."""
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -torch.inf)


def filter_logits(logits: torch.Tensor, temperature: float, top_p: float | None, top_k: int | None) -> torch.Tensor:
    """Dream's order: logits / temperature (when > 0), then top-p, then top-k."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    return logits


# ----- the sampler ------------------------------------------------------------------------------------------------

@dataclass
class DreamOptions(TimestepOptions):
    alg_temp: float | None = None  # > 0 samples which positions to commit instead of taking the top-k

    def validate(self) -> DreamOptions:
        super().validate()
        if self.alg_temp is not None and self.alg_temp < 0:
            raise ConfigError(f"alg_temp must be >= 0 (0 or None: commit the most confident), got {self.alg_temp}")
        return self

    def draws_noise(self) -> bool:
        return bool(self.alg_temp)


@SAMPLERS.register("dream")
class DreamSampler(Sampler):
    """Dream's `_sample` loop, one `step` per forward pass; see the module docstring.

    With a confidence rule the commit counts depend only on the mask counts, so `set_timesteps` plans them exactly
    (`fixed_plan`: the loop may skip the forward pass of a step that commits nothing, as Dream's result does not
    depend on it). With `origin` the counts are random; `commits_planned` is then what is still masked.
    """

    Options = DreamOptions
    options: DreamOptions
    applies_top_k_top_p = True  # top-k / top-p are applied here, in Dream's order; do not add them as processors

    def __init__(self, mask_id: int, config: GenerationConfig | None = None, **kwargs: Any) -> None:
        super().__init__(mask_id, config, **kwargs)
        self.origin = self.config.remasking == ORIGIN
        self.fixed_plan = not self.origin  # origin's counts are random
        self.timesteps = torch.empty(0)
        self.remaining = torch.empty(0, dtype=torch.long)

    def remasking_rule(self, name: str) -> Any:
        """`origin` ranks nothing (each mask moves with probability 1 - s/t), so it has no REMASKING rule."""
        return None if name == ORIGIN else super().remasking_rule(name)

    def set_timesteps(self, steps: int, is_masked: torch.Tensor) -> None:
        """is_masked: (B, Lr) masks of the region about to be denoised. Plans Dream's commit count of each step."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        # float32 as the reference: int(num_mask * (1 - s / t)) floors a float32 product.
        self.timesteps = torch.linspace(1, self.options.eps, steps + 1)
        self.remaining = is_masked.sum(1)  # (B,)
        self.step_index = 0
        self.plan = torch.zeros(is_masked.shape[0], steps, dtype=torch.long, device=is_masked.device)
        self._plan_from(0, self.remaining)

    def _plan_from(self, first: int, left: torch.Tensor) -> None:
        """Plan steps first.. from `left` (B,) masks: Dream's count int(mean masks * (1 - s / t)), recomputed from
        the canvas at every step upstream, so a committed [MASK] prediction (suppress_special off), which leaves its
        position masked, re-plans the rest."""
        steps = self.timesteps.numel() - 1
        left = left.cpu()  # planned on the CPU: the loop reads each count as a Python int
        B = left.shape[0]
        plan = torch.zeros(B, steps - first, dtype=torch.long)
        for j, i in enumerate(range(first, steps)):
            if i < steps - 1:
                t, s = self.timesteps[i], self.timesteps[i + 1]
                num_mask = left.sum() / B  # Dream's batch-averaged mask count (float32)
                n = int(num_mask * (1 - s / t))
                plan[:, j] = left.clamp(max=n)  # a row never commits more than it has masked
            else:
                plan[:, j] = left  # the last step commits whatever is left, in every row
            left = left - plan[:, j]
        self.plan[:, first:] = plan.to(self.plan.device)

    @property
    def commits_planned(self) -> torch.Tensor:
        """(B,) exact for confidence rules; for `origin` an upper bound (the masks left), 0 when all are done."""
        return self.remaining if self.origin else super().commits_planned

    def step(self, logits, xt, lo, hi, generator=None, offset=0):
        """logits (B, L, V) aligned with xt (B, L); commits at masked positions < hi only."""
        B, L = xt.shape
        i = self.step_index
        last = i == self.timesteps.numel() - 2
        cfg = self.config
        candidate = (xt == self.mask_id) & (torch.arange(L, device=xt.device) < hi)  # (B, L): may commit now
        n = None
        if not self.origin:
            n = candidate.sum(1) if last else self.commits_planned.to(xt.device)
            candidate &= (n > 0)[:, None]  # a row planned to commit nothing draws nothing (its step is skipped)
        gen = for_items(generator, candidate.sum(1))  # each row draws for its own candidates only
        x0 = xt.clone()
        confidence = torch.full(xt.shape, -torch.inf, dtype=torch.float64, device=xt.device)
        if bool(candidate.any()):  # Dream's `sample_tokens` on the candidates' logits only
            cand = logits[candidate].double()  # (N, V) float64
            if cfg.suppress_special:  # else, as diffusion_generate, a [MASK] prediction leaves the position masked
                cand[:, self.mask_id] = -torch.inf
            cand = filter_logits(cand, cfg.temperature, cfg.top_p, cfg.top_k)
            probs = cand.softmax(-1)
            pred = gumbel_argmax(cand, 1.0, gen) if cfg.temperature > 0 else probs.argmax(-1)  # (N,)
            if self.origin:
                conf = probs.gather(-1, pred[:, None])[:, 0]
            else:
                conf = self.remasking.confidence(probs[None], pred[None], gen)[0]  # (N,)
            x0[candidate] = pred
            confidence[candidate] = conf.double()
        if self.origin:
            p_transfer = 1.0 if last else float(1 - self.timesteps[i + 1] / self.timesteps[i])
            commit = candidate.clone()
            commit[candidate] = uniform(gen, (int(candidate.sum()),), device=xt.device) < p_transfer
        else:
            score = confidence
            if self.options.alg_temp:
                # Drawing n without replacement from softmax(c / alg_temp) = top-n of c / alg_temp + Gumbel.
                u = torch.ones(xt.shape, dtype=torch.float64, device=xt.device)
                u[candidate] = uniform(gen, (int(candidate.sum()),), device=xt.device)
                score = confidence / self.options.alg_temp - torch.log(-torch.log(u.clamp_min(1e-300)))
            commit = self.remasking.select(score, candidate, n)
        kept_masked = commit & (x0 == self.mask_id)  # (B, L): [MASK] predictions, committed as upstream does
        self.remaining = self.remaining - (commit & ~kept_masked).sum(1).to(self.remaining.device)
        self.step_index += 1
        if not self.origin and bool(kept_masked.any()) and self.step_index < self.plan.shape[1]:
            self._plan_from(self.step_index, self.remaining)
        return SamplerOutput(xt=torch.where(commit, x0, xt), committed=commit & (x0 != self.mask_id), x0=x0,
                             confidence=confidence)
