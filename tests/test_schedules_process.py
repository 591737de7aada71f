"""Noise schedules, t sampling, the masked forward process and the span-infilling example builder."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dlm.process import PROCESSES, MaskedProcess, span_infill_example
from dlm.schedules import SCHEDULES, Cosine, Geometric, Linear, LogLinear, sample_t

PROPS = settings(max_examples=50, deadline=None)
ALL = SCHEDULES.names()
unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def test_registry_holds_the_four_schedules():
    assert set(ALL) == {"linear", "loglinear", "cosine", "geometric"}
    assert isinstance(SCHEDULES.build("linear"), Linear)
    assert isinstance(SCHEDULES.build("loglinear"), LogLinear)
    assert isinstance(SCHEDULES.build("cosine"), Cosine)
    assert isinstance(SCHEDULES.build("geometric"), Geometric)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        SCHEDULES.build("sqrt")


@pytest.mark.parametrize("eps", [-0.1, 1.0, 1.5])
def test_eps_out_of_range_is_refused(eps):
    with pytest.raises(ValueError, match="eps"):
        Linear(eps=eps)


@PROPS
@pytest.mark.parametrize("name", ALL)
@given(t1=unit, t2=unit, eps=st.floats(min_value=0.0, max_value=0.5))
def test_move_chance_in_unit_interval_monotone_alpha_complement(name, t1, t2, eps):
    s = SCHEDULES.build(name, eps=eps)
    lo, hi = min(t1, t2), max(t1, t2)
    t = torch.tensor([lo, hi], dtype=torch.float64)
    mc = s.move_chance(t)
    assert ((mc >= 0) & (mc <= 1)).all()
    assert mc[0] <= mc[1]
    torch.testing.assert_close(s.alpha(t), 1.0 - mc)
    torch.testing.assert_close(s.sigma(t), -torch.log(s.alpha(t).clamp_min(1e-12)))


@pytest.mark.parametrize("name", [n for n in ALL if n != "geometric"])  # geometric: sigma_min / max, test_sedd.py
def test_endpoints(name):
    eps = 1e-3
    s = SCHEDULES.build(name, eps=eps)
    mc = s.move_chance(torch.tensor([0.0, 1.0], dtype=torch.float64))
    expected_t0 = eps if name == "linear" else 0.0  # LLaDA never has a zero mask rate
    assert mc[0].item() == pytest.approx(expected_t0, abs=1e-12)
    assert mc[1].item() == pytest.approx(1.0 if name == "linear" else 1.0 - eps, abs=1e-12)


@PROPS
@given(t=unit, eps=st.floats(min_value=1e-4, max_value=0.5))
def test_linear_matches_llada_p_mask(t, eps):
    s = Linear(eps=eps)
    tt = torch.tensor([t], dtype=torch.float64)
    assert s.move_chance(tt).item() == pytest.approx((1 - eps) * t + eps, rel=1e-12, abs=1e-15)
    assert s.weight(tt).item() == pytest.approx(1.0 / ((1 - eps) * t + eps), rel=1e-12)


def _fd_weight(s, t: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """-alpha'(t) / (1 - alpha(t)) with a central finite difference, float64."""
    d_alpha = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    return -d_alpha / (1.0 - s.alpha(t))


@pytest.mark.parametrize("name", ["loglinear", "cosine"])
@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.2])
def test_weight_is_the_elbo_weight(name, eps):
    s = SCHEDULES.build(name, eps=eps)
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    torch.testing.assert_close(s.weight(t), _fd_weight(s, t), rtol=1e-6, atol=0)


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.2])
def test_linear_weight_is_llada_inverse_p_mask(eps):
    # LLaDA weights by 1 / p_mask: the true ELBO weight (1 - eps) / p_mask up to the constant 1 - eps.
    s = Linear(eps=eps)
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    torch.testing.assert_close(s.weight(t), 1.0 / s.move_chance(t))
    torch.testing.assert_close(s.weight(t) * (1 - eps), _fd_weight(s, t), rtol=1e-6, atol=0)


# ----- sample_t ---------------------------------------------------------------------------------------------

@PROPS
@given(batch=st.integers(1, 64), seed=st.integers(0, 2**31 - 1))
def test_sample_t_antithetic_evenly_spaced(batch, seed):
    g = torch.Generator().manual_seed(seed)
    t = sample_t(batch, True, g)
    assert t.shape == (batch,)
    assert ((t >= 0) & (t < 1)).all()
    srt = t.double().sort().values
    gaps = torch.cat([srt[1:] - srt[:-1], (srt[:1] + 1.0 - srt[-1:])])  # includes the wrap-around gap
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1.0 / batch), atol=1e-6, rtol=0)


