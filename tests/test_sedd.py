"""SEDD's graphs, schedules and score-entropy loss against explicit matrices and exact toy distributions.

Rate matrices (rows sum to zero), their closed-form transitions (= torch.linalg.matrix_exp, Chapman-Kolmogorov),
the vectorised columns the samplers use, the staggered score, Tweedie's step and the reverse rates against Bayes'
rule on a toy distribution, and the denoising score entropy: >= 0, exactly 0 at the true ratios, minimised in
expectation by the true score, and equal to MDLM's ELBO on the absorbing graph when the scores are normalised.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dlm.graphs import AbsorbingGraph, UniformGraph
from dlm.losses import LOSSES, LossOutput
from dlm.process import PROCESSES, MaskedProcess
from dlm.schedules import SCHEDULES, Geometric, LogLinear

PROPS = settings(max_examples=30, deadline=None)
V, MASK = 6, 4  # a small vocabulary with [MASK] in the middle, so no code may assume it is the last id
GRAPHS = {"sedd-absorbing": lambda: AbsorbingGraph(MASK, LogLinear(), V),
          "sedd-uniform": lambda: UniformGraph(MASK, Geometric(), V)}


def states(graph) -> list[int]:
    return [y for y in range(V) if graph.absorbing or y != MASK]


# ----- schedules --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCHEDULES.names())
def test_dsigma_is_the_derivative_of_sigma(name):
    s = SCHEDULES.build(name, eps=1e-3)
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    h = 1e-6
    fd = (s.sigma(t + h) - s.sigma(t - h)) / (2 * h)
    torch.testing.assert_close(s.dsigma(t), fd, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.exp(-s.sigma(t)), s.alpha(t), rtol=1e-10, atol=0)


def test_geometric_is_sedds_noise():
    s = Geometric(sigma_min=1e-4, sigma_max=20.0)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(s.sigma(t), torch.tensor([1e-4, math.sqrt(1e-4 * 20), 20.0], dtype=torch.float64))
    torch.testing.assert_close(s.dsigma(t), s.sigma(t) * math.log(20 / 1e-4))
    torch.testing.assert_close(s.weight(t), s.dsigma(t) / torch.expm1(s.sigma(t)))
    with pytest.raises(ValueError, match="sigma_min"):
        Geometric(sigma_min=1.0, sigma_max=0.5)


def test_loglinear_dsigma_is_sedds_rate_noise():
    s = LogLinear(eps=1e-3)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(s.dsigma(t), (1 - 1e-3) / (1 - (1 - 1e-3) * t))
    torch.testing.assert_close(s.sigma(t), -torch.log1p(-(1 - 1e-3) * t))


# ----- rate matrices and transitions ------------------------------------------------------------------------

@pytest.mark.parametrize("name", GRAPHS)
def test_rate_matrix_rows_sum_to_zero_and_off_diagonals_are_rates(name):
    R = GRAPHS[name]().rate_matrix()
    assert R.shape == (V, V) and R.dtype == torch.float64
    torch.testing.assert_close(R.sum(1), torch.zeros(V, dtype=torch.float64), atol=1e-15, rtol=0)
    off = R - torch.diag(torch.diag(R))
    assert (off >= 0).all() and (torch.diag(R) <= 0).all()


@PROPS
@pytest.mark.parametrize("name", GRAPHS)
@given(a=st.floats(0.0, 5.0), b=st.floats(0.0, 5.0))
def test_transition_is_the_matrix_exponential_and_composes(name, a, b):
    g = GRAPHS[name]()
    R = g.rate_matrix()
    Pa, Pb, Pab = g.transition_matrix(a), g.transition_matrix(b), g.transition_matrix(a + b)
    # matrix_exp's own float64 error reaches ~5e-12 at a = 5 (hypothesis found it): compare at 1e-10.
    torch.testing.assert_close(Pa, torch.linalg.matrix_exp(a * R), rtol=0, atol=1e-10)
    torch.testing.assert_close(Pa @ Pb, Pab, rtol=0, atol=1e-12)  # Chapman-Kolmogorov
    torch.testing.assert_close(Pa.sum(1), torch.ones(V, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (Pa >= 0).all()


@pytest.mark.parametrize("name", GRAPHS)
def test_vectorised_columns_match_the_explicit_matrices(name):
    g = GRAPHS[name]()
    x = torch.tensor(states(g) * 2).view(2, -1)  # (2, n)
    d = torch.tensor([[0.3], [1.7]], dtype=torch.float64).expand(x.shape)
    torch.testing.assert_close(g.rate_cols(x, V), g.rate_matrix().T[x])
    for row in range(2):
        P = g.transition_matrix(float(d[row, 0]))
        torch.testing.assert_close(g.transition_cols(x[row], d[row], V), P.T[x[row]])


@pytest.mark.parametrize("name", GRAPHS)
def test_q_sample_follows_the_transition_rows(name):
    g = GRAPHS[name]()
    t = torch.full((4000,), 0.4)
    x0 = torch.tensor(states(g))[torch.arange(4000) % len(states(g))][:, None].repeat(1, 8)  # (4000, 8)
    xt, _ = g.q_sample(x0, t, generator=torch.Generator().manual_seed(0))
    P = g.transition_matrix(float(g.schedule.sigma(torch.tensor(0.4, dtype=torch.float64))))
    for a in states(g):
        freq = torch.bincount(xt[x0 == a], minlength=V).double() / int((x0 == a).sum())
        torch.testing.assert_close(freq, P[a], atol=0.02, rtol=0)  # ~5000 draws per row: ~4 sigma
    assert not (xt == MASK).any() or g.absorbing


def test_uniform_prior_never_draws_mask():
    g = UniformGraph(MASK, Geometric(), V)
    x = g.prior_sample(50, 40)
    assert not (x == MASK).any() and set(x.unique().tolist()) == set(states(g))


# ----- the toy distribution: exact scores, Bayes' rule for one position -------------------------------------

def toy_p0(graph, seed: int = 0) -> torch.Tensor:
    """p0 (V,) float64 over the graph's states (0 at [MASK])."""
    p = torch.rand(V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.05
    p[MASK] = 0.0
    return p / p.sum()


def exact_score(graph, p0: torch.Tensor, sigma: float) -> torch.Tensor:
    """(V, V): row x holds p_sigma(y) / p_sigma(x) for every y (one position)."""
    pt = p0 @ graph.transition_matrix(sigma)
    return torch.where(pt[None, :] > 0, pt[None, :] / pt[:, None].clamp_min(1e-300), 0.0)


@pytest.mark.parametrize("name", GRAPHS)
@pytest.mark.parametrize(("sigma", "d"), [(2.0, 0.5), (0.7, 0.7), (3.0, 0.01)])
def test_staggered_score_and_tweedie_are_bayes_rule(name, sigma, d):
    g = GRAPHS[name]()
    p0 = toy_p0(g)
    ps, pt = p0 @ g.transition_matrix(sigma - d), p0 @ g.transition_matrix(sigma)
    P = g.transition_matrix(d)
    xs = torch.tensor(states(g) if not g.absorbing else [MASK, 0, 5])
    score = exact_score(g, p0, sigma)[xs]  # (n, V)
    stag = g.staggered_score(score, torch.tensor(d, dtype=torch.float64))
    torch.testing.assert_close(stag, ps[None, :] / pt[xs, None], rtol=1e-10, atol=1e-12)
    probs = g.tweedie_probs(score, xs, torch.tensor(d, dtype=torch.float64))
    bayes = ps[None, :] * P[:, xs].T / pt[xs, None]  # p(x_s = z | x_t = x)
    torch.testing.assert_close(probs, bayes, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(xs), dtype=torch.float64))


