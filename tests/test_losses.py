"""Training objectives against hand-computed values, with dummy networks whose logits are known."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlm.losses import LOSSES, LossOutput, token_ce
from dlm.process import MaskedProcess
from dlm.schedules import Cosine, Linear, LogLinear, sample_t

B, L, V = 4, 16, 260
MASK, BOS = 257, 259


class FixedLogits(nn.Module):
    """forward(xt, t) -> the same logits (B, L, V) whatever the input; records what it was called with."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.logits = nn.Parameter(torch.randn(B, L, V, generator=g) * 3)
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def forward(self, xt, t=None, attention_mask=None):
        self.calls.append((xt.clone(), None if t is None else t.clone()))
        return self.logits


class TableLogits(nn.Module):
    """forward(x, t) -> W[x]: the logits at i depend only on the input token at i (a bigram model)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(1)))

    def forward(self, x, t=None, attention_mask=None):
        return self.table[x]


@pytest.fixture
def x0() -> torch.Tensor:
    return torch.randint(0, 256, (B, L), generator=torch.Generator().manual_seed(2))


def _expected_mask(seed: int, process: MaskedProcess, antithetic: bool = True,
                   maskable: torch.Tensor | None = None):
    """Replays the loss's random draws: t from sample_t, then the mask uniforms, on the same generator."""
    g = torch.Generator().manual_seed(seed)
    t = sample_t(B, antithetic, g)
    u = torch.rand(B, L, generator=g)
    mask = u < process.schedule.move_chance(t)[:, None]
    if maskable is not None:
        mask &= maskable
    return t, mask


