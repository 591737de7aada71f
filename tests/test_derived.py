"""Shipped models derived on first use (dlm.derived): a base causal LM + a committed LoRA adapter -> a dlm folder.

On a tiny random Qwen2 folder adapted with LoRA for a few steps: the exported adapter (float32) derives exactly the
run's merged checkpoint, float16 within its rounding, `from_pretrained(name)` derives once and then reads the cache,
and a changed base, a damaged adapter or a stray tensor is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_adapt import TEXT, _run, write_causal  # noqa: E402

from dlm import derived, pipeline  # noqa: E402
from dlm.checkpoint import load_pretrained  # noqa: E402
from dlm.config import GenerationConfig  # noqa: E402
from dlm.errors import CheckpointError  # noqa: E402
from dlm.lora import LoRAConfig  # noqa: E402
from dlm.pipeline import DiffusionLM  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(base folder, a finished LoRA adaptation run of it)."""
    root = tmp_path_factory.mktemp("derived")
    base, data = root / "qwen2", root / "text.txt"
    write_causal(base, "qwen2")
    data.write_text(TEXT)
    _run(base, data, root / "run", lora=LoRAConfig(r=4, alpha=8.0), max_steps=3, ckpt_every=3, lr=3e-2)
    return base, root / "run"


@pytest.fixture
def tiny_base(run, monkeypatch, tmp_path):
    """The tiny base registered as a derivation base, and an empty model cache."""
    monkeypatch.setitem(derived.BASES, "tiny-qwen2", lambda: run[0])
    monkeypatch.setenv("DLM_MODEL_CACHE", str(tmp_path / "cache"))
    return run


def _export(run_dir: Path, shipped: Path, dtype=torch.float32, **kw) -> derived.DeriveRecipe:
    return derived.export_adapter(run_dir, shipped, base="tiny-qwen2", dtype=dtype, **kw)


def test_float32_adapter_derives_the_runs_merged_model_exactly(tiny_base, tmp_path):
    _, run_dir = tiny_base
    recipe = _export(run_dir, tmp_path / "m", record={"steps": 3})
    assert recipe.lora_r == 4 and recipe.scale == 2.0
    state, cfg, tok = derived.build(tmp_path / "m")
    want, want_cfg, _ = load_pretrained(run_dir)
    assert sorted(state) == sorted(want.state_dict())
    for k, v in want.state_dict().items():
        assert torch.equal(state[k], v), k  # W + (alpha / r) B A in float32, as the run's checkpoint merged it
    assert cfg.model == want_cfg.model and cfg.extra["bos_prefix"] and cfg.extra["adaptation"] == {"steps": 3}


def test_float16_adapter_is_within_its_rounding(tiny_base, tmp_path):
    _, run_dir = tiny_base
    _export(run_dir, tmp_path / "m", dtype=torch.float16)
    state, _, _ = derived.build(tmp_path / "m")
    want = load_pretrained(run_dir)[0].state_dict()
    tensors, lora = derived.adapter_from_peft(run_dir / "adapter", torch.float32)
    scale = lora["alpha"] / lora["r"]
    for layer in {k.rsplit(".", 1)[0] for k in tensors}:
        A, B = tensors[f"{layer}.lora_A"], tensors[f"{layer}.lora_B"]
        # rounding A and B to float16 moves each by at most 2^-11 relative: |dW| <= scale |B| |A| (2 2^-11 + 2^-22)
        bound = scale * (B.abs() @ A.abs()) * (2 * 2.0 ** -11 + 2.0 ** -22) + 1e-6 * want[f"{layer}.weight"].abs()
        diff = (state[f"{layer}.weight"] - want[f"{layer}.weight"]).abs()
        assert (diff <= bound + 1e-7).all(), layer
    untouched = {k for k in want if k.rsplit(".", 1)[0] not in {t.rsplit(".", 1)[0] for t in tensors}}
    assert untouched and all(torch.equal(state[k], want[k]) for k in untouched)


