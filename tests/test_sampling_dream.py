"""Dream sampler and the maskgit_plus / topk_margin / entropy rules: fixed-logit choices, commit counts, alg_temp,
origin's unmasking rate, invariants, and token-for-token parity with a re-implementation of Dream's `_sample`."""

from __future__ import annotations

import math

import pytest
import torch
from sampling_helpers import FixedModel, run
from sampling_helpers import canvas_of as _canvas_of
from sampling_helpers import check_invariants as _check_invariants

import dlm.sampling.dream  # noqa: F401  (registers "dream" and the three rules)
from dlm.config import ConfigError, ModelConfig
from dlm.models import build_model
from dlm.sampling import REMASKING, SAMPLERS
from dlm.sampling.dream import ORIGIN, DreamSampler, filter_logits, top_k_filter, top_p_filter

V, MASK = 64, 63
RULES = ["maskgit_plus", "topk_margin", "entropy"]


def canvas_of(prompts: list[list[int]], n_new: int) -> torch.Tensor:
    return _canvas_of(prompts, n_new, MASK)


def check_invariants(canvas, out, events, start, block_length=None):
    _check_invariants(canvas, out, events, start, MASK, block_length)


# ----- the rules ------------------------------------------------------------------------------------------------

def test_rules_are_registered_and_dream_is_a_sampler():
    assert set(RULES) <= set(REMASKING.names())
    assert SAMPLERS.get("dream") is DreamSampler


def test_rule_values():
    probs = torch.tensor([[[0.5, 0.3, 0.2], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]], dtype=torch.float64)
    x0 = torch.tensor([[1, 0, 2]])  # maskgit_plus scores the predicted (possibly sampled) token
    expected = {
        "maskgit_plus": [0.3, 1.0, 1 / 3],
        "topk_margin": [0.2, 1.0, 0.0],
        "entropy": [0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2), math.log(1 + 1e-10),
                    -math.log(3)],
    }
    for rule, values in expected.items():
        conf = REMASKING.build(rule).confidence(probs, x0, None)
        assert conf.dtype == torch.float64 and torch.allclose(conf, torch.tensor([values], dtype=torch.float64))


def _three_way_logits() -> torch.Tensor:
    """Canvas [prompt, m, m, m, m]: each rule has a different favourite among the 4 masked positions.

    pos 1 uniform (loses everywhere); pos 2 [.44, .44, .12] lowest entropy; pos 3 [.45, 6 x .55/6] widest margin;
    pos 4 [.5, .25, .25] highest top-1 probability. (Token 63 is [MASK]; tokens 7.. get probability 0.)
    """
    rows = [[1 / 7] * 7, [0.44, 0.44, 0.12], [0.45] + [0.55 / 6] * 6, [0.5, 0.25, 0.25]]
    probs = torch.zeros(1, 5, V)
    for pos, p in enumerate(rows, start=1):
        probs[0, pos, : len(p)] = torch.tensor(p)
    probs[0, 0, 0] = 1.0
    return torch.log(probs)  # zero probability -> -inf logit


@pytest.mark.parametrize(("rule", "position"), [("maskgit_plus", 4), ("topk_margin", 3), ("entropy", 2)])
def test_each_rule_commits_its_own_favourite(rule, position):
    canvas = canvas_of([[5]], 4)
    s = DreamSampler(MASK, remasking=rule)
    s.set_timesteps(2, canvas == MASK)
    assert s.commits_planned.tolist() == [1]  # int(4 * (1 - 0.5005 / 1)) = 1
    out = s.step(_three_way_logits(), canvas, 1, 5)
    assert out.committed[0].nonzero().flatten().tolist() == [position]
    assert out.xt[0, position] == 0


# ----- commit counts --------------------------------------------------------------------------------------------

def test_commit_counts_follow_dreams_schedule():
    """ts = linspace(1, 1e-3, 5); n_i = int(masks_left * (1 - s/t)); the last step takes what is left."""
    canvas = canvas_of([[1, 2], [3, 4]], 10)
    s = DreamSampler(MASK, remasking="maskgit_plus")
    out, events = run(FixedModel(torch.randn(2, 12, V)), canvas, 2, 4, None, s)
    counts = torch.stack([ev.output.committed.sum(1) for ev in events], 1)
    assert counts.tolist() == [[2, 2, 2, 4], [2, 2, 2, 4]]  # 10 * .24975 -> 2, 8 * .33289 -> 2, 6 * .499 -> 2
    check_invariants(canvas, out, events, 2)


