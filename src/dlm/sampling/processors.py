"""Logits processors: small pure transforms of the logits (B, L, V), composed in a list before each sampler step.

A processor is `__call__(logits (B, L, V), xt (B, L)) -> logits (B, L, V)`: it sees the current canvas `xt`
(to penalise repeats or restrict chosen positions) and returns new logits of the same shape and dtype, never
modifying its input. Forbidden tokens get -inf; a filter never leaves a position with only -inf (it keeps that
position's argmax instead), so the sampler's softmax stays finite. The design follows HF transformers'
`LogitsProcessor` (Keskar et al. 2019 for the repetition penalty, Holtzman et al. 2020 for nucleus sampling).

    processors = build_processors(GenerationConfig(top_p=0.9, repetition_penalty=1.2), tokenizer)
    logits = apply_processors(processors, model_fn(xt), xt)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from dlm.config import GenerationConfig
    from dlm.tokenizer import Tokenizer

NEG_INF = -torch.inf


class LogitsProcessor:
    window_safe = False  # True: depends on neither positions nor the rest of the canvas (may see a window only)
    # True: the same transform at every position of a row, read from the row's whole canvas (repetition penalty):
    # may run on the logits of a window of positions if it is given the whole canvas as `xt`
    reads_canvas = False

    def __call__(self, logits: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:  # (B, L, V), (B, L) -> (B, L, V)
        raise NotImplementedError

    def window(self, rows: torch.Tensor, cols: torch.Tensor) -> LogitsProcessor | None:
        """This processor on a window of the canvas: logits (B', W, V) whose position (i, w) is canvas row
        rows[i], column cols[i, w] (-1: not on the canvas) -> a processor for those logits, or None when it needs
        the whole canvas. Position-free processors are themselves."""
        return self if self.window_safe else None

    def __repr__(self) -> str:
        def show(v: object) -> str:
            return f"<tensor {tuple(v.shape)}>" if isinstance(v, torch.Tensor) else repr(v)

        return f"{type(self).__name__}({', '.join(f'{k}={show(v)}' for k, v in vars(self).items())})"


def windowed(p: Any, rows: torch.Tensor, cols: torch.Tensor) -> Any:
    """`p.window(rows, cols)` for a LogitsProcessor; a plain callable is kept if it says it is `window_safe`."""
    if isinstance(p, LogitsProcessor):
        return p.window(rows, cols)
    return p if getattr(p, "window_safe", False) else None


def apply_processors(processors: Sequence[LogitsProcessor], logits: torch.Tensor, xt: torch.Tensor,
                     canvas: torch.Tensor | None = None) -> torch.Tensor:
    """Each processor in turn. `canvas` (B, L): the whole canvas when `logits` and `xt` cover a window of it;
    a `reads_canvas` processor reads that instead of the window."""
    for p in processors:
        logits = p(logits, canvas if canvas is not None and getattr(p, "reads_canvas", False) else xt)
    return logits


# ----- helpers ------------------------------------------------------------------------------------------------

def keep_argmax_where_empty(filtered: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Where a filter removed every token of a position, put back that position's best token from `logits`."""
    empty = ~(filtered > NEG_INF).any(-1, keepdim=True)  # (B, L, 1)
    if not bool(empty.any()):
        return filtered
    best = torch.zeros_like(filtered, dtype=torch.bool).scatter_(-1, logits.argmax(-1, keepdim=True), True)
    return torch.where(empty & best, logits, filtered)


def _vocab_mask(token_ids: Sequence[int], V: int, device: torch.device, who: str) -> torch.Tensor:
    """token ids -> bool (V,) with a clear error for ids outside the vocabulary (cached: built once, not per step)."""
    bad = [i for i in token_ids if not 0 <= int(i) < V]
    if bad:
        raise ValueError(f"{who}: token id(s) {bad} are outside the vocabulary of the logits (0..{V - 1})")
    return _cached_vocab_mask(tuple(int(i) for i in token_ids), V, str(device))


@functools.lru_cache(maxsize=64)
def _cached_vocab_mask(token_ids: tuple[int, ...], V: int, device: str) -> torch.Tensor:
    mask = torch.zeros(V, dtype=torch.bool, device=device)
    mask[torch.as_tensor(token_ids, dtype=torch.long, device=device)] = True
    return mask  # read only: callers combine it into new tensors


def _positions(where: torch.Tensor | None, logits: torch.Tensor, who: str) -> torch.Tensor | None:
    """`where` (B, L) or (1, L) bool -> (B, L, 1) on the logits' device; checks the shape against the logits."""
    if where is None:
        return None
    B, L, _ = logits.shape
    if where.dim() != 2 or where.shape[1] != L or where.shape[0] not in (1, B):
        raise ValueError(f"{who}: `where` must be a bool tensor (B, L) = ({B}, {L}) or (1, {L}) matching the "
                         f"canvas, got shape {tuple(where.shape)}")
    return where.to(device=logits.device, dtype=torch.bool)[..., None]


# ----- hard constraints ---------------------------------------------------------------------------------------

class _TokenSet(LogitsProcessor):
    """A set of token ids that is forbidden (BannedTokens) or the only one allowed (AllowedTokens), everywhere or
    only at the positions where `where` (B, L) is True."""

    _allow = False  # class attribute, so that repr (from vars) shows only the ids and `where`

    @property
    def window_safe(self) -> bool:  # position-free unless restricted to positions
        return self.where is None

    def __init__(self, token_ids: Sequence[int], where: torch.Tensor | None = None) -> None:
        self.token_ids = [int(i) for i in token_ids]
        self.where = where

    def window(self, rows: torch.Tensor, cols: torch.Tensor) -> _TokenSet:
        """`where` read at the window's canvas positions (columns -1 hold no constraint)."""
        if self.where is None:
            return self
        where = self.where.to(cols.device)
        r = rows[:, None].expand_as(cols) if where.shape[0] > 1 else torch.zeros_like(cols)
        sub = where[r, cols.clamp(0, where.shape[1] - 1)] & (cols >= 0) & (cols < where.shape[1])  # (B', W)
        return type(self)(self.token_ids, where=sub)

    def __call__(self, logits, xt):
        if not self.token_ids:
            return logits
        who = type(self).__name__
        ids = _vocab_mask(self.token_ids, logits.shape[-1], logits.device, who)  # (V,)
        forbidden = ~ids if self._allow else ids
        where = _positions(self.where, logits, who)
        mask = forbidden if where is None else where & forbidden  # (V,) or (B, L, V)
        return keep_argmax_where_empty(logits.masked_fill(mask, NEG_INF), logits)


class BannedTokens(_TokenSet):
    """Forbid token ids everywhere, or only at the positions where `where` (B, L) is True."""


SuppressTokens = BannedTokens  # the original name, kept for existing callers


class AllowedTokens(_TokenSet):
    """Only `token_ids` may be chosen: everywhere, or only at the positions where `where` (B, L) is True."""

    _allow = True

    def __init__(self, token_ids: Sequence[int], where: torch.Tensor | None = None) -> None:
        super().__init__(token_ids, where)
        if not self.token_ids:
            raise ValueError("AllowedTokens needs at least one token id; to forbid tokens use BannedTokens")


# ----- soft transforms ----------------------------------------------------------------------------------------

class RepetitionPenalty(LogitsProcessor):
    """CTRL's penalty, as HF: for every token already on the row's canvas (any non-[MASK] position, prompt
    included), a positive logit is divided by `penalty` and a negative one multiplied by it, at every position.
    penalty > 1 discourages repeats, < 1 encourages them, 1 is the identity. It reads the canvas but treats every
    position alike: logits (B, W, V) of a window of positions with the whole canvas xt (B, L) give the same as those
    positions of the full logits."""

    reads_canvas = True

    def __init__(self, penalty: float, mask_id: int) -> None:
        if penalty <= 0:
            raise ValueError(f"repetition penalty must be > 0 (1 disables it), got {penalty}")
        self.penalty = float(penalty)
        self.mask_id = int(mask_id)

    def __call__(self, logits, xt):
        if self.penalty == 1.0:
            return logits
        B, L, V = logits.shape
        xt = xt.to(logits.device)
        present = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)  # column V collects the masks
        present.scatter_(1, torch.where(xt == self.mask_id, V, xt), True)
        present = present[:, None, :V]  # (B, 1, V)
        penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
        return torch.where(present, penalised, logits)