def _ce(logits: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    return -F.log_softmax(logits.double(), -1).gather(-1, x0[..., None]).squeeze(-1)  # (B, L) float64


def test_token_ce_matches_log_softmax(x0):
    logits = torch.randn(B, L, V, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(token_ce(logits, x0).double(), _ce(logits, x0), rtol=1e-5, atol=1e-5)


def test_masked_elbo_all_masked_equals_weighted_mean_ce(x0):
    # eps -> 1: p_mask ~= 1 at every t, so every position is masked and the weight is ~1/p_mask.
    process = MaskedProcess(MASK, Linear(eps=0.999999))
    model = FixedLogits()
    g = torch.Generator().manual_seed(0)
    out = LOSSES.build("masked_elbo")(model, x0, process, generator=g)
    t, mask = _expected_mask(0, process)
    assert mask.all(), "the replayed draws must mask everything for this example to be meaningful"
    assert out.mask.all()
    (xt, t_seen), = model.calls
    assert (xt == MASK).all()
    torch.testing.assert_close(t_seen, t)
    p = (1 - 0.999999) * t.double() + 0.999999
    expected = (_ce(model.logits.detach(), x0) / p[:, None]).sum() / (B * L)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.nll.item() == pytest.approx(out.loss.item())
    assert not out.nll.requires_grad and out.loss.requires_grad


@pytest.mark.parametrize("schedule", [Linear(eps=0.1), LogLinear(eps=1e-3), Cosine(eps=1e-3)],
                         ids=["linear", "loglinear", "cosine"])
@pytest.mark.parametrize("antithetic", [True, False])
def test_masked_elbo_matches_hand_computation(x0, schedule, antithetic):
    process = MaskedProcess(MASK, schedule)
    model = FixedLogits()
    out = LOSSES.build("masked_elbo", antithetic=antithetic)(
        model, x0, process, generator=torch.Generator().manual_seed(5))
    t, mask = _expected_mask(5, process, antithetic)
    assert 0 < mask.sum() < B * L, "a partial mask makes the check meaningful"
    assert torch.equal(out.mask, mask)
    (xt, t_seen), = model.calls
    assert torch.equal(xt, torch.where(mask, MASK, x0))
    torch.testing.assert_close(t_seen, t)
    w = schedule.weight(t.double())[:, None]
    expected = (_ce(model.logits.detach(), x0) * w * mask).sum() / (B * L)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_masked_elbo_gradient_only_at_masked_positions(x0):
    process = MaskedProcess(MASK, Linear(eps=0.1))
    model = FixedLogits()
    out = LOSSES.build("masked_elbo")(model, x0, process, generator=torch.Generator().manual_seed(5))
    out.loss.backward()
    touched = model.logits.grad.abs().sum(-1) > 0  # (B, L)
    assert torch.equal(touched, out.mask)


def test_masked_elbo_with_maskable_normalises_by_maskable_count(x0):
    process = MaskedProcess(MASK, Linear(eps=0.1))
    model = FixedLogits()
    maskable = torch.zeros(B, L, dtype=torch.bool)
    maskable[:, L // 2:] = True  # e.g. a prompt in the first half is never masked
    out = LOSSES.build("masked_elbo")(model, x0, process, maskable=maskable,
                                       generator=torch.Generator().manual_seed(9))
    t, mask = _expected_mask(9, process, maskable=maskable)
    assert torch.equal(out.mask, mask)
    assert not out.mask[:, : L // 2].any()
    w = process.schedule.weight(t.double())[:, None]
    expected = (_ce(model.logits.detach(), x0) * w * mask).sum() / maskable.sum()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_masked_unweighted_is_mean_ce_over_masked(x0):
    process = MaskedProcess(MASK, Linear(eps=0.1))
    model = FixedLogits()
    out = LOSSES.build("masked_unweighted")(model, x0, process, generator=torch.Generator().manual_seed(3))
    _, mask = _expected_mask(3, process)
    assert torch.equal(out.mask, mask)
    expected = _ce(model.logits.detach(), x0)[mask].mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.nll.item() == pytest.approx(out.loss.item())


def test_masked_unweighted_with_nothing_masked_is_zero(x0):
    process = MaskedProcess(MASK, Linear(eps=0.1))
    out = LOSSES.build("masked_unweighted")(FixedLogits(), x0, process,
                                             maskable=torch.zeros(B, L, dtype=torch.bool),
                                             generator=torch.Generator().manual_seed(0))
    assert not out.mask.any()
    assert out.loss.item() == 0.0 and torch.isfinite(out.loss)


def test_masked_losses_deterministic_given_generator(x0):
    process = MaskedProcess(MASK, Linear())
    fn = LOSSES.build("masked_elbo")
    a = fn(FixedLogits(), x0, process, generator=torch.Generator().manual_seed(4))
    b = fn(FixedLogits(), x0, process, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.mask, b.mask) and a.loss.item() == b.loss.item()


def test_ar_loss_is_next_token_ce_after_bos(x0):
    model = TableLogits()
    out = LOSSES.build("ar", bos_id=BOS)(model, x0)
    inp = torch.cat([torch.full((B, 1), BOS), x0[:, :-1]], 1)
    expected = _ce(model.table.detach()[inp], x0).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.mask.shape == (B, L) and out.mask.dtype == torch.bool and out.mask.all()
    assert LOSSES.get("ar").causal and not LOSSES.get("masked_elbo").causal


def test_ar_loss_needs_bos():
    with pytest.raises(ValueError, match="bos_id"):
        LOSSES.build("ar")(TableLogits(), torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("name", ["masked_elbo", "masked_unweighted", "ar"])
def test_loss_output_contract(name, x0):
    model = TableLogits()
    out = LOSSES.build(name, bos_id=BOS)(model, x0, MaskedProcess(MASK, Linear()),
                                          generator=torch.Generator().manual_seed(0))
    assert isinstance(out, LossOutput)
    assert out.loss.dim() == 0 and out.nll.dim() == 0
    assert out.mask.shape == (B, L) and out.mask.dtype == torch.bool
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    assert model.table.grad is not None and model.table.grad.abs().sum() > 0
