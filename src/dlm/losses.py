"""Training objectives, each a small class registered by name and returning a `LossOutput`.

- `masked_elbo`: LLaDA / SMDM / MDLM. Cross-entropy on masked tokens weighted by the schedule's ELBO weight
  (1 / p_mask for LLaDA's linear schedule) and normalised per token (sum over masked / number of maskable
  tokens): an unbiased estimate of the negative ELBO in nats per token.
- `masked_unweighted`: the same cross-entropy averaged over masked tokens, no 1/t weight (MaskGIT style).
- `ar`: next-token cross-entropy for the autoregressive baseline.

    loss_fn = LOSSES.build("masked_elbo"); out = loss_fn(model, x0, process, generator=g)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlm.process import ForwardProcess
from dlm.registry import Registry
from dlm.schedules import sample_t

LOSSES: Registry[type[Loss]] = Registry("loss")


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to backpropagate
    nll: torch.Tensor  # scalar, nats per token (the ELBO estimate for diffusion losses), detached
    mask: torch.Tensor  # (B, L) bool: positions the loss was computed on


class Loss:
    """__call__(model, x0 (B, L), process, maskable (B, L) | None, generator) -> LossOutput."""

    causal = False
    antithetic = True

    def __init__(self, antithetic: bool = True, bos_id: int | None = None) -> None:
        self.antithetic = antithetic
        self.bos_id = bos_id

    def __call__(self, model: torch.nn.Module, x0: torch.Tensor, process: ForwardProcess,
                 maskable: torch.Tensor | None = None, generator: torch.Generator | None = None) -> LossOutput:
        raise NotImplementedError


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, L, V), (B, L) -> per-token cross-entropy (B, L) in float32."""
    B, L, V = logits.shape
    return F.cross_entropy(logits.reshape(B * L, V).float(), targets.reshape(B * L), reduction="none").view(B, L)


@LOSSES.register("masked_elbo")
class MaskedELBO(Loss):
    weighted = True

    def __call__(self, model, x0, process, maskable=None, generator=None):
        B, L = x0.shape
        t = sample_t(B, self.antithetic, generator, device="cpu").to(x0.device)  # (B,)
        xt, is_masked = process.q_sample(x0, t, generator=_gen_for(x0, generator), maskable=maskable)
        logits = model(xt, t)  # (B, L, V)
        ce = token_ce(logits, x0)  # (B, L)
        w = process.schedule.weight(t)[:, None] if self.weighted else 1.0  # (B, 1)
        n_tokens = maskable.sum().clamp_min(1) if maskable is not None else torch.tensor(B * L)
        if self.weighted:
            loss = (ce * w * is_masked).sum() / n_tokens
            nll = loss.detach()
        else:
            loss = (ce * is_masked).sum() / is_masked.sum().clamp_min(1)
            nll = loss.detach()
        return LossOutput(loss=loss, nll=nll, mask=is_masked)


@LOSSES.register("masked_unweighted")
class MaskedUnweighted(MaskedELBO):
    weighted = False


@LOSSES.register("ar")
class AutoregressiveCE(Loss):
    causal = True

    def __call__(self, model, x0, process=None, maskable=None, generator=None):
        # [BOS] + x0[:, :-1] predicts x0: every one of the L tokens is scored, as in the diffusion losses.
        if self.bos_id is None:
            raise ValueError("the ar loss needs bos_id")
        B = x0.shape[0]
        inp = torch.cat([torch.full((B, 1), self.bos_id, dtype=x0.dtype, device=x0.device), x0[:, :-1]], 1)
        logits = model(inp, None)  # (B, L, V): position i predicts token i
        loss = token_ce(logits, x0).mean()
        return LossOutput(loss=loss, nll=loss.detach(), mask=torch.ones_like(x0, dtype=torch.bool))


def _gen_for(x: torch.Tensor, generator: torch.Generator | None) -> torch.Generator | None:
    # Masks are drawn on the CPU generator when the data is on the CPU; on an accelerator the device's default.
    return generator if x.device.type == "cpu" else None
