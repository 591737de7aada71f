"""Exact denoisers of a toy distribution over short sequences, for testing SEDD / D3PM samplers without training.

The toy p0 puts known probabilities on every sequence of L tokens from a small vocabulary, with strong dependence
between positions. Since the forward processes act on each position independently, the exact quantities follow
by enumeration: p_t(x) = sum_x0 p0(x0) prod_j P_t[x0_j, x_j]. `ExactScore` returns the raw network output whose
log-score (graph.log_score) is exactly log p_t(x with position i set to y) / p_t(x); `ExactX0` returns the x0
logits with which D3PM's parameterisation gives the exact reverse step of each position. Positions listed in
`clean` are known to be clean (a model trained with clean context), which exact conditional sampling needs on a
uniform graph (and on an absorbing D3PM chain at k = T, where no token has survived).
"""

from __future__ import annotations

import itertools
import math

import torch

from dlm.sampling.generate import ModelFn  # declares accepts_time: the loop passes the sampler's t

V, MASK = 4, 1  # [MASK] sits between the real tokens 0, 2, 3
TOKENS = [0, 2, 3]


def toy_distribution(L: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> all sequences S (M, L) over TOKENS and their probabilities p0 (M,) float64 (min ~0.15 / M)."""
    S = torch.tensor(list(itertools.product(TOKENS, repeat=L)))
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(2.0 * torch.randn(len(S), generator=g, dtype=torch.float64), 0)
    return S, 0.85 * p + 0.15 / len(S)


def _likelihoods(P: torch.Tensor, x: torch.Tensor, clean: torch.Tensor | None) -> torch.Tensor:
    """A (B, L, V): p(x_j | x0_j = a); clean positions are a point mass on their token."""
    A = P[:, x].permute(1, 2, 0).clone()  # (B, L, V)
    if clean is not None and bool(clean.any()):
        A[:, clean] = torch.nn.functional.one_hot(x[:, clean], V).double()
    return A


def _sequence_terms(A: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """(B, M, L): A[b, j, S[m, j]]."""
    L = S.shape[1]
    return A[:, torch.arange(L)[None, :], S]


def unique_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct rows of x (B, L) and, for each row, its index among them (faster than unique(dim=0))."""
    place = V ** torch.arange(x.shape[1] - 1, -1, -1)
    codes, inverse = torch.unique((x * place).sum(1), return_inverse=True)
    return codes[:, None] // place % V, inverse


class ExactScore(ModelFn):
    """model_fn(x (B, L), t) -> raw (B, L, V) whose log score on `graph` is exact."""

    accepts_time = True

    def __init__(self, graph, S: torch.Tensor, p0: torch.Tensor, clean: torch.Tensor | None = None) -> None:
        self.graph, self.S, self.p0, self.clean = graph, S, p0, clean
        self.times: list[float] = []

    def __call__(self, x: torch.Tensor, t: float | None = None) -> torch.Tensor:
        assert t is not None, "the sampler must pass its time"
        self.times.append(float(t))
        rows, inverse = unique_rows(x)  # at most V^L distinct canvases
        return self.raw(rows, float(t))[inverse]

    def raw(self, x: torch.Tensor, t: float) -> torch.Tensor:
        sigma = float(self.graph.schedule.sigma(torch.tensor(t, dtype=torch.float64)))
        P = self.graph.transition_matrix(sigma, V)
        A = _likelihoods(P, x, self.clean)
        terms = _sequence_terms(A, self.S)  # (B, M, L)
        pt = terms.prod(-1) @ self.p0  # (B,)
        B, L = x.shape
        score = torch.zeros(B, L, V, dtype=torch.float64)
        for i in range(L):
            excl = torch.cat([terms[:, :, :i], terms[:, :, i + 1:]], -1).prod(-1) * self.p0  # (B, M)
            score[:, i] = excl @ P[self.S[:, i]] / pt[:, None]  # p_t(x_i -> y) / p_t(x)
        ls = torch.log(score)
        if self.graph.absorbing:  # undo the graph's scale_by_sigma
            ls = ls + math.log(math.expm1(sigma)) + math.log(V - 1)
        return ls.float()


class ExactX0(ModelFn):
    """model_fn(x (B, L), t = k / T) -> logits (B, L, V) of the exact p(x0_i | x_k) on a D3PM chain."""

    accepts_time = True

    def __init__(self, process, S: torch.Tensor, p0: torch.Tensor, clean: torch.Tensor | None = None) -> None:
        self.process, self.S, self.p0, self.clean = process, S, p0, clean
        self.times: list[float] = []

    def __call__(self, x: torch.Tensor, t: float | None = None) -> torch.Tensor:
        assert t is not None, "the sampler must pass its time"
        self.times.append(float(t))
        rows, inverse = unique_rows(x)
        return self.logits(rows, round(float(t) * self.process.T))[inverse]

    def logits(self, x: torch.Tensor, k: int) -> torch.Tensor:
        A = _likelihoods(self.process.Q_bar(k, V), x, self.clean)
        w = _sequence_terms(A, self.S).prod(-1) * self.p0  # (B, M): p(x0 = S_m, x_k = x)
        B, L = x.shape
        post = torch.zeros(B, L, V, dtype=torch.float64)
        for i in range(L):
            post[:, i] = w @ torch.nn.functional.one_hot(self.S[:, i], V).double()
        # D3PM's p(x_s | x_k) = sum_a q(x_s, x_k | a) p~(a) / Z carries q(x_k | a): the p~ that makes it the true
        # reverse step is p(x0 | x_k) / q(x_k | x0). (On an absorbing chain q([MASK] | a) is the same for all a.)
        lik = self.process.Q_bar(k, V)[:, x].permute(1, 2, 0)  # (B, L, V): q(x_k^i | x0^i = a)
        if self.clean is not None:
            lik[:, self.clean] = 1.0  # known tokens: nothing to undo (and never sampled)
        return (torch.log(post / post.sum(-1, keepdim=True)) - torch.log(lik)).float()


def sequence_index(x: torch.Tensor) -> torch.Tensor:
    """(N, L) sequences over TOKENS -> (N,) row index into toy_distribution's S."""
    digit = torch.full((V,), -1, dtype=torch.long)
    digit[torch.tensor(TOKENS)] = torch.arange(len(TOKENS))
    d = digit[x]
    assert (d >= 0).all(), f"a sample holds a token outside {TOKENS} (e.g. [MASK])"
    n, L = len(TOKENS), x.shape[1]
    return (d * n ** torch.arange(L - 1, -1, -1)).sum(1)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson's statistic of counts (K,) against probs (K,) -> (statistic, p-value with K - 1 degrees of freedom)."""
    n = counts.sum().double()
    expected = n * probs
    stat = float(((counts.double() - expected) ** 2 / expected).sum())
    dof = len(probs) - 1
    return stat, float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                               torch.tensor(stat / 2, dtype=torch.float64)))
