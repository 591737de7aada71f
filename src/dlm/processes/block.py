"""Block diffusion (BD3LM: Arriola et al. 2025, "Block Diffusion", kuleshov-group/bd3lms `diffusion.py`,
`models/dit.py: block_diff_mask`): autoregressive over blocks, masked diffusion inside each block.

A sequence x (L,) is cut into blocks of `block_size` tokens, b = position // block_size (the last may be shorter).
Each block draws its own time t_b and is masked as the masked process masks a sequence: token i becomes [MASK]
with probability move_chance(t_b). The network predicts block b from its noisy tokens x_t^b and the clean blocks
x^{<b}; the negative ELBO is the sum over blocks of the masked ELBO of each block given the clean past,

    -log p(x) <= sum_b E_t [ w(t_b) sum_{i in b, masked} -log p(x_i | x_t^b, x^{<b}) ],   w = -alpha' / (1 - alpha)

(1 / t for MDLM's log-linear schedule). Block size 1 is autoregressive: with t = 1 every block is masked and the
bound is the exact NLL of p(x_b | x^{<b}); block size L is MDLM.

The vectorised training pass runs x_t and x_0 side by side, 2L tokens in one forward, both halves at the
positions 0..L-1, under `block_diffusion_mask`: a noisy query of block b sees the noisy keys of block b (block
diagonal) and the clean keys of blocks < b (offset block-causal); a clean query of block b sees the clean keys of
blocks <= b (block-causal). Only the noisy half's logits are scored. It equals a loop over blocks that runs
[x_0^{<b}, x_t^b] under block-causal attention and keeps block b (tests/test_block_process.py).

The clipped schedule: training draws t_b ~ U[clip_min, clip_max] (BD3LM's sampling_eps_min / max) with the same
weight w(t), which lowers the variance of the gradient at the price of a biased objective; held-out bounds are
always unclipped. BD3LM chooses the interval by the variance of the per-block loss on held-out batches
(`_clipped_schedule_search` over widths 0.5-0.9 in steps of 0.05); `search_clip` does that search.

    proc = BlockProcess(mask_id, LogLinear(eps=0.0), block_size=16)
    xt, is_masked = proc.q_sample(x0, t)                       # t (B, n_blocks) -> xt (B, L)
    logits = block_logits(net, xt, x0, block_size=16)          # (B, L, V): one forward over 2L tokens
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dlm.processes.masked import PROCESSES, ForwardProcess, absorb
from dlm.schedules import SCHEDULES, NoiseSchedule

if TYPE_CHECKING:
    from dlm.config import ProcessConfig


def n_blocks(L: int, block_size: int) -> int:
    return -(-L // block_size)


def per_position(values: torch.Tensor, L: int, block_size: int) -> torch.Tensor:
    """(B, n_blocks) one value per block -> (B, L), each block's value at its positions."""
    return values.repeat_interleave(block_size, dim=1)[:, :L]


def check_clip(lo: float, hi: float) -> None:
    """BD3LM's clipped interval [lo, hi] of block times: 0 <= lo <= hi <= 1 and hi > 0, else ValueError."""
    if not 0.0 <= lo <= hi <= 1.0 or hi == 0.0:
        raise ValueError(f"the clipped schedule needs 0 <= clip_min <= clip_max <= 1 and clip_max > 0, got "
                         f"[{lo}, {hi}]")


