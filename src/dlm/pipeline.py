"""`DiffusionLM`: the one object a user holds. It owns the network, tokenizer, process and sampling defaults.

    lm = DiffusionLM.from_pretrained("default")                       # or a checkpoint / run folder
    lm.generate("ROMEO:", max_new_tokens=128, steps=64, seed=0)       # -> str (the continuation)
    lm.generate(ids, max_new_tokens=64)                               # LongTensor (B, L) -> (B, L + 64)
    lm.infill("To be, or not to be, [MASK] is the question")         # -> str, text outside gaps unchanged
    lm.logits(ids)                                                    # (B, L, V) float32
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dlm.checkpoint import CheckpointError, load_pretrained
from dlm.config import CheckpointConfig, SamplingConfig
from dlm.sampling import SAMPLERS, SamplingError, StepEvent, SuppressTokens, denoise
from dlm.tokenizer import Tokenizer

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
ALIASES = {"default": "shakespeare"}
GAP = re.compile(r"\[MASK(?::(\d+))?\]")


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A shipped model name ("default", "shakespeare"), or a folder on disk."""
    name = str(name_or_path)
    shipped = PRETRAINED_DIR / ALIASES.get(name, name)
    if "/" not in name and (shipped / "model.safetensors").exists():
        return shipped
    path = Path(name).expanduser()
    if path.exists():
        return path
    available = sorted({*ALIASES, *(p.name for p in PRETRAINED_DIR.glob("*") if (p / "model.safetensors").exists())})
    raise CheckpointError(f"unknown model {name!r}: not a shipped model ({', '.join(available) or 'none'}) "
                          "and no such folder")


@dataclass
class Gap:
    start: int  # canvas position of the gap's first token
    length: int
    fixed: bool  # [MASK:n]: exactly n tokens; [MASK]: up to max_span, closed with [PAD]


