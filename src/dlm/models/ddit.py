"""DDiT, the diffusion transformer of MDLM and SEDD: tokens (B, L) + time t (B,) -> logits (B, L, V).

MDLM (Sahoo et al. 2024; kuleshov-group/mdlm `models/dit.py`, the hub's `modeling_mdlm.py`) and SEDD (Lou et al.
2024; louaaron/Score-Entropy-Discrete-Diffusion `model/transformer.py`) publish the same network:

    c = silu(MLP(sinusoid(sigma)))                              (B, cond_dim)  the noise level, for adaLN
    x = vocab_embed[xt]                                         (B, L, D)
    block: x += gate_msa * attn_out(attn(rope(qkv(LN(x) * (1 + scale_msa) + shift_msa))))
           x += gate_mlp * mlp(LN(x) * (1 + scale_mlp) + shift_mlp)       LayerNorm without bias, in float32;
                                                                          fused qkv, RoPE (rotate-half) on q, k;
                                                                          bidirectional; GELU(tanh) MLP of 4 D
    logits = linear(LN(x) * (1 + scale) + shift)                (B, L, V)  `output_layer`, with a bias

Parameter names are the upstream ones (SEDD's exactly, MDLM's under `backbone.`), so loading is a rename at most.

Time: our samplers and losses pass the diffusion time t. Both repos condition the network on the total noise of
their log-linear schedule, so `sigma(t) = -log(1 - (1 - eps) t)` is computed here (`cfg.sigma_eps`, 1e-3 in both),
or sigma = 0 when `cfg.time_conditioning` is false: MDLM's released OWT model was trained that way
(`diffusion.py: _process_sigma`). A caller that works in sigma (SEDD's samplers) passes `sigma=` instead of t.

The output is the backbone's logits. MDLM's SUBS and SEDD's log-score are parameterisations of them and stay
outside the network: `subs_log_probs` and `sedd_log_score` below reproduce `diffusion.py: _subs_parameterization`
and the tail of `SEDD.forward` (`scale_by_sigma`, then 0 at the input token). Our samplers set the [MASK] logit
to -inf themselves and only commit masked positions, which is SUBS.

    net = DDiT(ModelConfig(arch="ddit", vocab_size=50258, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                           time_dim=256, cond_dim=128))
    logits = net(xt, t)   # (B, L), (B,) -> (B, L, V)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dlm.config import ModelConfig
from dlm.models.common import Rotary, apply_rotary, explicit_attention


def sigma_embedding(sigma: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """sigma (B,) -> (B, dim) sinusoidal features [cos, sin] of sigma itself (no 1000x, unlike `dit.py`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = sigma[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift  # x: (B, L, D); shift, scale: (B, 1, D)


class LayerNorm(nn.Module):
    """LayerNorm without bias; statistics in float32 as upstream, the result in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps) * self.weight.float()).to(x.dtype)


class EmbeddingLayer(nn.Module):
    """The token table as one parameter named `embedding` (V, D), the upstream name."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.embedding)


class SigmaEmbedder(nn.Module):
    """`sigma_map`: sinusoid of width `time_dim` (256 upstream) -> Linear -> SiLU -> Linear, to cond_dim."""

    def __init__(self, freq_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.mlp(sigma_embedding(sigma, self.freq_dim).to(self.mlp[0].weight.dtype))  # (B, cond_dim)


class DDiTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, d_ff = cfg.d_model, cfg.d_ff if cfg.d_ff is not None else 4 * cfg.d_model
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.norm1 = LayerNorm(D, cfg.norm_eps)
        self.attn_qkv = nn.Linear(D, 3 * D, bias=False)
        self.attn_out = nn.Linear(D, D, bias=False)
        self.norm2 = LayerNorm(D, cfg.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(D, d_ff), nn.GELU(approximate="tanh"), nn.Linear(d_ff, D))
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 6 * D)  # adaLN-Zero: zero-initialised in DDiT.__init__

    def forward(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D), c (B, cond_dim), cos / sin (L, hd) -> (B, L, D)."""
        B, L, D = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c)[:, None].chunk(6, dim=-1))  # (B, 1, D) each, in this order upstream
        qkv = self.attn_qkv(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, L, 3 D): (three h d) upstream
        q, k, v = qkv.view(B, L, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, L, hd) each
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, L, hd); scale 1/sqrt(hd)
        y = self.attn_out(y.transpose(1, 2).reshape(B, L, D))
        x = x + gate_msa * F.dropout(y, self.dropout, self.training)
        y = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * F.dropout(y, self.dropout, self.training)


class FinalLayer(nn.Module):
    """`output_layer`: a modulated LayerNorm and Linear(D, V) with a bias (both zero-initialised upstream)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm_final = LayerNorm(cfg.d_model, cfg.norm_eps)
        self.linear = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.d_model)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, L, V)


