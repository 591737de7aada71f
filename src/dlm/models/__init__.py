"""Networks, each only tokens (B, L) [+ t (B,)] -> logits (B, L, V), registered by `ModelConfig.arch`.

    net = build_model(ModelConfig.preset("small", arch="dit"))
"""

from __future__ import annotations

from torch import nn

from dlm.config import ModelConfig
from dlm.models.ar import CausalTransformer
from dlm.models.ddit import DDiT
from dlm.models.dit import DiT
from dlm.models.transformer import Transformer
from dlm.registry import Registry

MODELS: Registry[type[nn.Module]] = Registry("model architecture")
MODELS.register("llada")(Transformer)
MODELS.register("ar")(CausalTransformer)
MODELS.register("dit")(DiT)
MODELS.register("ddit")(DDiT)


def build_model(cfg: ModelConfig) -> nn.Module:
    return MODELS.build(cfg.arch, cfg)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "build_model", "count_params", "Transformer", "CausalTransformer", "DiT"]
