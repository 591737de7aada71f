"""Training objectives, each a small class registered by name and returning a `LossOutput`.

- `masked_elbo`: LLaDA / SMDM / MDLM. Cross-entropy on masked tokens weighted by the schedule's ELBO weight
  (1 / p_mask for LLaDA's linear schedule) and normalised per token (sum over masked / number of maskable
  tokens): an unbiased estimate of the negative ELBO in nats per token.
- `masked_unweighted`: the same cross-entropy averaged over masked tokens, no 1/t weight (MaskGIT style).
- `ar`: next-token cross-entropy for the autoregressive baseline.
- `score_entropy`: SEDD (Lou, Meng, Ermon 2024; louaaron/Score-Entropy-Discrete-Diffusion `losses.py`). The
  denoising score entropy of each position (processes/sedd.py, with its constant so every term is >= 0) weighted by
  dsigma(t), averaged over the tokens (SEDD sums them): an unbiased estimate of the negative ELBO per token.
- `d3pm_hybrid`: D3PM (Austin et al. 2021). With k ~ U{1..T}, T * KL(q(x_{k-1} | x_k, x0) || p(x_{k-1} | x_k))
  per token estimates L_vb; the loss adds hybrid_lambda times the cross-entropy of the x0 prediction.

Every `nll` is in nats per token, so the families compare directly. The two graph losses also give `sequence_nll`,
the per-sequence estimate that held-out evaluation averages (dlm/eval/elbo.py).

- `bd3lm`: block diffusion (BD3LM; dlm/processes/block.py). A time per block, the masked ELBO of each block given
  the clean blocks before it, in one forward over x_t + x_0 (2L tokens); times drawn from BD3LM's clipped interval
  [clip_min, clip_max]. Its `sequence_nll` is the unclipped bound (the exact NLL at block size 1).

- `sft`: LLaDA's instruction tuning (Nie et al. 2025, GUIDELINES.md of ML-GSAI/LLaDA). Only the response
  (`maskable`) is masked; each row's weighted cross-entropy is divided by its answer length (the response and its
  EOS padding), then averaged over rows.

A call may compute only some `Rows` of a global batch (one rank's share under DDP / FSDP, one micro-batch of
gradient accumulation): the times and the corruption are then drawn for the whole global batch and sliced, so any
split of a batch sees exactly the noise of one call on all of it, with t stratified across all its rows.

    loss_fn = LOSSES.build("masked_elbo"); out = loss_fn(model, x0, process, generator=g)
    loss_fn = LOSSES.get(pcfg.loss).from_config(pcfg, bos_id=tok.bos_id)
    out = loss_fn(model, x0[4:8], process, generator=g, rows=Rows(start=4, total=16))   # rows 4..7 of 16
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dlm.processes.block import block_logits, check_clip, n_blocks, per_position
from dlm.processes.masked import ForwardProcess, drop_mask_logit
from dlm.registry import Registry
from dlm.schedules import sample_t

if TYPE_CHECKING:
    from dlm.config import ProcessConfig

LOSSES: Registry[type[Loss]] = Registry("loss")


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to backpropagate
    nll: torch.Tensor  # scalar, nats per token (the ELBO estimate for diffusion losses), detached
    mask: torch.Tensor  # (B, L) bool: positions the loss was computed on


@dataclass(frozen=True)
class Rows:
    """A loss call on x0 (n, L) computes the rows [start, start + n) of a global batch of `total` rows."""

    start: int
    total: int


def draw_t(n: int, antithetic: bool, generator: torch.Generator | None, rows: Rows | None = None) -> torch.Tensor:
    """t (n,) on the CPU: `sample_t` over the global batch (stratified across all its rows), this call's slice."""
    if rows is None:
        return sample_t(n, antithetic, generator, device="cpu")
    return sample_t(rows.total, antithetic, generator, device="cpu")[rows.start:rows.start + n]


