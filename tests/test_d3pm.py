"""D3PM: explicit transition matrices, the posterior against Bayes' rule, the hybrid loss, the ELBO (unbiased, and
a true bound on the model's exact likelihood on a toy case), and the ancestral sampler on a known distribution.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from toy_diffusion import MASK, TOKENS, ExactX0, V, chi_square, sequence_index, toy_distribution

from dlm.d3pm import D3PMAbsorbing, D3PMUniform
from dlm.losses import LOSSES, LossOutput
from dlm.sampling import SAMPLERS, denoise
from dlm.schedules import Cosine, Linear

T = 8


def chain(name: str, T: int = T):
    return {"absorbing": lambda: D3PMAbsorbing(MASK, Linear(eps=0.0), V, T),
            "uniform": lambda: D3PMUniform(MASK, Cosine(eps=0.0), V, T)}[name]()


FAMILIES = ["absorbing", "uniform"]


# ----- the matrices ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_matrices_are_stochastic_and_compose(name):
    c = chain(name)
    eye = torch.eye(V, dtype=torch.float64)
    torch.testing.assert_close(c.Q_bar(0), eye)
    prod = eye
    for k in range(1, T + 1):
        Qk = c.Q(k)
        assert (Qk >= 0).all()
        torch.testing.assert_close(Qk.sum(1), torch.ones(V, dtype=torch.float64))
        prod = prod @ Qk
        torch.testing.assert_close(c.Q_bar(k), prod, rtol=0, atol=1e-12)  # Qbar_k = Q_1 ... Q_k
    for s, k in itertools.combinations(range(T + 1), 2):
        between = eye
        for j in range(s + 1, k + 1):
            between = between @ c.Q(j)
        torch.testing.assert_close(c.Q_between(s, k), between, rtol=0, atol=1e-12)
        torch.testing.assert_close(c.Q_bar(s) @ c.Q_between(s, k), c.Q_bar(k), rtol=0, atol=1e-12)
    real = torch.tensor([y for y in range(V) if y != MASK])
    torch.testing.assert_close(c.Q_bar(T)[real], c.stationary().expand(len(real), V))  # the chain ends at pi
    ks = torch.tensor([1, 5, 8])
    torch.testing.assert_close(c.Q_bar(ks), torch.stack([c.Q_bar(int(k)) for k in ks]))


def test_absorbing_chain_is_austins():
    """beta_k = 1 / (T - k + 1): the linear schedule masks a token at step k with that probability."""
    c = chain("absorbing")
    for k in range(1, T + 1):
        torch.testing.assert_close(c.Q(k)[0, MASK], torch.tensor(1.0 / (T - k + 1), dtype=torch.float64))
    assert c.stationary()[MASK] == 1.0


def test_schedules_that_do_not_end_at_pi_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        D3PMAbsorbing(MASK, Linear(eps=1e-3), V, T)


@pytest.mark.parametrize("name", FAMILIES)
def test_q_sample_follows_the_rows_of_qbar(name):
    c = chain(name)
    x0 = torch.tensor([y for y in range(V) if y != MASK]).repeat(3000)[:, None].repeat(1, 4)
    k = torch.full((x0.shape[0],), 5)
    xt, changed = c.q_sample_k(x0, k, generator=torch.Generator().manual_seed(0))
    assert torch.equal(changed, xt != x0)
    for a in x0[:, 0].unique().tolist():
        freq = torch.bincount(xt[x0 == a], minlength=V).double() / int((x0 == a).sum())
        torch.testing.assert_close(freq, c.Q_bar(5)[a], atol=0.02, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_posterior_is_bayes_rule(name):
    c = chain(name)
    gen = torch.Generator().manual_seed(0)
    for s, k in [(0, 1), (2, 3), (1, 6), (0, T)]:
        for x0 in [y for y in range(V) if y != MASK]:
            reach = c.Q_bar(k)[x0] > 0
            xk = torch.arange(V)[reach]
            q = c.posterior(xk, s, k, torch.full_like(xk, x0))  # (n, V)
            joint = c.Q_bar(s)[x0][None, :] * c.Q_between(s, k)[:, xk].T  # q(x_s) q(x_k | x_s)
            torch.testing.assert_close(q, joint / c.Q_bar(k)[x0, xk][:, None], rtol=1e-10, atol=1e-12)
        # The x0-parameterisation: p(x_s | x_k) = sum_a p~(a) q(x_s, x_k | a) / sum_a p~(a) q(x_k | a).
        p0 = torch.softmax(torch.randn(V, V, generator=gen, dtype=torch.float64), -1)  # a p~ per x_k
        p = c.posterior(torch.arange(V), s, k, p0)
        joint = (p0[:, :, None] * c.Q_bar(s)[None] * c.Q_between(s, k).T[:, None, :]).sum(1)
        live = joint.sum(-1) > 0  # x_k reachable
        torch.testing.assert_close(p[live], (joint / joint.sum(-1, keepdim=True))[live], rtol=1e-10, atol=1e-12)


# ----- the loss and the bound --------------------------------------------------------------------------------

class TableNet(nn.Module):
    """x0 logits from the token at each position and t (B,): a fixed, imperfect model."""

    def __init__(self, seed: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(V, V, generator=g))
        self.slope = torch.randn(V, V, generator=g)

    def forward(self, xt, t, attention_mask=None):
        return self.table[xt] + t.float()[:, None, None] * self.slope[xt]


def _kl_terms(c, net, x0: torch.Tensor, k: int, xk: torch.Tensor) -> torch.Tensor:
    """(n,) sum over positions of KL(q(x_{k-1} | x_k, x0) || p(x_{k-1} | x_k)) for canvases xk (n, L), explicitly."""
    logits = net(xk, torch.full((len(xk),), k / c.T)).double()
    logits[..., MASK] = -torch.inf
    p0 = torch.softmax(logits, -1)  # (n, L, V)
    between, from0 = c.Q_between(k - 1, k), c.Q_bar(k - 1)
    q = from0[x0][None] * between[:, xk].permute(1, 2, 0)  # (n, L, V)
    q = q / q.sum(-1, keepdim=True)
    p = (p0 @ from0) * between[:, xk].permute(1, 2, 0)
    p = p / p.sum(-1, keepdim=True)
    return torch.where(q > 0, q * (q.log() - p.log()), 0.0).sum((-1, -2))


@torch.no_grad()
def exact_bound(c, net, x0: torch.Tensor) -> float:
    """-ELBO(x0) = sum_k E_{x_k | x0} KL_k, the expectation by enumerating every canvas x_k."""
    L = x0.shape[0]
    grid = torch.tensor(list(itertools.product(range(V), repeat=L)))
    total = 0.0
    for k in range(1, c.T + 1):
        prob = c.Q_bar(k)[x0][torch.arange(L), grid].prod(-1)  # (V^L,)
        live = prob > 0
        total += float((prob[live] * _kl_terms(c, net, x0, k, grid[live])).sum())
    return total


@torch.no_grad()
def exact_nll(c, net, x0: torch.Tensor) -> float:
    """-log p(x0) under the model's own reverse chain, pi^L -> x_T -> ... -> x_0, every canvas enumerated."""
    L = x0.shape[0]
    grid = torch.tensor(list(itertools.product(range(V), repeat=L)))  # (G, L)
    p = c.stationary()[grid].prod(-1)  # p(x_T)
    for k in range(c.T, 0, -1):
        logits = net(grid, torch.full((len(grid),), k / c.T)).double()
        logits[..., MASK] = -torch.inf
        step = c.posterior(grid, k - 1, k, torch.softmax(logits, -1))  # (G, L, V): p(x_{k-1}^i | x_k)
        trans = step[:, torch.arange(L)[None, :], grid].prod(-1)  # (G from, G to)
        p = p @ trans
    return float(-torch.log(p[(grid == x0).all(1)]))