@pytest.mark.parametrize("name", GRAPHS)
def test_reverse_rates_balance_the_forward_flow(name):
    """p_t(x) R^(x -> y) = p_t(y) R(y -> x): the time reversal of a Markov chain, with rows summing to zero."""
    g = GRAPHS[name]()
    p0 = toy_p0(g)
    pt = p0 @ g.transition_matrix(1.3)
    R = g.rate_matrix()
    xs = torch.tensor([y for y in states(g) if pt[y] > 0])
    rates = g.reverse_rates(exact_score(g, p0, 1.3)[xs], xs)  # (n, V)
    torch.testing.assert_close(rates.sum(-1), torch.zeros(len(xs), dtype=torch.float64), atol=1e-12, rtol=0)
    flow = pt[xs, None] * rates
    expected = (pt[:, None] * R)[:, xs].T  # p_t(y) R[y, x]
    off = torch.ones_like(flow, dtype=torch.bool).scatter(-1, xs[:, None], False)
    torch.testing.assert_close(flow[off], expected[off], rtol=1e-10, atol=1e-12)


def test_euler_step_is_first_order_in_the_step():
    g = GRAPHS["sedd-uniform"]()
    p0 = toy_p0(g)
    xs = torch.tensor(states(g))
    score = exact_score(g, p0, 2.0)[xs]
    h = torch.tensor(1e-4, dtype=torch.float64).expand(xs.shape)
    euler, tweedie = g.euler_probs(score, xs, h), g.tweedie_probs(score, xs, h)
    torch.testing.assert_close(euler, tweedie, rtol=0, atol=1e-7)  # O(h^2) apart
    torch.testing.assert_close(euler.sum(-1), torch.ones(len(xs), dtype=torch.float64))


