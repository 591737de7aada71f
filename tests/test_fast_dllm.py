"""Fast-dLLM parallel decoding (sampling/fast_dllm.py): threshold and factor rules on fixed logits, the
variable-step loop of denoise_cached, and the fallback to LLaDA's plan."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dlm.config import ModelConfig
from dlm.models import build_model
from dlm.sampling import SAMPLERS, LLaDASampler, StepEvent, SuppressTokens, denoise
from dlm.sampling.cache import denoise_cached
from dlm.sampling.fast_dllm import FastDLLMSampler, factor_count, threshold_count

V, MASK = 64, 63


def conf_logits(conf: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) target confidences -> logits (B, L, V) whose argmax (token l % 50 at position l, or `tokens`) has
    exactly that probability once [MASK] is suppressed (the other V - 2 tokens share the rest evenly)."""
    B, L = conf.shape
    tokens = torch.arange(L).repeat(B, 1) % 50 if tokens is None else tokens
    conf = conf.double()
    rest = ((1 - conf) / (V - 2)).log()
    logits = rest[..., None].expand(B, L, V).clone()
    logits.scatter_(-1, tokens[..., None], conf.log()[..., None])
    logits[..., MASK] = -torch.inf
    return logits.float()


class FixedModel:
    """A network with fixed logits (B, L, V): counts its calls, serves slices for the cached loop."""

    supports_kv_cache = True

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.calls = 0

    def __call__(self, xt, t=None, attention_mask=None, cache=None):
        self.calls += 1
        start = 0 if cache is None or cache.start is None else cache.start
        return self.logits[:, start:start + xt.shape[1]].clone()


def _sampler(**cfg) -> FastDLLMSampler:
    return SAMPLERS.build("fast_dllm", mask_id=MASK, **cfg)


def _run(model, canvas, start, steps, block_length, sampler, mode="none", **kw):
    events: list[StepEvent] = []
    out = denoise_cached(model, canvas, start, steps, block_length, sampler, callback=events.append, mode=mode,
                         processors=[SuppressTokens([MASK])], **kw)
    return out, events


def _commits(events, row=0):
    return [ev.output.committed[row].nonzero().flatten().tolist() for ev in events]


def _check_invariants(canvas, out, events):
    was_masked = canvas == MASK
    assert torch.equal(out[~was_masked], canvas[~was_masked]), "the prompt is never changed"
    assert not (out == MASK).any(), "no mask left"
    seen = torch.zeros_like(was_masked)
    for ev in events:
        assert not (ev.output.committed & seen).any(), "a position is committed once"
        seen |= ev.output.committed
    assert torch.equal(seen, was_masked)


# ----- threshold ----------------------------------------------------------------------------------------------

# Confidence of the 8 generated positions of one block (prompt of 2 in front of it).
CONF = [0.95, 0.30, 0.92, 0.50, 0.99, 0.10, 0.85, 0.60]


@pytest.mark.parametrize("mode", ["none", "prefix", "dual"])
def test_threshold_commits_exactly_the_confident_positions_then_the_best_one(mode):
    conf = torch.tensor([[0.5, 0.5] + CONF])
    model = FixedModel(conf_logits(conf))
    canvas = torch.tensor([[7, 8] + [MASK] * 8])
    out, events = _run(model, canvas, 2, 8, None, _sampler(threshold=0.9), mode=mode)
    # Step 1: every position with c >= 0.9; then nothing qualifies and each step commits the single best one.
    assert _commits(events) == [[2, 4, 6], [8], [9], [5], [3], [7]]
    assert model.calls == len(events) == 6 < 8, "fewer forward passes than one token per step"
    assert out[0].tolist() == [7, 8] + list(range(2, 10))
    _check_invariants(canvas, out, events)


