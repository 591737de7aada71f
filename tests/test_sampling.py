"""Sampling: commit plans, remasking rules, block planning and full denoising loops driven by fixed logits."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dlm.sampling import (
    REMASKING,
    SAMPLERS,
    LLaDASampler,
    Remasking,
    SamplingError,
    StepEvent,
    SuppressTokens,
    denoise,
    num_transfer_tokens,
    plan_blocks,
)

PROPS = settings(max_examples=50, deadline=None)
V, MASK = 260, 257


# ----- num_transfer_tokens ----------------------------------------------------------------------------------

def test_num_transfer_tokens_example():
    assert num_transfer_tokens(torch.tensor([10]), 4).tolist() == [[3, 3, 2, 2]]
    plan = num_transfer_tokens(torch.tensor([8, 0, 3]), 4)
    assert plan.tolist() == [[2, 2, 2, 2], [0, 0, 0, 0], [1, 1, 1, 0]]


@PROPS
@given(n=st.lists(st.integers(0, 500), min_size=1, max_size=5), steps=st.integers(1, 64))
def test_num_transfer_tokens_properties(n, steps):
    plan = num_transfer_tokens(torch.tensor(n), steps)
    assert plan.shape == (len(n), steps)
    assert plan.sum(1).tolist() == n
    for row, k in zip(plan.tolist(), n, strict=True):
        assert row == sorted(row, reverse=True), "the remainder goes to the first steps"
        assert max(row) - min(row) <= 1
        assert row.count(k // steps + 1) == k % steps


# ----- Remasking.select -------------------------------------------------------------------------------------

@PROPS
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 4), L=st.integers(1, 40), data=st.data())
def test_select_picks_top_n_masked(seed, B, L, data):
    g = torch.Generator().manual_seed(seed)
    confidence = torch.rand(B, L, generator=g, dtype=torch.float64)
    is_masked = torch.rand(B, L, generator=g) < 0.6
    n = torch.tensor(data.draw(st.lists(st.integers(0, L + 3), min_size=B, max_size=B)))
    commit = Remasking.select(confidence, is_masked, n)
    assert commit.dtype == torch.bool and commit.shape == (B, L)
    assert not (commit & ~is_masked).any(), "only masked positions are committed"
    for b in range(B):
        assert int(commit[b].sum()) == min(int(n[b]), int(is_masked[b].sum()))
        chosen = confidence[b][commit[b]]
        left = confidence[b][is_masked[b] & ~commit[b]]
        if chosen.numel() and left.numel():
            assert chosen.min() >= left.max(), "the most confident masked positions win"


def test_select_ties_go_to_lower_index():
    confidence = torch.zeros(1, 6, dtype=torch.float64)
    is_masked = torch.tensor([[False, True, True, True, True, False]])
    commit = Remasking.select(confidence, is_masked, torch.tensor([2]))
    assert commit.tolist() == [[False, True, True, False, False, False]]


def test_select_nothing_when_n_zero_or_nothing_masked():
    conf = torch.rand(2, 5, dtype=torch.float64)
    assert not Remasking.select(conf, torch.ones(2, 5, dtype=torch.bool), torch.tensor([0, 0])).any()
    assert not Remasking.select(conf, torch.zeros(2, 5, dtype=torch.bool), torch.tensor([3, 3])).any()


def test_low_confidence_scores_the_predicted_token_probability():
    probs = torch.softmax(torch.randn(2, 5, V, dtype=torch.float64), -1)
    x0 = probs.argmax(-1)
    conf = REMASKING.build("low_confidence").confidence(probs, x0, None)
    torch.testing.assert_close(conf, probs.max(-1).values)


def test_random_remasking_is_seeded_uniform():
    rule = REMASKING.build("random")
    x0 = torch.zeros(3, 50, dtype=torch.long)
    a = rule.confidence(None, x0, torch.Generator().manual_seed(0))
    b = rule.confidence(None, x0, torch.Generator().manual_seed(0))
    assert a.dtype == torch.float64 and torch.equal(a, b)
    assert ((a >= 0) & (a < 1)).all()


# ----- plan_blocks ------------------------------------------------------------------------------------------

def test_plan_blocks_valid():
    assert plan_blocks(64, 64, 32) == (32, 2, 32)
    assert plan_blocks(64, 16, None) == (64, 1, 16)
    assert plan_blocks(64, 16, 0) == (64, 1, 16)
    assert plan_blocks(10, 4, 100) == (10, 1, 4)  # a block longer than the generation is clipped


def test_plan_blocks_last_block_may_be_shorter():
    # 10 tokens in blocks of 4: blocks [0, 4), [4, 8), [8, 10); each block gets steps / 3 steps.
    assert plan_blocks(10, 9, 4) == (4, 3, 3)
    with pytest.raises(SamplingError, match=r"steps=10 must be a multiple of the number of blocks .*= 3\), "
                                            r"e\.g\. steps=9"):
        plan_blocks(10, 10, 4)


def test_shorter_last_block_generates_every_token_with_the_planned_commits():
    # A dummy denoiser (fixed logits): every position is filled, block by block, each block within its own steps.
    from dlm.config import GenerationConfig
    from dlm.sampling import SAMPLERS, denoise_steps

    V, mask_id, P, N = 12, 11, 3, 10
    logits = torch.randn(1, P + N, V, generator=torch.Generator().manual_seed(0))
    sampler = SAMPLERS.build("llada", mask_id=mask_id, config=GenerationConfig())
    canvas = torch.cat([torch.zeros(1, P, dtype=torch.long), torch.full((1, N), mask_id)], 1)
    events = list(denoise_steps(lambda x: logits, canvas, P, 6, 4, sampler))
    final = events[-1].output.xt
    assert not (final == mask_id).any()
    logits_nomask = logits.clone()
    logits_nomask[..., mask_id] = -torch.inf
    assert torch.equal(final[0, P:], logits_nomask[0, P:].argmax(-1))
    # 3 blocks x 2 steps; the last block (2 tokens) commits one per step, and every commit is in its block.
    assert [e.block for e in events] == [0, 0, 1, 1, 2, 2]
    for e in events:
        pos = e.output.committed[0].nonzero().flatten().tolist()
        lo = P + 4 * e.block
        assert pos and all(lo <= p < min(lo + 4, P + N) for p in pos)


def test_plan_blocks_steps_must_divide_blocks():
    with pytest.raises(SamplingError, match=r"steps=5 must be a multiple of the number of blocks .*= 2\), "
                                            r"e\.g\. steps=4"):
        plan_blocks(64, 5, 32)


@pytest.mark.parametrize(("gen", "steps"), [(0, 4), (8, 0)])
def test_plan_blocks_rejects_empty(gen, steps):
    with pytest.raises(SamplingError, match=">= 1"):
        plan_blocks(gen, steps, None)


@PROPS
@given(gen=st.integers(1, 200), steps=st.integers(1, 200), block=st.integers(1, 200))
def test_plan_blocks_suggestions_work(gen, steps, block):
    """Either a valid plan, or an error whose suggested value is itself accepted."""
    try:
        bl, n_blocks, spb = plan_blocks(gen, steps, block)
    except SamplingError as e:
        msg = str(e)
        if (m := re.search(r"e\.g\. block_length=(\d+)", msg)) is not None:
            assert gen % int(m.group(1)) == 0
            plan_blocks(gen, gen, int(m.group(1)))
        else:
            m = re.search(r"e\.g\. steps=(\d+)", msg)
            assert m is not None, msg
            plan_blocks(gen, int(m.group(1)), block)
        return
    # The blocks cover the generation, the last one possibly shorter; the steps split evenly.
    assert (n_blocks - 1) * bl < gen <= bl * n_blocks and spb * n_blocks == steps and bl <= block


# ----- full loops driven by fixed logits --------------------------------------------------------------------

def ramp_logits(L: int, B: int = 1) -> torch.Tensor:
    """Position i predicts token i % 256, with confidence strictly increasing with i."""
    logits = torch.zeros(B, L, V)
    pos = torch.arange(L)
    logits[:, pos, pos % 256] = 1.0 + 0.25 * pos.float()
    return logits


class FixedModel:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return self.logits.clone()


def run(model, canvas, start, steps, block_length, sampler=None, **kw):
    events: list[StepEvent] = []
    sampler = sampler or LLaDASampler(MASK)
    out = denoise(model, canvas, start, steps, block_length, sampler, callback=events.append, **kw)
    return out, events


def _canvas(prompt: list[int], n_new: int, B: int = 1) -> torch.Tensor:
    return torch.tensor([prompt + [MASK] * n_new] * B)


def _committed(ev: StepEvent, row: int = 0) -> list[int]:
    return ev.output.committed[row].nonzero().flatten().tolist()


def _check_invariants(canvas: torch.Tensor, out: torch.Tensor, events: list[StepEvent]) -> None:
    """Prompt kept, no mask left, each position committed once and never changed afterwards."""
    was_masked = canvas == MASK
    assert torch.equal(out[~was_masked], canvas[~was_masked]), "the prompt is never changed"
    assert not (out == MASK).any(), "no mask left"
    seen = torch.zeros_like(was_masked)
    for ev in events:
        c = ev.output.committed
        assert not (c & seen).any(), "a position is committed once"
        assert not (c & ~was_masked).any(), "only masks are committed"
        seen |= c
        assert torch.equal(ev.output.xt[seen], out[seen]), "committed tokens never change"
        assert (ev.output.xt[was_masked & ~seen] == MASK).all(), "uncommitted positions stay masked"
    assert torch.equal(seen, was_masked)


def test_low_confidence_one_block_commits_most_confident_first():
    P, N = 4, 10
    canvas = _canvas([65, 66, 67, 68], N)
    model = FixedModel(ramp_logits(P + N))
    out, events = run(model, canvas, P, steps=4, block_length=None)
    # Plan [3, 3, 2, 2]; confidence grows with position, so the right end is committed first.
    assert [_committed(ev) for ev in events] == [[11, 12, 13], [8, 9, 10], [6, 7], [4, 5]]
    assert [(ev.block, ev.step) for ev in events] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert out[0, P:].tolist() == list(range(P, P + N))
    assert out[0, :P].tolist() == [65, 66, 67, 68]
    _check_invariants(canvas, out, events)
    # The model saw the canvas of each step: masks shrink by the plan.
    assert [int((x == MASK).sum()) for x in model.inputs] == [10, 7, 4, 2]


def test_semi_autoregressive_blocks_complete_in_order():
    P, N, BL = 2, 12, 4
    canvas = _canvas([1, 2], N)
    out, events = run(FixedModel(ramp_logits(P + N)), canvas, P, steps=6, block_length=BL)
    assert [_committed(ev) for ev in events] == [[4, 5], [2, 3], [8, 9], [6, 7], [12, 13], [10, 11]]
    assert [ev.block for ev in events] == [0, 0, 1, 1, 2, 2]
    _check_invariants(canvas, out, events)
    committed_so_far = torch.zeros(P + N, dtype=torch.bool)
    for ev in events:
        lo = P + ev.block * BL
        assert ev.output.committed[0, lo + BL:].sum() == 0, "nothing after the current block"
        assert committed_so_far[P:lo].all(), "earlier blocks are complete before a later block starts"
        committed_so_far |= ev.output.committed[0]


def test_masks_inside_the_prompt_are_filled_with_the_first_block():
    canvas = torch.tensor([[10, MASK, MASK, 13] + [MASK] * 8])
    out, events = run(FixedModel(ramp_logits(12)), canvas, 4, steps=4, block_length=4)
    # Block 0 owns positions [0, 8): 6 masks over 2 steps -> [3, 3], most confident (rightmost) first.
    assert [_committed(ev) for ev in events[:2]] == [[5, 6, 7], [1, 2, 4]]
    assert out[0].tolist() == [10, 1, 2, 13, 4, 5, 6, 7, 8, 9, 10, 11]
    _check_invariants(canvas, out, events)


def test_steps_with_nothing_to_commit_skip_the_model():
    model = FixedModel(ramp_logits(5))
    canvas = _canvas([7, 8, 9], 2)
    out, events = run(model, canvas, 3, steps=4, block_length=None)  # plan [1, 1, 0, 0]
    assert len(model.inputs) == 2 and len(events) == 2
    assert [_committed(ev) for ev in events] == [[4], [3]]
    assert out[0].tolist() == [7, 8, 9, 3, 4]


def test_rows_follow_their_own_plans():
    canvas = torch.tensor([[0, MASK, MASK] + [MASK] * 6, [0, 1, 2] + [MASK] * 6])
    out, events = run(FixedModel(ramp_logits(9, B=2)), canvas, 3, steps=3, block_length=None)
    plan = num_transfer_tokens(torch.tensor([8, 6]), 3)
    assert torch.equal(torch.stack([ev.output.committed.sum(1) for ev in events], 1), plan)
    _check_invariants(canvas, out, events)


def test_suppressed_mask_token_is_never_committed():
    logits = torch.zeros(1, 8, V)
    logits[..., MASK] = 10.0  # the net's favourite is [MASK]; second choice is token 42
    logits[..., 42] = 5.0
    canvas = _canvas([1, 2], 6)
    out, events = run(FixedModel(logits), canvas, 2, steps=3, block_length=None,
                      processors=[SuppressTokens([MASK])])
    assert out[0].tolist() == [1, 2] + [42] * 6
    _check_invariants(canvas, out, events)


def _random_logits(L: int, B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, L, V, generator=torch.Generator().manual_seed(seed))


def test_temperature_sampling_is_deterministic_given_seed():
    canvas = _canvas([3, 1, 4], 16, B=2)
    logits = _random_logits(19) * 0.1  # flat: Gumbel noise decides most tokens

    def sample(seed):
        s = LLaDASampler(MASK, temperature=1.0)
        g = torch.Generator().manual_seed(seed)
        return run(FixedModel(logits), canvas, 3, 8, 8, sampler=s, generator=g)[0]

    a, b, c = sample(0), sample(0), sample(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    greedy = run(FixedModel(logits), canvas, 3, 8, 8)[0]
    assert not torch.equal(a, greedy)
    assert torch.equal(greedy[:, 3:], logits.argmax(-1)[:, 3:])


def test_random_remasking_commits_the_planned_number():
    canvas = _canvas([5], 15, B=2)
    s = LLaDASampler(MASK, remasking="random")
    logits = _random_logits(16)
    g = torch.Generator().manual_seed(0)
    out, events = run(FixedModel(logits), canvas, 1, 4, None, sampler=s, generator=g)
    plan = num_transfer_tokens(torch.tensor([15, 15]), 4)
    assert torch.equal(torch.stack([ev.output.committed.sum(1) for ev in events], 1), plan)
    _check_invariants(canvas, out, events)
    # The random rule ignores the model's confidence: the first commits are not its most confident positions.
    first = [_committed(events[0], row) for row in range(2)]
    surest = logits.softmax(-1).amax(-1)[:, 1:].argsort(-1, descending=True)[:, :4] + 1  # plan[0] == 4
    assert [set(f) for f in first] != [set(r) for r in surest.tolist()]


def test_sampler_validates_arguments():
    with pytest.raises(ValueError, match="temperature"):
        LLaDASampler(MASK, temperature=-1.0)
    with pytest.raises(ValueError, match="remasking rule"):
        LLaDASampler(MASK, remasking="nope")
    with pytest.raises(ValueError, match="steps"):
        LLaDASampler(MASK).set_timesteps(0, torch.ones(1, 4, dtype=torch.bool))


@pytest.mark.parametrize("sampler_name", SAMPLERS.names())
@pytest.mark.parametrize("remasking", REMASKING.names())
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize(("steps", "block_length"), [(12, None), (6, 4), (12, 4)])
def test_contract_every_sampler_and_remasking_rule(sampler_name, remasking, temperature, steps, block_length):
    """Every registered sampler x rule: plan followed, prompt kept, no mask left, commits final."""
    P, N = 3, 12
    canvas = torch.tensor([[9, MASK, 7] + [MASK] * N, [4, 5, 6] + [MASK] * N])
    s = SAMPLERS.build(sampler_name, mask_id=MASK, temperature=temperature, remasking=remasking)
    out, events = run(FixedModel(_random_logits(P + N)), canvas, P, steps, block_length, sampler=s,
                      generator=torch.Generator().manual_seed(0), processors=[SuppressTokens([MASK])])
    assert out.shape == canvas.shape and out.dtype == canvas.dtype
    _check_invariants(canvas, out, events)
    bl = block_length or N
    for ev in events:
        assert ev.output.committed[:, P + (ev.block + 1) * bl:].sum() == 0
        assert ev.output.x0.shape == canvas.shape and ev.output.confidence.dtype == torch.float64
