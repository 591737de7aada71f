"""The transformer of LLaDA, Dream, the AR baseline and the block models: pre-norm blocks (RMSNorm, RoPE attention,
SwiGLU), no time input, untied head (LLaMA / Qwen2 / Qwen3 layouts load onto it: dlm.formats). With
`ModelConfig.moe_experts` the feed-forward of the later layers is a mixture of experts (models/moe.py, LLaDA2).

Bidirectional by default (the mask predictor of LLaDA, Nie et al. 2025); `causal=True` gives the AR baseline
with the very same blocks (models/ar.py). The network maps tokens to logits and nothing else.

An optional `KVCache` (models/common.py) lets a forward recompute only a slice of the canvas against the stored
keys and values of the rest (Fast-dLLM's prefix and dual caches; the loop is dlm.sampling.cache).

The attention mode is an argument of the forward (models/common.py `attention_rule`): the class's own (full, or
causal for the AR baseline) by default, `block_size=bs` for block-causal attention (any checkpoint: BD3LM,
Fast-dLLM v2, SDAR run this way), or a boolean mask with `positions` for inputs that are not one sequence
(BD3LM's x_t + x_0 training pass, dlm.processes.block). A `BlockCache` holds the finished blocks exactly.

    net = Transformer(ModelConfig(vocab_size=260)); logits = net(xt)   # (B, L) -> (B, L, V)
    cache = KVCache(); net(xt, cache=cache); net(xt[:, a:b], cache=cache.window(a))   # -> (B, b - a, V)
    net(xt, block_size=8)                                                 # block-causal, blocks of 8
"""

from __future__ import annotations

import torch
from torch import nn

from dlm.config import ModelConfig
from dlm.models.common import (
    Attention,
    BlockCache,
    KVCache,
    RMSNorm,
    Rotary,
    SwiGLU,
    attention_rule,
    init_weights,
)
from dlm.models.moe import MoE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, causal: bool, layer: int = 0) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, causal)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # LLaDA2: a mixture of experts after the first moe_dense_layers dense layers (models/moe.py)
        self.ff = MoE(cfg) if cfg.moe_experts and layer >= cfg.moe_dense_layers else SwiGLU(cfg)

    def forward(self, x, cos, sin, attn_mask=None, cache=None, layer=0, causal=None):  # x: (B, L, D)
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, cache, layer, causal)
        return x + self.ff(self.ff_norm(x))


class Transformer(nn.Module):
    causal = False
    needs_time = False
    supports_kv_cache = True
    supports_logits_window = True
    supports_attention_modes = True  # forward takes attention= / block_size= / positions= (and a BlockCache)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rotary = Rotary(cfg.rope_dim, cfg.rope_theta)  # rope_dim < head_dim: partial RoPE (LLaDA2)
        self.blocks = nn.ModuleList(Block(cfg, self.causal, i) for i in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.n_layers)

    def forward(self, xt: torch.Tensor, t: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | BlockCache | None = None,
                logits_window: tuple[int, int] | None = None, attention: str | torch.Tensor | None = None,
                block_size: int | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """xt: (B, L) token ids; t is ignored (the mask count carries the time); -> logits (B, L, V).

        With `logits_window=(a, b)` only positions [a, b) go through the final norm and the head -> (B, b - a, V):
        a sampler that can commit only there skips the rest of the (B, L, V) head (large with a big vocabulary).

        With `cfg.logits_shift` (Dream) the logits are already moved one place right, as samplers expect them.

        With a filled `cache` windowed at `start`, xt (B, n) is the slice [start, start + n) of the cached canvas
        and `attention_mask` (if any) still covers the whole canvas (B, L); -> logits of the slice (B, n, V).
        A shifted model's slice row 0 then holds no prediction for position `start` (its predictor, start - 1,
        is outside the slice): to predict [a, b), run the slice [a - cache_lookback, b) and drop its first
        `cache_lookback` rows.

        `attention`: "full", "causal" or "block" (default: the class's mode, or "block" when `block_size` is
        given), or a boolean mask (n, L) / (B, n, L) of the input's queries x keys, True = may attend.
        `positions` (n,): the RoPE position of each input token (default: its index, after the cache). With a
        `BlockCache` of T positions, xt (B, n) sits at [T, T + n) and `attention_mask` (B, T + n) covers both.
        """
        B, n = xt.shape
        if isinstance(cache, BlockCache):
            start = cache.length
            L = start + n
            if positions is None and cache.offset:  # a sliding window: true positions run on past the cache
                positions = torch.arange(cache.offset + start, cache.offset + L, device=xt.device)
        else:
            start = 0 if cache is None or cache.start is None else cache.start
            L = n if cache is None or cache.start is None else self._check_slice(cache, B, start, n)
        if positions is None:
            cos, sin = self.rotary.cos_sin(L, xt.device)
            cos, sin = cos[start:start + n], sin[start:start + n]  # the slice's true positions
        else:
            cos, sin = self.rotary.cos_sin(int(positions.max()) + 1, xt.device)
            cos, sin = cos[positions], sin[positions]  # (n, hd)
        mask, is_causal = attention_rule(attention, attention_mask, L, start, n, block_size,
                                         default="causal" if self.causal else "full", device=xt.device)
        x = self.wte(xt)  # (B, n, D)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, cache, i, is_causal)
        if isinstance(cache, BlockCache):
            cache.done()
        if self.cfg.logits_shift:  # Dream: the state at i - 1 predicts token i; position 0 keeps its own
            x = torch.cat([x[:, :1], x[:, :-1]], dim=1)
        if logits_window is not None:
            x = x[:, logits_window[0]:logits_window[1]]
        return self.lm_head(self.ln_f(x))  # (B, n, V)

    @property
    def cache_lookback(self) -> int:
        """A shifted model's position i is predicted by the hidden state of i - 1: a cached slice that must predict
        its first position starts this many places earlier (read by sampling.cache.CachedForward)."""
        return 1 if self.cfg.logits_shift else 0

    @staticmethod
    def _check_slice(cache: KVCache, B: int, start: int, n: int) -> int:
        L = cache.length
        if L == 0:
            raise ValueError("the KV cache is empty: run a forward on the whole canvas with it first")
        if start < 0 or start + n > L:
            raise ValueError(f"slice [{start}, {start + n}) does not fit the cached canvas of length {L}")
        if cache.keys[0].shape[0] != B:
            raise ValueError(f"the cache holds a batch of {cache.keys[0].shape[0]} rows, the input has {B}")
        return L
