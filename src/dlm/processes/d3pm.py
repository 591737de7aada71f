"""D3PM: discrete-time diffusion with explicit transition matrices (Austin et al. 2021, "Structured Denoising
Diffusion Models in Discrete State-Spaces"; google-research/d3pm `text/diffusion.py`, and MDLM's `_d3pm_loss`).

Row vectors, as the paper: q(x_k | x_{k-1}) = Cat(x_{k-1} Q_k) and q(x_k | x0) = Cat(x0 Qbar_k), Qbar_k = Q_1 ... Q_k,
for k = 1..T. Both families here have Q_k = (1 - beta_k) I + beta_k 1 pi^T:

- `d3pm-absorbing`: pi = e_[MASK] (beta_k = 1 / (T - k + 1) with the default linear schedule, Austin et al.'s choice);
- `d3pm-uniform`: pi uniform over the V - 1 ids that are not [MASK] (cosine schedule by default).

Then Qbar_k = abar_k I + (1 - abar_k) 1 pi^T with abar_k = alpha(k / T) from a NoiseSchedule, and the matrices for
any pair s < k follow from abar_k / abar_s. They are built explicitly (V x V in float64), which suits small
vocabularies (byte-level: V = 260); the chain starts exactly at the data (abar_0 = 1) and ends exactly at pi
(abar_T = 0), so the prior term KL(q(x_T | x0) || pi) of the ELBO is zero.

The posterior q(x_s | x_k, x0) is proportional to (x_k Q_{s->k}^T) * (x0 Qbar_s); the network predicts
p~(x0 | x_k) and p(x_s | x_k) puts p~ in place of x0 (the "x0-parameterisation", eq. 5 of the paper). The loss
(dlm.losses `d3pm_hybrid`) is the ELBO L_vb = sum_k KL(q(x_{k-1} | x_k, x0) || p(x_{k-1} | x_k)) (the k = 1 term
being -log p(x0 | x_1)) plus lambda times the cross-entropy of p~.

    proc = PROCESSES.build("d3pm-uniform", mask_id, Cosine(eps=0.0), vocab_size=260, timesteps=1000)
    xt, moved = proc.q_sample_k(x0, k, generator); probs = proc.posterior(xt, k - 1, k, x0_probs)  # (B, L, V)
"""

from __future__ import annotations

import torch

from dlm.processes.masked import PROCESSES, ForwardProcess
from dlm.schedules import SCHEDULES

MAX_VOCAB = 4096  # a (B, V, V) float64 batch of matrices is 4 GB at V = 4096 and B = 32


