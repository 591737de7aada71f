"""LLaDA-style transformer: pre-norm blocks (RMSNorm, RoPE attention, SwiGLU), no time input, untied head.

Bidirectional by default (the mask predictor of LLaDA, Nie et al. 2025); `causal=True` gives the AR baseline
with the very same blocks (models/ar.py). The network maps tokens to logits and nothing else.

    net = Transformer(ModelConfig(vocab_size=260)); logits = net(xt)   # (B, L) -> (B, L, V)
"""

from __future__ import annotations

import torch
from torch import nn

from dlm.config import ModelConfig
from dlm.models.common import Attention, RMSNorm, Rotary, SwiGLU, init_weights, padding_attn_mask


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, causal: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, causal)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ff = SwiGLU(cfg)

    def forward(self, x, cos, sin, attn_mask=None):  # x: (B, L, D)
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask)
        return x + self.ff(self.ff_norm(x))


class Transformer(nn.Module):
    causal = False
    needs_time = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rotary = Rotary(cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg, self.causal) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.n_layers)

    def forward(self, xt: torch.Tensor, t: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """xt: (B, L) token ids; t is ignored (the mask count carries the time); -> logits (B, L, V)."""
        B, L = xt.shape
        cos, sin = self.rotary.cos_sin(L, xt.device)
        mask = padding_attn_mask(attention_mask, self.causal, L)
        x = self.wte(xt)  # (B, L, D)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.lm_head(self.ln_f(x))  # (B, L, V)