class Temperature(LogitsProcessor):
    """logits / t. Not added by `build_processors`: samplers apply their own temperature (LLaDA: Gumbel-max in
    float64). Use it with samplers that take the softmax of the logits as given."""

    window_safe = True  # position-free: may run on the logits of a window of positions

    def __init__(self, temperature: float) -> None:
        if temperature <= 0:
            raise ValueError(f"Temperature must be > 0, got {temperature}; temperature 0 means greedy decoding, "
                             "which is the sampler's temperature=0, not a logits processor")
        self.temperature = float(temperature)

    def __call__(self, logits, xt):
        return logits if self.temperature == 1.0 else logits / self.temperature


# ----- truncation ---------------------------------------------------------------------------------------------

class TopK(LogitsProcessor):
    """Keep exactly the k highest logits of each position (ties broken by torch.topk), -inf elsewhere."""

    window_safe = True  # position-free: may run on the logits of a window of positions

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"top_k must be >= 1, got {k}")
        self.k = int(k)

    def __call__(self, logits, xt):
        if self.k >= logits.shape[-1]:
            return logits
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(self.k, -1).indices, True)
        return logits.masked_fill(~keep, NEG_INF)


class TopP(LogitsProcessor):
    """Nucleus filtering: keep, per position, the fewest most-likely tokens whose probability sums to >= p.

    The probabilities are those of softmax(logits / temperature): the distribution the sampler draws from
    (Gumbel-max samples softmax(logits / T)), so the nucleus matches HF's temperature-then-top-p order even
    though the temperature itself is applied later by the sampler. The most likely token is always kept.
    """

    window_safe = True  # position-free: may run on the logits of a window of positions

    def __init__(self, p: float, temperature: float = 1.0) -> None:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {p}")
        self.p = float(p)
        self.temperature = float(temperature) if temperature > 0 else 1.0

    def __call__(self, logits, xt):
        if self.p >= 1.0:
            return logits
        scaled = logits if self.temperature == 1.0 else logits / self.temperature
        sorted_logits, order = scaled.sort(-1, descending=True)
        probs = sorted_logits.float().softmax(-1)
        # Mass of the strictly more likely tokens; a token is in the nucleus iff that mass is still < p.
        mass_before = torch.cat([torch.zeros_like(probs[..., :1]), probs.cumsum(-1)[..., :-1]], -1)
        drop_sorted = mass_before >= self.p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        return logits.masked_fill(drop, NEG_INF)


