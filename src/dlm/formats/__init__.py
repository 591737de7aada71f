"""Checkpoint formats: our own folders and the upstream Hugging Face ones (LLaDA, Dream), loaded natively.

A folder is recognised by its `config.json`: ours carry `"library": "dlm"` and a `format_version`; an upstream
folder carries `model_type`, looked up in `FORMATS`. Upstream weights are mapped onto our own networks, so every
sampler, cache and processor works on them; no code from the hub is ever run (`trust_remote_code` is not needed).

    model, cfg, tok = load_folder(Path("/models/LLaDA-8B-Instruct"), dtype=torch.bfloat16, device="cuda")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlm.config import CheckpointConfig
from dlm.formats.base import FORMATS, CheckpointError, Format, check_folder_files
from dlm.io import read_text_file
from dlm.tokenizer import Tokenizer


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder} has no config.json; is it a model folder?")
    try:
        config = json.loads(read_text_file(path, error=CheckpointError))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return config


def detect(config: dict[str, Any], folder: Path) -> Format:
    for name in FORMATS.names():
        fmt = FORMATS.build(name)
        if fmt.matches(config):
            return fmt
    upstream = sorted(m for name in FORMATS.names() for m in FORMATS.get(name).model_types)
    kind = config.get("model_type")
    raise CheckpointError(f"{folder}: model_type {kind!r} is not supported; dlm loads its own folders and the "
                          f"model types {upstream}" if kind is not None else
                          f"{folder}/config.json has neither 'library': 'dlm' nor a 'model_type'; supported model "
                          f"types: {upstream}")


def load_folder(folder: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                allow_pickle: bool = False) -> tuple[nn.Module, CheckpointConfig, Tokenizer]:
    """A model folder (ours or upstream) -> (network in eval mode, its CheckpointConfig, its tokenizer)."""
    check_folder_files(folder)  # no device, FIFO or huge file behind any name a format or tokenizer reads
    config = read_config(folder)
    return detect(config, folder).load(folder, config, dtype, device, allow_pickle)


__all__ = ["FORMATS", "Format", "CheckpointError", "load_folder", "read_config", "detect"]
