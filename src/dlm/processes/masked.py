"""Forward processes: corrupt clean tokens x0 (B, L) at time t (B,) into xt (B, L).

`MaskedProcess` is the absorbing process of LLaDA / MDLM: each token independently becomes [MASK] with
probability move_chance(t). SEDD's continuous-time graphs (processes/sedd.py: `sedd-absorbing`,
`sedd-uniform`), D3PM's discrete-time processes (processes/d3pm.py: `d3pm-absorbing`, `d3pm-uniform`) and BD3LM's
blocks (processes/block.py) register in the same PROCESSES.
Each process class names the objectives it trains with and the defaults of its family (schedule, loss, network,
sampler), which `dlm train --process NAME` starts from.

`span_infill_example` builds the infilling objective's training sequence: a span of the text becomes a longer gap
whose tail is [PAD], so the model learns to fill gaps of unknown length.

    proc = MaskedProcess(mask_id, schedule); xt, is_masked = proc.q_sample(x0, t, generator)
    proc = build_process(ProcessConfig(process="sedd-uniform", schedule="geometric"), tokenizer)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dlm.registry import Registry
from dlm.schedules import SCHEDULES, NoiseSchedule

if TYPE_CHECKING:
    from dlm.config import ProcessConfig
    from dlm.tokenizer import Tokenizer

# SEDD's graphs, D3PM's chains and BD3LM's blocks subclass ForwardProcess in their own modules and register when
# the registry is first looked up (they import this module, so this one must not import them).
PROCESSES: Registry[type[ForwardProcess]] = Registry("forward process", plugins=tuple(
    f"dlm.processes.{m}" for m in ("sedd", "d3pm", "block")))


class ForwardProcess:
    # The family: objectives it trains with, ProcessConfig / GenerationConfig defaults of a new run, the network.
    losses: tuple[str, ...] = ()
    defaults: dict[str, Any] = {}  # ProcessConfig fields (schedule, loss, eps, ...)
    sampling: dict[str, Any] = {}  # GenerationConfig fields saved with a run (the family's own sampler)
    default_arch = "llada"
    needs_time = False  # the network must see t (a DiT): the uniform graphs' x_t does not show how noisy it is

    def __init__(self, mask_id: int, schedule: NoiseSchedule, vocab_size: int | None = None) -> None:
        self.mask_id = mask_id
        self.schedule = schedule
        self.vocab_size = vocab_size  # V, the width of the logits; needed by processes that draw random tokens

    @classmethod
    def from_config(cls, pcfg: ProcessConfig, mask_id: int, vocab_size: int | None = None) -> ForwardProcess:
        return cls(mask_id, SCHEDULES.get(pcfg.schedule).from_config(pcfg), vocab_size)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None,
                 maskable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def prior_sample(self, batch: int, length: int, device: str | torch.device = "cpu") -> torch.Tensor:
        raise NotImplementedError

    def model_time(self, xt: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        """xt (B, L) [+ real (B, L), the non-padding positions] -> t (B,) float32: the time a time-conditioned
        network sees for this canvas, the one definition that sampling and both likelihood estimators use.

        Absorbing processes read it off the canvas: the t at which training's expected fraction of masks,
        move_chance(t), equals the canvas's fraction of masks, so training (which passes its drawn t) and
        sampling agree for every schedule. Processes whose canvas does not show its time (uniform graphs) are
        sampled by their own samplers, which pass their t."""
        real = torch.ones_like(xt, dtype=torch.bool) if real is None else real.bool()
        frac = ((xt == self.mask_id) & real).sum(1).double() / real.sum(1).clamp_min(1).double()  # (B,)
        return self.schedule.t_for_move_chance(frac).clamp(0.0, 1.0).float()


def absorb(x0: torch.Tensor, p_mask: torch.Tensor, mask_id: int, generator: torch.Generator | None = None,
           maskable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The absorbing draw every masked process shares: x0 (B, L), p_mask (B, 1) or (B, L) float32 -> xt (B, L),
    is_masked (B, L) bool, each position [MASK] with its probability (one uniform per position, drawn over
    (B, L) whatever p_mask's shape, so the same generator masks alike), never outside `maskable`."""
    u = torch.rand(x0.shape, generator=generator, device=x0.device)
    is_masked = u < p_mask
    if maskable is not None:
        is_masked &= maskable
    return torch.where(is_masked, torch.full_like(x0, mask_id), x0), is_masked


def drop_mask_logit(logits: torch.Tensor, mask_id: int, inplace: bool = False) -> torch.Tensor:
    """logits (..., V) with [MASK]'s logit at -inf: x0 is never [MASK], so it leaves the softmax (MDLM's SUBS).
    `inplace` writes into `logits` (no copy of a (B, L, V) tensor; only where no gradient flows through it)."""
    if inplace:
        logits[..., mask_id] = -torch.inf
        return logits
    return logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), -torch.inf)


@PROCESSES.register("masked")
class MaskedProcess(ForwardProcess):
    """Absorbing-state diffusion: xt_i = [MASK] with probability 1 - alpha(t), else x0_i."""

    losses = ("masked_elbo", "masked_unweighted", "ar")

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None,
                 maskable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x0: (B, L), t: (B,), maskable: (B, L) bool or None -> xt (B, L), is_masked (B, L) bool."""
        p_mask = self.schedule.move_chance(t).to(torch.float32)[:, None]  # (B, 1)
        return absorb(x0, p_mask, self.mask_id, generator, maskable)

    def prior_sample(self, batch: int, length: int, device: str | torch.device = "cpu") -> torch.Tensor:
        return torch.full((batch, length), self.mask_id, dtype=torch.long, device=device)


def build_process(pcfg: ProcessConfig, tok: Tokenizer, vocab_size: int | None = None) -> ForwardProcess:
    """The process (with its schedule) of a ProcessConfig; vocab_size defaults to the tokenizer's."""
    return PROCESSES.get(pcfg.process).from_config(pcfg, tok.mask_id, vocab_size or tok.vocab_size)


def span_infill_example(x0: torch.Tensor, pad_id: int, max_span: int, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn one clean sequence (L,) into an infilling example (L,) and its gap mask (L,) bool.

    A span of m tokens (1 <= m < max_span) at position a is replaced by a gap of G tokens (m < G <= max_span):
    the span's m tokens then G - m [PAD]. The right context follows and the result is cut back to L. At
    sampling time a bare [MASK] becomes max_span masks, so the model must learn to write the text first and
    close the gap with [PAD]; the pipeline strips the pads.
    """
    L = x0.shape[0]
    max_span = min(max_span, L // 2)
    g = generator
    G = int(torch.randint(2, max_span + 1, (1,), generator=g))
    m = int(torch.randint(1, G, (1,), generator=g))
    a = int(torch.randint(0, L - G + 1, (1,), generator=g))
    pads = torch.full((G - m,), pad_id, dtype=x0.dtype, device=x0.device)
    out = torch.cat([x0[: a + m], pads, x0[a + m:]])[:L]
    gap = torch.zeros(L, dtype=torch.bool, device=x0.device)
    gap[a: a + G] = True
    return out, gap
