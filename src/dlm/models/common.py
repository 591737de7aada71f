"""Building blocks shared by every network: RMSNorm, rotary embeddings, SDPA attention, SwiGLU, KV caches, and
the attention modes.

Attention modes (`ATTENTION_MODES`, an argument of every network's forward): "full" (bidirectional: LLaDA, MDLM),
"causal" (AR), "block" (block-causal, BD3LM / Fast-dLLM v2 / SDAR: a query in block i = pos // block_size sees
every key of blocks <= i, so attention is causal across blocks and full inside one). A boolean tensor (Lq, Lk)
or (B, Lq, Lk), True = may attend, is taken as it is (BD3LM's x_t + x_0 training mask, dlm.processes.block).
`attention_rule` builds them as boolean SDPA masks; `BlockCache` is the append-only KV cache that is exact under
block-causal attention (earlier blocks never change, so their keys and values are computed once).

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
    """x: (B, H, L, hd); cos, sin: (L, rd). With rd < hd (partial RoPE, LLaDA2) the first rd channels rotate."""
    rd = cos.shape[-1]
    if rd < x.shape[-1]:
        return torch.cat([apply_rotary(x[..., :rd], cos, sin), x[..., rd:]], dim=-1)
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


class BlockCache:
    """Append-only keys and values (B, H_kv, T, hd) of every layer for the complete blocks of a block model.

    Under block-causal attention a finished block never changes and nothing before it attends to what follows,
    so its K/V, computed once, are exactly what a full forward would recompute: the cache is exact (Fast-dLLM
    v2's block cache, SDAR's `store_kv`). A forward with `cache=c` runs its input (B, n) at positions
    [c.length, c.length + n) against the stored K/V and leaves them as they are; with `cache=c.extend()` the
    input's K/V are appended (a finished block, or the prompt's complete blocks).

        cache = BlockCache(); net(prompt, cache=cache.extend(), block_size=bs)     # prefill: T = len(prompt)
        logits = net(block, cache=cache, block_size=bs)                            # (B, bs, V), cache unchanged
        net(block, cache=cache.extend(), block_size=bs)                            # T += bs
    """

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.appending = False
        self.keep: int | None = None
        self.offset = 0  # positions dropped from the front (a sliding window): the cache holds [offset, offset + T)

    @property
    def length(self) -> int:
        """T, the number of cached positions (0 while empty)."""
        return self.keys[0].shape[2] if self.keys else 0

    def extend(self, keep: int | None = None) -> BlockCache:
        """The next forward appends its input's keys and values: all of them, or its first `keep` positions (a
        finished block run together with the next block, whose K/V are not final yet)."""
        self.appending, self.keep = True, keep
        return self

    def drop_front(self, n: int) -> None:
        """Forget the oldest n positions (a sliding window of the context, as BD3LM's sampler keeps); the later
        ones keep their positions, so a block-aligned n leaves block boundaries where they were."""
        self.keys = [k[:, :, n:] for k in self.keys]
        self.values = [v[:, :, n:] for v in self.values]
        self.offset += n

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (B,) bool or (B',) indices: rows that stopped leave the batch."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H_kv, n, hd) of the current input -> the keys and values (B, H_kv, T + n, hd) it attends over."""
        n = k.shape[2]
        if layer < len(self.keys):
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        elif (self.appending and layer != len(self.keys)) or (not self.appending and self.keys):
            raise RuntimeError(f"BlockCache holds {len(self.keys)} layers, not layer {layer}: a forward runs every "
                               "layer in order")  # (an empty cache that is only read holds nothing: fine)
        if self.appending:
            cut = k.shape[2] - n + (n if self.keep is None else self.keep)  # cached + kept positions
            if layer < len(self.keys):
                self.keys[layer], self.values[layer] = k[:, :, :cut], v[:, :, :cut]
            else:
                self.keys.append(k[:, :, :cut])
                self.values.append(v[:, :, :cut])
        return k, v

    def done(self) -> None:
        """Called by the network after a forward: the next one reads again unless extend() is called."""
        self.appending = False


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
        if cfg.qk_norm:  # Qwen3: each head's queries and keys are RMS-normalised before RoPE
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.norm_eps), RMSNorm(hd, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, cache: KVCache | BlockCache | None = None, layer: int = 0,
                causal: bool | None = None) -> torch.Tensor:
        """x (B, n, D); cos, sin (n, hd) of the true positions of x. With a cache the keys span the whole canvas.

        `causal` overrides the module's own mode for this call (used only when attn_mask is None)."""
        B, L, D = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, -1).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, -1).transpose(1, 2)  # (B, H_kv, L, hd)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, -1).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q.float()).to(q.dtype), self.k_norm(k.float()).to(k.dtype)  # in float32, as Qwen3
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H_kv, L_canvas, hd): the cache stores the H_kv heads only
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, H, L, hd)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=(self.causal if causal is None else causal) and attn_mask is None,
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