def test_sample_t_deterministic_given_generator():
    for antithetic in (True, False):
        a = sample_t(16, antithetic, torch.Generator().manual_seed(3))
        b = sample_t(16, antithetic, torch.Generator().manual_seed(3))
        c = sample_t(16, antithetic, torch.Generator().manual_seed(4))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_sample_t_plain_is_uniform():
    t = sample_t(20000, False, torch.Generator().manual_seed(0))
    assert ((t >= 0) & (t < 1)).all()
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)
    assert t.var().item() == pytest.approx(1 / 12, abs=0.005)


# ----- MaskedProcess ----------------------------------------------------------------------------------------

MASK = 257


@pytest.mark.parametrize("name", ALL)
def test_q_sample_mask_rate_matches_move_chance(name):
    B, L = 64, 4096
    proc = PROCESSES.build("masked", MASK, SCHEDULES.build(name, eps=1e-3))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (B, L), generator=g)
    t = torch.linspace(0, 1, B)
    xt, is_masked = proc.q_sample(x0, t, generator=g)
    assert xt.shape == x0.shape and xt.dtype == x0.dtype and is_masked.dtype == torch.bool
    rate = is_masked.float().mean(1)
    torch.testing.assert_close(rate, proc.schedule.move_chance(t).float(), atol=0.04, rtol=0)  # ~5 sigma
    assert torch.equal(xt[~is_masked], x0[~is_masked])
    assert (xt[is_masked] == MASK).all()
    assert torch.equal(xt == MASK, is_masked)  # x0 holds no mask id: masks are exactly the masked positions


def test_q_sample_maskable_restricts_masking():
    proc = MaskedProcess(MASK, Linear(eps=1e-3))
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 256, (8, 512), generator=g)
    maskable = torch.rand(8, 512, generator=g) < 0.5
    t = torch.ones(8)  # p_mask = 1: every maskable position must be masked
    xt, is_masked = proc.q_sample(x0, t, generator=g, maskable=maskable)
    assert torch.equal(is_masked, maskable)
    assert torch.equal(xt[~maskable], x0[~maskable])
    t = torch.full((8,), 0.5)
    xt, is_masked = proc.q_sample(x0, t, generator=g, maskable=maskable)
    assert not (is_masked & ~maskable).any()
    assert 0.3 < is_masked[maskable].float().mean().item() < 0.7


def test_q_sample_deterministic_given_seed():
    proc = MaskedProcess(MASK, Cosine())
    x0 = torch.randint(0, 256, (4, 100), generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 0.5)
    a = proc.q_sample(x0, t, generator=torch.Generator().manual_seed(7))
    b = proc.q_sample(x0, t, generator=torch.Generator().manual_seed(7))
    c = proc.q_sample(x0, t, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_prior_sample_is_all_masks():
    x = MaskedProcess(MASK, Linear()).prior_sample(3, 7)
    assert x.shape == (3, 7) and x.dtype == torch.long
    assert (x == MASK).all()


# ----- span_infill_example ----------------------------------------------------------------------------------

PAD = 0


@PROPS
@given(seed=st.integers(0, 2**31 - 1), L=st.integers(4, 96), max_span=st.integers(2, 100))
def test_span_infill_example_structure(seed, L, max_span):
    x0 = torch.arange(L) + 1000  # distinct tokens, none equal to PAD, so every token can be traced
    g = torch.Generator().manual_seed(seed)
    out, gap = span_infill_example(x0, PAD, max_span, generator=g)
    assert out.shape == (L,) and gap.shape == (L,) and gap.dtype == torch.bool and out.dtype == x0.dtype
    idx = gap.nonzero().flatten().tolist()
    assert idx, "the gap is never empty"
    a, G = idx[0], len(idx)
    assert idx == list(range(a, a + G)), "the gap is contiguous"
    assert 2 <= G <= min(max_span, L // 2)
    assert torch.equal(out[:a], x0[:a]), "text before the gap is unchanged"
    inside = out[a: a + G]
    m = int((inside != PAD).sum())
    assert 1 <= m < G, "at least one text token and at least one [PAD]"
    assert torch.equal(inside[:m], x0[a: a + m]), "the gap starts with the original continuation"
    assert (inside[m:] == PAD).all(), "then only [PAD]"
    after = out[a + G:]
    assert torch.equal(after, x0[a + m: a + m + after.numel()]), "the right context follows the span"
    assert (out[~gap] != PAD).all()


def test_span_infill_example_deterministic_given_seed():
    x0 = torch.arange(64) + 5
    a = span_infill_example(x0, PAD, 16, generator=torch.Generator().manual_seed(11))
    b = span_infill_example(x0, PAD, 16, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_span_infill_example_covers_positions_and_lengths():
    # Over many seeds the gap start and length both vary: the objective sees gaps everywhere.
    x0 = torch.arange(32) + 5
    starts, lengths = set(), set()
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        _, gap = span_infill_example(x0, PAD, 8, generator=g)
        idx = gap.nonzero().flatten()
        starts.add(int(idx[0]))
        lengths.add(idx.numel())
    assert lengths == set(range(2, 9))
    assert starts == set(range(0, 32 - 2 + 1))