def test_from_pretrained_derives_once_then_reads_the_cache(tiny_base, tmp_path, monkeypatch, capsys):
    _, run_dir = tiny_base
    monkeypatch.setattr(pipeline, "PRETRAINED_DIR", tmp_path / "pretrained")
    gen = GenerationConfig(max_new_tokens=6, steps=6, sampler="llada", block_length=2, temperature=0.0)
    _export(run_dir, tmp_path / "pretrained/tiny-shakespeare", generation=gen)
    lm = DiffusionLM.from_pretrained("tiny-shakespeare")
    assert "deriving tiny-shakespeare once" in capsys.readouterr().err
    folder = pipeline.resolve_model_path("tiny-shakespeare")
    assert folder.parent == tmp_path / "cache" and (folder / "model.safetensors").exists()
    assert "deriving" not in capsys.readouterr().err  # the second time: the cached folder
    assert lm.sampling.sampler == "llada" and lm.sampling.block_length == 2 and lm.bos_prefix
    want = DiffusionLM.from_pretrained(run_dir)
    assert lm.generate("To be", seed=0) == want.generate("To be", **{**gen.to_dict(), "seed": 0})
    ids = torch.tensor([[want.tokenizer.bos_id, *want.tokenizer.encode("To be, or")]])
    assert torch.equal(lm.logits(ids), want.logits(ids))
    # a new recipe (here: other sampling defaults) is a new cache entry, not the stale one
    GenerationConfig(max_new_tokens=4, steps=4).save_json(tmp_path / "pretrained/tiny-shakespeare" /
                                                          derived.GENERATION_FILE)
    refreshed = pipeline.resolve_model_path("tiny-shakespeare")
    assert refreshed != folder and not folder.exists() and refreshed.exists()  # the stale entry is removed
    assert "removing" in capsys.readouterr().err
    assert "tiny-shakespeare" in str(pytest.raises(CheckpointError, pipeline.resolve_model_path, "no-such").value)


def test_a_different_base_or_a_damaged_adapter_is_refused(tiny_base, tmp_path, monkeypatch):
    base, run_dir = tiny_base
    _export(run_dir, tmp_path / "m")
    other = tmp_path / "other"
    write_causal(other, "qwen2", seed=1)
    monkeypatch.setitem(derived.BASES, "tiny-qwen2", lambda: other)
    with pytest.raises(CheckpointError, match="not the one m was adapted from"):
        derived.build(tmp_path / "m")
    monkeypatch.setitem(derived.BASES, "tiny-qwen2", lambda: base)
    from safetensors.torch import load_file, save_file

    path = tmp_path / "m" / derived.ADAPTER_FILE
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        derived.build(tmp_path / "m")
    tensors["blocks.0.attn.q_proj.bias"] = torch.zeros(4)
    save_file(tensors, path)
    recipe = json.loads((tmp_path / "m" / derived.DERIVE_FILE).read_text())
    recipe["adapter_sha256"] = derived.tensor_sha256(tensors)
    (tmp_path / "m" / derived.DERIVE_FILE).write_text(json.dumps(recipe))
    with pytest.raises(CheckpointError, match="unexpected tensor 'blocks.0.attn.q_proj.bias'"):
        derived.build(tmp_path / "m")
    recipe["base"] = "../../etc"
    (tmp_path / "m" / derived.DERIVE_FILE).write_text(json.dumps(recipe))
    with pytest.raises(CheckpointError, match="unknown base"):
        derived.build(tmp_path / "m")


def test_tensor_digest_depends_on_names_dtypes_and_values():
    a = {"x": torch.zeros(2, 3), "y": torch.ones(3)}
    assert derived.tensor_sha256(a) == derived.tensor_sha256({"y": torch.ones(3), "x": torch.zeros(2, 3)})
    assert derived.tensor_sha256(a) != derived.tensor_sha256({"x": torch.zeros(2, 3), "z": torch.ones(3)})
    assert derived.tensor_sha256(a) != derived.tensor_sha256({"x": torch.zeros(3, 2), "y": torch.ones(3)})
    assert derived.tensor_sha256(a) != derived.tensor_sha256({"x": torch.zeros(2, 3).half(), "y": torch.ones(3)})
    assert derived.tensor_sha256(a) != derived.tensor_sha256({"x": torch.zeros(2, 3), "y": torch.ones(3) * 2})


def test_a_stray_folder_in_the_cache_is_an_error_not_a_broken_model(tiny_base, tmp_path):
    _, run_dir = tiny_base
    _export(run_dir, tmp_path / "m")
    stray = derived.cache_folder(tmp_path / "m")
    (stray / "notes").mkdir(parents=True)  # a folder where the derived model goes, without weights
    with pytest.raises(CheckpointError, match="could not place the derived model"):
        derived.derived_path(tmp_path / "m")
    assert not [p for p in stray.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
