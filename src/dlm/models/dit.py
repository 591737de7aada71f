"""DiT backbone for diffusion LMs (Peebles & Xie 2023; as in MDLM / SEDD): time-conditioned transformer.

t (B,) -> sinusoidal embedding -> MLP -> c (B, D); each block modulates its pre-norms with shift, scale and a
gate computed from c (adaLN-Zero: the modulation layer starts at zero, so each block starts as the identity).

    net = DiT(ModelConfig(arch="dit")); logits = net(xt, t)   # (B, L), (B,) -> (B, L, V)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dlm.config import ModelConfig
from dlm.models.common import Attention, RMSNorm, Rotary, SwiGLU, explicit_attention, init_weights


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t: (B,) in [0, 1] -> (B, dim) sinusoidal features of 1000 t (the DDPM / DiT convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (1000.0 * t.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]  # x: (B, L, D); shift, scale: (B, D)


class DiTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, affine=False)
        self.attn = Attention(cfg, causal=False)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.norm_eps, affine=False)
        self.ff = SwiGLU(cfg)
        self.ada = nn.Linear(cfg.d_model, 6 * cfg.d_model)  # adaLN-Zero: zero-initialised in DiT.__init__

    def forward(self, x, c, cos, sin, attn_mask=None):  # x: (B, L, D), c: (B, D)
        s1, g1, a1, s2, g2, a2 = self.ada(c).chunk(6, dim=-1)
        x = x + a1[:, None] * self.attn(modulate(self.attn_norm(x), s1, g1), cos, sin, attn_mask)
        return x + a2[:, None] * self.ff(modulate(self.ff_norm(x), s2, g2))


class DiT(nn.Module):
    causal = False
    needs_time = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.time_dim, cfg.d_model), nn.SiLU(), nn.Linear(cfg.d_model, cfg.d_model)
        )
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.norm_eps, affine=False)
        self.final_ada = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.n_layers)
        for block in self.blocks:
            nn.init.zeros_(block.ada.weight)
            nn.init.zeros_(block.ada.bias)
        nn.init.zeros_(self.final_ada.weight)
        nn.init.zeros_(self.final_ada.bias)

    def forward(self, xt: torch.Tensor, t: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, attention: str | torch.Tensor | None = None,
                block_size: int | None = None) -> torch.Tensor:
        """xt: (B, L), t: (B,) in [0, 1] (required) -> logits (B, L, V). `attention` / `block_size`: the
        attention mode (full by default; models/common.py `attention_rule`)."""
        if t is None:
            raise ValueError("DiT needs the diffusion time t (B,); samplers pass the current t")
        B, L = xt.shape
        t = t.expand(B) if t.dim() == 0 or t.shape[0] == 1 else t
        c = self.time_mlp(timestep_embedding(t, self.cfg.time_dim).to(self.wte.weight.dtype))  # (B, D)
        c = nn.functional.silu(c)
        cos, sin = self.rotary.cos_sin(L, xt.device)
        mask = explicit_attention(attention, attention_mask, L, block_size, xt.device)
        x = self.wte(xt)
        for block in self.blocks:
            x = block(x, c, cos, sin, mask)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.lm_head(modulate(self.ln_f(x), shift, scale))