def test_threshold_step_on_fixed_logits_commits_c_ge_tau_inside_the_block_only():
    conf = torch.tensor([[0.5, 0.5] + CONF + [0.999, 0.999]])  # confident positions past the block's end
    x = torch.tensor([[7, 8] + [MASK] * 10])
    x[0, 4] = 11  # already committed: not a candidate, however confident
    s = _sampler(threshold=0.9)
    s.set_timesteps(4, x[:, 2:10] == MASK)
    out = s.step(conf_logits(conf), x, 2, 10)
    assert out.committed[0].nonzero().flatten().tolist() == [2, 6]
    candidates = [2, 3, 5, 6, 7, 8, 9]
    torch.testing.assert_close(out.confidence[0, candidates], conf.double()[0, candidates], rtol=1e-6, atol=1e-6)
    assert (out.confidence[0, [0, 1, 4, 10, 11]] == -torch.inf).all(), "-inf where not a candidate"
    assert out.x0[0, candidates].tolist() == candidates and out.x0[0, 4] == 11


def test_threshold_one_commits_one_per_step():
    conf = torch.tensor([[0.5, 0.5] + CONF])
    model = FixedModel(conf_logits(conf))
    canvas = torch.tensor([[7, 8] + [MASK] * 8])
    out, events = _run(model, canvas, 2, 2, None, _sampler(threshold=1.0))
    assert [len(c) for c in _commits(events)] == [1] * 8
    order = sorted(range(8), key=lambda i: -CONF[i])
    assert _commits(events) == [[2 + i] for i in order], "most confident first"
    _check_invariants(canvas, out, events)


def test_threshold_batch_rows_commit_their_own_counts():
    conf = torch.tensor([[0.5, 0.5] + CONF, [0.5, 0.5] + [0.97, 0.96, 0.2, 0.3, 0.4, 0.95, 0.94, 0.93]])
    model = FixedModel(conf_logits(conf))
    canvas = torch.tensor([[7, 8] + [MASK] * 8, [1, 2] + [MASK] * 8])
    out, events = _run(model, canvas, 2, 4, None, _sampler(threshold=0.9))
    assert [len(c) for c in _commits(events, 0)] == [3, 1, 1, 1, 1, 1]
    assert [len(c) for c in _commits(events, 1)] == [5, 1, 1, 1, 0, 0]  # row 1 is done after 4 steps
    assert _commits(events, 1)[0] == [2, 3, 7, 8, 9]
    _check_invariants(canvas, out, events)


