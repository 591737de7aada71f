"""Held-out likelihood bounds in bits per token and per character.

Masked diffusion: the negative ELBO with LLaDA's lower-variance estimator (Nie et al. 2025, eq. 6): draw a mask
count l ~ U{1..L}, mask l positions uniformly, and score (L / l) * sum of masked cross-entropies. Its expectation
is an upper bound on -log p(x0). Mask counts are stratified across the windows of a batch and accumulated in
float64. Autoregressive models: the exact negative log-likelihood, each window prefixed with [BOS].
SEDD and D3PM (a `loss_fn` with `sequence_nll`, dlm/losses.py): their own training estimator of the negative ELBO
(score entropy weighted by dsigma at a time t ~ U(0, 1); T times one KL term at a step k ~ U{1..T}), with the times
stratified across the windows of a batch in the same way, so every family reports nats (here bits) per token.

    r = elbo_bits(model, windows, mask_id=tok.mask_id, n_samples=4); r.bits_per_token, r.stderr
    r = elbo_bits(model, windows, tok.mask_id, loss_fn=LOSSES.get("score_entropy")(), process=graph)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dlm.losses import Loss, token_ce
from dlm.process import ForwardProcess
from dlm.processes.masked import drop_mask_logit


@dataclass
class ElboResult:
    nats_per_window: torch.Tensor  # (N,) float64: the estimate for each window (averaged over samples)
    n_tokens: int
    n_samples: int
    exact: bool  # True for AR models (no Monte Carlo)

    @property
    def bits_per_token(self) -> float:
        return float(self.nats_per_window.sum()) / self.n_tokens / math.log(2)

    @property
    def stderr_bits_per_token(self) -> float:
        """Standard error of bits_per_token from the spread of per-window estimates (0 for exact AR)."""
        n = self.nats_per_window.numel()
        if self.exact or n < 2:
            return 0.0
        L = self.n_tokens / n
        return float(self.nats_per_window.std() / math.sqrt(n)) / L / math.log(2)


# ----- LLaDA's estimator, shared with the conditional likelihood (eval/conditional.py) ----------------------------
def stratified_u(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n stratified uniforms: one uniform offset plus n evenly spaced quantiles, mod 1 -> (n,)."""
    return (torch.rand(1, generator=generator, dtype=dtype) + torch.arange(n, dtype=dtype) / n) % 1.0


def mask_counts(u: torch.Tensor, n: int) -> torch.Tensor:
    """Uniforms (B,) -> mask counts (B,) long in 1..n (U{1..n} when u is uniform)."""
    return (u * n).floor().long().clamp(0, n - 1) + 1


def mask_exactly(counts: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """counts (B,) -> (B, n) bool with exactly counts[b] True positions in row b, chosen uniformly."""
    ranks = torch.rand(counts.numel(), n, generator=generator).argsort(1).argsort(1)  # random permutation ranks
    return ranks < counts[:, None]


def llada_nats(logits: torch.Tensor, target: torch.Tensor, is_masked: torch.Tensor, counts: torch.Tensor,
               n: int, mask_id: int) -> torch.Tensor:
    """LLaDA's estimate (Nie et al. 2025, eq. 6) -> (B,) float64 nats: (n / l) * the masked positions' cross-entropy,
    logits (B, L, V) of the canvas with l = counts[b] of its n scorable positions masked (is_masked (B, L)).
    [MASK]'s logit leaves the softmax (MDLM's SUBS), written into `logits` (no gradient flows here)."""
    ce = token_ce(drop_mask_logit(logits, mask_id, inplace=True), target).double()  # (B, L)
    return (ce * is_masked).sum(1) * (n / counts.to(logits.device).double())


@torch.no_grad()
def elbo_bits(model: torch.nn.Module, windows: torch.Tensor, mask_id: int, bos_id: int | None = None,
              n_samples: int = 1, batch_size: int = 32, seed: int = 0, autocast: bool = False,
              loss_fn: Loss | None = None, process: ForwardProcess | None = None,
              bos_prefix: bool = False) -> ElboResult:
    """windows: (N, L) clean token ids -> ElboResult. Causal models get the exact NLL; a `loss_fn` with
    `sequence_nll` (score_entropy, d3pm_hybrid) and its `process` give that family's ELBO estimate.
    `bos_prefix`: the masked estimator scores each window after a [BOS] column (bos_id) that is never masked, as
    an adapted (shifted) model was trained (dlm.adapt); the mask count still runs over the window's L tokens."""
    if n_samples < 1:  # zero samples would average nothing and report 0 bits
        raise ValueError(f"n_samples must be >= 1 Monte Carlo samples per window, got {n_samples}")
    if bos_prefix and bos_id is None:
        raise ValueError("bos_prefix needs bos_id")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    N, L = windows.shape
    per_window = torch.zeros(N, dtype=torch.float64)
    causal = getattr(model, "causal", False)
    own_estimator = loss_fn is not None and hasattr(loss_fn, "sequence_nll") and not causal
    timed = getattr(model, "needs_time", False)  # only a time-conditioned network reads t
    for start in range(0, N, batch_size):
        x0 = windows[start: start + batch_size].to(device)
        B = x0.shape[0]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if causal:
                if bos_id is None:
                    raise ValueError("the exact AR likelihood needs bos_id")
                inp = torch.cat([torch.full((B, 1), bos_id, device=device, dtype=x0.dtype), x0[:, :-1]], 1)
                ce = token_ce(model(inp, None), x0)  # (B, L)
                per_window[start: start + B] = ce.double().sum(1).cpu()
                continue
            for _ in range(n_samples):
                # Stratified mask counts: one uniform offset, B evenly spaced quantiles of U{1..L}.
                u = stratified_u(B, g)  # (B,)
                if own_estimator:  # the same stratified u, as the family's time
                    est = loss_fn.sequence_nll(model, x0, process, u.to(device), g)  # (B,) nats per window
                    per_window[start: start + B] += est.double().cpu() / n_samples
                    continue
                n_mask = mask_counts(u, L)  # (B,) in 1..L
                is_masked = mask_exactly(n_mask, L, g).to(device)  # exactly n_mask[b] masked positions
                xt = torch.where(is_masked, torch.full_like(x0, mask_id), x0)
                target = x0
                if bos_prefix:  # (B, 1 + L): the [BOS] column is clean and scores nothing
                    bos = torch.full((B, 1), bos_id, device=device, dtype=x0.dtype)
                    xt, target = torch.cat([bos, xt], 1), torch.cat([bos, x0], 1)
                    is_masked = torch.cat([torch.zeros_like(is_masked[:, :1]), is_masked], 1)
                t = None if not timed else (process.model_time(xt) if process is not None
                                            else (n_mask.double() / L).float().to(device))
                # x0 is never [MASK] (SUBS). Loaded MDLM / LLaDA never trained its logit; for our models dropping
                # it changes the bound by < 1e-7 bits/char. (B,) nats per window; with bos_prefix the target and
                # the mask are (B, 1 + L)
                est = llada_nats(model(xt, t), target, is_masked, n_mask, L, mask_id)
                per_window[start: start + B] += est.cpu() / n_samples
    model.train(was_training)
    return ElboResult(per_window, n_tokens=N * L, n_samples=n_samples, exact=causal)
