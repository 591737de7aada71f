"""SEDD samplers on a known distribution: with the exact score, samples pass a chi-square test, for both graphs,
both samplers, unconditional and conditional (prompt + infilling). Plus the loop contract and the ELBO estimator.
"""

from __future__ import annotations

import pytest
import torch
from toy_diffusion import MASK, TOKENS, ExactScore, V, chi_square, sequence_index, toy_distribution

from dlm.graphs import AbsorbingGraph, UniformGraph
from dlm.losses import LOSSES
from dlm.sampling import SAMPLERS, SamplingError, denoise
from dlm.schedules import Geometric, LogLinear

N = 4000  # samples per test: a cell of probability 0.01 expects 40
P_MIN = 1e-3  # reject at p < 0.001


def graph(name: str):
    return {"absorbing": AbsorbingGraph(MASK, LogLinear(eps=1e-3), V),
            "uniform": UniformGraph(MASK, Geometric(sigma_min=1e-4, sigma_max=20.0), V)}[name]


def sampler(name: str, g, **kw):
    s = SAMPLERS.build(name, mask_id=MASK, temperature=1.0, **kw)
    s.use_process(g)
    return s


def sample(model_fn, s, canvas: torch.Tensor, steps: int, seed: int = 0) -> torch.Tensor:
    return denoise(model_fn, canvas, 0, steps, None, s, torch.Generator().manual_seed(seed))


# Steps: enough that the tau-leaping error (two positions changing within one step, each drawn from its own
# conditional) stays below what 4000 samples can see. With the exact score, 64 absorbing steps still show it
# (mean chi2 34 on 26 dof over 6 seeds), 256 do not (26.5); the uniform graph needs 128.
CASES = [("absorbing", "sedd_analytic", 256), ("absorbing", "sedd_euler", 256),
         ("uniform", "sedd_analytic", 128), ("uniform", "sedd_euler", 128)]


@pytest.mark.parametrize(("graph_name", "sampler_name", "steps"), CASES)
def test_samples_follow_the_toy_distribution(graph_name, sampler_name, steps):
    S, p0 = toy_distribution(L=3)
    g = graph(graph_name)
    model = ExactScore(g, S, p0)
    out = sample(model, sampler(sampler_name, g), torch.full((N, 3), MASK), steps)
    counts = torch.bincount(sequence_index(out), minlength=len(S))
    stat, p = chi_square(counts, p0)
    assert p > P_MIN, f"chi2 = {stat:.1f} on {len(S) - 1} dof (p = {p:.2e})"
    # The sampler gave the network the time of each step: 1, ..., 1/steps.
    assert model.times == pytest.approx(torch.linspace(1, 0, steps + 1)[:-1].tolist())


def test_the_chi_square_test_has_power():
    """Independent positions with the right marginals (what a one-step sampler draws) are rejected."""
    S, p0 = toy_distribution(L=3)
    g = torch.Generator().manual_seed(0)
    cols = []
    for i in range(3):
        marg = torch.stack([p0[S[:, i] == a].sum() for a in TOKENS])
        cols.append(torch.tensor(TOKENS)[torch.multinomial(marg, N, replacement=True, generator=g)])
    counts = torch.bincount(sequence_index(torch.stack(cols, 1)), minlength=len(S))
    assert chi_square(counts, p0)[1] < 1e-6


@pytest.mark.parametrize(("graph_name", "sampler_name", "steps"), CASES)
def test_prompt_and_infilling_sample_the_conditional(graph_name, sampler_name, steps):
    """Position 0 is a prompt, position 2 a fixed token between two gaps: positions 1 and 3 follow p0(. | x0, x2)."""
    S, p0 = toy_distribution(L=4, seed=1)
    g = graph(graph_name)
    fixed = torch.tensor([True, False, True, False])
    # An absorbing graph conditions exactly with the plain score (a clean token is known); a uniform one needs a
    # model that knows the context is clean, as one trained with clean context (maskable positions) does.
    model = ExactScore(g, S, p0, clean=None if g.absorbing else fixed)
    a, b = TOKENS[2], TOKENS[0]
    canvas = torch.tensor([[a, MASK, b, MASK]]).repeat(N, 1)
    out = sample(model, sampler(sampler_name, g), canvas, steps)
    assert (out[:, 0] == a).all() and (out[:, 2] == b).all()
    keep = (S[:, 0] == a) & (S[:, 2] == b)
    cond = p0[keep] / p0[keep].sum()
    idx = sequence_index(out)
    rows = keep.nonzero().flatten()
    counts = torch.stack([(idx == r).sum() for r in rows])
    assert counts.sum() == N
    stat, p = chi_square(counts, cond)
    assert p > P_MIN, f"chi2 = {stat:.1f} on {len(cond) - 1} dof (p = {p:.2e})"


