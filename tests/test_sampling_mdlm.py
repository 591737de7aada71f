"""MDLM ancestral sampler: unmasking rate (t - s) / t per step, SUBS, tokens drawn from softmax(logits / T),
noise removal at the last step, invariants under blocks, seeding, and the cached variant."""

from __future__ import annotations

import math

import pytest
import torch
from sampling_helpers import FixedModel, run
from sampling_helpers import canvas_of as _canvas_of
from sampling_helpers import check_invariants as _check_invariants

import dlm.sampling.mdlm  # noqa: F401  (registers "mdlm" and "mdlm_cache")
from dlm.sampling import SAMPLERS
from dlm.sampling.mdlm import MDLMCacheSampler, MDLMSampler

V, MASK = 64, 63


class CanvasModel:
    """Logits that depend on the canvas: each position favours (its left neighbour + 1) mod 60."""

    def __init__(self) -> None:
        self.calls = 0
        self.noise = torch.randn(1, 64, V, generator=torch.Generator().manual_seed(3))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = self.noise[:, : x.shape[1]].repeat(x.shape[0], 1, 1)
        left = torch.cat([x[:, :1], x[:, :-1]], 1)
        return logits.scatter_add(-1, ((left + 1) % 60)[..., None], torch.full((*x.shape, 1), 3.0))


def canvas_of(prompts: list[list[int]], n_new: int) -> torch.Tensor:
    return _canvas_of(prompts, n_new, MASK)


def check_invariants(canvas, out, events, start, block_length=None):
    _check_invariants(canvas, out, events, start, MASK, block_length)


def test_registered():
    assert SAMPLERS.get("mdlm") is MDLMSampler and SAMPLERS.get("mdlm_cache") is MDLMCacheSampler
    assert not MDLMSampler.reuse_logits_when_unchanged and MDLMCacheSampler.reuse_logits_when_unchanged


def test_unmask_probability_is_t_minus_s_over_t():
    s = MDLMSampler(MASK, eps=1e-3)
    s.set_timesteps(4, torch.ones(1, 8, dtype=torch.bool))
    ts = torch.linspace(1, 1e-3, 5, dtype=torch.float64).tolist()
    for i in range(4):
        assert math.isclose(s.unmask_probability(i), (ts[i] - ts[i + 1]) / ts[i], rel_tol=1e-12)


def test_each_step_unmasks_the_fraction_t_minus_s_over_t():
    B, N, steps = 4, 500, 5
    canvas = canvas_of([[1]] * B, N)
    s = MDLMSampler(MASK, temperature=1.0)
    out, events = run(FixedModel(torch.randn(B, N + 1, V)), canvas, 1, steps, None, s)
    ts = torch.linspace(1, 1e-3, steps + 1, dtype=torch.float64).tolist()
    left = B * N
    for i, ev in enumerate(events[:-1]):
        p = (ts[i] - ts[i + 1]) / ts[i]
        rate = int(ev.output.committed.sum()) / left
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / left), (i, rate, p)
        left -= int(ev.output.committed.sum())
    assert int(events[-1].output.committed.sum()) == left, "the last step commits every remaining mask"
    check_invariants(canvas, out, events, 1)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_tokens_follow_softmax_of_logits_over_temperature(temperature):
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = torch.full((1, 2001, V), -torch.inf)
    logits[..., :3] = probs.log()
    canvas = canvas_of([[5]], 2000)
    s = MDLMSampler(MASK, temperature=temperature)
    out, events = run(FixedModel(logits), canvas, 1, 2, None, s)
    first = events[0].output  # the ancestral draw (the last step's leftovers take the argmax)
    drawn = first.xt[first.committed]
    freq = torch.bincount(drawn, minlength=3)[:3].double() / drawn.numel()
    target = probs.double() ** (1 / temperature)
    target /= target.sum()
    assert torch.allclose(freq, target, atol=4 * math.sqrt(0.25 / drawn.numel()))


def test_subs_never_predicts_mask_and_temperature_zero_is_argmax():
    logits = torch.randn(2, 13, V, generator=torch.Generator().manual_seed(0))
    logits[..., MASK] = 50.0  # the network's favourite is [MASK]
    canvas = canvas_of([[1, 2, 3], [4, 5, 6]], 10)
    out, events = run(FixedModel(logits), canvas, 3, 4, None, MDLMSampler(MASK))
    assert torch.equal(out[:, 3:], logits[..., :MASK].argmax(-1)[:, 3:])
    check_invariants(canvas, out, events, 3)


def test_one_step_commits_everything():
    canvas = canvas_of([[1]], 30)
    out, events = run(FixedModel(torch.randn(1, 31, V)), canvas, 1, 1, None, MDLMSampler(MASK, temperature=1.0))
    assert len(events) == 1
    check_invariants(canvas, out, events, 1)


@pytest.mark.parametrize("name", ["mdlm", "mdlm_cache"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize(("steps", "block_length"), [(12, None), (6, 4), (12, 4), (40, 6)])
def test_invariants(name, temperature, steps, block_length):
    canvas = torch.tensor([[9, MASK, 7] + [MASK] * 12, [4, 5, 6] + [MASK] * 12])
    s = SAMPLERS.build(name, mask_id=MASK, temperature=temperature)
    out, events = run(CanvasModel(), canvas, 3, steps, block_length, s)
    check_invariants(canvas, out, events, 3, block_length)


def test_seeded():
    canvas = canvas_of([[1], [2]], 24)

    def sample(seed):
        return run(CanvasModel(), canvas, 1, 6, None, MDLMSampler(MASK, temperature=1.0), seed)[0]

    assert torch.equal(sample(0), sample(0)) and not torch.equal(sample(0), sample(1))


def test_cache_reuses_logits_and_gives_the_same_samples():
    """More steps than masks: many steps unmask nothing, so the cached sampler calls the model less often."""
    canvas = canvas_of([[1, 2], [3, 4]], 6)
    plain, cached = CanvasModel(), CanvasModel()
    a, _ = run(plain, canvas, 2, 32, None, MDLMSampler(MASK, temperature=1.0), seed=7)
    b, _ = run(cached, canvas, 2, 32, None, MDLMCacheSampler(MASK, temperature=1.0), seed=7)
    assert torch.equal(a, b)
    assert cached.calls < plain.calls
