"""Networks: shapes, the time input of DiT, causality of the AR baseline and padding masks (tiny preset)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dlm.config import ModelConfig
from dlm.models import MODELS, CausalTransformer, DiT, Transformer, build_model, count_params
from dlm.models.common import padding_attn_mask
from dlm.models.dit import timestep_embedding

B, L, V = 2, 12, 260
ARCHS = ["llada", "dit", "ar", "ddit"]


def _model(arch: str, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():  # seeded init without touching the global RNG other tests may use
        torch.manual_seed(seed)
        return build_model(ModelConfig.preset("tiny", arch=arch)).eval()


def _perturb_ada(model: DiT, seed: int = 0) -> DiT:
    """Move the adaLN-Zero modulation away from its zero init, so every block and t matter."""
    g = torch.Generator().manual_seed(seed)
    zero_init = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and
                 (n.endswith(("ada", "final_ada", "adaLN_modulation")) or n == "output_layer.linear")]
    with torch.no_grad():
        for lin in zero_init:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.2)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.2)
    return model


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (B, L), generator=torch.Generator().manual_seed(seed))


def _t() -> torch.Tensor:
    return torch.tensor([0.3, 0.8])


def test_registry_and_builder():
    assert set(MODELS.names()) == set(ARCHS)
    assert type(_model("llada")) is Transformer
    assert type(_model("ar")) is CausalTransformer
    assert type(_model("dit")) is DiT
    assert count_params(_model("llada")) > 0
    with pytest.raises(ValueError, match="unknown model architecture"):
        build_model(ModelConfig.preset("tiny", arch="rnn"))


@pytest.mark.parametrize("arch", ARCHS)
def test_output_shape_and_dtype(arch):
    logits = _model(arch)(_ids(), _t())
    assert logits.shape == (B, L, V)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_flags():
    assert _model("llada").causal is False and _model("llada").needs_time is False
    assert _model("ar").causal is True
    assert _model("dit").needs_time is True


def test_dit_needs_t():
    with pytest.raises(ValueError, match="time"):
        _model("dit")(_ids())


def test_dit_at_init_blocks_are_identity_and_t_is_ignored():
    # adaLN-Zero: every gate and the final modulation start at zero, so the net is a per-token map at init.
    model = _model("dit")
    x = _ids()
    a = model(x, torch.tensor([0.1, 0.1]))
    b = model(x, torch.tensor([0.9, 0.9]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    expected = model.lm_head(model.ln_f(model.wte(x)))
    torch.testing.assert_close(a, expected)


def test_dit_with_trained_modulation_depends_on_t():
    model = _perturb_ada(_model("dit"))
    x = _ids()
    a = model(x, torch.tensor([0.1, 0.1]))
    b = model(x, torch.tensor([0.9, 0.9]))
    assert (a - b).abs().amax(-1).min() > 1e-4, "every position's logits change with t"
    # Per-row t: row 0 sees t=0.1 in both calls, so it is unchanged when only row 1's t moves.
    c = model(x, torch.tensor([0.1, 0.5]))
    torch.testing.assert_close(c[0], a[0])
    assert not torch.allclose(c[1], a[1])


def test_dit_scalar_or_single_t_is_broadcast():
    model = _perturb_ada(_model("dit"))
    x = _ids()
    full = model(x, torch.tensor([0.4, 0.4]))
    torch.testing.assert_close(model(x, torch.tensor(0.4)), full)
    torch.testing.assert_close(model(x, torch.tensor([0.4])), full)


def test_llada_ignores_t():
    model = _model("llada")
    x = _ids()
    torch.testing.assert_close(model(x, torch.tensor([0.1, 0.1])), model(x, None), rtol=0, atol=0)


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0.0, 0.5]), 16)
    assert e.shape == (2, 16)
    torch.testing.assert_close(e[0], torch.cat([torch.ones(8), torch.zeros(8)]))
    assert not torch.allclose(e[0], e[1])


def _change_token(x: torch.Tensor, j: int) -> torch.Tensor:
    y = x.clone()
    y[:, j] = (y[:, j] + 17) % 256
    return y


@pytest.mark.parametrize("j", [0, 5, L - 1])
def test_ar_is_causal(j):
    model = _model("ar")
    x = _ids()
    a, b = model(x), model(_change_token(x, j))
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
    assert (a[:, j:] - b[:, j:]).abs().amax(-1).min() > 1e-6, "positions >= j see token j"


@pytest.mark.parametrize("arch", ["llada", "dit"])
@pytest.mark.parametrize("j", [3, L - 1])
def test_diffusion_models_are_bidirectional(arch, j):
    model = _model(arch)
    if arch in ("dit", "ddit"):
        _perturb_ada(model)  # at init DiT blocks are the identity: no token mixing at all
    x = _ids()
    a, b = model(x, _t()), model(_change_token(x, j), _t())
    assert (a[:, :j] - b[:, :j]).abs().amax(-1).min() > 1e-6, "every earlier position sees token j"


def test_padding_attn_mask_semantics():
    am = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    m = padding_attn_mask(am, causal=False, L=4)
    assert m.shape == (3, 1, 4, 4) and m.dtype == torch.bool
    assert m[0, 0, 0].tolist() == [True, True, True, False]  # real queries never see pads
    assert m[1, 0, 3].tolist() == [True, True, False, True]
    assert m[2, 0].equal(torch.eye(4, dtype=torch.bool))  # an all-pad row sees itself only: no NaN
    mc = padding_attn_mask(am, causal=True, L=4)
    assert mc[0, 0, 1].tolist() == [True, True, False, False]
    assert padding_attn_mask(None, causal=True, L=4) is None


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_content_does_not_leak_into_real_tokens(arch):
    model = _model(arch)
    if arch in ("dit", "ddit"):
        _perturb_ada(model)
    n_real = 7
    x = _ids()
    am = torch.zeros(B, L, dtype=torch.long)
    am[:, :n_real] = 1
    y = x.clone()
    y[:, n_real:] = torch.randint(0, 256, (B, L - n_real), generator=torch.Generator().manual_seed(9))
    a = model(x, _t(), attention_mask=am)
    b = model(y, _t(), attention_mask=am)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a[:, :n_real], b[:, :n_real], rtol=0, atol=1e-5)
    # Without the mask the same change is visible (for the bidirectional nets): the mask is what hides it.
    if arch != "ar":
        c, d = model(x, _t()), model(y, _t())
        assert (c[:, :n_real] - d[:, :n_real]).abs().max() > 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_all_ones_attention_mask_equals_no_mask(arch):
    model = _model(arch)
    if arch in ("dit", "ddit"):
        _perturb_ada(model)
    x = _ids()
    a = model(x, _t())
    b = model(x, _t(), attention_mask=torch.ones(B, L, dtype=torch.long))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_deterministic_and_batch_independent(arch):
    model = _model(arch)
    if arch in ("dit", "ddit"):
        _perturb_ada(model)
    x = _ids()
    full = model(x, _t())
    torch.testing.assert_close(model(x, _t()), full, rtol=0, atol=0)
    row1 = model(x[1:], _t()[1:])
    torch.testing.assert_close(row1[0], full[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_backward_reaches_every_parameter(arch):
    model = _model(arch).train()
    if arch in ("dit", "ddit"):
        _perturb_ada(model)
    model(_ids(), _t()).logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


@pytest.mark.parametrize("arch", ARCHS)
def test_fully_padded_row_gives_finite_logits(arch):
    model = _model(arch)
    am = torch.ones(B, L, dtype=torch.long)
    am[1] = 0
    assert torch.isfinite(model(_ids(), _t(), attention_mask=am)).all()