# ----- score entropy -----------------------------------------------------------------------------------------

def _ratios(g, xt: torch.Tensor, x0: torch.Tensor, sigma: float) -> torch.Tensor:
    """log p(y | x0) / p(xt | x0) (..., V): the conditional ratios the denoising score entropy targets."""
    P = g.transition_matrix(sigma)
    r = P[x0] / P[x0, xt][..., None]
    return torch.log(r).scatter(-1, xt[..., None], 0.0)


@PROPS
@pytest.mark.parametrize("name", GRAPHS)
@given(seed=st.integers(0, 2**31 - 1), sigma=st.floats(1e-3, 8.0), scale=st.floats(0.0, 6.0))
def test_score_entropy_is_nonnegative_and_zero_at_the_true_ratios(name, seed, sigma, scale):
    g = GRAPHS[name]()
    gen = torch.Generator().manual_seed(seed)
    ok = torch.tensor([y for y in range(V) if y != MASK])  # data never holds [MASK]
    x0 = ok[torch.randint(0, len(ok), (64,), generator=gen)]
    xt, _ = g.q_sample(x0[None], torch.full((1,), 0.5), generator=gen)  # any reachable xt
    xt = torch.where(torch.rand(64, generator=gen) < 0.5, torch.full_like(x0, MASK) if g.absorbing else x0, xt[0])
    s = torch.full((64,), sigma, dtype=torch.float64)
    exact = _ratios(g, xt, x0, sigma)
    noisy = exact + scale * torch.randn(64, V, generator=gen, dtype=torch.float64)
    for ls in (noisy, exact):
        ls = ls.scatter(-1, xt[:, None], 0.0)
        if not g.absorbing:
            ls[:, MASK] = -torch.inf
        ent = g.score_entropy(ls, xt, x0, s)
        assert ent.shape == (64,) and ent.dtype == torch.float64
        assert (ent >= -1e-9 * (1 + 1 / sigma)).all()
    torch.testing.assert_close(ent, torch.zeros_like(ent), atol=1e-9 * (1 + 1 / sigma), rtol=0)