class DDiT(nn.Module):
    causal = False
    needs_time = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_embed = EmbeddingLayer(cfg.vocab_size, cfg.d_model)
        self.sigma_map = SigmaEmbedder(cfg.time_dim, cfg.cond_dim)
        self.rotary_emb = Rotary(cfg.head_dim, cfg.rope_theta)  # upstream's cached table (base 10000), recomputed
        self.blocks = nn.ModuleList(DDiTBlock(cfg) for _ in range(cfg.n_layers))
        self.output_layer = FinalLayer(cfg)
        for lin in [*(b.adaLN_modulation for b in self.blocks), self.output_layer.adaLN_modulation,
                    self.output_layer.linear]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """t (B,) -> the noise level (B,) the network is conditioned on: -log(1 - (1 - eps) t), or 0."""
        if not self.cfg.time_conditioning:
            return torch.zeros_like(t, dtype=torch.float32)
        return -torch.log1p(-(1 - self.cfg.sigma_eps) * t.float())

    def forward(self, xt: torch.Tensor, t: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                sigma: torch.Tensor | None = None, attention: str | torch.Tensor | None = None,
                block_size: int | None = None) -> torch.Tensor:
        """xt (B, L), t (B,) in [0, 1] (or sigma (B,) directly) -> logits (B, L, V). `attention` / `block_size`:
        the attention mode (bidirectional by default; models/common.py `attention_rule`)."""
        B, L = xt.shape
        if sigma is None:
            if t is None and self.cfg.time_conditioning:
                raise ValueError("DDiT needs the diffusion time t (B,) (or sigma=); samplers pass the current t")
            sigma = self.sigma(t if t is not None else torch.zeros(B, device=xt.device))
        elif not self.cfg.time_conditioning:
            sigma = torch.zeros_like(sigma, dtype=torch.float32)  # as upstream's `_process_sigma`
        sigma = sigma.expand(B) if sigma.dim() == 0 or sigma.shape[0] == 1 else sigma
        c = F.silu(self.sigma_map(sigma))  # (B, cond_dim)
        cos, sin = self.rotary_emb.cos_sin(L, xt.device)
        mask = explicit_attention(attention, attention_mask, L, block_size, xt.device)
        x = self.vocab_embed(xt)
        for block in self.blocks:
            x = block(x, c, cos, sin, mask)
        return self.output_layer(x, c)


def subs_log_probs(logits: torch.Tensor, xt: torch.Tensor, mask_id: int) -> torch.Tensor:
    """MDLM's SUBS parameterisation: logits (B, L, V), xt (B, L) -> log p(x0 | xt) (B, L, V) in float32.

    [MASK] gets probability 0 (upstream adds -1e6, here -inf), the rest is a log-softmax, and an unmasked
    position keeps its token with probability 1 (0 at xt, -inf elsewhere): `diffusion.py: _subs_parameterization`.
    """
    logits = logits.float().clone()
    logits[..., mask_id] = -torch.inf
    log_probs = logits.log_softmax(-1)
    carry = torch.full_like(log_probs, -torch.inf).scatter_(-1, xt[..., None], 0.0)
    return torch.where((xt != mask_id)[..., None], carry, log_probs)


def sedd_log_score(logits: torch.Tensor, xt: torch.Tensor, sigma: torch.Tensor,
                   scale_by_sigma: bool = True) -> torch.Tensor:
    """SEDD's absorbing-graph output: logits (B, L, V), xt (B, L), sigma (B,) -> log score (B, L, V).

    With `scale_by_sigma` the logits are shifted by -log(e^sigma - 1) - log(V - 1) (so the score of a masked
    position is about p(x0) / (e^sigma - 1)), then the entry of the input token is set to 0 (`SEDD.forward`).
    """
    if scale_by_sigma:
        esigm1 = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1)  # expm1 where it is accurate
        logits = logits - esigm1.log().to(logits.dtype)[:, None, None] - math.log(logits.shape[-1] - 1)
    return torch.scatter(logits, -1, xt[..., None], torch.zeros_like(logits[..., :1]))