@pytest.mark.parametrize("mode", ["none", "prefix", "dual"])
def test_threshold_semi_autoregressive_blocks(mode):
    tau = 0.4
    conf = torch.rand(2, 3 + 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.98 + 0.01
    model = FixedModel(conf_logits(conf))
    canvas = torch.tensor([[4, 5, 6] + [MASK] * 16] * 2)
    out, events = _run(model, canvas, 3, 4, 4, _sampler(threshold=tau), mode=mode)
    _check_invariants(canvas, out, events)
    inputs = [canvas] + [ev.output.xt for ev in events[:-1]]
    for ev, x_in in zip(events, inputs, strict=True):
        lo, hi = 3 + 4 * ev.block, 3 + 4 * (ev.block + 1)
        masked = x_in == MASK
        masked[:, :lo] = masked[:, hi:] = False  # the current block's masks
        qualifying = masked & (conf >= tau)
        best = torch.zeros_like(masked).scatter_(1, conf.masked_fill(~masked, -1).argmax(1, keepdim=True), True)
        expected = torch.where(qualifying.any(1, keepdim=True), qualifying, best & masked)
        assert torch.equal(ev.output.committed, expected)
    assert model.calls == len(events) < 16


def test_threshold_count_and_factor_count_on_empty_rows():
    conf = torch.rand(2, 5, dtype=torch.float64)
    none = torch.zeros(2, 5, dtype=torch.bool)
    assert threshold_count(conf, none, 0.5).tolist() == [0, 0]
    assert factor_count(conf, none, 1.0).tolist() == [0, 0]


# ----- factor -------------------------------------------------------------------------------------------------

def reference_factor_count(conf: list[float], factor: float) -> int:
    """The factor branch of Fast-dLLM's get_transfer_index_dynamic, for one row, as a plain loop over the sorted
    confidences of the masked positions (rank r is the (r + 1)-th best and needs 1 - factor / (r + 2))."""
    n = len(conf)
    if n == 0:
        return 0
    ranked = sorted(conf, reverse=True)
    bars = [-1.0] + [1 - factor / (r + 2) for r in range(1, n)]
    stop = 0
    for stop in range(n):
        if ranked[stop] < bars[stop]:
            break
    return stop + 1 if stop in (0, n - 1) else stop


def test_factor_count_hand_example():
    # factor 1: bars -inf, 1 - 1/3, 1 - 1/4, 1 - 1/5 = -inf, .667, .75, .8
    conf = torch.tensor([[0.9, 0.8, 0.7, 0.3, 0.2]], dtype=torch.float64)
    eligible = torch.ones_like(conf, dtype=torch.bool)
    assert factor_count(conf, eligible, 1.0).tolist() == [2]  # 0.7 < 0.75 stops at rank 2
    # factor 2: bars -inf, .333, .5, .6, .667
    assert factor_count(conf, eligible, 2.0).tolist() == [3]  # 0.3 < 0.6 stops at rank 3
    conf = torch.tensor([[0.9, 0.8, 0.7, 0.65, 0.2]], dtype=torch.float64)
    assert factor_count(conf, eligible, 2.0).tolist() == [5]  # only the last one fails: the reference commits all
    conf = torch.tensor([[0.99, 0.95, 0.9, 0.85, 0.8]], dtype=torch.float64)
    assert factor_count(conf, eligible, 2.0).tolist() == [5]  # none fails
    for c in ([0.9, 0.8, 0.7, 0.3, 0.2], [0.9, 0.8, 0.7, 0.65, 0.2], [0.99, 0.95, 0.9, 0.85, 0.8]):
        assert reference_factor_count(c, 2.0) == factor_count(torch.tensor([c], dtype=torch.float64), eligible, 2.0)


def test_factor_reference_quirks():
    elig = torch.ones(1, 2, dtype=torch.bool)
    # Two masks left: both are always committed, however unsure the second one is.
    assert factor_count(torch.tensor([[0.9, 0.01]], dtype=torch.float64), elig, 0.1).tolist() == [2]
    assert reference_factor_count([0.9, 0.01], 0.1) == 2
    # One mask left: committed.
    assert factor_count(torch.tensor([[0.01]], dtype=torch.float64), elig[:, :1], 0.1).tolist() == [1]


@settings(max_examples=200, deadline=None)
@given(conf=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12), factor=st.floats(0.05, 4.0),
       data=st.data())
def test_factor_count_matches_the_reference_loop(conf, factor, data):
    eligible = data.draw(st.lists(st.booleans(), min_size=len(conf), max_size=len(conf)))
    c = torch.tensor([conf], dtype=torch.float64)
    e = torch.tensor([eligible])
    expected = reference_factor_count([x for x, ok in zip(conf, eligible, strict=True) if ok], factor)
    assert factor_count(c, e, factor).tolist() == [expected]


def test_factor_rule_in_the_loop_on_fixed_logits():
    conf = torch.tensor([[0.5, 0.5] + CONF])
    model = FixedModel(conf_logits(conf))
    canvas = torch.tensor([[7, 8] + [MASK] * 8])
    out, events = _run(model, canvas, 2, 8, None, _sampler(factor=1.0))
    left = list(CONF)
    for ev in events:  # each step commits the reference's count of the masks left, most confident first
        k = reference_factor_count(left, 1.0)
        got = [CONF[i - 2] for i in ev.output.committed[0].nonzero().flatten().tolist()]
        assert sorted(got, reverse=True) == sorted(left, reverse=True)[:k]
        left = [c for c in left if c not in got]
    assert not left and model.calls == len(events) < 8
    _check_invariants(canvas, out, events)


def test_factor_wins_over_threshold():
    conf = torch.tensor([[0.5, 0.5] + CONF])
    x = torch.tensor([[7, 8] + [MASK] * 8])
    s = _sampler(factor=1.0, threshold=0.99)
    s.set_timesteps(1, x[:, 2:] == MASK)
    out = s.step(conf_logits(conf), x, 2, 10)
    assert int(out.committed.sum()) == reference_factor_count(CONF, 1.0) == 4


