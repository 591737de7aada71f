"""Checkpoints: `model.safetensors` + `config.json` (+ `tokenizer.json`), every file written atomically.

A folder saved by `save_pretrained` loads with `load_pretrained`; a training run's folder holds `ckpt-NNNNNN/`
subfolders and a `latest` pointer, and loading the run folder loads its latest checkpoint. Each file goes to a
temporary name in the same folder and is renamed into place, so a killed process never leaves a half-written
file under the real name; a training checkpoint folder is renamed into place only when complete.

    save_pretrained("runs/x/export", model, cfg, tokenizer); model, cfg, tok = load_pretrained("runs/x/export")
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dlm.config import CheckpointConfig, ConfigError
from dlm.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not match its config; the message says which file."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(save_fn, path: Path) -> None:
    """Call save_fn(tmp_path) then rename tmp_path to path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def state_dict_for_saving(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        sd[k] = v.contiguous()
    return sd


def save_pretrained(folder: str | Path, model: torch.nn.Module, cfg: CheckpointConfig, tokenizer: Tokenizer,
                    dtype: torch.dtype | None = None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict_for_saving(model, dtype)
    atomic_save(lambda p: save_file(sd, p, metadata={"format": "pt", "library": "dlm"}), folder / WEIGHTS)
    tokenizer.save(folder / TOKENIZER)
    cfg.save(folder / CONFIG)


def resolve_checkpoint_dir(folder: str | Path) -> Path:
    """A folder with model.safetensors, or a training run folder (-> its latest complete checkpoint)."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"no checkpoint at {folder}: the folder does not exist")
    if (folder / WEIGHTS).exists():
        return folder
    latest = folder / LATEST
    if latest.exists():
        sub = folder / latest.read_text().strip()
        if (sub / WEIGHTS).exists():
            return sub
    ckpts = sorted(folder.glob("ckpt-*"))
    ckpts = [c for c in ckpts if (c / WEIGHTS).exists()]
    if ckpts:
        return ckpts[-1]
    raise CheckpointError(f"{folder} holds no {WEIGHTS} and no ckpt-* folder; is it a dlm checkpoint?")


def load_pretrained(folder: str | Path, map_location: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, CheckpointConfig, Tokenizer]:
    from dlm.models import build_model

    folder = resolve_checkpoint_dir(folder)
    if not (folder / CONFIG).exists():
        raise CheckpointError(f"{folder} has weights but no {CONFIG}")
    try:
        cfg = CheckpointConfig.load(folder / CONFIG)
    except ConfigError as e:
        raise CheckpointError(f"{folder / CONFIG}: {e}") from e
    tok = Tokenizer.load(folder / TOKENIZER)
    try:
        sd = load_file(str(folder / WEIGHTS), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{folder / WEIGHTS} is corrupt or truncated ({e}); re-download or re-train it") from e
    with torch.device("meta"):
        model = build_model(cfg.model)
    expected = {k: v for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{folder / WEIGHTS} does not match its config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{folder / WEIGHTS}: {k} has shape {tuple(sd[k].shape)}, config says "
                                  f"{tuple(v.shape)}")
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    model.load_state_dict(sd, assign=True)
    _materialise_buffers(model, cfg, map_location)
    if tok.vocab_size > cfg.model.vocab_size:
        raise CheckpointError(f"tokenizer has {tok.vocab_size} ids but the model only {cfg.model.vocab_size}")
    return model.eval(), cfg, tok


def _materialise_buffers(model: torch.nn.Module, cfg: CheckpointConfig, device: str | torch.device) -> None:
    # Non-persistent buffers (RoPE frequencies) are not in the file and are still on the meta device.
    from dlm.models.common import Rotary

    for m in model.modules():
        if isinstance(m, Rotary):
            fresh = Rotary(cfg.model.d_model // cfg.model.n_heads, cfg.model.rope_theta)
            m.inv_freq = fresh.inv_freq.to(device)
            m._cache = None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    ckpts = sorted(run_dir.glob("ckpt-*"))
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
