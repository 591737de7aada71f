"""The mixture-of-experts feed-forward of LLaDA2.x (inclusionAI; Ling 2.0's MoE): a sigmoid router with a bias
that only steers the choice, group-limited top-k routing, SwiGLU experts and a shared expert on every token.

For each token x (D,), with E experts in G groups:

- scores s = sigmoid(W_r x) (E,), in float32; the choice uses s + b, b = `expert_bias` (a per-expert offset the
  upstream training moves to balance the load: it picks experts, it never weights them);
- group-limited routing (DeepSeek-V3's): each group is scored by the sum of its two best biased scores, the
  `moe_topk_groups` best groups are eligible, and the `moe_top_k` best eligible experts are chosen;
- weights: the chosen experts' unbiased scores, normalised to sum 1 when more than one is chosen, times
  `moe_scale` (routed_scaling_factor); the weighted sum of their outputs is taken in float32;
- plus the shared expert (a SwiGLU of width moe_shared * moe_d_ff) on every token.

`MoE` is a drop-in for `SwiGLU` in models/transformer.py's blocks (ModelConfig.moe_experts > 0, from layer
`moe_dense_layers` on). Each expert runs once per forward on the tokens routed to it.

    ff = MoE(ModelConfig(d_model=32, moe_experts=8, moe_top_k=2, moe_d_ff=16, moe_groups=4, moe_topk_groups=2))
    y = ff(x)   # (B, L, D) -> (B, L, D)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlm.config import ModelConfig


class Expert(nn.Module):
    """One SwiGLU of width `width` (the names of models/common.SwiGLU: gate, up, down)."""

    def __init__(self, d_model: int, width: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, width, bias=False)
        self.up = nn.Linear(d_model, width, bias=False)
        self.down = nn.Linear(width, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Router(nn.Module):
    """The router's weight (E, D), applied in float32. Not an nn.Linear, so that int8 quantization
    (dlm.quantize) leaves it exact: the routing is a top-k choice, which rounding would change."""

    def __init__(self, d_model: int, n_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, E) float32
        return F.linear(x.float(), self.weight.float())


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.moe_experts and cfg.moe_d_ff, "MoE needs ModelConfig.moe_experts and moe_d_ff"
        self.n_experts, self.top_k, self.scale = cfg.moe_experts, cfg.moe_top_k, cfg.moe_scale
        self.groups, self.topk_groups = cfg.moe_groups, cfg.moe_topk_groups
        self.router = Router(cfg.d_model, cfg.moe_experts)
        # A parameter (so that checkpoints carry it) that no gradient reaches: it only enters the top-k choice.
        self.expert_bias = nn.Parameter(torch.zeros(cfg.moe_experts), requires_grad=False)
        self.experts = nn.ModuleList(Expert(cfg.d_model, cfg.moe_d_ff) for _ in range(cfg.moe_experts))
        self.shared = Expert(cfg.d_model, cfg.moe_shared * cfg.moe_d_ff) if cfg.moe_shared else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> the chosen experts (N, k) and their weights (N, k), float32."""
        N = x.shape[0]
        s = torch.sigmoid(self.router(x))  # (N, E)
        biased = s + self.expert_bias.detach().float()
        group_score = biased.view(N, self.groups, -1).topk(2, dim=-1).values.sum(-1)  # (N, G)
        best = group_score.topk(self.topk_groups, dim=-1).indices  # (N, G')
        eligible = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
        eligible = eligible.repeat_interleave(self.n_experts // self.groups, dim=1)  # (N, E)
        idx = biased.masked_fill(~eligible, -torch.inf).topk(self.top_k, dim=-1).indices  # (N, k)
        w = s.gather(1, idx)
        if self.top_k > 1:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, L, D)
        flat = x.reshape(-1, x.shape[-1])  # (N, D)
        idx, w = self.route(flat)  # (N, k)
        picked = flat.new_empty(*idx.shape, flat.shape[-1])  # (N, k, D): each token's experts' outputs
        for e in idx.unique().tolist():
            rows, slot = (idx == e).nonzero(as_tuple=True)
            picked[rows, slot] = self.experts[e](flat[rows])
        # summed over k in float32 in the router's order, as upstream (deterministic on every device)
        y = (picked.float() * w[..., None]).sum(1).to(x.dtype).view_as(x)
        return y if self.shared is None else y + self.shared(x)
