"""Remasking rules: which masked positions a denoising step commits.

A rule scores each position (`confidence`, (B, L)) and `select` keeps the n highest-scoring masked positions per
row. `low_confidence` is LLaDA's default (commit where the model is surest: the probability of the predicted
token, in float64); `random` scores with uniform noise (LLaDA's `random` remasking).

    rule = REMASKING.build("low_confidence"); commit = rule.select(rule.confidence(probs, x0, g), is_masked, n)
"""

from __future__ import annotations

import torch

from dlm.registry import Registry
from dlm.sampling.noise import Noise, uniform

REMASKING: Registry[type[Remasking]] = Registry("remasking rule")


class Remasking:
    def confidence(self, probs: torch.Tensor, x0: torch.Tensor, generator: Noise) -> torch.Tensor:
        """probs (B, L, V) float64, x0 (B, L) predicted tokens -> score (B, L) float64; higher commits first.
        Samplers pass their candidates as one row (1, N, V) with `generator.for_items` counts (dlm.sampling.noise)."""
        raise NotImplementedError

    @staticmethod
    def select(confidence: torch.Tensor, is_masked: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Top-n[b] masked positions of each row by confidence -> bool (B, L). Ties go to the lower index."""
        B, L = confidence.shape
        score = torch.where(is_masked, confidence, torch.full_like(confidence, -torch.inf))
        n = torch.minimum(n.to(confidence.device), is_masked.sum(1))  # never more than what is masked
        k = int(n.max()) if B else 0
        commit = torch.zeros_like(is_masked)
        if k == 0:
            return commit
        # A stable descending sort puts equal scores in index order, so results do not depend on the backend.
        order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]  # (B, k)
        keep = torch.arange(k, device=score.device)[None, :] < n[:, None]  # (B, k)
        commit.scatter_(1, order, keep)
        return commit & is_masked


@REMASKING.register("low_confidence")
class LowConfidence(Remasking):
    def confidence(self, probs, x0, generator):
        return probs.gather(-1, x0[..., None]).squeeze(-1)


@REMASKING.register("random")
class RandomRemasking(Remasking):
    def confidence(self, probs, x0, generator):
        return uniform(generator, x0.shape, dtype=torch.float64, device=x0.device)
