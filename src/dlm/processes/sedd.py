"""SEDD's continuous-time graphs: a Markov chain on token ids whose rate at time t is dsigma(t) R.

Score Entropy Discrete Diffusion (Lou, Meng, Ermon 2024; louaaron/Score-Entropy-Discrete-Diffusion `graph_lib.py`).
Row convention throughout: R[x, y] is the rate of jumping from x to y (rows sum to zero) and the transition over an
interval with noise increment d = sigma(t) - sigma(s) is P(d) = exp(d R), P[x, y] = p(x_t = y | x_s = x). Each
position of a sequence moves independently. Two graphs, over the ids of a vocabulary of width V:

- `sedd-absorbing`: every token jumps to [MASK] at rate 1; P[x, x] = e^-d, P[x, MASK] = 1 - e^-d.
- `sedd-uniform`: every token jumps to each of the N = V - 1 other non-[MASK] ids at rate 1 / N (R = J - I with
  J = 11^T / N), so P = e^-d I + (1 - e^-d) J; [MASK] is no state of this graph.

The network's output becomes a log concrete score log s(x)_y ~ log p_t(y) / p_t(x) (for y differing from x at one
position) in `log_score`: uniform takes it as is; absorbing subtracts log(e^sigma - 1) + log(V - 1) as SEDD's
`scale_by_sigma`, so that a network that knows nothing outputs ~0. The entry of the current token is log 1 = 0.

The reverse chain has rates R^(x -> y) = s(x)_y R[y, x]. Its samplers (dlm/sampling/sedd.py) take either an Euler
step of those rates, or Tweedie's step: p(x_s = z | x_t = x) = [s^T exp(-d R)]_z P(d)[z, x], the "staggered score"
times a column of the transition. `score_entropy` is the per-position denoising score entropy with its constant,
sum_y R[y, x] (s_y - r_y log s_y + K(r_y)), r_y = p(y | x0) / p(x | x0), K(a) = a (log a - 1): each term is >= 0 and
is 0 exactly at s_y = r_y. Weighted by dsigma(t) and integrated over t in [0, 1] it bounds -log p(x0).

    graph = PROCESSES.build("sedd-uniform", mask_id, Geometric(), vocab_size=260)
    xt, moved = graph.q_sample(x0, t, generator); ls = graph.log_score(net(xt, t), xt, graph.schedule.sigma(t))
"""

from __future__ import annotations

import math

import torch

from dlm.processes.masked import PROCESSES, ForwardProcess, absorb, drop_mask_logit


