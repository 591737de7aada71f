"""Noise schedules of masked diffusion: alpha(t) is the probability that a token is still clean at time t.

move_chance(t) = 1 - alpha(t) is the mask rate; `weight(t)` is the ELBO weight -alpha'(t) / (1 - alpha(t)).
LLaDA (Nie et al. 2025, ML-GSAI/LLaDA `forward_process`) uses p_mask = (1 - eps) t + eps and weights by 1 / p_mask;
MDLM/SEDD's log-linear schedule has move_chance = (1 - eps) t; cosine follows MaskGIT.

    s = SCHEDULES.build("linear", eps=1e-3); s.move_chance(t)   # t: (B,) -> (B,)
"""

from __future__ import annotations

import math

import torch

from dlm.registry import Registry

SCHEDULES: Registry[type[NoiseSchedule]] = Registry("noise schedule")


class NoiseSchedule:
    def __init__(self, eps: float = 1e-3) -> None:
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"schedule eps must be in [0, 1), got {eps}")
        self.eps = eps

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B,)
        raise NotImplementedError

    def alpha(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B,)
        return 1.0 - self.move_chance(t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B,)
        """-alpha'(t) / (1 - alpha(t)): the continuous-time ELBO weight of a masked token's cross-entropy."""
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:  # total noise: alpha = exp(-sigma)
        return -torch.log(self.alpha(t).clamp_min(1e-12))


@SCHEDULES.register("linear")
class Linear(NoiseSchedule):
    """LLaDA: p_mask = (1 - eps) t + eps. Weighted by 1 / p_mask exactly as the reference loss."""

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.eps) * t + self.eps

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / self.move_chance(t)


@SCHEDULES.register("loglinear")
class LogLinear(NoiseSchedule):
    """MDLM / SEDD: sigma(t) = -log(1 - (1 - eps) t), so move_chance = (1 - eps) t and weight = 1 / t."""

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.eps) * t

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / t.clamp_min(1e-12)


@SCHEDULES.register("cosine")
class Cosine(NoiseSchedule):
    """alpha(t) = cos(pi t / 2) scaled into [eps, 1]: masks slowly at first, fast near t = 1."""

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.eps) * (1.0 - torch.cos(0.5 * math.pi * t))

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        d_move = (1.0 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t)
        return d_move / self.move_chance(t).clamp_min(1e-12)


def sample_t(batch: int, antithetic: bool, generator: torch.Generator | None, device: str | torch.device = "cpu"
             ) -> torch.Tensor:
    """t ~ U(0, 1) per sequence, (B,). Antithetic: one uniform offset, then evenly spaced (MDLM's stratified t)."""
    if antithetic:
        u0 = torch.rand(1, generator=generator, device=device)
        return (u0 + torch.arange(batch, device=device) / batch) % 1.0
    return torch.rand(batch, generator=generator, device=device)
