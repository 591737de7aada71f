"""DiffusionLM end to end on a tiny trained model: generate, infill, logits, and the errors users meet."""

from __future__ import annotations

import pytest
import torch

from dlm.pipeline import DiffusionLM
from dlm.sampling import SamplingError


@pytest.fixture(scope="module")
def lm(trained_tiny):
    return DiffusionLM.from_pretrained(str(trained_tiny))


def test_generate_text_returns_a_continuation(lm):
    out = lm.generate("ROMEO:\n", max_new_tokens=32, steps=16, block_length=16, seed=0)
    assert isinstance(out, str) and len(out) > 0
    assert "[MASK]" not in out
    # greedy decoding is deterministic
    assert out == lm.generate("ROMEO:\n", max_new_tokens=32, steps=16, block_length=16, seed=0)


def test_generate_ids_keeps_the_prompt_and_leaves_no_mask(lm):
    tok = lm.tokenizer
    ids = torch.tensor([tok.encode("HAMLET:\n"), tok.encode("Lady M:\n")])
    out = lm.generate(ids, max_new_tokens=16, steps=8, block_length=8, temperature=0.7, seed=3)
    assert out.shape == (2, ids.shape[1] + 16) and out.dtype == torch.long
    assert torch.equal(out[:, : ids.shape[1]], ids)
    assert not (out == tok.mask_id).any()
    again = lm.generate(ids, max_new_tokens=16, steps=8, block_length=8, temperature=0.7, seed=3)
    assert torch.equal(out, again)


def test_logits_shape_and_dtype(lm):
    ids = torch.tensor([lm.tokenizer.encode("to be or not")])
    logits = lm.logits(ids)
    assert logits.shape == (1, ids.shape[1], lm.tokenizer.vocab_size) and logits.dtype == torch.float32


def test_infill_keeps_text_outside_gaps_byte_for_byte(lm):
    text = "To be, or not to be, [MASK] is the question.\nWhether 'tis nobler [MASK:6] to suffer ü"
    out = lm.infill(text, max_span=16, seed=0)
    before, rest = out[: len("To be, or not to be, ")], out[len("To be, or not to be, "):]
    assert before == "To be, or not to be, "
    assert out.endswith(" to suffer ü")
    assert " is the question.\nWhether 'tis nobler " in rest
    assert "[MASK" not in out


def test_fixed_gap_has_exactly_n_tokens(lm):
    prefix, suffix = "KING:\nMy lord, ", " and so farewell.\n"
    tok = lm.tokenizer
    ids, gaps, _ = lm.parse_gaps(prefix + "[MASK:10]" + suffix, max_span=64)
    assert len(gaps) == 1 and gaps[0].length == 10 and gaps[0].fixed
    assert ids.count(tok.mask_id) == 10
    out = lm.infill(prefix + "[MASK:10]" + suffix, seed=0)
    fill = out[len(prefix): len(out) - len(suffix)]
    assert len(tok.encode(fill)) == 10 or "\ufffd" in fill  # 10 bytes (a cut UTF-8 char is replaced)


def test_bad_input_gives_clear_errors(lm):
    with pytest.raises(SamplingError, match="empty"):
        lm.generate("")
    with pytest.raises(SamplingError, match="context"):
        lm.generate("x" * 200, max_new_tokens=64, steps=64, block_length=64)
    with pytest.raises(SamplingError, match="multiple of block_length"):
        lm.generate("ROMEO:", max_new_tokens=30, steps=30, block_length=16)
    with pytest.raises(SamplingError, match="multiple of the number of blocks"):
        lm.generate("ROMEO:", max_new_tokens=32, steps=7, block_length=16)
    with pytest.raises(SamplingError, match="no gap"):
        lm.infill("nothing to fill")
    with pytest.raises(ValueError, match="remasking"):
        lm.generate("ROMEO:", max_new_tokens=32, steps=32, remasking="nope")


def test_unknown_model_name(tmp_path):
    from dlm.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="unknown model"):
        DiffusionLM.from_pretrained("no-such-model")
    with pytest.raises(CheckpointError, match="holds no model.safetensors"):
        DiffusionLM.from_pretrained(str(tmp_path))
