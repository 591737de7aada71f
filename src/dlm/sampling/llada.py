"""LLaDA's reverse process (Nie et al. 2025; ML-GSAI/LLaDA `generate.py`): a block's masks are spread evenly over
its steps (the remainder to the first steps); each step predicts every masked token (argmax of the logits, with
Gumbel noise in float64 when temperature > 0), scores it with the remasking rule and commits the n best masked
positions that lie before the block's end. Committed tokens are never re-masked.

    sampler = SAMPLERS.build("llada", mask_id=tok.mask_id, config=GenerationConfig(temperature=0.0))
    sampler.set_timesteps(steps, is_masked[:, lo:hi]); out = sampler.step(logits, xt, lo, hi, generator)
"""

from __future__ import annotations

import torch

from dlm.sampling.noise import Noise, for_items
from dlm.sampling.sampler import SAMPLERS, Sampler, SamplerOutput, gumbel_argmax


@SAMPLERS.register("llada")
class LLaDASampler(Sampler):
    """LLaDA's step. The argmax and the float64 softmax run only at the positions this step may commit (masked,
    before the block's end): the same tokens as the reference, which softmaxes every position of the canvas."""

    fixed_plan = True  # commits_planned is exact: a step planned to commit nothing needs no forward pass
    windowed = True  # step() accepts the logits of [offset, hi) only

    def predict(self, logits: torch.Tensor, xt: torch.Tensor, hi: int, generator: Noise,
                offset: int = 0, allowed: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> candidate (B, L) bool (masked, before `hi`), x0 (B, L) and confidence (B, L) float64 at them.

        logits (B, L, V) or, windowed, (B, W, V) for positions [offset, offset + W) that cover every candidate.
        allowed: (B, L) or (B, 1) bool, where this step may commit at all (a row planned to commit nothing, the
        block sampler's sub-block): nothing is predicted or drawn elsewhere, so a row's noise is its own.
        """
        candidate = xt == self.mask_id
        candidate[:, hi:] = False  # (B, L): may be committed by this step
        if allowed is not None:
            candidate &= allowed
        x0 = xt.clone()
        confidence = torch.full(xt.shape, -torch.inf, dtype=torch.float64, device=xt.device)
        if bool(candidate.any()):
            gen = for_items(generator, candidate.sum(1))  # row r draws for its own candidates only
            cand_logits = logits[candidate[:, offset:offset + logits.shape[1]]]  # (N, V)
            if self.config.suppress_special:  # else, as the reference, a [MASK] prediction leaves it masked
                cand_logits[:, self.mask_id] = -torch.inf
            pred = gumbel_argmax(cand_logits, self.temperature, gen)  # (N,)
            probs = torch.softmax(cand_logits.double(), dim=-1)  # (N, V) float64, as the reference
            conf = self.remasking.confidence(probs[None], pred[None], gen)[0]  # (N,)
            conf = self.defer_end_markers(pred, conf)  # keep [EOS] / [PAD] from being committed early
            x0[candidate] = pred
            confidence[candidate] = conf.double()
        return candidate, x0, confidence

    def step(self, logits, xt, lo, hi, generator=None, offset=0):
        """logits (B, L, V) or, windowed, (B, hi - offset, V) for positions [offset, hi); xt (B, L).

        Commits inside [0, hi) only (earlier blocks are already complete)."""
        n = self.commits_planned
        # A row planned to commit nothing draws nothing: as if the step were skipped for it (`fixed_plan`).
        candidate, x0, confidence = self.predict(logits, xt, hi, generator, offset, (n > 0)[:, None])
        commit = self.remasking.select(confidence, candidate, n)
        self.step_index += 1
        return SamplerOutput(xt=torch.where(commit, x0, xt), committed=commit & (x0 != self.mask_id), x0=x0,
                             confidence=confidence)
