"""Our own folders: `config.json` (CheckpointConfig, `format_version`), `model.safetensors`, `tokenizer.json`,
and `generation_config.json` (the sampling defaults; older folders keep them in config.json).

Version 1 folders fused q/k/v into one `attn.qkv` matrix and gate/up into `ff.gate_up`; they are split on load.

    model, cfg, tok = NativeFormat().load(folder, read_config(folder), torch.float32, "cpu", False)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dlm.config import CheckpointConfig, ConfigError, GenerationConfig
from dlm.formats.base import FORMATS, CheckpointError, Format, load_weights
from dlm.io import read_text_file
from dlm.tokenizer import HFTokenizer, Tokenizer, missing_tokenizer

GENERATION_CONFIG = "generation_config.json"


def upgrade_v1(cfg: CheckpointConfig):
    """Convert for format_version 1: split the fused projections into ours."""
    m = cfg.model

    def convert(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if key.endswith("attn.qkv.weight"):
            q, k, v = tensor.split([m.d_model, m.kv_heads * m.head_dim, m.kv_heads * m.head_dim])
            base = key.removesuffix("qkv.weight")
            return [(base + "q_proj.weight", q), (base + "k_proj.weight", k), (base + "v_proj.weight", v)]
        if key.endswith("attn.proj.weight"):
            return [(key.removesuffix("proj.weight") + "o_proj.weight", tensor)]
        if key.endswith("ff.gate_up.weight"):
            gate, up = tensor.chunk(2)
            base = key.removesuffix("gate_up.weight")
            return [(base + "gate.weight", gate), (base + "up.weight", up)]
        return [(key, tensor)]

    return convert


def load_tokenizer(folder: Path, cfg: CheckpointConfig) -> Tokenizer:
    path = folder / "tokenizer.json"
    ids = cfg.extra.get("tokenizer", {})
    if not path.exists() and "mask_id" in ids:  # the special ids are recorded: load for token-id calls
        return missing_tokenizer(folder, vocab_size=cfg.model.vocab_size, mask_id=ids["mask_id"],
                                 eos_id=ids["eos_id"], pad_id=ids.get("pad_id"), bos_id=ids.get("bos_id"),
                                 stop_ids=ids.get("stop_ids", ()))
    if not path.exists():
        raise CheckpointError(f"{folder} has no tokenizer.json and its config records no special ids; copy the "
                              "tokenizer.json of the run that trained it into the folder")
    try:
        is_dlm = "dlm_tokenizer" in json.loads(read_text_file(path, error=CheckpointError))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read tokenizer {path}: {e}") from e
    if is_dlm:
        return Tokenizer.load(path)
    # An exported upstream model keeps its Hugging Face tokenizer files; the special ids are in config.extra.
    from transformers import AutoTokenizer

    ids = cfg.extra.get("tokenizer", {})
    hf = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    return HFTokenizer(hf, mask_id=ids["mask_id"], eos_id=ids["eos_id"], pad_id=ids.get("pad_id"),
                       bos_id=ids.get("bos_id"), stop_ids=ids.get("stop_ids", ()), vocab_size=cfg.model.vocab_size)


@FORMATS.register("dlm")
class NativeFormat(Format):
    def matches(self, config: dict[str, Any]) -> bool:
        return config.get("library") == "dlm" or ("format_version" in config and "model_type" not in config)

    def load(self, folder, config, dtype, device, allow_pickle):
        from dlm.models import build_model

        try:
            cfg = CheckpointConfig.from_dict(config)
            if (folder / GENERATION_CONFIG).exists():
                cfg.sampling = GenerationConfig.load_json(folder / GENERATION_CONFIG)
        except ConfigError as e:
            raise CheckpointError(f"{folder}: {e}") from e
        tok = load_tokenizer(folder, cfg)
        if tok.vocab_size > cfg.model.vocab_size:
            raise CheckpointError(f"tokenizer has {tok.vocab_size} ids but the model only {cfg.model.vocab_size}")
        convert = upgrade_v1(cfg) if cfg.format_version < 2 else (lambda k, t: [(k, t)])
        model = load_weights(folder, cfg.model, build_model, convert, dtype, device, allow_pickle)
        return model, cfg, tok
