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
from dlm.formats.base import CheckpointError
from dlm.registry import Registry
from dlm.tokenizer import Tokenizer


class Format:
    """How one family of checkpoint folders loads: `matches(config)` and `load(...)`."""

    model_types: tuple[str, ...] = ()

    def matches(self, config: dict[str, Any]) -> bool:
        return str(config.get("model_type", "")).lower() in {m.lower() for m in self.model_types}

    def load(self, folder: Path, config: dict[str, Any], dtype: torch.dtype, device: str | torch.device,
             allow_pickle: bool) -> tuple[nn.Module, CheckpointConfig, Tokenizer]:
        raise NotImplementedError


FORMATS: Registry[type[Format]] = Registry("checkpoint format")


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder} has no config.json; is it a model folder?")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
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
    config = read_config(folder)
    return detect(config, folder).load(folder, config, dtype, device, allow_pickle)


# The formats register themselves (their matches never overlap: ours has no model_type).
from dlm.formats import dream, llada, mdlm, native, sedd  # noqa: E402,F401

__all__ = ["FORMATS", "Format", "CheckpointError", "load_folder", "read_config", "detect"]