def _rows(M: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """M (V, V) or (B, V, V), idx (..) or (B, ..) -> the rows M[idx] (..., V) (per batch row when M is batched)."""
    if M.dim() == 2:
        return M[idx]
    b = torch.arange(M.shape[0], device=idx.device).view(-1, *([1] * (idx.dim() - 1)))
    return M[b, idx]


class D3PM(ForwardProcess):
    losses = ("d3pm_hybrid",)
    default_arch = "dit"
    sampling = {"sampler": "d3pm", "temperature": 1.0, "block_length": 0}
    absorbing = False

    def __init__(self, mask_id: int, schedule, vocab_size: int | None = None, timesteps: int = 1000) -> None:
        super().__init__(mask_id, schedule, vocab_size)
        if timesteps < 1:
            raise ValueError(f"d3pm needs timesteps >= 1, got {timesteps}")
        self.T = timesteps
        if vocab_size is not None and vocab_size > MAX_VOCAB:
            raise ValueError(f"d3pm builds dense V x V transition matrices, meant for small vocabularies (byte-level);"
                             f" V = {vocab_size} > {MAX_VOCAB}: use sedd-absorbing or sedd-uniform")
        a0, a1 = schedule.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64)).tolist()
        if abs(a0 - 1.0) > 1e-6 or abs(a1) > 1e-6:
            raise ValueError(f"d3pm needs a schedule with alpha(0) = 1 and alpha(1) = 0 (got {a0:.6g}, {a1:.6g}): "
                             "use schedule linear, loglinear or cosine with eps=0")

    @classmethod
    def from_config(cls, pcfg, mask_id, vocab_size=None):
        return cls(mask_id, SCHEDULES.get(pcfg.schedule).from_config(pcfg), vocab_size, pcfg.timesteps)

    def _V(self, V: int | None = None) -> int:
        V = V or self.vocab_size
        if V is None:
            raise ValueError("d3pm needs vocab_size (the width of the logits)")
        return V

    # ----- the matrices --------------------------------------------------------------------------------------
    def alpha_bar(self, k: torch.Tensor | int) -> torch.Tensor:
        """abar_k = alpha(k / T) in float64, exactly 1 at k = 0 and 0 at k = T."""
        k = torch.as_tensor(k, dtype=torch.float64)
        a = self.schedule.alpha(k / self.T).double()
        return torch.where(k <= 0, 1.0, torch.where(k >= self.T, 0.0, a))

    def stationary(self, V: int | None = None) -> torch.Tensor:
        """pi (V,) float64: the distribution every token reaches at k = T."""
        raise NotImplementedError

    def _mix(self, keep: torch.Tensor, V: int | None) -> torch.Tensor:
        """keep (...) -> (..., V, V): keep I + (1 - keep) 1 pi^T."""
        V = self._V(V)
        pi = self.stationary(V)
        eye = torch.eye(V, dtype=torch.float64)
        keep = keep.double()[..., None, None]
        return keep * eye + (1.0 - keep) * pi.expand(V, V)

    def Q(self, k: torch.Tensor | int, V: int | None = None) -> torch.Tensor:
        """One forward step k - 1 -> k: (V, V), or (B, V, V) for k (B,)."""
        k = torch.as_tensor(k)
        return self._mix(self.alpha_bar(k) / self.alpha_bar(k - 1), V)

    def Q_bar(self, k: torch.Tensor | int, V: int | None = None) -> torch.Tensor:
        """From x0 to step k: Q_1 ... Q_k."""
        return self._mix(self.alpha_bar(k), V)

    def Q_between(self, s: torch.Tensor | int, k: torch.Tensor | int, V: int | None = None) -> torch.Tensor:
        """From step s to step k >= s: Q_{s+1} ... Q_k."""
        return self._mix(self.alpha_bar(k) / self.alpha_bar(s), V)

    # ----- forward sampling and the posterior ------------------------------------------------------------------
    def q_sample_k(self, x0: torch.Tensor, k: torch.Tensor, generator: torch.Generator | None = None,
                   maskable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 (B, L), k (B,) in 0..T -> xt (B, L) drawn from the rows x0 Qbar_k, changed (B, L) bool."""
        rows = _rows(self.Q_bar(k.cpu()).to(x0.device), x0)  # (B, L, V) float64
        u = torch.rand(x0.shape, generator=generator, dtype=torch.float64, device=x0.device)
        xt = torch.searchsorted(rows.cumsum(-1), u[..., None], right=True).squeeze(-1).clamp_max(rows.shape[-1] - 1)
        if maskable is not None:
            xt = torch.where(maskable, xt, x0)
        return xt, xt != x0

    def q_sample(self, x0, t, generator=None, maskable=None):
        """t (B,) = k / T, as the network sees it."""
        return self.q_sample_k(x0, (t * self.T).round().long().clamp(0, self.T), generator, maskable)

    def posterior(self, xt: torch.Tensor, s: torch.Tensor | int, k: torch.Tensor | int,
                  x0: torch.Tensor) -> torch.Tensor:
        """p(x_s | x_k = xt) (..., V) float64 for s < k, with x0 ids (...) (the true posterior q) or x0 probabilities
        (..., V) (the model's p). s, k: ints, or (B,) with xt (B, L)."""
        V = self._V(x0.shape[-1] if x0.is_floating_point() else None)
        to_k = self.Q_between(torch.as_tensor(s).cpu(), torch.as_tensor(k).cpu(), V).to(xt.device)
        from_0 = self.Q_bar(torch.as_tensor(s).cpu(), V).to(xt.device)
        fact1 = _rows(to_k.transpose(-1, -2), xt)  # (..., V): Q_{s->k}[z, x_k] for every z
        fact2 = _rows(from_0, x0) if not x0.is_floating_point() else x0.double() @ from_0
        unnorm = fact1 * fact2
        return unnorm / unnorm.sum(-1, keepdim=True).clamp_min(1e-300)

    def prior_sample(self, batch, length, device="cpu"):
        pi = self.stationary().to(device)
        return torch.multinomial(pi, batch * length, replacement=True).view(batch, length)


@PROCESSES.register("d3pm-absorbing")
class D3PMAbsorbing(D3PM):
    defaults = {"schedule": "linear", "eps": 0.0, "loss": "d3pm_hybrid"}
    absorbing = True

    def stationary(self, V=None):
        pi = torch.zeros(self._V(V), dtype=torch.float64)
        pi[self.mask_id] = 1.0
        return pi


@PROCESSES.register("d3pm-uniform")
class D3PMUniform(D3PM):
    defaults = {"schedule": "cosine", "eps": 0.0, "loss": "d3pm_hybrid"}
    needs_time = True

    def stationary(self, V=None):
        V = self._V(V)
        pi = torch.full((V,), 1.0 / (V - 1), dtype=torch.float64)
        pi[self.mask_id] = 0.0
        return pi
