"""Classifier-free guidance (LLaDA's generate.py): the unconditional copy, one batched forward, the mixing formula."""

from __future__ import annotations

import pytest
import torch

from dlm.sampling import LLaDASampler, denoise
from dlm.sampling.guidance import ClassifierFreeGuidance, classifier_free_guidance

V, MASK = 12, 11


class DummyModel:
    """Logits that depend on every input token (a fixed random embedding summed over the row), so masking the
    prompt changes them; records each forward's input."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(V, V, generator=g)
        self.position = torch.randn(64, V, generator=g)
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        L = x.shape[1]
        return self.table[x] + 0.5 * self.table[x].mean(1, keepdim=True) + self.position[:L]  # (B, L, V)


def test_formula_and_prompt_masking_are_exact():
    model = DummyModel()
    xt = torch.tensor([[1, 2, 3, MASK, MASK, 4], [5, 6, 7, 8, MASK, MASK]])
    prompt_mask = torch.tensor([[True, True, True, False, False, False], [True, True, False, False, False, False]])
    scale = 1.5
    out = ClassifierFreeGuidance(model, prompt_mask, scale, MASK)(xt)

    assert len(model.inputs) == 1, "one forward for both halves"
    batch = model.inputs[0]
    assert batch.shape == (4, 6)
    uncond = torch.tensor([[MASK, MASK, MASK, MASK, MASK, 4], [MASK, MASK, 7, 8, MASK, MASK]])
    assert torch.equal(batch[:2], xt) and torch.equal(batch[2:], uncond)

    cond_logits, uncond_logits = DummyModel()(xt), DummyModel()(uncond)
    expected = uncond_logits + (scale + 1) * (cond_logits - uncond_logits)
    assert torch.equal(out, expected)
    assert out.dtype == torch.float32 and out.shape == (2, 6, V)


def test_scale_zero_returns_the_model_unchanged():
    model = DummyModel()
    assert classifier_free_guidance(model, torch.ones(1, 3, dtype=torch.bool), 0.0, MASK) is model
    wrapped = classifier_free_guidance(model, torch.ones(1, 3, dtype=torch.bool), 2.0, MASK)
    assert isinstance(wrapped, ClassifierFreeGuidance) and wrapped.scale == 2.0


def test_one_prompt_row_broadcasts_over_the_batch():
    model = DummyModel()
    xt = torch.tensor([[1, 2, MASK], [3, 4, MASK], [5, 6, 7]])
    ClassifierFreeGuidance(model, torch.tensor([[True, False, False]]), 1.0, MASK)(xt)
    assert model.inputs[0][3:, 0].tolist() == [MASK] * 3 and torch.equal(model.inputs[0][3:, 1:], xt[:, 1:])


def test_errors_say_what_is_expected():
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        ClassifierFreeGuidance(DummyModel(), torch.ones(1, 3, dtype=torch.bool), -1.0, MASK)
    with pytest.raises(ValueError, match="prompt_mask must be a bool tensor"):
        ClassifierFreeGuidance(DummyModel(), torch.ones(1, 3), 1.0, MASK)
    cfg = ClassifierFreeGuidance(DummyModel(), torch.ones(1, 3, dtype=torch.bool), 1.0, MASK)
    with pytest.raises(ValueError, match=r"prompt_mask has shape \(1, 3\) but the canvas is \(1, 4\)"):
        cfg(torch.zeros(1, 4, dtype=torch.long))


def test_guided_denoising_loop_runs_one_double_batch_forward_per_step():
    model = DummyModel()
    canvas = torch.tensor([[1, 2, 3] + [MASK] * 4] * 2)
    model_fn = classifier_free_guidance(model, canvas != MASK, 1.0, MASK)
    out = denoise(model_fn, canvas, 3, steps=4, block_length=2, sampler=LLaDASampler(MASK))
    assert not (out == MASK).any() and torch.equal(out[:, :3], canvas[:, :3])
    assert len(model.inputs) == 4 and all(x.shape == (4, 7) for x in model.inputs)
    for x in model.inputs:
        assert (x[2:, :3] == MASK).all(), "the prompt is masked in the unconditional half at every step"
        assert torch.equal(x[2:, 3:], x[:2, 3:]), "generated tokens stay visible in both halves (as LLaDA)"