@pytest.mark.parametrize(("n", "steps"), [(10, 4), (7, 3), (20, 6), (5, 9), (1, 1)])
def test_plan_matches_the_formula(n, steps):
    s = DreamSampler(MASK)
    s.set_timesteps(steps, torch.ones(1, n, dtype=torch.bool))
    ts = torch.linspace(1, 1e-3, steps + 1)
    left = n
    for i in range(steps):
        k = int(torch.tensor(float(left)) * (1 - ts[i + 1] / ts[i])) if i < steps - 1 else left
        assert s.plan[0, i] == k
        left -= k
    assert s.plan.sum() == n


def test_mask_count_is_averaged_over_the_batch_and_every_row_finishes():
    """ts = [1, .667, .334, .001]. Rows with 10 and 4 masks both commit int(7 * .333) = 2, then int(5 * .4996) = 2.
    Dream's last step would commit int(mean) = 3 in each row: masks left in one, prompt overwritten in the other;
    here the last step commits every row's remainder."""
    s = DreamSampler(MASK)
    is_masked = torch.tensor([[True] * 10, [True] * 4 + [False] * 6])
    s.set_timesteps(3, is_masked)
    assert s.plan.tolist() == [[2, 2, 6], [2, 2, 0]]


def test_steps_that_commit_nothing_skip_the_forward_pass():
    model = FixedModel(torch.randn(1, 5, V))
    canvas = canvas_of([[1]], 4)
    s = DreamSampler(MASK)
    out, events = run(model, canvas, 1, 8, None, s)
    assert s.fixed_plan and model.calls == int((s.plan > 0).sum()) < 8
    check_invariants(canvas, out, events, 1)


# ----- alg_temp -------------------------------------------------------------------------------------------------

def _flat_logits(B=2, L=17, seed=0):
    return 0.3 * torch.randn(B, L, V, generator=torch.Generator().manual_seed(seed))


def test_alg_temp_sampling_is_seeded():
    canvas = canvas_of([[1], [2]], 16)

    def sample(seed, alg_temp=0.5):
        s = DreamSampler(MASK, remasking="maskgit_plus", alg_temp=alg_temp)
        _, events = run(FixedModel(_flat_logits()), canvas, 1, 8, None, s, seed=seed)
        return torch.stack([ev.output.committed for ev in events])

    a, b, c = sample(0), sample(0), sample(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = sample(0, alg_temp=None)
    assert torch.equal(sample(3, alg_temp=1e-12), greedy), "alg_temp -> 0 is the top-k choice"
    assert not torch.equal(a, greedy)


def test_negative_alg_temp_is_refused():
    with pytest.raises(ConfigError, match="alg_temp"):
        DreamSampler(MASK, alg_temp=-1.0)


# ----- origin ---------------------------------------------------------------------------------------------------

def test_origin_is_a_dream_option_not_a_rule():
    s = SAMPLERS.build("dream", mask_id=MASK, remasking=ORIGIN)
    assert s.config.remasking == "origin" and s.origin and not s.fixed_plan
    assert ORIGIN not in REMASKING.names()
    with pytest.raises(ValueError, match="unknown remasking rule 'origin'"):
        SAMPLERS.build("llada", mask_id=MASK, remasking=ORIGIN)


def test_origin_unmasks_each_mask_with_probability_1_minus_s_over_t():
    B, N, steps = 4, 500, 4
    canvas = canvas_of([[1]] * B, N)
    s = DreamSampler(MASK, remasking=ORIGIN, temperature=1.0)
    out, events = run(FixedModel(_flat_logits(B, N + 1)), canvas, 1, steps, None, s)
    ts = torch.linspace(1, 1e-3, steps + 1).double()
    left = B * N
    for i, ev in enumerate(events[:-1]):
        p = float(1 - ts[i + 1] / ts[i])
        rate = int(ev.output.committed.sum()) / left
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / left) + 1e-9, (i, rate, p)
        left -= int(ev.output.committed.sum())
    check_invariants(canvas, out, events, 1)


def test_origin_is_seeded():
    canvas = canvas_of([[1], [2]], 16)

    def sample(seed):  # the order of commits, and (temperature 1) the tokens
        s = DreamSampler(MASK, remasking=ORIGIN, temperature=1.0)
        out, events = run(FixedModel(_flat_logits()), canvas, 1, 4, None, s, seed)
        return torch.cat([out[None], *(ev.output.committed[None].long() for ev in events)])

    a, b, c = sample(0), sample(0), sample(1)
    assert torch.equal(a, b) and not torch.equal(a[0], c[0]) and not torch.equal(a[1:], c[1:])


# ----- every option together ------------------------------------------------------------------------------------

@pytest.mark.parametrize("remasking", [*RULES, ORIGIN, "low_confidence", "random"])
@pytest.mark.parametrize(("temperature", "alg_temp", "top_p", "top_k"), [(0.0, None, None, None),
                                                                         (0.8, 0.3, 0.9, 20)])