# ----- from a GenerationConfig --------------------------------------------------------------------------------

def special_ids_to_suppress(tokenizer: Tokenizer, allow_pad: bool = False) -> list[int]:
    """[MASK], [BOS] and (unless `allow_pad`) [PAD]: the ids `suppress_special` bans from every prediction.

    Pretrained tokenizers reuse ids: LLaDA pads with its EOS, Dream's BOS and PAD are its EOS. The model must still
    be able to end an answer, so an id that is also the EOS is left to `ban_eos`."""
    banned = [tokenizer.mask_id]
    if tokenizer.bos_id != tokenizer.eos_id:
        banned.append(tokenizer.bos_id)
    if not allow_pad and tokenizer.pad_id != tokenizer.eos_id:
        banned.append(tokenizer.pad_id)
    return banned


def build_processors(config: GenerationConfig, tokenizer: Tokenizer, extra: Sequence[LogitsProcessor] = (),
                     allow_pad: bool = False) -> list[LogitsProcessor]:
    """The processors a GenerationConfig asks for, in the order they must run:

    1. BannedTokens: with `config.suppress_special` (dlm's own models), [MASK] and [BOS], and [PAD] unless
       `allow_pad` (only infilling gaps close with [PAD]); [EOS] when `config.ban_eos`. A [BOS] or [PAD] id that
       is also the [EOS] id (LLaDA, Dream) is not banned. Upstream folders load with suppress_special off, as
       their reference samplers ban nothing.
    2. `extra` (constraint masks, AllowedTokens, ...): hard constraints run before truncation, so top-k/top-p
       choose among permitted tokens only.
    3. RepetitionPenalty when `config.repetition_penalty != 1`.
    4. TopK when `config.top_k` is set, then TopP when `config.top_p` is set (and < 1).

    Temperature is not added: the samplers apply it themselves (LLaDA: Gumbel-max in float64), and dividing here
    as well would apply it twice. Note that top-k/top-p also reshape the probabilities the remasking rule scores,
    so they change which positions commit even at temperature 0.
    """
    config.validate()
    banned = special_ids_to_suppress(tokenizer, allow_pad) if config.suppress_special else []
    if config.ban_eos:
        banned.append(tokenizer.eos_id)
    processors: list[LogitsProcessor] = [BannedTokens(list(dict.fromkeys(banned)))] if banned else []
    processors += list(extra)
    if config.repetition_penalty != 1.0:
        processors.append(RepetitionPenalty(config.repetition_penalty, tokenizer.mask_id))
    if config.top_k is not None:
        processors.append(TopK(config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        processors.append(TopP(config.top_p, temperature=config.temperature))
    return processors
