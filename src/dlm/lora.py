"""LoRA fine-tuning of loaded checkpoints through `peft` (Hu et al. 2021): W x + (alpha / r) B A x on chosen linears.

Every checkpoint format loads into our own networks (dlm.formats), so one set of target names serves LLaDA, Dream
and our models: the attention projections q_proj, k_proj, v_proj, o_proj and the SwiGLU gate, up, down. The
adapters are trained by the same Trainer and SFT loss as full fine-tuning (dlm.sft); only their parameters
require gradients, and only they are trainer state. Each checkpoint of the run is written with the adapters
merged (`merged_weights`), so `dlm generate --model RUN` samples the fine-tuned model; at the end the adapter is
saved in peft's format (OUT/adapter) and, with `merge`, the merged model in `dlm export`'s format (OUT/merged).

    net = apply_lora(net, LoRAConfig(r=8)); ...; save_adapter_and_merged(net, cfg, out, ckpt_cfg, tok)
    net = load_adapter("tests/data/hf/llada-tiny", "runs/lora/adapter")   # base + adapter, unmerged
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlm.config import CheckpointConfig, ConfigError, _Config
from dlm.tokenizer import Tokenizer

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "up", "down")  # our networks' linear layers
PEFT_PREFIX = "base_model.model."  # what a PeftModel puts before the network's own parameter names


@dataclass
class LoRAConfig(_Config):
    r: int = 8  # rank of the update B A
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # > 0: dropout noise is not a function of (seed, step), so resuming is no longer exact
    target_modules: list[str] = field(default_factory=lambda: list(TARGETS))  # names of linear layers
    merge: bool = False  # also write OUT/merged: the base with the adapters folded in

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def _peft() -> Any:
    try:
        import peft
    except ImportError as e:
        raise ConfigError("LoRA needs peft: pip install 'dlm[lora]'") from e
    return peft


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """A peft model around `model`: its base weights frozen, a LoRA adapter on each target linear layer."""
    peft = _peft()
    if cfg.r < 1:
        raise ConfigError(f"LoRA rank r must be >= 1, got {cfg.r}")
    lc = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                         target_modules=list(cfg.target_modules), bias="none")
    try:
        return peft.get_peft_model(model, lc)
    except ValueError as e:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"no LoRA target {cfg.target_modules} in this model; its linear layers are {linears}"
                          ) from e


def merge_delta(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """W (out, in) + scale B (out, r) A (r, in), computed in float32 and returned in W's dtype (peft's merge)."""
    return (W.float() + scale * (B.float() @ A.float())).to(W.dtype)


def merged_weights(state: dict[str, torch.Tensor], cfg: LoRAConfig, adapter: str = "default"
                   ) -> dict[str, torch.Tensor]:
    """A peft model's state dict -> the base network's, each adapted weight W + (alpha / r) B A (what peft's
    merge_and_unload computes), so the result loads as the plain model."""
    out = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        name = key.removeprefix(PEFT_PREFIX)
        if ".base_layer." in key:
            module = key.rsplit(".base_layer.", 1)[0]
            if key.endswith(".base_layer.weight"):
                A, B = state[f"{module}.lora_A.{adapter}.weight"], state[f"{module}.lora_B.{adapter}.weight"]
                value = merge_delta(value, A, B, cfg.scale)
            name = name.replace(".base_layer.", ".")
        out[name] = value
    return out


def save_adapter_and_merged(model: nn.Module, cfg: LoRAConfig, out: Path, ckpt_cfg: CheckpointConfig,
                            tok: Tokenizer, is_main: bool = True) -> dict[str, str]:
    """OUT/adapter in peft's format and, with cfg.merge, OUT/merged as a dlm model folder (folds the adapters in:
    `model` is the plain network afterwards)."""
    if not is_main:
        return {}
    from dlm.checkpoint import save_pretrained

    adapter = out / "adapter"
    model.save_pretrained(str(adapter))
    info = {"adapter": str(adapter)}
    if cfg.merge:
        save_pretrained(out / "merged", model.merge_and_unload(), ckpt_cfg, tok)
        info["merged"] = str(out / "merged")
    return info


def finish_fit(trainer: Any, history: list[dict[str, Any]], summary: dict[str, Any], lora: LoRAConfig | None,
               ckpt_cfg: CheckpointConfig, tok: Tokenizer, is_main: bool = True) -> dict[str, Any]:
    """The end of a fit (dlm adapt, dlm sft): the last logged loss into `summary`, the adapters (EMA weights) and
    the merged model with `lora`, and OUT/summary.json on the main rank. Returns `summary`."""
    import json

    out = Path(summary["out"])
    summary["final_loss"] = next((h["loss"] for h in reversed(history) if "loss" in h), None)
    if lora is not None:
        with trainer.ema_weights():
            summary.update(save_adapter_and_merged(trainer.raw, lora, out, ckpt_cfg, tok, is_main))
    if is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_adapter(model: str | Path, adapter: str | Path) -> nn.Module:
    """A model folder (any format) with a saved adapter on top, unmerged, in eval mode."""
    from dlm.checkpoint import load_pretrained

    net, _, _ = load_pretrained(model)
    return _peft().PeftModel.from_pretrained(net, str(adapter)).eval()