def uniform_tokens(V: int, mask_id: int, shape: tuple[int, ...], generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Ids drawn uniformly from the V - 1 that are not [MASK]: the limit of the uniform chains."""
    r = torch.randint(0, V - 1, shape, generator=generator, device=device)
    return r + (r >= mask_id).long()


def expm1_pos(sigma: torch.Tensor) -> torch.Tensor:
    """e^sigma - 1, accurate for small sigma and never 0 (sigma = 0 only where nothing is noised)."""
    return torch.expm1(sigma).clamp_min(1e-30)


def entropy_const(a: torch.Tensor) -> torch.Tensor:
    """K(a) = a (log a - 1): the constant that makes s - a log s + K(a) >= 0 with equality at s = a."""
    return a * (torch.log(a) - 1.0)


class Graph(ForwardProcess):
    """A SEDD graph. Vectors over the vocabulary are (..., V); `sigma` / `d` broadcast against the leading dims."""

    losses = ("score_entropy",)
    default_arch = "dit"
    sampling = {"sampler": "sedd_analytic", "temperature": 1.0, "block_length": 0}
    absorbing = False

    def _V(self, V: int | None = None) -> int:
        V = V or self.vocab_size
        if V is None:
            raise ValueError(f"{type(self).__name__} needs vocab_size (the width of the logits)")
        return V

    def valid(self, V: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(V,) bool: the states of the graph."""
        return torch.ones(V, dtype=torch.bool, device=device)

    # ----- explicit matrices (small vocabularies: tests and documentation) ---------------------------------------
    def rate_matrix(self, V: int | None = None) -> torch.Tensor:
        """(V, V) float64 R, rows summing to zero."""
        raise NotImplementedError

    def transition_matrix(self, d: float | torch.Tensor, V: int | None = None) -> torch.Tensor:
        """(V, V) float64 exp(d R) in closed form; rows sum to one."""
        raise NotImplementedError

    # ----- per-position vectors --------------------------------------------------------------------------------
    def rate_cols(self, x: torch.Tensor, V: int) -> torch.Tensor:
        """x (...) -> (..., V) float64: R[y, x] for every y (the forward rates into x)."""
        raise NotImplementedError

    def transition_cols(self, x: torch.Tensor, d: torch.Tensor, V: int) -> torch.Tensor:
        """x (...), d (...) -> (..., V) float64: P(d)[z, x] for every z."""
        raise NotImplementedError

    def log_score(self, raw: torch.Tensor, xt: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """raw network output (..., V), xt (...), sigma (...) -> log s(xt) (..., V), 0 at xt, -inf off the graph."""
        raise NotImplementedError

    def score_entropy(self, log_score: torch.Tensor, xt: torch.Tensor, x0: torch.Tensor,
                      sigma: torch.Tensor) -> torch.Tensor:
        """Denoising score entropy (...) >= 0 of each position, in nats per unit of sigma."""
        raise NotImplementedError

    def staggered_score(self, score: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """score (..., V), d (...) -> s^T exp(-d R) (..., V): p_{sigma - d}(z) / p_sigma(x) for an exact score."""
        raise NotImplementedError

    def reverse_rates(self, score: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        """(..., V) rates of the reverse chain out of xt: s_y R[y, xt] for y != xt, minus their sum at xt."""
        V = score.shape[-1]
        rates = score * self.rate_cols(xt, V).to(score.dtype)
        rates = rates.scatter(-1, xt[..., None], 0.0)
        return rates.scatter(-1, xt[..., None], -rates.sum(-1, keepdim=True))

    def euler_probs(self, score: torch.Tensor, xt: torch.Tensor, rate_dt: torch.Tensor) -> torch.Tensor:
        """One Euler step of the reverse chain: onehot(xt) + dsigma dt R^; rate_dt (...). Stay may be < 0 (clamp)."""
        step = rate_dt[..., None].to(score.dtype) * self.reverse_rates(score, xt)
        return step.scatter_add(-1, xt[..., None], torch.ones_like(step[..., :1]))

    def tweedie_probs(self, score: torch.Tensor, xt: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Tweedie's tau-leaping step from sigma to sigma - d: staggered score times column xt of P(d)."""
        V = score.shape[-1]
        return self.staggered_score(score, d) * self.transition_cols(xt, d, V).to(score.dtype)


@PROCESSES.register("sedd-absorbing")
class AbsorbingGraph(Graph):
    """Tokens jump to [MASK] at rate 1; only [MASK] moves in reverse. Log-linear noise makes it MDLM's process."""

    defaults = {"schedule": "loglinear", "loss": "score_entropy", "eps": 1e-3}
    absorbing = True

    def rate_matrix(self, V=None):
        V, m = self._V(V), self.mask_id
        R = -torch.eye(V, dtype=torch.float64)
        R[:, m] += 1.0  # every token moves to [MASK] at rate 1; [MASK]'s row is then zero
        return R

    def transition_matrix(self, d, V=None):
        V, m = self._V(V), self.mask_id
        keep = math.exp(-float(d))
        P = keep * torch.eye(V, dtype=torch.float64)
        P[:, m] += 1.0 - keep
        P[m, m] = 1.0
        return P

    def rate_cols(self, x, V):
        # R[y, x]: into [MASK] from every other token at rate 1; into a token only its own diagonal -1.
        cols = torch.zeros(*x.shape, V, dtype=torch.float64, device=x.device)
        is_mask = (x == self.mask_id)[..., None]
        cols = torch.where(is_mask, torch.ones_like(cols), cols)
        return cols.scatter(-1, x[..., None], torch.where(is_mask, 0.0, -1.0).to(cols.dtype))

    def transition_cols(self, x, d, V):
        keep = torch.exp(-d.double())[..., None].expand(*x.shape, 1)  # (..., 1)
        is_mask = (x == self.mask_id)[..., None]
        # Column [MASK]: 1 - e^-d from any token, 1 from [MASK]. Column x (a token): e^-d from x only.
        cols = torch.where(is_mask, 1.0 - keep, torch.zeros(*x.shape, V, dtype=torch.float64, device=x.device))
        return cols.scatter(-1, x[..., None], torch.where(is_mask, torch.ones_like(keep), keep))

    def q_sample(self, x0, t, generator=None, maskable=None):
        """x0 (B, L), t (B,) -> xt (B, L), is_masked (B, L) bool: the draws of MaskedProcess."""
        p_mask = self.schedule.move_chance(t).to(torch.float32)[:, None]  # (B, 1)
        return absorb(x0, p_mask, self.mask_id, generator, maskable)

    def prior_sample(self, batch, length, device="cpu"):
        return torch.full((batch, length), self.mask_id, dtype=torch.long, device=device)

    def log_score(self, raw, xt, sigma):
        V = raw.shape[-1]
        shift = torch.log(expm1_pos(sigma.double())) + math.log(V - 1)  # SEDD's scale_by_sigma
        ls = raw - shift.to(raw.dtype)[..., None]
        return ls.scatter(-1, xt[..., None], 0.0)

    def score_entropy(self, log_score, xt, x0, sigma):
        # Only [MASK] has incoming rates (from every token, rate 1); r_y = 1 / (e^sigma - 1) at y = x0, else 0.
        out = torch.zeros(xt.shape, dtype=torch.float64, device=xt.device)
        masked = xt == self.mask_id
        if not bool(masked.any()):
            return out + 0.0 * log_score.sum()  # keeps the graph connected for backward
        ls = log_score[masked]  # (N, V)
        r = 1.0 / expm1_pos(sigma.double().expand_as(xt)[masked])  # (N,)
        pos = ls.exp().index_fill(-1, torch.tensor([self.mask_id], device=ls.device), 0.0).sum(-1)
        neg = r * ls.gather(-1, x0[masked][:, None])[:, 0]
        return out.masked_scatter(masked, pos - neg + entropy_const(r))

    def staggered_score(self, score, d):
        grow = torch.exp(d.double())[..., None].to(score.dtype)  # e^d
        m = self.mask_id
        others = score.index_fill(-1, torch.tensor([m], device=score.device), 0.0).sum(-1, keepdim=True)
        stag = score * grow
        return stag.index_copy(-1, torch.tensor([m], device=score.device), score[..., m:m + 1] + (1 - grow) * others)


@PROCESSES.register("sedd-uniform")
class UniformGraph(Graph):
    """Every id but [MASK] jumps to each of the other N - 1 at rate 1 / N. The network must see t (`needs_time`)."""

    defaults = {"schedule": "geometric", "loss": "score_entropy"}
    needs_time = True

    def valid(self, V, device="cpu"):
        v = torch.ones(V, dtype=torch.bool, device=device)
        v[self.mask_id] = False
        return v

    def rate_matrix(self, V=None):
        V = self._V(V)
        N, v = V - 1, self.valid(V).double()
        R = v[:, None] * v[None, :] / N
        return R - torch.diag(R.sum(1))

    def transition_matrix(self, d, V=None):
        V = self._V(V)
        N, v = V - 1, self.valid(V).double()
        keep = math.exp(-float(d))
        P = keep * torch.eye(V, dtype=torch.float64) + (1.0 - keep) * v[:, None] * v[None, :] / N
        P[self.mask_id, self.mask_id] = 1.0  # not a state: an isolated point keeps the matrix stochastic
        return P

    def rate_cols(self, x, V):
        v = self.valid(V, x.device).double()
        cols = (v / (V - 1)).expand(*x.shape, V)
        return cols.scatter(-1, x[..., None], -(V - 2) / (V - 1))

    def transition_cols(self, x, d, V):
        keep = torch.exp(-d.double())[..., None].expand(*x.shape, 1)
        v = self.valid(V, x.device).double()
        cols = (1.0 - keep) * v / (V - 1)
        return cols.scatter_add(-1, x[..., None], keep)

    def q_sample(self, x0, t, generator=None, maskable=None):
        """x0 (B, L), t (B,) -> xt (B, L), moved (B, L) bool: moved positions take a uniform id (maybe their own)."""
        p_move = self.schedule.move_chance(t).to(torch.float32)[:, None]  # (B, 1) = 1 - e^-sigma
        u = torch.rand(x0.shape, generator=generator, device=x0.device)
        moved = u < p_move
        if maskable is not None:
            moved &= maskable
        return torch.where(moved, self.random_tokens(x0.shape, generator, x0.device), x0), moved

    def random_tokens(self, shape, generator=None, device="cpu"):
        return uniform_tokens(self._V(), self.mask_id, shape, generator, device)

    def prior_sample(self, batch, length, device="cpu"):
        return self.random_tokens((batch, length), None, device)

    def log_score(self, raw, xt, sigma):
        return drop_mask_logit(raw, self.mask_id).scatter(-1, xt[..., None], 0.0)

    def score_entropy(self, log_score, xt, x0, sigma):
        V = log_score.shape[-1]
        N = V - 1
        others = self.valid(V, xt.device).expand(*xt.shape, V).scatter(-1, xt[..., None], False)  # y != x, valid
        sum_exp = log_score.exp().masked_fill(~others, 0.0).sum(-1)  # (...)
        sum_ls = log_score.masked_fill(~others, 0.0).sum(-1)
        ls_x0 = log_score.gather(-1, x0[..., None])[..., 0]
        em1 = expm1_pos(sigma.double()).expand_as(xt)
        same = xt == x0
        # x = x0: every other y has r = (e^s - 1) / (e^s - 1 + N). x != x0: r = 1 + N / (e^s - 1) at x0, else 1.
        r_same = em1 / (em1 + N)
        neg = torch.where(same, r_same * sum_ls / N, sum_ls / N + ls_x0.double() / em1)
        const = torch.where(same, (N - 1) / N * entropy_const(r_same), (entropy_const(1 + N / em1) - (N - 2)) / N)
        return sum_exp / N - neg + const

    def staggered_score(self, score, d):
        grow = torch.exp(d.double())[..., None].to(score.dtype)
        V = score.shape[-1]
        v = self.valid(V, score.device).to(score.dtype)
        total = (score * v).sum(-1, keepdim=True)
        return (grow * score + (1 - grow) / (V - 1) * total) * v