def block_diffusion_mask(L: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The (2L, 2L) boolean mask of the x_t + x_0 pass, True = may attend (queries x keys); rows and columns
    [0, L) are x_t, [L, 2L) are x_0."""
    idx = torch.arange(2 * L, device=device)
    clean = idx >= L
    block = (idx % L) // block_size
    q_clean, k_clean = clean[:, None], clean[None, :]
    q_block, k_block = block[:, None], block[None, :]
    diagonal = (q_block == k_block) & (q_clean == k_clean)  # a noisy block sees itself; a clean block itself
    offset_causal = ~q_clean & k_clean & (k_block < q_block)  # a noisy block sees the clean past
    block_causal = q_clean & k_clean & (k_block <= q_block)  # a clean block sees the clean past and itself
    return diagonal | offset_causal | block_causal


def block_logits(model: torch.nn.Module, xt: torch.Tensor, x0: torch.Tensor, block_size: int,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """xt, x0 (B, L) -> logits (B, L, V) of the noisy tokens, each block seeing itself and the clean blocks before
    it: one forward over x_t + x_0 (2L tokens). attention_mask (B, L): 1 = real token (in both halves)."""
    if not getattr(model, "supports_attention_modes", False):
        raise ValueError(f"{type(model).__name__} takes no attention mask and positions: block diffusion trains a "
                         "network that does (arch 'llada')")
    B, L = x0.shape
    pos = torch.arange(L, device=x0.device)
    am = torch.cat([attention_mask, attention_mask], 1) if attention_mask is not None else None
    return model(torch.cat([xt, x0], 1), None, attention_mask=am, logits_window=(0, L),
                 attention=block_diffusion_mask(L, block_size, x0.device), positions=torch.cat([pos, pos]))


@PROCESSES.register("bd3lm")
class BlockProcess(ForwardProcess):
    """Masked diffusion inside blocks of `block_size`, one time per block; the network conditions on clean blocks."""

    losses = ("bd3lm",)
    # BD3LM: the log-linear schedule with move_chance = t exactly (eps 0: at t = 1 every token of a block is
    # masked, so block size 1 gives the exact NLL), t ~ U[1e-3, 1] in training (`sampling_eps`).
    defaults: dict[str, Any] = {"schedule": "loglinear", "loss": "bd3lm", "eps": 0.0, "block_size": 16,
                                "clip_min": 1e-3, "clip_max": 1.0}
    sampling: dict[str, Any] = {"sampler": "block"}
    default_arch = "llada"

    def __init__(self, mask_id: int, schedule: NoiseSchedule, vocab_size: int | None = None,
                 block_size: int = 16) -> None:
        super().__init__(mask_id, schedule, vocab_size)
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.block_size = block_size

    @classmethod
    def from_config(cls, pcfg: ProcessConfig, mask_id: int, vocab_size: int | None = None) -> BlockProcess:
        check_clip(pcfg.clip_min, pcfg.clip_max)
        return cls(mask_id, SCHEDULES.get(pcfg.schedule).from_config(pcfg), vocab_size, pcfg.block_size)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None,
                 maskable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 (B, L), t (B, n_blocks) (or (B,): one time for every block) -> xt (B, L), is_masked (B, L) bool.

        The uniforms are drawn over (B, L) as the masked process draws them, so one block of length L masks
        exactly as MaskedProcess does with the same generator."""
        B, L = x0.shape
        if t.dim() == 1:
            t = t[:, None].expand(B, n_blocks(L, self.block_size))
        p_mask = per_position(self.schedule.move_chance(t).to(torch.float32), L, self.block_size)  # (B, L)
        return absorb(x0, p_mask, self.mask_id, generator, maskable)

    def prior_sample(self, batch: int, length: int, device: str | torch.device = "cpu") -> torch.Tensor:
        return torch.full((batch, length), self.mask_id, dtype=torch.long, device=device)


@torch.no_grad()
def search_clip(model: torch.nn.Module, windows: torch.Tensor, process: BlockProcess, loss_fn: Any,
                widths: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9), delta: float = 0.05,
                batch_size: int = 16, seed: int = 0) -> tuple[tuple[float, float], dict[tuple[float, float], float]]:
    """BD3LM's data-driven clipping: -> the interval [clip_min, clip_max] whose per-block loss has the least
    variance on held-out `windows` (N, L), and the variance of every candidate.

    Candidates: the unclipped [1e-3, 1] and, for each width w, [s, s + w] for s = 0, delta, ..., 1 - w (as
    `metrics.init_valid_vars`); for each, the training loss is computed on the same batches with the same noise,
    its (B, n_blocks) per-block means collected, and their variances summed over batches (as
    `_clipped_schedule_search`). Block size 1 has only [1e-3, 1] and [1, 1] (the exact NLL, variance-free)."""
    eps = 1e-3
    if process.block_size == 1:
        candidates = [(eps, 1.0), (1.0, 1.0)]
    else:
        candidates = [(eps, 1.0)]
        for w in widths:
            s = 0.0
            while s <= 1.0 - w + 1e-9:
                candidates.append((max(round(s, 6), eps), round(s + w, 6)))
                s += delta
    variances: dict[tuple[float, float], float] = {}
    was_training = model.training
    model.eval()
    for lo, hi in candidates:
        clipped = type(loss_fn)(antithetic=loss_fn.antithetic, bos_id=loss_fn.bos_id, clip=(lo, hi))
        total = 0.0
        for i, start in enumerate(range(0, windows.shape[0], batch_size)):
            x0 = windows[start:start + batch_size].to(next(model.parameters()).device)
            g = torch.Generator().manual_seed(seed + i)
            per_block = clipped.per_block_loss(model, x0, process, generator=g)  # (B, n_blocks)
            total += float(per_block.double().var())
        variances[(lo, hi)] = total
    model.train(was_training)
    return min(variances, key=variances.get), variances
