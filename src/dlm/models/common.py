"""Building blocks shared by every network: RMSNorm, rotary embeddings, SDPA attention, SwiGLU, a KV cache.

Shapes: B batch, L length, D width, H heads, hd = D / H; n the length of a slice [start, start + n) of a canvas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlm.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Rotary(nn.Module):
    """RoPE (Su et al.), rotate-half convention as in LLaMA / LLaDA; cos/sin cached and grown on demand."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self, L: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] < L or self._cache[1] != device:
            pos = torch.arange(max(L, 256), device=device, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq.to(device))  # (L, hd/2)
            emb = torch.cat([freqs, freqs], dim=-1)  # (L, hd)
            self._cache = (emb.shape[0], device, emb.cos(), emb.sin())
        _, _, cos, sin = self._cache
        return cos[:L], sin[:L]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, L, hd); cos, sin: (L, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)  # in float32, as LLaDA


class KVCache:
    """Keys and values (B, H, L, hd) of every attention layer for one canvas, after RoPE (Fast-dLLM's KV cache).

    Filling: while `start` is None (new, or after `refill()`), a forward on the whole canvas (B, L) stores the K, V
    of each layer. Reusing: after `window(start)`, a forward on a slice xt[:, start:start + n] attends over the
    stored K/V of every other position and the fresh K/V of the slice, spliced in at [start, start + n). The
    stored K/V stay as they were when the cache was filled (Fast-dLLM's dual cache writes the slice back in
    place; that changes nothing, the slice is recomputed at every use, and out of place autograd still works).

        cache = KVCache(); logits = net(x, cache=cache)                     # (B, L, V), fills the cache
        logits = net(x[:, lo:hi], cache=cache.window(lo))                   # (B, hi - lo, V)
    """

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.start: int | None = None

    @property
    def length(self) -> int:
        """L, the length of the cached canvas (0 while empty)."""
        return self.keys[0].shape[2] if self.keys else 0

    def window(self, start: int) -> KVCache:
        """The next forwards run on a slice that begins at canvas position `start`."""
        self.start = start
        return self

    def refill(self) -> KVCache:
        """The next forward runs on the whole canvas and replaces what is stored."""
        self.keys, self.values, self.start = [], [], None
        return self

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H, n, hd) of the current input -> the keys and values its queries attend over."""
        if self.start is None:
            if layer == 0:
                self.keys, self.values = [], []
            if layer != len(self.keys):
                raise RuntimeError(f"KVCache filled out of order: layer {layer} after {len(self.keys)} layers")
            self.keys.append(k)
            self.values.append(v)
            return k, v
        a, b = self.start, self.start + k.shape[2]
        ck, cv = self.keys[layer], self.values[layer]
        return (torch.cat([ck[:, :, :a], k, ck[:, :, b:]], dim=2),
                torch.cat([cv[:, :, :a], v, cv[:, :, b:]], dim=2))  # (B, H, L, hd)


class Attention(nn.Module):
    """Multi-head (or grouped-query, H_kv < H) attention with RoPE; projection names as in LLaMA / Qwen2."""

    def __init__(self, cfg: ModelConfig, causal: bool) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.causal = causal
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x (B, n, D); cos, sin (n, hd) of the true positions of x. With a cache the keys span the whole canvas."""
        B, L, D = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, -1).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, -1).transpose(1, 2)  # (B, H_kv, L, hd)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, -1).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H_kv, L_canvas, hd): the cache stores the H_kv heads only
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, H, L, hd)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=self.causal and attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, L, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.ff_width, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.ff_width, bias=False)
        self.down = nn.Linear(cfg.ff_width, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def padding_attn_mask(attention_mask: torch.Tensor | None, causal: bool, L: int, start: int = 0,
                      n: int | None = None) -> torch.Tensor | None:
    """attention_mask (B, L) with 1 = real token -> SDPA boolean mask (B, 1, n, L), True = may attend.

    The rows are the queries at positions [start, start + n) (default: all L); the columns every key.
    """
    if attention_mask is None:
        return None
    n = L - start if n is None else n
    device = attention_mask.device
    q_pos = torch.arange(start, start + n, device=device)[:, None]  # (n, 1)
    k_pos = torch.arange(L, device=device)[None, :]  # (1, L)
    mask = attention_mask.bool()[:, None, None, :].expand(-1, 1, n, L)
    if causal:
        mask = mask & (k_pos <= q_pos)
    # A padded query row that sees no key would give NaN: let it see itself.
    return mask | (k_pos == q_pos)


def init_weights(module: nn.Module, n_layers: int) -> None:
    """GPT-2 / LLaMA init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers)."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue
        std = 0.02 / (2 * n_layers) ** 0.5 if name.endswith(("o_proj.weight", "down.weight")) else 0.02
        nn.init.normal_(p, mean=0.0, std=std)