# ----- fallback, contract and loop ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["none", "prefix", "dual"])
def test_without_threshold_or_factor_it_is_llada(mode):
    logits = torch.randn(2, 3 + 12, V, generator=torch.Generator().manual_seed(0))
    canvas = torch.tensor([[9, MASK, 7] + [MASK] * 12, [4, 5, 6] + [MASK] * 12])
    ref_events: list[StepEvent] = []
    ref = denoise(lambda x: logits.clone(), canvas, 3, 6, 4, LLaDASampler(MASK), callback=ref_events.append,
                  processors=[SuppressTokens([MASK])])
    out, events = _run(FixedModel(logits), canvas, 3, 6, 4, _sampler(), mode=mode)
    assert torch.equal(out, ref)
    assert all(torch.equal(a.output.committed, b.output.committed) for a, b in zip(events, ref_events, strict=True))
    _check_invariants(canvas, out, events)


def test_fallback_works_in_the_fixed_step_denoise_too():
    logits = torch.randn(1, 3 + 12, V, generator=torch.Generator().manual_seed(1))
    canvas = torch.tensor([[9, 8, 7] + [MASK] * 12])
    out = denoise(lambda x: logits.clone(), canvas, 3, 6, 4, _sampler(), processors=[SuppressTokens([MASK])])
    assert not (out == MASK).any()


def test_temperature_sampling_is_seeded():
    logits = torch.randn(2, 3 + 8, V, generator=torch.Generator().manual_seed(0)) * 0.1
    canvas = torch.tensor([[1, 2, 3] + [MASK] * 8] * 2)

    def sample(seed):
        s = _sampler(threshold=0.05, temperature=1.0)
        return _run(FixedModel(logits), canvas, 3, 4, 4, s, generator=torch.Generator().manual_seed(seed))[0]

    a, b, c = sample(0), sample(0), sample(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not (a == MASK).any()


def test_defer_eos_commits_eos_last_even_when_confident():
    EOS = 61
    tokens = torch.tensor([[0, 0, 11, EOS, 12, 13]])
    conf = torch.tensor([[0.5, 0.5, 0.95, 0.99, 0.92, 0.3]])
    x = torch.tensor([[7, 8] + [MASK] * 4])
    s = SAMPLERS.build("fast_dllm", mask_id=MASK, eos_id=EOS, threshold=0.9, defer_eos=True)
    s.set_timesteps(1, x[:, 2:] == MASK)
    out = s.step(conf_logits(conf, tokens), x, 2, 6)
    assert out.committed[0].nonzero().flatten().tolist() == [2, 4]  # [EOS] at 3 waits despite 0.99
    plain = _sampler(threshold=0.9)
    plain.set_timesteps(1, x[:, 2:] == MASK)
    assert plain.step(conf_logits(conf, tokens), x, 2, 6).committed[0].nonzero().flatten().tolist() == [2, 3, 4]


def test_commits_planned_is_the_masks_left_when_adaptive():
    s = _sampler(threshold=0.9)
    is_masked = torch.tensor([[True, True, False], [True, False, False]])
    s.set_timesteps(4, is_masked)
    assert s.commits_planned.tolist() == [2, 1]
    assert _sampler().adaptive is False and s.adaptive is True


def test_on_a_tiny_network_with_cache():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = build_model(ModelConfig.preset("tiny", vocab_size=V)).eval()
    canvas = torch.cat([torch.randint(0, 60, (2, 4), generator=torch.Generator().manual_seed(0)),
                        torch.full((2, 16), MASK)], 1)
    for mode in ("prefix", "dual"):
        out, events = _run(net, canvas, 4, 8, 8, _sampler(threshold=math.nextafter(0.0, 1.0)), mode=mode)
        # A threshold this low commits every masked position of a block in its first (full) step.
        assert len(events) == 2
        _check_invariants(canvas, out, events)