ATTENTION_MODES = ("full", "causal", "block")


def attention_rule(attention: str | torch.Tensor | None, attention_mask: torch.Tensor | None, L: int,
                   start: int = 0, n: int | None = None, block_size: int | None = None, default: str = "full",
                   device: torch.device | None = None) -> tuple[torch.Tensor | None, bool]:
    """The SDPA mask of one forward -> (mask (B | 1, 1, n, L) bool or None, is_causal).

    attention: a mode of ATTENTION_MODES (None: `default`, or "block" when block_size is given), or a boolean
    (n, L) / (B, n, L) tensor, True = may attend. The queries are the positions [start, start + n) of a
    sequence of L keys (a slice against a cache: the keys before `start` are cached). attention_mask: (B, L)
    padding, 1 = real token (every query ignores the pads). A query that would see no key sees itself, as
    `padding_attn_mask`. None and is_causal=True is SDPA's fast path.
    """
    n = L - start if n is None else n
    if isinstance(attention, torch.Tensor):
        rule = attention.bool()
        if rule.shape[-2:] != (n, L):
            raise ValueError(f"an attention mask must be (n, L) = ({n}, {L}) queries x keys, got {tuple(rule.shape)}")
        rule = rule[:, None] if rule.dim() == 3 else rule[None, None]  # (B | 1, 1, n, L)
    else:
        mode = attention if attention is not None else ("block" if block_size else default)
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)} or a boolean mask, got {mode!r}")
        if mode == "block" and (block_size is None or block_size < 1):
            raise ValueError(f"block-causal attention needs block_size >= 1, got {block_size}")
        if mode == "block" and (L - 1) // block_size <= start // block_size:
            mode = "full"  # every query's block is the last one (one block against a BlockCache): it sees every key
        if mode == "full":  # the padding alone (a slice against a cache sees every key)
            return padding_attn_mask(attention_mask, False, L, start, n), False
        if attention_mask is None and start == 0 and n == L and mode == "causal":
            return None, True
        device = attention_mask.device if attention_mask is not None else (device or torch.device("cpu"))
        q_pos = torch.arange(start, start + n, device=device)[:, None]  # (n, 1)
        k_pos = torch.arange(L, device=device)[None, :]  # (1, L)
        if mode == "causal":
            rule = (k_pos <= q_pos)[None, None]
        else:
            rule = (k_pos // block_size <= q_pos // block_size)[None, None]  # (1, 1, n, L)
    if attention_mask is not None:
        rule = rule.to(attention_mask.device) & attention_mask.bool()[:, None, None, :]
    diag = torch.zeros(n, L, dtype=torch.bool, device=rule.device)
    idx = torch.arange(n, device=rule.device)
    diag[idx, idx + start] = True
    return rule | diag, False


def explicit_attention(attention: str | torch.Tensor | None, attention_mask: torch.Tensor | None, L: int,
                       block_size: int | None, device: torch.device) -> torch.Tensor | None:
    """`attention_rule` for networks that call SDPA without is_causal (DiT, DDiT): causal as an explicit mask."""
    mask, is_causal = attention_rule(attention, attention_mask, L, block_size=block_size, device=device)
    if is_causal:
        mask = torch.ones(L, L, dtype=torch.bool, device=device).tril()[None, None]
    return mask


def init_weights(module: nn.Module, n_layers: int) -> None:
    """GPT-2 / LLaMA init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers)."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue
        std = 0.02 / (2 * n_layers) ** 0.5 if name.endswith(("o_proj.weight", "down.weight")) else 0.02
        nn.init.normal_(p, mean=0.0, std=std)
