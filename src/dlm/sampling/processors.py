"""Logits processors: small pure transforms of the logits (B, L, V), composed in a list before sampling.

    logits = apply_processors([SuppressTokens([mask_id])], logits, xt)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class LogitsProcessor:
    def __call__(self, logits: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:  # (B, L, V), (B, L) -> (B, L, V)
        raise NotImplementedError


class SuppressTokens(LogitsProcessor):
    """Forbid token ids everywhere, or only at the positions where `where` (B, L) is True."""

    def __init__(self, token_ids: Sequence[int], where: torch.Tensor | None = None) -> None:
        self.token_ids = list(token_ids)
        self.where = where

    def __call__(self, logits, xt):
        if not self.token_ids:
            return logits
        ids = torch.tensor(self.token_ids, device=logits.device)
        if self.where is None:
            return logits.index_fill(-1, ids, -torch.inf)
        banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        banned[ids] = True
        mask = self.where.to(logits.device)[..., None] & banned  # (B, L, V)
        return logits.masked_fill(mask, -torch.inf)


def apply_processors(processors: Sequence[LogitsProcessor], logits: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    for p in processors:
        logits = p(logits, xt)
    return logits