def corrupt(q_sample, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None,
            maskable: torch.Tensor | None, rows: Rows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q_sample(x0 (n, L), t (n,), generator=, maskable=) -> (xt, moved) (n, L), drawn for the global batch.

    Every process draws its noise elementwise over (B, L) whatever the tokens and times, so the rows of the other
    calls are stand-ins (token 0, their t = this call's first); only their share of the draws matters.
    """
    n, L = x0.shape
    if rows is None or (rows.start == 0 and rows.total == n):
        return q_sample(x0, t, generator=generator, maskable=maskable)
    own = slice(rows.start, rows.start + n)
    x_all = x0.new_zeros(rows.total, L)
    x_all[own] = x0
    t_all = t[:1].expand(rows.total, *t.shape[1:]).clone()  # t (n,) or (n, n_blocks)
    t_all[own] = t
    m_all = None
    if maskable is not None:
        m_all = maskable.new_zeros(rows.total, L)
        m_all[own] = maskable
    xt, moved = q_sample(x_all, t_all, generator=generator, maskable=m_all)
    return xt[own], moved[own]


class Loss:
    """__call__(model, x0 (B, L), process, maskable (B, L) | None, generator, rows) -> LossOutput."""

    causal = False
    antithetic = True

    def __init__(self, antithetic: bool = True, bos_id: int | None = None) -> None:
        self.antithetic = antithetic
        self.bos_id = bos_id

    @classmethod
    def from_config(cls, pcfg: ProcessConfig, bos_id: int | None = None) -> Loss:
        return cls(antithetic=pcfg.antithetic, bos_id=bos_id)

    def __call__(self, model: torch.nn.Module, x0: torch.Tensor, process: ForwardProcess,
                 maskable: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 rows: Rows | None = None) -> LossOutput:
        raise NotImplementedError


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, L, V), (B, L) -> per-token cross-entropy (B, L) in float32."""
    B, L, V = logits.shape
    return F.cross_entropy(logits.reshape(B * L, V).float(), targets.reshape(B * L), reduction="none").view(B, L)


@LOSSES.register("masked_elbo")
class MaskedELBO(Loss):
    weighted = True

    def __call__(self, model, x0, process, maskable=None, generator=None, rows=None):
        B, L = x0.shape
        t = draw_t(B, self.antithetic, generator, rows).to(x0.device)  # (B,)
        xt, is_masked = corrupt(process.q_sample, x0, t, _gen_for(x0, generator), maskable, rows)
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

    def __call__(self, model, x0, process=None, maskable=None, generator=None, rows=None):
        # [BOS] + x0[:, :-1] predicts x0: every one of the L tokens is scored, as in the diffusion losses.
        if self.bos_id is None:
            raise ValueError("the ar loss needs bos_id")
        B = x0.shape[0]
        inp = torch.cat([torch.full((B, 1), self.bos_id, dtype=x0.dtype, device=x0.device), x0[:, :-1]], 1)
        logits = model(inp, None)  # (B, L, V): position i predicts token i
        loss = token_ce(logits, x0).mean()
        return LossOutput(loss=loss, nll=loss.detach(), mask=torch.ones_like(x0, dtype=torch.bool))


def draw_block_t(n: int, blocks: int, antithetic: bool, generator: torch.Generator | None,
                 rows: Rows | None = None) -> torch.Tensor:
    """(n, blocks) times on the CPU: `sample_t` over every block of the global batch, stratified across all of
    them (BD3LM's antithetic sampling along blocks and batches), this call's rows. One block: `draw_t`."""
    total = n if rows is None else rows.total
    t = sample_t(total * blocks, antithetic, generator, device="cpu").view(total, blocks)
    return t if rows is None else t[rows.start:rows.start + n]


@LOSSES.register("bd3lm")
class BlockDiffusionELBO(Loss):
    """BD3LM: sum over blocks of w(t_b) x the cross-entropy of block b's masked tokens given x_t^b and x^{<b},
    over the number of tokens, t_b ~ U[clip_min, clip_max] per block."""

    def __init__(self, antithetic: bool = True, bos_id: int | None = None,
                 clip: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__(antithetic, bos_id)
        check_clip(*clip)
        self.clip = (float(clip[0]), float(clip[1]))

    @classmethod
    def from_config(cls, pcfg, bos_id=None):
        return cls(antithetic=pcfg.antithetic, bos_id=bos_id, clip=(pcfg.clip_min, pcfg.clip_max))

    def terms(self, model, x0, process, t, generator, maskable=None, rows=None):
        """t (B, n_blocks) -> per-token loss w(t_b) CE (B, L) at the masked positions (0 elsewhere), is_masked."""
        B, L = x0.shape
        xt, is_masked = corrupt(process.q_sample, x0, t, _gen_for(x0, generator), maskable, rows)
        ce = token_ce(block_logits(model, xt, x0, process.block_size), x0)  # (B, L)
        w = per_position(process.schedule.weight(t.to(x0.device)), L, process.block_size)  # (B, L)
        return ce * w * is_masked, is_masked

    def block_times(self, B, L, process, generator, rows=None):
        u = draw_block_t(B, n_blocks(L, process.block_size), self.antithetic, generator, rows)  # (B, n_blocks)
        lo, hi = self.clip
        return lo + (hi - lo) * u

    def __call__(self, model, x0, process, maskable=None, generator=None, rows=None):
        B, L = x0.shape
        t = self.block_times(B, L, process, generator, rows).to(x0.device)
        per_token, is_masked = self.terms(model, x0, process, t, generator, maskable, rows)
        n_tokens = maskable.sum().clamp_min(1) if maskable is not None else torch.tensor(B * L)
        loss = per_token.sum() / n_tokens
        return LossOutput(loss=loss, nll=loss.detach(), mask=is_masked)

    def per_block_loss(self, model, x0, process, generator=None):
        """(B, n_blocks): the mean per-token loss of each block, as BD3LM's clipping search collects it."""
        B, L = x0.shape
        t = self.block_times(B, L, process, generator).to(x0.device)
        per_token, _ = self.terms(model, x0, process, t, generator)
        nb, bs = n_blocks(L, process.block_size), process.block_size
        padded = torch.zeros(B, nb * bs, dtype=per_token.dtype, device=per_token.device)
        padded[:, :L] = per_token
        counts = torch.full((nb,), bs, dtype=per_token.dtype, device=per_token.device)
        counts[-1] = L - (nb - 1) * bs
        return padded.view(B, nb, bs).sum(-1) / counts

    @torch.no_grad()
    def sequence_nll(self, model, x0, process, u, generator=None):
        """(B,) float64: one unclipped estimate of -ELBO(x0) in nats per sequence; u (B,) stratified offsets
        give each row's blocks the times (u + b / n_blocks) mod 1. Block size 1: every block masked at weight 1,
        the exact NLL (BD3LM evaluates its block-1 model so)."""
        B, L = x0.shape
        bs = process.block_size
        if bs == 1:
            xt = torch.full_like(x0, process.mask_id)
            return token_ce(block_logits(model, xt, x0, 1), x0).double().sum(1)
        nb = n_blocks(L, bs)
        t = ((u.double().cpu()[:, None] + torch.arange(nb, dtype=torch.float64) / nb) % 1.0).float().to(x0.device)
        xt, is_masked = process.q_sample(x0, t, generator=_gen_for(x0, generator))
        ce = token_ce(block_logits(model, xt, x0, bs), x0).double()
        w = per_position(process.schedule.weight(t.double()), L, bs)
        return (ce * w * is_masked).sum(1)


@LOSSES.register("bd3lm_sft")
class BlockSFTLoss(BlockDiffusionELBO):
    """Instruction tuning of a block model: only the response (`maskable`) is masked, a time per block as in
    pretraining; each row's loss over its answer length, then the mean over rows (LLaDA's SFT normalisation). A
    block that holds the end of the prompt keeps those tokens clean, as the block sampler's first block does."""

    def __call__(self, model, x0, process, maskable=None, generator=None, rows=None):
        if maskable is None:
            raise ValueError("the bd3lm_sft loss needs the response positions (maskable); build batches with dlm.sft")
        B, L = x0.shape
        t = self.block_times(B, L, process, generator, rows).to(x0.device)
        per_token, is_masked = self.terms(model, x0, process, t, generator, maskable, rows)
        loss = (per_token.sum(1) / maskable.sum(1).clamp_min(1)).mean()
        return LossOutput(loss=loss, nll=loss.detach(), mask=is_masked)


class GraphLoss(Loss):
    """A loss whose per-position negative-ELBO integrand is computed at given times: `terms` (B, L) in nats."""

    def terms(self, model: torch.nn.Module, x0: torch.Tensor, process: ForwardProcess, u: torch.Tensor,
              generator: torch.Generator | None, maskable: torch.Tensor | None, rows: Rows | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """u (B,) in [0, 1) -> nll (B, L) float64, auxiliary (B, L) or 0, loss mask (B, L), scored (B, L)."""
        raise NotImplementedError

    def __call__(self, model, x0, process, maskable=None, generator=None, rows=None):
        B, L = x0.shape
        u = draw_t(B, self.antithetic, generator, rows).to(x0.device)  # (B,)
        nll, aux, mask, scored = self.terms(model, x0, process, u, generator, maskable, rows)
        n_tokens = scored.sum().clamp_min(1)
        nll = (nll * scored).sum() / n_tokens
        return LossOutput(loss=(nll + (aux * scored).sum() / n_tokens).float(), nll=nll.detach().float(), mask=mask)

    @torch.no_grad()
    def sequence_nll(self, model: torch.nn.Module, x0: torch.Tensor, process: ForwardProcess, u: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) float64: one Monte Carlo estimate of -ELBO(x0) in nats per sequence at the times u (B,)."""
        return self.terms(model, x0, process, u, generator, None)[0].sum(1)


@LOSSES.register("score_entropy")
class ScoreEntropy(GraphLoss):
    """dsigma(t) * denoising score entropy, t ~ U(0, 1): the network's output is read as log scores."""

    def terms(self, model, x0, process, u, generator, maskable, rows=None):
        xt, moved = corrupt(process.q_sample, x0, u, _gen_for(x0, generator), maskable, rows)
        raw = model(xt, u).float()  # (B, L, V): the network sees t itself
        t = u.double()
        sigma = process.schedule.sigma(t)[:, None].expand(xt.shape)  # (B, L) float64
        entropy = process.score_entropy(process.log_score(raw, xt, sigma), xt, x0, sigma)  # (B, L) float64
        nll = process.schedule.dsigma(t)[:, None] * entropy
        scored = maskable if maskable is not None else torch.ones_like(x0, dtype=torch.bool)
        mask = moved if process.absorbing else scored  # absorbing: only [MASK] positions carry a loss
        return nll, torch.zeros((), device=x0.device), mask, scored


@LOSSES.register("d3pm_hybrid")
class D3PMHybrid(GraphLoss):
    """T * KL(q(x_{k-1} | x_k, x0) || p(x_{k-1} | x_k)) + hybrid_lambda * CE(x0 | x_k), k ~ U{1..T}."""

    def __init__(self, antithetic: bool = True, bos_id: int | None = None, hybrid_lambda: float = 0.01) -> None:
        super().__init__(antithetic, bos_id)
        if hybrid_lambda < 0:
            raise ValueError(f"hybrid_lambda must be >= 0, got {hybrid_lambda}")
        self.hybrid_lambda = hybrid_lambda

    @classmethod
    def from_config(cls, pcfg, bos_id=None):
        return cls(antithetic=pcfg.antithetic, bos_id=bos_id, hybrid_lambda=pcfg.hybrid_lambda)

    def terms(self, model, x0, process, u, generator, maskable, rows=None):
        T = process.T
        k = (u * T).long().clamp(0, T - 1) + 1  # (B,) uniform on 1..T (stratified when u is)
        xt, moved = corrupt(process.q_sample_k, x0, k, _gen_for(x0, generator), maskable, rows)
        logits = model(xt, k.float() / T).float()  # (B, L, V)
        logits = drop_mask_logit(logits, process.mask_id)  # p~(x0 | x_k) never [MASK]
        log_p0 = torch.log_softmax(logits.double(), -1)  # (B, L, V): p~(x0 | x_k), never [MASK]
        q = process.posterior(xt, k - 1, k, x0)  # (B, L, V) float64
        p = process.posterior(xt, k - 1, k, log_p0.exp())
        kl = torch.where(q > 0, q * (torch.log(q.clamp_min(1e-300)) - torch.log(p.clamp_min(1e-300))), 0.0).sum(-1)
        ce = -log_p0.gather(-1, x0[..., None])[..., 0]  # (B, L)
        scored = maskable if maskable is not None else torch.ones_like(x0, dtype=torch.bool)
        mask = moved if process.absorbing else scored
        return T * kl, self.hybrid_lambda * ce, mask, scored


@LOSSES.register("sft")
class SFTLoss(Loss):
    """LLaDA's SFT loss: the response (`maskable`) alone is masked; per row, the 1 / p_mask weighted cross-entropy
    of its masked tokens over its answer length (response + EOS padding, as `maskable` marks it); mean over rows."""

    def __call__(self, model, x0, process, maskable=None, generator=None, rows=None):
        if maskable is None:
            raise ValueError("the sft loss needs the response positions (maskable); build batches with dlm.sft")
        B, L = x0.shape
        t = draw_t(B, self.antithetic, generator, rows).to(x0.device)  # (B,)
        xt, is_masked = corrupt(process.q_sample, x0, t, _gen_for(x0, generator), maskable, rows)
        ce = token_ce(model(xt, t), x0)  # (B, L)
        w = process.schedule.weight(t)[:, None]  # (B, 1)
        answer_len = maskable.sum(1).clamp_min(1)  # (B,)
        loss = ((ce * w * is_masked).sum(1) / answer_len).mean()
        return LossOutput(loss=loss, nll=loss.detach(), mask=is_masked)


def _gen_for(x: torch.Tensor, generator: torch.Generator | None) -> torch.Generator | None:
    # Masks are drawn on the CPU generator when the data is on the CPU; on an accelerator the device's default.
    return generator if x.device.type == "cpu" else None
