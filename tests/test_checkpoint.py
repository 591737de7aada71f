"""Checkpoints: round trip, atomic writes, and clear errors for corrupt, truncated or mismatched files."""

from __future__ import annotations

import json

import pytest
import torch

from dlm.checkpoint import CheckpointError, atomic_write_text, load_pretrained, save_pretrained
from dlm.config import CheckpointConfig, ModelConfig
from dlm.models import build_model
from dlm.tokenizer import ByteTokenizer


@pytest.fixture
def saved(tmp_path):
    cfg = CheckpointConfig(model=ModelConfig.preset("tiny", max_len=64))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    save_pretrained(tmp_path / "m", model, cfg, ByteTokenizer())
    return tmp_path / "m", model


@pytest.mark.parametrize("arch", ["llada", "dit", "ar"])
def test_round_trip_gives_identical_logits(tmp_path, arch):
    cfg = CheckpointConfig(model=ModelConfig.preset("tiny", arch=arch, max_len=64))
    model = build_model(cfg.model).eval()
    save_pretrained(tmp_path / arch, model, cfg, ByteTokenizer())
    loaded, cfg2, tok = load_pretrained(tmp_path / arch)
    x = torch.randint(0, 256, (2, 20))
    t = torch.full((2,), 0.5)
    assert torch.equal(model(x, t), loaded(x, t))
    assert cfg2.to_dict() == cfg.to_dict() and tok.vocab_size == 260


def test_bf16_export_loads_as_float32(tmp_path, saved):
    folder, model = saved
    cfg = CheckpointConfig.load(folder / "config.json")
    save_pretrained(tmp_path / "half", model, cfg, ByteTokenizer(), dtype=torch.bfloat16)
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < (folder / "model.safetensors").stat().st_size
    loaded, _, _ = load_pretrained(tmp_path / "half")
    assert next(loaded.parameters()).dtype == torch.float32


def test_truncated_weights_give_a_clear_error(saved):
    folder, _ = saved
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_pretrained(folder)


def test_garbage_config_gives_a_clear_error(saved):
    folder, _ = saved
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pretrained(folder)


def test_shape_mismatch_names_the_tensor(saved):
    folder, _ = saved
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model"]["d_model"] = 64
    cfg["model"]["n_heads"] = 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_pretrained(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def test_atomic_write_leaves_no_temp_file(tmp_path):
    p = tmp_path / "a" / "b.txt"
    atomic_write_text(p, "hello")
    atomic_write_text(p, "world")
    assert p.read_text() == "world"
    assert [q.name for q in p.parent.iterdir()] == ["b.txt"]