class DiffusionLM:
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, config: CheckpointConfig,
                 device: str | torch.device = "cpu") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.device = torch.device(device)
        self.sampling = config.sampling

    # ----- loading --------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "default", device: str = "cpu",
                        dtype: str | torch.dtype = "float32") -> DiffusionLM:
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        model, cfg, tok = load_pretrained(resolve_model_path(name_or_path), map_location=device, dtype=torch_dtype)
        return cls(model, tok, cfg, device=device)

    @property
    def max_len(self) -> int:
        return self.config.model.max_len

    @property
    def is_causal(self) -> bool:
        return bool(getattr(self.model, "causal", False))

    # ----- the network ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, L) -> logits (B, L, V) float32. Time-conditioned models get t = the fraction of masks."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        t = (ids == self.tokenizer.mask_id).float().mean(1) if getattr(self.model, "needs_time", False) else None
        return self.model(ids, t, attention_mask=attention_mask).float()

    # ----- generation -----------------------------------------------------------------------------------------
    def _options(self, **kw: Any) -> SamplingConfig:
        given = {k: v for k, v in kw.items() if v is not None}
        try:
            return self.sampling.replace(**given)
        except ValueError as e:
            raise SamplingError(str(e)) from e

    def _check_length(self, L: int) -> None:
        if L > self.max_len:
            raise SamplingError(f"the canvas needs {L} tokens but the model's context is {self.max_len}; "
                                "shorten the prompt or lower max_new_tokens")

    def generate(self, prompt: str | torch.Tensor, max_new_tokens: int | None = None, steps: int | None = None,
                 block_length: int | None = None, temperature: float | None = None, remasking: str | None = None,
                 seed: int | None = None, sampler: str = "llada",
                 callback: Callable[[StepEvent], None] | None = None) -> str | torch.Tensor:
        """Text -> the generated continuation (cut at the first [EOS]); LongTensor (B, L) -> (B, L + new)."""
        if self.is_causal:
            raise SamplingError("this checkpoint is an autoregressive baseline; DiffusionLM samples diffusion models")
        opts = self._options(max_new_tokens=max_new_tokens, steps=steps, block_length=block_length,
                             temperature=temperature, remasking=remasking, seed=seed)
        as_text = isinstance(prompt, str)
        if as_text:
            if not prompt:
                raise SamplingError("the prompt is empty: give at least one character of text")
            ids = torch.tensor([self.tokenizer.encode(prompt)], dtype=torch.long)
        else:
            ids = torch.as_tensor(prompt, dtype=torch.long)
            if ids.dim() == 1:
                ids = ids[None]
            if ids.dim() != 2 or ids.shape[1] == 0:
                raise SamplingError(f"prompt ids must be a non-empty LongTensor (B, L), got shape {tuple(ids.shape)}")
        B, P = ids.shape
        L = P + opts.max_new_tokens
        self._check_length(L)
        canvas = torch.full((B, L), self.tokenizer.mask_id, dtype=torch.long)
        canvas[:, :P] = ids
        tok = self.tokenizer
        # [MASK] / [BOS] are never valid outputs, and [PAD] only closes infilling gaps.
        processors = [SuppressTokens([tok.mask_id, tok.bos_id, tok.pad_id])]
        out = self._denoise(canvas, P, opts, processors, sampler, callback)
        if not as_text:
            return out
        new = out[0, P:].tolist()
        if tok.eos_id in new:
            new = new[: new.index(tok.eos_id)]
        return tok.decode(new)

    def _denoise(self, canvas: torch.Tensor, start: int, opts: SamplingConfig, processors: list,
                 sampler: str, callback: Callable[[StepEvent], None] | None) -> torch.Tensor:
        g = torch.Generator(device=self.device)
        g.manual_seed(opts.seed if opts.seed is not None else torch.seed() % 2**63)
        s = SAMPLERS.build(sampler, mask_id=self.tokenizer.mask_id, config=opts)
        return denoise(self.logits, canvas.to(self.device), start, opts.steps, opts.block_length, s,
                       generator=g, processors=processors, callback=callback).cpu()

    # ----- infilling ------------------------------------------------------------------------------------------
    def parse_gaps(self, text: str, max_span: int) -> tuple[list[int], list[Gap], list[str]]:
        """Text with [MASK] / [MASK:n] gaps -> canvas ids, gaps, and the text pieces between them."""
        ids: list[int] = []
        gaps: list[Gap] = []
        pieces: list[str] = []
        pos = 0
        for m in GAP.finditer(text):
            pieces.append(text[pos: m.start()])
            ids += self.tokenizer.encode(text[pos: m.start()])
            n = int(m.group(1)) if m.group(1) is not None else max_span
            if n < 1:
                raise SamplingError(f"gap {m.group(0)} must have at least 1 token")
            gaps.append(Gap(start=len(ids), length=n, fixed=m.group(1) is not None))
            ids += [self.tokenizer.mask_id] * n
            pos = m.end()
        pieces.append(text[pos:])
        ids += self.tokenizer.encode(text[pos:])
        return ids, gaps, pieces

    def infill(self, text: str, steps: int | None = None, max_span: int | None = None,
               temperature: float | None = None, remasking: str | None = None, seed: int | None = None,
               callback: Callable[[StepEvent], None] | None = None) -> str:
        """Fill every [MASK] (up to max_span tokens, pads removed) and [MASK:n] (exactly n tokens) gap.

        The text outside the gaps is returned unchanged, character for character. `steps` defaults to the
        number of masked tokens (one commit per step).
        """
        if self.is_causal:
            raise SamplingError("this checkpoint is an autoregressive baseline; it cannot infill")
        opts = self._options(temperature=temperature, remasking=remasking, seed=seed, max_span=max_span)
        ids, gaps, pieces = self.parse_gaps(text, opts.max_span)
        if not gaps:
            raise SamplingError("no gap in the text: mark each gap with [MASK] (unknown length) or [MASK:n]")
        self._check_length(len(ids))
        canvas = torch.tensor([ids], dtype=torch.long)
        n_masks = sum(g.length for g in gaps)
        opts = opts.replace(steps=steps or n_masks, block_length=0)
        tok = self.tokenizer
        fixed = torch.zeros_like(canvas, dtype=torch.bool)
        for g in gaps:
            if g.fixed:
                fixed[0, g.start: g.start + g.length] = True
        processors = [SuppressTokens([tok.mask_id, tok.bos_id]),
                      SuppressTokens([tok.pad_id, tok.eos_id], where=fixed)]  # a fixed gap holds n real tokens
        # The whole canvas is one block: every gap sees both sides at every step.
        out = self._denoise(canvas, 0, opts, processors, "llada", callback)[0].tolist()
        result = [pieces[0]]
        for g, after in zip(gaps, pieces[1:], strict=True):
            fill = [i for i in out[g.start: g.start + g.length] if i not in (tok.pad_id, tok.eos_id)]
            result.append(tok.decode(fill))
            result.append(after)
        return "".join(result)