@pytest.mark.parametrize("name", FAMILIES)
def test_elbo_estimator_is_unbiased_and_bounds_the_exact_likelihood(name):
    c, net = chain(name), TableNet()
    loss = LOSSES.build("d3pm_hybrid")
    x0 = torch.tensor([TOKENS[0], TOKENS[2]])
    exact = exact_bound(c, net, x0)
    assert exact >= exact_nll(c, net, x0) - 1e-9, "the ELBO bounds -log p(x0)"
    means = torch.stack([loss.sequence_nll(net, x0.repeat(4000, 1), c, (torch.rand(1, generator=gen) +
                                           torch.arange(4000) / 4000) % 1.0, gen).mean()
                         for gen in [torch.Generator().manual_seed(s) for s in range(20)]])
    mean, err = float(means.mean()), float(means.std() / len(means) ** 0.5)
    assert err < 0.01 * exact and abs(mean - exact) < 4 * err, (mean, exact, err)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_model_chain_is_a_distribution(name):
    c, net = chain(name, T=4), TableNet(seed=5)
    total = sum(math.exp(-exact_nll(c, net, torch.tensor(x))) for x in itertools.product(TOKENS, repeat=2))
    assert total == pytest.approx(1.0, abs=1e-9)


def test_hybrid_loss_replays_its_draws():
    c, net = chain("uniform"), TableNet()
    B, L = 16, 3
    x0 = torch.tensor(TOKENS)[torch.randint(0, 3, (B, L), generator=torch.Generator().manual_seed(0))]
    out = LOSSES.build("d3pm_hybrid", hybrid_lambda=0.5)(net, x0, c, generator=torch.Generator().manual_seed(1))
    assert isinstance(out, LossOutput) and out.mask.all() and out.loss.requires_grad
    g = torch.Generator().manual_seed(1)
    from dlm.schedules import sample_t

    k = (sample_t(B, True, g) * T).long().clamp(0, T - 1) + 1
    xt, _ = c.q_sample_k(x0, k, generator=g)
    kl = torch.stack([_kl_terms(c, net, x0[b], int(k[b]), xt[b:b + 1])[0] for b in range(B)])
    logits = net(xt, k.float() / T).double()
    logits[..., MASK] = -torch.inf
    ce = -torch.log_softmax(logits, -1).gather(-1, x0[..., None]).sum()
    assert out.nll.item() == pytest.approx((T * kl.sum() / (B * L)).item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((T * kl.sum() / (B * L) + 0.5 * ce / (B * L)).item(), rel=1e-5)
    out.loss.backward()
    assert net.table.grad.abs().sum() > 0


def test_a_perfect_denoiser_of_a_point_mass_has_zero_loss():
    c = chain("absorbing")
    x0 = torch.tensor([[TOKENS[1], TOKENS[0], TOKENS[2]]]).repeat(8, 1)

    class Oracle(nn.Module):
        def forward(self, xt, t, attention_mask=None):
            return torch.nn.functional.one_hot(x0, V).float() * 1e4

    out = LOSSES.build("d3pm_hybrid")(Oracle(), x0, c, generator=torch.Generator().manual_seed(0))
    assert out.nll.item() == pytest.approx(0.0, abs=1e-9) and out.loss.item() == pytest.approx(0.0, abs=1e-9)


# ----- the sampler -------------------------------------------------------------------------------------------

N = 4000


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("conditional", [False, True])
def test_ancestral_samples_follow_the_toy_distribution(name, conditional):
    """T = 1000 strided in 256 steps (Q_{s->k} skips ahead exactly); positions 0 and 2 fixed when conditional."""
    L = 4 if conditional else 3
    S, p0 = toy_distribution(L=L, seed=int(conditional))
    c = chain(name, T=1000)
    fixed = torch.tensor([True, False, True, False]) if conditional else torch.zeros(L, dtype=torch.bool)
    # The context is known to be clean: under the plain absorbing chain a revealed token is impossible at k = T.
    model = ExactX0(c, S, p0, clean=fixed if conditional else None)
    s = SAMPLERS.build("d3pm", mask_id=MASK, temperature=1.0)
    s.use_process(c)
    a, b = TOKENS[2], TOKENS[0]
    canvas = torch.full((N, L), MASK)
    if conditional:
        canvas[:, 0], canvas[:, 2] = a, b
    out = denoise(model, canvas, 0, 256, None, s, torch.Generator().manual_seed(0))
    keep = torch.ones(len(S), dtype=torch.bool) if not conditional else (S[:, 0] == a) & (S[:, 2] == b)
    idx = sequence_index(out)
    counts = torch.stack([(idx == r).sum() for r in keep.nonzero().flatten()])
    assert counts.sum() == N
    stat, p = chi_square(counts, p0[keep] / p0[keep].sum())
    assert p > 1e-3, f"chi2 = {stat:.1f} on {int(keep.sum()) - 1} dof (p = {p:.2e})"
    assert model.times[0] == 1.0 and model.times[-1] == pytest.approx(round(1000 / 256) / 1000)
