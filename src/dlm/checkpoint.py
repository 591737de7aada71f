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
from safetensors.torch import save_file

from dlm.config import FORMAT_VERSION, CheckpointConfig
from dlm.formats.base import CheckpointError
from dlm.tokenizer import HFTokenizer, Tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
GENERATION_CONFIG = "generation_config.json"
TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"




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


def state_dict_for_saving(model: torch.nn.Module | dict[str, torch.Tensor], dtype: torch.dtype | None = None
                          ) -> dict[str, torch.Tensor]:
    """A module's (or a state dict's) tensors, detached, on the CPU, contiguous, floats in `dtype` if given."""
    sd = {}
    for k, v in (model if isinstance(model, dict) else model.state_dict()).items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        sd[k] = v.contiguous()
    return sd


def save_pretrained(folder: str | Path, model: torch.nn.Module | dict[str, torch.Tensor], cfg: CheckpointConfig,
                    tokenizer: Tokenizer, dtype: torch.dtype | None = None) -> None:
    """Write a model folder from a network or its state dict (weights, tokenizer, configs), each file atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict_for_saving(model, dtype)
    atomic_save(lambda p: save_file(sd, p, metadata={"format": "pt", "library": "dlm"}), folder / WEIGHTS)
    tokenizer.save(folder / TOKENIZER)
    cfg.sampling.save_json(folder / GENERATION_CONFIG)
    extra = dict(cfg.extra)
    if isinstance(tokenizer, HFTokenizer):  # its files are the upstream ones; the ids a DLM needs go here
        extra["tokenizer"] = {"mask_id": tokenizer.mask_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
                              "bos_id": tokenizer.bos_id, "stop_ids": sorted(tokenizer.stop_ids)}
    cfg.replace(format_version=FORMAT_VERSION, extra=extra).save(folder / CONFIG)


def resolve_checkpoint_dir(folder: str | Path) -> Path:
    """A model folder (with config.json), or a training run folder (-> its latest complete checkpoint)."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"no checkpoint at {folder}: the folder does not exist")
    if (folder / WEIGHTS).exists() or (folder / CONFIG).exists():
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


def load_pretrained(folder: str | Path, map_location: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    allow_pickle: bool = False) -> tuple[torch.nn.Module, CheckpointConfig, Tokenizer]:
    """Any model folder (ours, a training run, or an upstream LLaDA / Dream folder) -> (network, config, tokenizer).

    Weights go straight to `dtype` on `map_location`, shard by shard (dlm.formats.base.load_weights).
    """
    from dlm.formats import load_folder

    return load_folder(resolve_checkpoint_dir(folder), dtype=dtype, device=map_location, allow_pickle=allow_pickle)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    ckpts = sorted(run_dir.glob("ckpt-*"))
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