# ----- the loop contract -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sedd_euler", "sedd_analytic", "d3pm"])
@pytest.mark.parametrize("uniform", [False, True])
def test_prompt_kept_no_mask_left_deterministic(name, uniform):
    Vb, M = 40, 37
    from dlm.d3pm import D3PMAbsorbing, D3PMUniform
    from dlm.schedules import Cosine, Linear

    if name == "d3pm":
        proc = D3PMUniform(M, Cosine(eps=0.0), Vb, 50) if uniform else D3PMAbsorbing(M, Linear(eps=0.0), Vb, 50)
    else:
        proc = UniformGraph(M, Geometric(), Vb) if uniform else AbsorbingGraph(M, LogLinear(), Vb)
    logits = torch.randn(3, 12, Vb, generator=torch.Generator().manual_seed(0))
    canvas = torch.randint(0, 30, (3, 12), generator=torch.Generator().manual_seed(1))
    canvas[:, 4:] = M
    canvas[1, 2] = M  # a gap inside the prompt
    runs = []
    for _ in range(2):
        s = SAMPLERS.build(name, mask_id=M, temperature=1.0)
        s.use_process(proc)
        events = []
        out = denoise(lambda x: logits.clone(), canvas, 4, 8, None, s, torch.Generator().manual_seed(5),
                      callback=events.append)
        runs.append(out)
        free = canvas == M
        assert torch.equal(out[~free], canvas[~free]), "only the masked positions change"
        assert not (out == M).any(), "no mask left"
        assert len(events) == 8 or not uniform
        for ev in events:
            assert ev.output.confidence.dtype == torch.float64
            assert not (ev.output.committed & ~free).any()
    assert torch.equal(runs[0], runs[1])


def test_uniform_graph_refuses_several_blocks():
    g = UniformGraph(MASK, Geometric(), V)
    canvas = torch.full((2, 8), MASK)
    with pytest.raises(SamplingError, match="block_length=0"):
        denoise(lambda x: torch.zeros(2, 8, V), canvas, 0, 4, 4, sampler("sedd_analytic", g))


def test_family_checks():
    from dlm.process import MaskedProcess

    with pytest.raises(ValueError, match="SEDD"):
        SAMPLERS.build("sedd_euler", mask_id=MASK).use_process(MaskedProcess(MASK, LogLinear()))
    with pytest.raises(ValueError, match="guidance"):
        SAMPLERS.build("sedd_analytic", mask_id=MASK, cfg_scale=1.0)


# ----- the ELBO estimator ------------------------------------------------------------------------------------

class TableNet(torch.nn.Module):
    """A fixed 'network': raw output depends on the token at each position and on t (B,)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.table, self.slope = 0.5 * torch.randn(V, V, generator=g), 0.5 * torch.randn(V, V, generator=g)

    def forward(self, xt, t, attention_mask=None):
        return self.table[xt] + t.float()[:, None, None] * self.slope[xt]


@pytest.mark.parametrize("graph_name", ["absorbing", "uniform"])
def test_elbo_estimator_is_unbiased(graph_name):
    """The mean of many one-sample estimates (stratified t) matches the bound integrated exactly over t and xt."""
    g = graph(graph_name)
    net = TableNet()
    loss = LOSSES.build("score_entropy")
    x0 = torch.tensor([[TOKENS[0], TOKENS[2]]])  # L = 2
    # Exact: E_{xt | x0} over all V^2 canvases, then Gauss-Legendre in t on [0, 1] (smooth for these schedules).
    nodes, weights = _gauss_legendre(64)
    grid = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # (V^2, 2)
    exact = 0.0
    for t, w in zip(nodes.tolist(), weights.tolist(), strict=True):
        sigma = float(g.schedule.sigma(torch.tensor(t, dtype=torch.float64)))
        P = g.transition_matrix(sigma, V)
        prob = P[x0[0, 0], grid[:, 0]] * P[x0[0, 1], grid[:, 1]]  # (V^2,)
        live = prob > 0
        xt = grid[live]
        tt = torch.full((len(xt),), t)
        sig = torch.full(xt.shape, sigma, dtype=torch.float64)
        ent = g.score_entropy(g.log_score(net(xt, tt), xt, sig), xt, x0.expand_as(xt), sig).sum(1)
        exact += w * float(g.schedule.dsigma(torch.tensor(t, dtype=torch.float64)) * (prob[live] * ent).sum())
    # 40 batches of 5000 stratified times; the batch means are independent.
    means = torch.stack([loss.sequence_nll(net, x0.repeat(5000, 1), g, (torch.rand(1, generator=gen) +
                                           torch.arange(5000) / 5000) % 1.0, gen).mean()
                         for gen in [torch.Generator().manual_seed(s) for s in range(40)]])
    mean, err = float(means.mean()), float(means.std() / len(means) ** 0.5)
    assert err < 0.01 * exact, "the check must be able to see a 1% bias"
    assert abs(mean - exact) < 4 * err, (mean, exact, err)


def _gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights on [0, 1] (Golub-Welsch), float64."""
    k = torch.arange(1, n, dtype=torch.float64)
    beta = k / torch.sqrt(4 * k * k - 1)
    J = torch.diag(beta, 1) + torch.diag(beta, -1)
    nodes, vecs = torch.linalg.eigh(J)
    return (nodes + 1) / 2, vecs[0] ** 2
