"""Noise schedules: alpha(t) is the probability that a token is still clean at time t.

move_chance(t) = 1 - alpha(t) is the mask rate; `weight(t)` is the ELBO weight -alpha'(t) / (1 - alpha(t)).
LLaDA (Nie et al. 2025, ML-GSAI/LLaDA `forward_process`) uses p_mask = (1 - eps) t + eps and weights by 1 / p_mask;
MDLM/SEDD's log-linear schedule has move_chance = (1 - eps) t; cosine follows MaskGIT.

The continuous-time graphs of SEDD (Lou, Meng, Ermon 2024; louaaron/Score-Entropy-Discrete-Diffusion `noise_lib.py`)
see a schedule through its total noise sigma(t) = -log alpha(t) and the noise rate dsigma(t) = sigma'(t): the
forward chain is exp(sigma(t) R) for a rate matrix R. `geometric` (SEDD's uniform graph) is defined by sigma itself:
sigma(t) = sigma_min^(1 - t) sigma_max^t.

    s = SCHEDULES.build("linear", eps=1e-3); s.move_chance(t)   # t: (B,) -> (B,)
    s = SCHEDULES.get("geometric").from_config(ProcessConfig()); s.sigma(t), s.dsigma(t)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from dlm.registry import Registry

if TYPE_CHECKING:
    from dlm.config import ProcessConfig

SCHEDULES: Registry[type[NoiseSchedule]] = Registry("noise schedule")


class NoiseSchedule:
    def __init__(self, eps: float = 1e-3) -> None:
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"schedule eps must be in [0, 1), got {eps}")
        self.eps = eps

    @classmethod
    def from_config(cls, pcfg: ProcessConfig) -> NoiseSchedule:
        return cls(eps=pcfg.eps)

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B,)
        raise NotImplementedError

    def alpha(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B,)
        return 1.0 - self.move_chance(t)

    def t_for_move_chance(self, p: torch.Tensor) -> torch.Tensor:  # (B,) -> (B,)
        """The time t in [0, 1] whose move_chance(t) is p (clipped to the schedule's range): the t a network was
        trained on for a canvas whose fraction of masks is p. move_chance increases with t, so bisection in
        float64 (52 halvings reach float64's resolution on [0, 1]); schedules with a closed form override it."""
        p = p.double()
        lo, hi = torch.zeros_like(p), torch.ones_like(p)
        for _ in range(52):
            mid = (lo + hi) / 2
            below = self.move_chance(mid) < p
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2

    def weight(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B,)
        """-alpha'(t) / (1 - alpha(t)): the continuous-time ELBO weight of a masked token's cross-entropy."""
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:  # total noise: alpha = exp(-sigma)
        return -torch.log(self.alpha(t).clamp_min(1e-12))

    def dsigma(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B,)
        """sigma'(t) = -alpha'(t) / alpha(t): the rate of the forward chain at time t (SEDD's `rate_noise`)."""
        raise NotImplementedError


@SCHEDULES.register("linear")
class Linear(NoiseSchedule):
    """LLaDA: p_mask = (1 - eps) t + eps. Weighted by 1 / p_mask exactly as the reference loss."""

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.eps) * t + self.eps

    def t_for_move_chance(self, p: torch.Tensor) -> torch.Tensor:
        return ((p.double() - self.eps) / (1.0 - self.eps)).clamp(0.0, 1.0)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / self.move_chance(t)

    def dsigma(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / (1.0 - t)  # alpha = (1 - eps)(1 - t)


@SCHEDULES.register("loglinear")
class LogLinear(NoiseSchedule):
    """MDLM / SEDD: sigma(t) = -log(1 - (1 - eps) t), so move_chance = (1 - eps) t and weight = 1 / t."""

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.eps) * t

    def t_for_move_chance(self, p: torch.Tensor) -> torch.Tensor:
        return (p.double() / (1.0 - self.eps)).clamp(0.0, 1.0)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / t.clamp_min(1e-12)

    def dsigma(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.eps) / (1.0 - (1.0 - self.eps) * t)


@SCHEDULES.register("cosine")
class Cosine(NoiseSchedule):
    """alpha(t) = cos(pi t / 2) scaled into [eps, 1]: masks slowly at first, fast near t = 1."""

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.eps) * (1.0 - torch.cos(0.5 * math.pi * t))

    def t_for_move_chance(self, p: torch.Tensor) -> torch.Tensor:
        return torch.arccos((1.0 - p.double() / (1.0 - self.eps)).clamp(0.0, 1.0)) * (2.0 / math.pi)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        d_move = (1.0 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t)
        return d_move / self.move_chance(t).clamp_min(1e-12)

    def dsigma(self, t: torch.Tensor) -> torch.Tensor:
        d_move = (1.0 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t)
        return d_move / self.alpha(t).clamp_min(1e-12)


@SCHEDULES.register("geometric")
class Geometric(NoiseSchedule):
    """SEDD's uniform-graph noise: sigma(t) = sigma_min^(1 - t) sigma_max^t, so dsigma = sigma log(max / min).

    sigma_min is the noise already present at t = 0 (the role eps plays elsewhere; eps itself is unused) and
    exp(-sigma_max) the share of the data left at t = 1: SEDD's 1e-4 and 20.
    """

    def __init__(self, eps: float = 1e-3, sigma_min: float = 1e-4, sigma_max: float = 20.0) -> None:
        super().__init__(eps)
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"geometric schedule needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    @classmethod
    def from_config(cls, pcfg: ProcessConfig) -> Geometric:
        return cls(eps=pcfg.eps, sigma_min=pcfg.sigma_min, sigma_max=pcfg.sigma_max)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min ** (1.0 - t) * self.sigma_max ** t

    def dsigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma(t) * math.log(self.sigma_max / self.sigma_min)

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.expm1(-self.sigma(t))

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.sigma(t))  # not 1 - move_chance: e^-20 would round away

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return self.dsigma(t) / torch.expm1(self.sigma(t))


def sample_t(batch: int, antithetic: bool, generator: torch.Generator | None, device: str | torch.device = "cpu"
             ) -> torch.Tensor:
    """t ~ U(0, 1) per sequence, (B,). Antithetic: one uniform offset, then evenly spaced (MDLM's stratified t)."""
    if antithetic:
        u0 = torch.rand(1, generator=generator, device=device)
        return (u0 + torch.arange(batch, device=device) / batch) % 1.0
    return torch.rand(batch, generator=generator, device=device)
