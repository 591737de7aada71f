"""Logits processors on hand-made logits, and the processor list built from a GenerationConfig."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dlm.config import ConfigError, GenerationConfig
from dlm.sampling import LLaDASampler, denoise
from dlm.sampling.processors import (
    AllowedTokens,
    BannedTokens,
    RepetitionPenalty,
    SuppressTokens,
    Temperature,
    TopK,
    TopP,
    apply_processors,
    build_processors,
    keep_argmax_where_empty,
)
from dlm.tokenizer import ByteTokenizer

PROPS = settings(max_examples=40, deadline=None)
NEG = -math.inf


def _kept(logits: torch.Tensor) -> torch.Tensor:
    return logits > NEG


# ----- TopK -------------------------------------------------------------------------------------------------

@PROPS
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 12))
def test_top_k_keeps_exactly_the_k_largest(seed, k):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 10, generator=g)
    out = TopK(k)(logits, torch.zeros(2, 3, dtype=torch.long))
    assert out.dtype == torch.float32
    kept = _kept(out)
    assert (kept.sum(-1) == min(k, 10)).all()
    assert torch.equal(out[kept], logits[kept]), "kept logits are unchanged"
    if k < 10:
        smallest_kept = out.masked_fill(~kept, math.inf).min(-1).values
        largest_dropped = logits.masked_fill(kept, NEG).max(-1).values
        assert (smallest_kept >= largest_dropped).all()


def test_top_k_with_ties_keeps_exactly_k():
    logits = torch.zeros(1, 1, 6)
    assert int(_kept(TopK(2)(logits, None)).sum()) == 2


# ----- TopP -------------------------------------------------------------------------------------------------

def test_top_p_keeps_the_minimal_nucleus_per_position():
    probs = torch.tensor([[[0.1, 0.5, 0.15, 0.25],  # sorted: .5 .25 .15 .1
                           [0.7, 0.12, 0.1, 0.08]]])
    logits = probs.log()
    xt = torch.zeros(1, 2, dtype=torch.long)
    expect = {0.4: [[1], [0]], 0.6: [[1, 3], [0]], 0.85: [[1, 2, 3], [0, 1, 2]], 0.95: [[0, 1, 2, 3], [0, 1, 2, 3]]}
    for p, rows in expect.items():
        out = TopP(p)(logits, xt)
        got = [_kept(out[0, i]).nonzero().flatten().tolist() for i in range(2)]
        assert got == [sorted(r) for r in rows], p
        assert torch.equal(out[_kept(out)], logits[_kept(out)])


@PROPS
@given(seed=st.integers(0, 2**31 - 1), p=st.floats(0.05, 0.99))
def test_top_p_matches_brute_force(seed, p):
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(seed)) * 2
    out = TopP(p)(logits[None], None)[0]
    for row, kept in zip(logits, _kept(out), strict=True):
        probs = torch.softmax(row.double(), -1)
        ordered = probs.sort(descending=True).values
        cum = ordered.cumsum(0)
        if (cum - p).abs().min() < 1e-5:
            continue  # too close to a boundary for float32 to decide
        n = int((cum < p).sum()) + 1  # the fewest tokens reaching mass p
        assert int(kept.sum()) == n
        assert probs[kept].min() >= probs[~kept].max() if n < 12 else True


def test_top_p_uses_the_sampling_temperature_for_the_nucleus():
    logits = torch.randn(2, 4, 30, generator=torch.Generator().manual_seed(0))
    hot = TopP(0.8, temperature=2.0)(logits, None)
    assert torch.equal(_kept(hot), _kept(TopP(0.8)(logits / 2.0, None)))
    assert torch.equal(hot[_kept(hot)], logits[_kept(hot)]), "the logits themselves are not rescaled"
    assert _kept(hot).sum() > _kept(TopP(0.8)(logits, None)).sum(), "a hotter distribution has a wider nucleus"


def test_top_p_one_is_identity_and_always_keeps_the_best():
    logits = torch.tensor([[[5.0, 0.0, 0.0]]])
    assert TopP(1.0)(logits, None) is logits
    assert _kept(TopP(0.01)(logits, None)).tolist() == [[[True, False, False]]]


# ----- RepetitionPenalty ------------------------------------------------------------------------------------

def test_repetition_penalty_hand_checked():
    mask = 4
    logits = torch.tensor([[2.0, -1.0, 3.0, -2.0, 1.0]]).repeat(2, 3, 1)  # (B=2, L=3, V=5)
    xt = torch.tensor([[1, 2, mask], [0, 0, mask]])
    out = RepetitionPenalty(2.0, mask_id=mask)(logits, xt)
    row0 = [2.0, -2.0, 1.5, -2.0, 1.0]  # token 1 (negative) x2, token 2 (positive) /2; [MASK] untouched
    row1 = [1.0, -1.0, 3.0, -2.0, 1.0]  # token 0 /2
    assert out[0].tolist() == [row0] * 3 and out[1].tolist() == [row1] * 3, "every position, per row"
    assert out.dtype == torch.float32
    assert RepetitionPenalty(1.0, mask)(logits, xt) is logits


def test_repetition_penalty_below_one_encourages():
    out = RepetitionPenalty(0.5, mask_id=3)(torch.tensor([[[1.0, -1.0, 1.0, 0.0]]]), torch.tensor([[0]]))
    assert out.tolist() == [[[2.0, -1.0, 1.0, 0.0]]]


# ----- Banned / Allowed -------------------------------------------------------------------------------------

def test_banned_tokens_everywhere_and_where():
    logits = torch.zeros(2, 3, 5)
    out = BannedTokens([1, 3])(logits, None)
    assert _kept(out).tolist() == [[[True, False, True, False, True]] * 3] * 2
    where = torch.tensor([[True, False, False], [False, False, True]])
    out = BannedTokens([0], where=where)(logits, None)
    assert (~_kept(out)).nonzero().tolist() == [[0, 0, 0], [1, 2, 0]]
    assert SuppressTokens is BannedTokens


def test_allowed_tokens_everywhere_and_where():
    logits = torch.arange(10.0).repeat(1, 2, 1)  # (1, 2, 10)
    out = AllowedTokens([2, 7])(logits, None)
    assert [_kept(out[0, i]).nonzero().flatten().tolist() for i in range(2)] == [[2, 7], [2, 7]]
    out = AllowedTokens([2, 7], where=torch.tensor([[False, True]]))(logits, None)
    assert torch.equal(out[0, 0], logits[0, 0])
    assert _kept(out[0, 1]).nonzero().flatten().tolist() == [2, 7]
    assert torch.equal(out[_kept(out)], logits[_kept(out)])


def test_where_broadcasts_one_row_over_the_batch():
    out = BannedTokens([0], where=torch.tensor([[True, False]]))(torch.zeros(3, 2, 4), None)
    assert (out[:, 0, 0] == NEG).all() and (out[:, 1, 0] == 0).all()


def test_filters_never_leave_a_position_empty():
    logits = torch.tensor([[[1.0, 3.0, 2.0], [NEG, NEG, 0.5]]])
    out = BannedTokens([0, 1, 2])(logits, None)
    assert out.tolist() == [[[NEG, 3.0, NEG], [NEG, NEG, 0.5]]], "the argmax survives"
    out = AllowedTokens([0])(logits, None)
    assert out[0, 0].tolist() == [1.0, NEG, NEG]
    assert out[0, 1].tolist() == [NEG, NEG, 0.5], "allowed token already -inf: the argmax is kept instead"
    chain = [BannedTokens([1]), AllowedTokens([1]), TopK(1), TopP(0.3), RepetitionPenalty(1.3, 2)]
    out = apply_processors(chain, torch.randn(4, 6, 3), torch.zeros(4, 6, dtype=torch.long))
    assert _kept(out).any(-1).all()


def test_keep_argmax_where_empty_is_identity_when_nothing_is_empty():
    x = torch.tensor([[[0.0, NEG]]])
    assert keep_argmax_where_empty(x, x) is x


def test_processors_do_not_modify_their_input_and_keep_dtype():
    logits = torch.randn(2, 4, 8)
    before = logits.clone()
    xt = torch.randint(0, 8, (2, 4))
    for p in [TopK(3), TopP(0.5), RepetitionPenalty(1.5, 7), AllowedTokens([1, 2]), BannedTokens([1]),
              Temperature(0.7)]:
        out = p(logits, xt)
        assert out.dtype == torch.float32 and out.shape == logits.shape, p
        assert torch.equal(logits, before), p


def test_temperature_divides():
    logits = torch.tensor([[[1.0, -2.0]]])
    assert Temperature(0.5)(logits, None).tolist() == [[[2.0, -4.0]]]
    assert Temperature(1.0)(logits, None) is logits


def test_teaching_errors():
    with pytest.raises(ValueError, match=r"token id\(s\) \[9\] are outside the vocabulary .*0\.\.4"):
        BannedTokens([9])(torch.zeros(1, 1, 5), None)
    with pytest.raises(ValueError, match=r"`where` must be a bool tensor \(B, L\) = \(1, 2\)"):
        AllowedTokens([0], where=torch.ones(1, 3, dtype=torch.bool))(torch.zeros(1, 2, 5), None)
    with pytest.raises(ValueError, match="at least one token id; to forbid tokens use BannedTokens"):
        AllowedTokens([])
    with pytest.raises(ValueError, match="temperature 0 means greedy"):
        Temperature(0)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        TopK(0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        TopP(0.0)
    with pytest.raises(ValueError, match="repetition penalty must be > 0"):
        RepetitionPenalty(0.0, 1)


def test_repr_is_readable():
    assert repr(TopK(3)) == "TopK(k=3)"
    assert repr(BannedTokens([1], where=torch.ones(2, 3, dtype=torch.bool))) == \
        "BannedTokens(token_ids=[1], where=<tensor (2, 3)>)"


# ----- build_processors -------------------------------------------------------------------------------------

TOK = ByteTokenizer()  # pad 256, mask 257, eos 258, bos 259


def _describe(processors):
    return [(type(p).__name__, dict(vars(p))) for p in processors]


def test_build_default_forbids_mask_bos_and_pad():
    ps = build_processors(GenerationConfig(), TOK)
    assert _describe(ps) == [("BannedTokens", {"token_ids": [257, 259, 256], "where": None})]
    assert build_processors(GenerationConfig(), TOK, allow_pad=True)[0].token_ids == [257, 259]
    assert build_processors(GenerationConfig(ban_eos=True), TOK)[0].token_ids == [257, 259, 256, 258]


def test_build_full_config_order_and_no_temperature():
    extra = AllowedTokens([65, 66])
    cfg = GenerationConfig(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.3)
    ps = build_processors(cfg, TOK, extra=[extra])
    assert [type(p).__name__ for p in ps] == ["BannedTokens", "AllowedTokens", "RepetitionPenalty", "TopK", "TopP"]
    assert ps[1] is extra
    assert (ps[2].penalty, ps[2].mask_id, ps[3].k, ps[4].p, ps[4].temperature) == (1.3, 257, 5, 0.9, 0.7)
    assert not any(isinstance(p, Temperature) for p in ps), "samplers apply the temperature themselves"
    assert build_processors(GenerationConfig(top_p=1.0), TOK)[1:] == []


def test_build_validates_the_config():
    with pytest.raises(ConfigError, match="top_k must be >= 1"):
        build_processors(GenerationConfig(top_k=0), TOK)


def test_built_processors_drive_a_denoising_loop():
    """Allowed letters only, repeats penalised: a dummy model preferring a > b > c everywhere writes "abc"."""
    V, P, N = TOK.vocab_size, 2, 3
    logits = torch.zeros(1, P + N, V)
    logits[..., ord("a")] = 5.0
    logits[..., ord("b")] = 4.0
    logits[..., ord("c")] = 3.0
    logits[..., TOK.mask_id] = 10.0  # a model that loves [MASK] must still never produce it
    cfg = GenerationConfig(repetition_penalty=100.0, top_k=2)
    ps = build_processors(cfg, TOK, extra=[AllowedTokens([ord("a"), ord("b"), ord("c")])])
    canvas = torch.tensor([[ord("x"), ord("y")] + [TOK.mask_id] * N])
    out = denoise(lambda x: logits.clone(), canvas, P, steps=N, block_length=None, sampler=LLaDASampler(TOK.mask_id),
                  processors=ps)
    assert bytes(out[0, P:].tolist()).decode() == "abc", "each committed letter is pushed below the next one"
