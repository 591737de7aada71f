"""A folder with weights and config but no tokenizer files loads for token-id calls; text calls say what to do."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dlm.pipeline import DiffusionLM
from dlm.sampling import SamplingError
from dlm.tokenizer import TokenizerMissingError

DATA = Path(__file__).parent / "data" / "hf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def _without_tokenizer(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for name in TOKENIZER_FILES:
        (dst / name).unlink(missing_ok=True)
    return dst


@pytest.mark.parametrize("name", ["llada-tiny", "dream-tiny", "mdlm-tiny"])
def test_ids_work_text_explains(tmp_path, name):
    full = DiffusionLM.from_pretrained(str(DATA / name))
    with pytest.warns(UserWarning, match="no tokenizer files"):
        bare = DiffusionLM.from_pretrained(str(_without_tokenizer(DATA / name, tmp_path / name)))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    assert torch.equal(bare.logits(ids), full.logits(ids))
    opts = dict(max_new_tokens=8, steps=8, temperature=0.0, seed=0)
    assert torch.equal(bare.generate(ids, **opts), full.generate(ids, **opts))
    assert bare.tokenizer.mask_id == full.tokenizer.mask_id and bare.tokenizer.eos_id == full.tokenizer.eos_id
    with pytest.raises(TokenizerMissingError, match="pass tokenizer=") as e:
        bare.tokenizer.encode("hello")
    assert "\n" not in str(e.value)
    with pytest.raises((TokenizerMissingError, SamplingError), match="tokenizer="):
        bare.generate("hello", **opts)
    with pytest.raises((TokenizerMissingError, SamplingError), match="tokenizer="):
        bare.chat([{"role": "user", "content": "hi"}], **opts)


def test_tokenizer_argument_supplies_one(tmp_path):
    folder = _without_tokenizer(DATA / "llada-tiny", tmp_path / "llada")
    full = DiffusionLM.from_pretrained(str(DATA / "llada-tiny"))
    with pytest.warns(UserWarning):
        lm = DiffusionLM.from_pretrained(str(folder), tokenizer=full.tokenizer.hf)  # a transformers tokenizer
    assert lm.tokenizer.encode("hello") == full.tokenizer.encode("hello")
    assert lm.tokenizer.mask_id == full.tokenizer.mask_id
    opts = dict(max_new_tokens=8, steps=8, temperature=0.0, seed=0)
    assert lm.generate("hello", **opts) == full.generate("hello", **opts)
    with pytest.warns(UserWarning):
        again = DiffusionLM.from_pretrained(str(folder), tokenizer=full.tokenizer)  # a dlm Tokenizer
    assert again.tokenizer is full.tokenizer