@pytest.mark.parametrize("name", GRAPHS)
def test_expected_score_entropy_is_minimised_by_the_true_score(name):
    """E_{x0 | xt} DSE(s) = score entropy + const: its gradient vanishes at the marginal ratios p_t(y) / p_t(x)."""
    g = GRAPHS[name]()
    p0, sigma = toy_p0(g), 1.1
    P = g.transition_matrix(sigma)
    pt = p0 @ P
    xs = [y for y in states(g) if pt[y] > 0 and (not g.absorbing or y == MASK)]
    for x in xs:
        post = p0 * P[:, x] / pt[x]  # p(x0 | xt = x)
        x0s = torch.tensor([a for a in range(V) if post[a] > 0])
        ls = torch.log(exact_score(g, p0, sigma)[x]).clone().requires_grad_(True)

        def expected(ls, x=x, x0s=x0s, post=post):
            ent = g.score_entropy(ls.expand(len(x0s), V), torch.full_like(x0s, x), x0s,
                                  torch.full((len(x0s),), sigma, dtype=torch.float64))
            return (post[x0s] * ent).sum()

        value = expected(ls)
        (grad,) = torch.autograd.grad(value, ls)
        free = torch.tensor([y != x and (g.absorbing or y != MASK) for y in range(V)])
        torch.testing.assert_close(grad[free], torch.zeros(int(free.sum()), dtype=torch.float64), atol=1e-10, rtol=0)
        with torch.no_grad():
            for k in range(5):
                bumped = ls + 0.3 * torch.randn(V, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
                assert expected(bumped.scatter(-1, torch.tensor([x]), 0.0)) > value


class FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, xt, t=None, attention_mask=None):
        self.calls.append((xt.clone(), t.clone()))
        return self.logits


def test_score_entropy_loss_is_dsigma_weighted_mean_over_tokens():
    B, L = 8, 16
    g = UniformGraph(MASK, Geometric(), V)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, MASK, (B, L), generator=gen)
    model = FixedLogits(torch.randn(B, L, V, generator=gen))
    out = LOSSES.build("score_entropy")(model, x0, g, generator=torch.Generator().manual_seed(3))
    assert isinstance(out, LossOutput) and out.loss.dim() == 0 and out.mask.all()
    (xt, t), = model.calls
    sigma = g.schedule.sigma(t.double())[:, None].expand(B, L)
    ent = g.score_entropy(g.log_score(model.logits.detach(), xt, sigma), xt, x0, sigma)
    expected = (g.schedule.dsigma(t.double())[:, None] * ent).mean()  # averaged over tokens, not summed
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.nll.item() == pytest.approx(out.loss.item()) and not out.nll.requires_grad
    out.loss.backward()
    assert model.logits.grad.abs().sum() > 0


def test_absorbing_score_entropy_with_normalised_scores_is_mdlms_elbo():
    """With log s_y = log p~(y) - log(e^sigma - 1) the absorbing DSE is dsigma / (e^sigma - 1) CE = CE / t: MDLM."""
    B, L, Vb, M = 8, 32, 260, 257
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 256, (B, L), generator=gen)
    logits = torch.randn(B, L, Vb, generator=gen)
    logits[..., M] = -torch.inf
    log_p = F.log_softmax(logits, -1)
    sedd = LOSSES.build("score_entropy")(FixedLogits(log_p + math.log(Vb - 1)), x0,
                                          PROCESSES.build("sedd-absorbing", M, LogLinear(eps=1e-3)),
                                          generator=torch.Generator().manual_seed(7))
    mdlm = LOSSES.build("masked_elbo")(FixedLogits(logits), x0, MaskedProcess(M, LogLinear(eps=1e-3)),
                                        generator=torch.Generator().manual_seed(7))
    assert torch.equal(sedd.mask, mdlm.mask) and 0 < sedd.mask.sum() < B * L
    assert sedd.nll.item() == pytest.approx(mdlm.nll.item(), rel=1e-4)


def test_score_entropy_respects_maskable_positions():
    B, L = 4, 12
    g = UniformGraph(MASK, Geometric(), V)
    x0 = torch.randint(0, MASK, (B, L), generator=torch.Generator().manual_seed(0))
    maskable = torch.zeros(B, L, dtype=torch.bool)
    maskable[:, 6:] = True
    model = FixedLogits(torch.randn(B, L, V, generator=torch.Generator().manual_seed(1)))
    out = LOSSES.build("score_entropy")(model, x0, g, maskable=maskable, generator=torch.Generator().manual_seed(2))
    (xt, _), = model.calls
    assert torch.equal(xt[:, :6], x0[:, :6]), "the context stays clean"
    assert torch.equal(out.mask, maskable)
    out.loss.backward()
    assert model.logits.grad[:, :6].abs().sum() == 0
