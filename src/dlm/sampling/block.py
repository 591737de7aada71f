"""Block diffusion sampling: block by block, each block denoised against an exact KV cache of the finished ones.

BD3LM (Arriola et al. 2025; kuleshov-group/bd3lms `diffusion.py: _semi_ar_sampler`), Fast-dLLM v2 (Wu et al.
2025, arXiv:2509.26328; the hub's `Fast_dLLM_QwenForCausalLM.generate`) and SDAR (JetAstra/SDAR `generate.py:
block_diffusion_generate`) sample a block model the same way, which `block_steps` does:

- The prompt's complete blocks are run once (with the first step) and their keys and values stored
  (`BlockCache`, models/common.py).
- The next block starts as the prompt's tail (the tokens after its last complete block) followed by [MASK]; every
  step runs the block alone against the cache (block-causal attention: it sees the cache and itself) and commits
  some of its masks. Sub-blocks (Fast-dLLM v2's `small_block_size`, option `sub_block`) commit left to right: a
  step's candidates lie in the first sub-block that still holds a mask.
- A finished block's K/V are appended once, computed in the same forward as the next block's first step (the
  two blocks side by side: block-causal attention keeps the finished one from seeing the new one), so a step is
  one forward. Under block-causal attention nothing earlier ever changes, so the cache is exact and the cached
  loop gives the tokens of the uncached one (`cache=False` recomputes the whole sequence at every step;
  tests/test_block_sampling.py checks they agree token for token).
- A row stops when a finished block holds [EOS] (the rest of its output becomes [EOS]) and leaves the batch, so
  rows of a ragged batch stop at different blocks; generation stops at `max_new_tokens` in any case. There is no
  canvas of fixed length: the network only ever sees the cache and one block.

Ragged prompts: row b's prompt is shifted right by a whole number of blocks so that every row's first open block
lands on the same block of the batch. Block boundaries then fall where they fall for the row alone and RoPE
depends on relative positions only, so each row gets the tokens it would get alone.

The in-block rule (`BlockSampler`, registered as "block"): predictions as LLaDA (argmax, Gumbel-max in float64
when temperature > 0, the remasking rule's confidence), then per step the planned count k (the block's masks spread
over its steps, as LLaDA) by confidence, or with `threshold` tau every mask whose confidence exceeds tau and at
least k (SDAR's `low_confidence_dynamic`; with one token per step planned, k = 1, this is Fast-dLLM v2's rule).
`steps` keeps LLaDA's meaning, steps for `max_new_tokens`: a block of block_size tokens gets
ceil(steps * block_size / max_new_tokens) of them (at most block_size).

Streaming: each step yields a `StepEvent` whose `output.xt` is the (B, P + max_new_tokens) view of the prompt and
the tokens so far ([MASK] where nothing is committed yet), as the other samplers' canvas is.

    sampler = SAMPLERS.build("block", mask_id=tok.mask_id, threshold=0.9)
    for event in block_steps(net, prompt, prompt_mask, sampler, block_size=16, max_new_tokens=256, steps=256,
                             eos_id=tok.eos_id): ...
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from dlm.config import ConfigError
from dlm.models.common import BlockCache
from dlm.sampling.generate import SamplingError, StepEvent
from dlm.sampling.llada import LLaDASampler
from dlm.sampling.noise import Noise, subset
from dlm.sampling.processors import LogitsProcessor, apply_processors, windowed
from dlm.sampling.sampler import SAMPLERS, SamplerOutput, ThresholdOptions


@dataclass
class BlockOptions(ThresholdOptions):
    sub_block: int = 0  # decode each block in sub-blocks of this many tokens (Fast-dLLM v2); 0: none
    # A block's first token is decoded alone, first, from the finished block before it (Fast-dLLM v2 commits it
    # autoregressively before the block's diffusion steps).
    ar_first_token: bool = False
    # LLaDA2's generate: every block is decoded whole, the last one past max_new_tokens too (those tokens are then
    # dropped), in min(steps per block, max_new_tokens) steps whose counts spread the block's length (not its
    # masks) over them; a block's steps stop there even if a [MASK] prediction left a mask.
    whole_blocks: bool = False

    def validate(self) -> BlockOptions:
        super().validate()
        if self.sub_block < 0:
            raise ConfigError(f"sub_block must be >= 1 (or 0: no sub-blocks), got {self.sub_block}")
        return self


@SAMPLERS.register("block")
class BlockSampler(LLaDASampler):
    """k per step by confidence, or with `threshold` every mask above it and at least k (SDAR / Fast-dLLM v2)."""

    Options = BlockOptions
    options: BlockOptions
    variable_steps = True  # with a threshold a block may finish early; the loop steps while masks are left
    fixed_plan = False
    windowed = True

    def use_process(self, process) -> None:
        """Any absorbing (masked) process: the masked one, or block diffusion's; not SEDD / D3PM."""
        own = getattr(process, "sampling", {}).get("sampler")
        if own not in (None, "block"):
            raise ValueError(f"the block sampler samples masked diffusion, but the checkpoint is a "
                             f"{type(process).__name__} model: use sampler={own!r}")

    def set_timesteps(self, steps: int | torch.Tensor, is_masked: torch.Tensor) -> None:
        """steps: one count, or (B,) a count per row (rows whose sub-blocks differ in size)."""
        if isinstance(steps, torch.Tensor):  # num_transfer_tokens row by row, zeros after a row's own steps
            n, steps = is_masked.sum(1)[:, None], steps.to(is_masked.device)[:, None]
            k = torch.arange(int(steps.max()), device=is_masked.device)[None]
            self.plan = (n // steps) * (k < steps) + (k < n % steps).long()
            self.step_index = 0
        else:
            super().set_timesteps(steps, is_masked)
        self.eligible: torch.Tensor | None = None  # (B, L) bool: positions that may be committed (None: all)

    @property
    def commits_planned(self) -> torch.Tensor:
        """(B,) the planned count (at least one); with a threshold a lower bound."""
        assert self.plan is not None, "call set_timesteps first"
        if self.step_index >= self.plan.shape[1]:
            return torch.ones_like(self.plan[:, 0])
        return self.plan[:, self.step_index].clamp_min(1)

    def step(self, logits, xt, lo, hi, generator=None, offset=0):
        """logits (B, L, V) (or (B, hi - offset, V)), xt (B, L): commits masked positions before `hi` (and in
        `eligible`, when the driver set it)."""
        # Only the driver's region is predicted (and draws noise): a row's draws never depend on its neighbours.
        candidate, x0, confidence = self.predict(logits, xt, hi, generator, offset, self.eligible)
        n = self.commits_planned.to(xt.device)
        if self.options.threshold is not None:
            n = torch.maximum(n, (candidate & (confidence > self.options.threshold)).sum(1))
        commit = self.remasking.select(confidence, candidate, torch.minimum(n, candidate.sum(1)))
        self.step_index += 1
        return SamplerOutput(xt=torch.where(commit, x0, xt), committed=commit & (x0 != self.mask_id), x0=x0,
                             confidence=confidence)


def steps_per_block(steps: int, block_size: int, max_new_tokens: int) -> int:
    """LLaDA's `steps` for `max_new_tokens` tokens -> the steps of one block of `block_size` tokens."""
    return max(1, min(block_size, -(-steps * block_size // max_new_tokens)))


@torch.no_grad()
def block_steps(model: torch.nn.Module, prompt: torch.Tensor, prompt_mask: torch.Tensor | None, sampler: BlockSampler,
                generator: Noise = None, processors: Sequence[LogitsProcessor] = (), *,
                block_size: int, max_new_tokens: int, steps: int, eos_id: int | None = None, sub_block: int = 0,
                cache: bool = True, window: int | None = None,
                stop_ids: Sequence[int] | None = None, ar_first_token: bool = False,
                whole_blocks: bool = False, template: torch.Tensor | None = None) -> Iterator[StepEvent]:
    """Sample after `prompt` (B, P) (left-padded; `prompt_mask` (B, P), 1 = real token) block by block.

    `template` (B, max_new_tokens): the new tokens' canvas, [MASK] where the model writes and known tokens elsewhere
    (infilling, JSON, documents, code on a block model). A known token is kept, and the model sees it once the
    block that holds it is decoded (the current block and those before it: nothing later, under block-causal
    attention); `steps` is then spread over the blocks in proportion to their masks, and rows do not stop early.
    Positional logits processors (`where=`) are read at each block's canvas positions (LogitsProcessor.window).

    model: a network with attention modes (`supports_attention_modes`: net(x, None, attention_mask=,
    cache=BlockCache, block_size=)). Yields a StepEvent per step over the (B, P + max_new_tokens) view; the last
    event's `output.xt` is the result (each row's tokens after its prompt, [EOS] after a stop). A row stops once its
    finished block holds `eos_id` or any of `stop_ids` (a chat model's end of turn, as upstream). `ar_first_token`:
    a block with no prompt token in it decodes its first position alone first (Fast-dLLM v2's AR token), then the
    rest in sub-blocks [1, sub), [sub, 2 sub), ... `whole_blocks`: LLaDA2's plan (BlockOptions.whole_blocks).
    `window`: the model's context; once the cache and the next forward would exceed it, the oldest whole blocks leave
    the cache (a sliding window, as BD3LM's sampler), so any `max_new_tokens` can be generated.
    """
    if not getattr(model, "supports_attention_modes", False):
        raise SamplingError(f"the block sampler needs a network with block-causal attention and a block cache; "
                            f"{type(model).__name__} has none: use another sampler")
    if block_size < 1 or max_new_tokens < 1 or steps < 1:
        raise SamplingError(f"block_size, max_new_tokens and steps must be >= 1, got {block_size}, "
                            f"{max_new_tokens}, {steps}")
    origin = torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)
    bad = [type(p).__name__ for p in processors if windowed(p, *origin) is None]
    if bad:
        raise SamplingError(f"the block sampler sees one block at a time; {', '.join(bad)} needs the whole canvas "
                            "(drop repetition_penalty, or use another sampler)")
    mask_id, bs, device = sampler.mask_id, block_size, prompt.device
    B, P = prompt.shape
    lengths = prompt_mask.long().sum(1) if prompt_mask is not None else torch.full((B,), P, device=device)
    full_blocks = lengths // bs  # (B,) the prompt's complete blocks
    K = int(full_blocks.max())  # every row's first open block is block K of the batch
    shift = (K - full_blocks) * bs  # (B,) whole blocks of padding in front of each row
    tail = lengths - full_blocks * bs  # (B,) prompt tokens in the first open block
    seq = torch.full((B, (K + 1) * bs), mask_id, dtype=torch.long, device=device)  # the prefix + first open block
    for b in range(B):
        n_b = int(lengths[b])
        seq[b, int(shift[b]):int(shift[b]) + n_b] = prompt[b, P - n_b:]
    if template is not None and template.shape != (B, max_new_tokens):
        raise SamplingError(f"template must be (B, max_new_tokens) = ({B}, {max_new_tokens}), got "
                            f"{tuple(template.shape)}")
    new = template.to(device) if template is not None else torch.full((B, max_new_tokens), mask_id, device=device)
    canvas = torch.cat([prompt, new], 1)
    n_masks = (new == mask_id).sum(1).clamp_min(1)  # (B,) the masks the steps are spread over (a template's)
    rows = torch.arange(B, device=device)  # the rows still generating
    kv = BlockCache()

    def key_mask(n_pos: int, offset: int) -> torch.Tensor | None:  # (B', n_pos): 1 from each row's first real token
        if not bool((shift[rows] > offset).any()):
            return None  # no padding left to hide
        return (torch.arange(offset, offset + n_pos, device=device)[None] >= shift[rows][:, None]).long()

    def slide(n_new: int) -> int:
        """Drop the oldest whole blocks so that the cached positions and n_new more fit the window -> the offset.
        The kept K/V were computed while the dropped blocks were visible (BD3LM's sliding cache does the same), so
        this is not a recomputation inside the window; the uncached reference (cache=False) never slides."""
        if cache and window is not None and kv.length + n_new > window:
            n = min(kv.length, -(-(kv.length + n_new - window) // bs) * bs)
            kv.drop_front(n)
        return kv.offset

    def forward(block: torch.Tensor) -> torch.Tensor:
        """The logits (B', n, V) of `block` against the cache. A finished block waiting to be appended (`pending`)
        runs in the same forward, in front of it (block-causal: it does not see `block`), and its K/V are kept."""
        nonlocal history, pending, first_row
        x, keep = block, 0
        if pending is not None:
            x, keep, pending = torch.cat([pending, block], 1), pending.shape[1], None
        offset = slide(x.shape[1])
        T = kv.length if cache else history.shape[1]
        am = key_mask(T + x.shape[1], offset)
        if cache:
            out = model(x, None, attention_mask=am, cache=kv.extend(keep) if keep else kv, block_size=bs)
        else:
            out = model(torch.cat([history, x], 1), None, attention_mask=am, block_size=bs)[:, T:]
            history = torch.cat([history, x[:, :keep]], 1)
        out = out[:, keep:].float()
        if shifted and cache:  # position 0 is predicted by the previous block's last state, seen only with it
            if keep:
                first_row = out[:, :1]
            elif first_row is not None:
                out = torch.cat([first_row, out[:, 1:]], 1)
        return out

    # The prompt's complete blocks (and later each finished block) are `pending`: their K/V go in with the next
    # block's first forward. `history` is what the uncached reference recomputes at every step.
    pending: torch.Tensor | None = seq[:, :K * bs] if K > 0 else None
    # A shifted network (Dream, Fast-dLLM v2's token shift: the state at i - 1 predicts token i) predicts a block's
    # first position from the previous block, which a later step against the cache no longer runs: the logits of
    # that position from the block's first forward are kept (they cannot change: the past is fixed).
    shifted = bool(getattr(model, "cache_lookback", 0))
    first_row: torch.Tensor | None = None
    history = seq[:, :0]
    block = seq[:, K * bs:]
    per_block = steps_per_block(steps, bs, max_new_tokens)
    sub = sub_block if 0 < sub_block < bs else bs
    global_step = 0
    stops = torch.tensor([] if template is not None else  # a template is filled to its end
                         sorted({*(stop_ids or ()), *(() if eos_id is None else (eos_id,))}), dtype=torch.long,
                         device=device)
    fill_id = eos_id if eos_id is not None else (int(stops[0]) if stops.numel() else None)
    last_view: SamplerOutput | None = None  # the last event's output: a stop found after it is written into it too
    j = torch.arange(bs, device=device)
    for k in range(K, K + 2 + -(-max_new_tokens // bs)):
        g = (k - K) * bs + j[None] - tail[rows][:, None]  # (B', bs) index of each position among the new tokens
        wanted = (g >= 0) & (g < max_new_tokens)  # (B', bs) the positions that are part of the output
        if not bool(wanted.any()):
            break
        eligible = (g >= 0) if whole_blocks else wanted  # LLaDA2 also decodes the last block's tail past the output
        cols = torch.where(g < max_new_tokens, P + g, -1)  # (B', bs) canvas column of each position (-1: past it)
        if template is not None:  # the block's known tokens, in place before its first step
            r, c = wanted.nonzero(as_tuple=True)
            block[r, c] = new[rows[r], g[r, c]]
        procs = [windowed(p, rows, cols) for p in processors]
        # Each row's sub-block of each position: [0, sub), [sub, 2 sub), ...; with ar_first_token a row whose block
        # holds no prompt token has [0, 1), [1, sub), [sub, 2 sub), ... (position 0 is AR), so rows may differ.
        part = (j // sub)[None].expand(len(rows), bs)
        if ar_first_token and sub > 1:
            part = torch.where((g[:, :1] >= 0) & (j[None] > 0), part + 1, part)
        for i_sub in range(int(part.max()) + 1):
            region = eligible & (part == i_sub)
            todo = region & (block == mask_id)
            if not bool(todo.any()):
                continue
            size = (part == i_sub).sum(1)  # (B',) the sub-block's positions in each row
            if whole_blocks:  # LLaDA2: min(steps, gen_length) steps, counts of block_length / steps, as many steps
                n_steps = min(per_block, max_new_tokens)
                sampler.set_timesteps(n_steps, torch.ones_like(todo))
                budget = n_steps
            elif template is not None:  # steps in proportion to the masks: the template's steps for all of them
                sampler.set_timesteps((-(-steps * todo.sum(1) // n_masks[rows])).clamp_min(1), todo)
                budget = int(todo.sum(1).max()) + per_block
            else:
                sampler.set_timesteps((-(-per_block * size // bs)).clamp_min(1), todo)
                # Every step commits at least one mask, unless a [MASK] prediction leaves it masked
                # (suppress_special off, as upstream checkpoints load): a budget keeps the block from stepping forever.
                budget = int(todo.sum(1).max()) + per_block
            sampler.eligible = region
            for _ in range(budget):
                if not bool((region & (block == mask_id)).any()):
                    break
                logits = apply_processors(procs, forward(block), block)  # (B', bs, V)
                out = sampler.step(logits, block, 0, bs, generator)  # `region` (eligible) bounds the commits
                block = out.xt
                last_view = _view(canvas, out, rows, g, wanted, P)
                yield StepEvent(block=k - K, step=global_step, output=last_view)
                global_step += 1
        is_stop = torch.isin(block, stops) & wanted  # (B', bs)
        done = is_stop.any(1)
        if bool(done.any()):
            for r in done.nonzero()[:, 0].tolist():
                cols = P + g[r][wanted[r]]
                first = int(cols[is_stop[r][wanted[r]]].min())
                canvas[rows[r], first + 1:] = fill_id  # the stop token stays; [EOS] after it
                if last_view is not None:  # when no later step runs, the last event already holds the result
                    last_view.xt[rows[r], first + 1:] = fill_id
        keep = ~done
        last = not bool(((g + bs < max_new_tokens) & keep[:, None]).any())
        if last or not bool(keep.any()):
            break
        # Its K/V, computed once, go in with the next block's first forward (a block with nothing to decode ran no
        # forward, so the blocks waiting are appended together).
        pending = block if pending is None else torch.cat([pending, block], 1)
        if not bool(keep.all()):
            rows, pending = rows[keep], pending[keep]
            generator = subset(generator, keep)  # one generator per row: they leave the batch with their rows
            first_row = None
            if cache:
                kv.select(keep)
            else:
                history = history[keep]
        block = torch.full((len(rows), bs), mask_id, dtype=torch.long, device=device)


def _view(canvas: torch.Tensor, out: SamplerOutput, rows: torch.Tensor, g: torch.Tensor, eligible: torch.Tensor,
          P: int) -> SamplerOutput:
    """The step's block (B', bs) written into the (B, P + max_new_tokens) view -> a SamplerOutput over the view."""
    r, c = eligible.nonzero(as_tuple=True)
    cols = P + g[r, c]
    canvas[rows[r], cols] = out.xt[r, c]
    committed = torch.zeros_like(canvas, dtype=torch.bool)
    committed[rows[r], cols] = out.committed[r, c]
    x0 = canvas.clone()
    x0[rows[r], cols] = out.x0[r, c]
    confidence = torch.full(canvas.shape, -torch.inf, dtype=torch.float64, device=canvas.device)
    confidence[rows[r], cols] = out.confidence[r, c]
    return SamplerOutput(xt=canvas.clone(), committed=committed, x0=x0, confidence=confidence)