@pytest.mark.parametrize(("steps", "block_length"), [(12, None), (6, 4), (5, None)])
def test_invariants(remasking, temperature, alg_temp, top_p, top_k, steps, block_length):
    canvas = torch.tensor([[9, MASK, 7] + [MASK] * 12, [4, 5, 6] + [MASK] * 12])
    s = DreamSampler(MASK, remasking=remasking, temperature=temperature, alg_temp=alg_temp, top_p=top_p,
                     top_k=top_k)
    logits = _flat_logits(2, 15)
    logits[..., MASK] = 5.0  # the sampler never predicts [MASK], even when the net prefers it
    out, events = run(FixedModel(logits), canvas, 3, steps, block_length, s)
    check_invariants(canvas, out, events, 3, block_length)


# ----- filtering ------------------------------------------------------------------------------------------------

def test_top_p_keeps_the_smallest_nucleus_and_top_k_keeps_ties():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64))
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [[False, True, True]]  # .5 < .7 <= .8
    assert torch.isfinite(top_p_filter(logits, 0.4)).tolist() == [[False, True, False]]  # the first always stays
    assert torch.isfinite(top_k_filter(torch.tensor([[1.0, 3.0, 2.0, 2.0]]), 2)).tolist() == [[False, True, True,
                                                                                                 True]]
    # Dream's order: temperature first, so the nucleus is taken on the tempered distribution.
    flat = filter_logits(logits, temperature=10.0, top_p=0.7, top_k=None)
    assert torch.isfinite(flat).all()


# ----- parity with Dream's `_sample` ----------------------------------------------------------------------------

def reference_top_p(logits, top_p):
    sorted_logits, idx = torch.sort(logits, descending=True)
    remove = torch.cumsum(torch.softmax(sorted_logits, -1), -1) > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    return logits.masked_fill(torch.zeros_like(remove).scatter(-1, idx, remove), torch.finfo(logits.dtype).min)


def reference_top_k(logits, top_k):
    kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def reference_dream_sample(net_fn, x, steps, alg, eps=1e-3, top_p=None, top_k=None):
    """Dream's `_sample` at temperature 0 and alg_temp 0, straight from its source, on the raw network output."""
    x = x.clone()
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == MASK
        logits = net_fn(x)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # Dream predicts token i at position i - 1
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        if top_p is not None and top_p < 1:
            mask_logits = reference_top_p(mask_logits, top_p)
        if top_k is not None:
            mask_logits = reference_top_k(mask_logits, top_k)
        probs = torch.softmax(mask_logits, dim=-1)
        confidence, x0 = probs.max(dim=-1)
        if alg == "topk_margin":
            sorted_probs = torch.sort(probs, dim=-1, descending=True).values
            confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
        elif alg == "entropy":
            confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
        num_mask_token = mask_index.sum() / mask_index.shape[0]
        n = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
        full_confidence[mask_index] = confidence
        if n > 0:
            _, transfer_index = torch.topk(full_confidence, n)
            x_ = torch.zeros_like(x) + MASK
            x_[mask_index] = x0
            rows = torch.arange(x.size(0)).unsqueeze(1).expand_as(transfer_index)
            x[rows, transfer_index] = x_[rows, transfer_index]
    return x


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    net = build_model(ModelConfig.preset("tiny", vocab_size=V, d_model=32, n_heads=2, n_layers=1, d_ff=64,
                                         max_len=32)).eval()

    # A random init predicts nearly the same peaked distribution at every masked position; a fixed random
    # bias per position makes the confidences differ, so no ranking hangs on a float near-tie.
    bias = 2.0 * torch.randn(32, V, generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def raw(x):  # deterministic pseudo-random logits that depend on the whole canvas; never [MASK]
        logits = 10.0 * net(x).float() + bias[: x.shape[1]]
        logits[..., MASK] = -torch.inf
        return logits

    return raw


@pytest.mark.parametrize("alg", RULES)
@pytest.mark.parametrize(("steps", "top_p", "top_k"), [(1, None, None), (3, None, None), (7, None, None),
                                                        (20, None, None), (32, None, None), (6, 0.8, 10)])
def test_parity_with_dream_sample(tiny_net, alg, steps, top_p, top_k):
    P, N = 4, 20
    canvas = canvas_of([[1, 2, 3, 4], [10, 20, 30, 40]], N)
    expected = reference_dream_sample(tiny_net, canvas, steps, alg, top_p=top_p, top_k=top_k)

    def shifted(x):  # the Dream model adapter: logits aligned with the canvas
        logits = tiny_net(x)
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)

    s = DreamSampler(MASK, remasking=alg, temperature=0.0, top_p=top_p, top_k=top_k)
    out, events = run(shifted, canvas, P, steps, N, s)
    assert torch.equal(out, expected)
    check_invariants(canvas, out, events, P)
