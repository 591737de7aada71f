"""`DiffusionLM`: the one object a user holds. It owns the network, tokenizer, process and sampling defaults.

    lm = DiffusionLM.from_pretrained("default")                       # or a checkpoint / run folder
    lm.generate("ROMEO:", max_new_tokens=128, steps=64, seed=0)       # -> str (the continuation)
    lm.generate(ids, max_new_tokens=64)                               # LongTensor (B, L) -> (B, L + 64)
    lm.infill("To be, or not to be, [MASK] is the question")         # -> str, text outside gaps unchanged
    lm.logits(ids)                                                    # (B, L, V) float32
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dlm.checkpoint import CheckpointError, load_pretrained
from dlm.config import OPTION_ALIASES, CheckpointConfig, ConfigError, GenerationConfig
from dlm.derived import derived_path, is_derived
from dlm.sampling import SAMPLERS, SamplingError, StepEvent, denoise_cached_steps, denoise_steps
from dlm.sampling.block import BlockSampler, block_steps
from dlm.sampling.generate import ModelFn, fit_steps
from dlm.sampling.guidance import classifier_free_guidance
from dlm.sampling.noise import Noise, RowGenerators, as_noise
from dlm.sampling.processors import BannedTokens, build_processors
from dlm.tokenizer import Tokenizer, tokenizer_like

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
ALIASES = {"default": "shakespeare"}
GAP = re.compile(r"\[MASK(?::(\d+))?\]")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(name_or_path: str | Path, allow_pickle: bool = False) -> Path:
    """A shipped model name ("default", "shakespeare"; "shakespeare-smollm2" is derived from its base model on
    first use: dlm.derived), a folder on disk, or a Hugging Face hub id.

    A local folder never touches the network. A hub id ("GSAI-ML/LLaDA-8B-Instruct") that is not a folder is
    fetched with `huggingface_hub.snapshot_download` into its cache (configs, tokenizer and safetensors weights
    only: no code files; pickle weights only with allow_pickle).
    """
    name = str(name_or_path)
    shipped = PRETRAINED_DIR / ALIASES.get(name, name)
    if "/" not in name:
        if (shipped / "model.safetensors").exists():
            return shipped
        if is_derived(shipped):  # a base model + a committed adapter: derived once, then cached
            return derived_path(shipped)
    path = Path(name).expanduser()
    if path.exists():
        return path
    if HUB_ID.match(name) and not name.startswith((".", "~")):
        return download(name, allow_pickle)
    available = sorted({*ALIASES, *(p.name for p in PRETRAINED_DIR.glob("*")
                                    if (p / "model.safetensors").exists() or is_derived(p))})
    raise CheckpointError(f"unknown model {name!r}: not a shipped model ({', '.join(available) or 'none'}), "
                          "no such folder, and not a hub id (owner/name)")


def download(repo_id: str, allow_pickle: bool = False) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise CheckpointError(f"{repo_id!r} is not a local folder; downloading it needs huggingface_hub "
                              "(pip install 'dlm[hf]'), or pass the path of a downloaded copy") from e
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"] + (["*.bin"] if allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network, auth and not-found errors have many types in huggingface_hub
        raise CheckpointError(f"cannot download {repo_id!r} from the Hugging Face hub: {e}") from e


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
                        dtype: str | torch.dtype = "float32", allow_pickle: bool = False,
                        quantize: str | None = None, tokenizer: Any = None) -> DiffusionLM:
        """A shipped name, a folder (ours, a run, or an upstream LLaDA / Dream folder), or a hub id.

        `dtype` is what the weights are converted to as they are read; `quantize="int8"` then replaces every
        linear layer by an int8 weight-only one (CPU inference; dlm.quantize). `tokenizer` replaces the folder's
        (a dlm Tokenizer, a transformers tokenizer, or a path to tokenizer files): a folder with weights and
        config but no tokenizer files loads with a warning, for token-id calls only, until one is given.
        """
        from dlm.precision import resolve_dtype

        try:  # dtype="auto": bfloat16 where the device computes it natively, else float32 (dlm.precision)
            torch_dtype = resolve_dtype(dtype, device)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        path = resolve_model_path(name_or_path, allow_pickle)
        model, cfg, tok = load_pretrained(path, map_location=device, dtype=torch_dtype, allow_pickle=allow_pickle)
        if tokenizer is not None:
            try:
                tok = tokenizer_like(tokenizer, tok)
            except ValueError as e:
                raise CheckpointError(str(e)) from e
        if quantize is not None:
            from dlm.quantize import quantize_model

            quantize_model(model, quantize)
        return cls(model, tok, cfg, device=device)

    @property
    def max_len(self) -> int:
        return self.config.model.max_len

    @property
    def bos_prefix(self) -> bool:
        """Whether text prompts start with [BOS], as the rows the model was trained on (`dlm adapt` sets it)."""
        return bool(self.config.extra.get("bos_prefix"))

    @property
    def is_causal(self) -> bool:
        return bool(getattr(self.model, "causal", False))

    @property
    def process(self):
        """The forward process (and schedule) the checkpoint was trained with: its graph samplers need it."""
        if getattr(self, "_process", None) is None:
            from dlm.processes.masked import build_process

            self._process = build_process(self.config.process, self.tokenizer, self.config.model.vocab_size)
        return self._process

    # ----- the network ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               block_size: int | None = None) -> torch.Tensor:
        """ids (B, L) -> logits (B, L, V) float32. Time-conditioned models get t = process.model_time(ids).

        A block model (bd3lm) runs under its own block-causal attention; `block_size=n` runs any model under
        block-causal attention with blocks of n (1: causal)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        return self.model_fn(attention_mask, block_size=block_size or self.block_size)(ids)

    @property
    def block_size(self) -> int | None:
        """The block size of a block-diffusion checkpoint (its process's), else None."""
        return getattr(self.process, "block_size", None)

    # ----- generation ---------------------------------------------------------------------------------------
    def options(self, config: GenerationConfig | None = None, **kw: Any) -> GenerationConfig:
        """The options of a call, validated: the checkpoint's defaults, then `config`, then keyword overrides
        (None means: keep; other libraries' names such as num_steps are accepted). Raises SamplingError."""
        given = {k: v for k, v in kw.items() if v is not None}
        for alias in [k for k in given if k in OPTION_ALIASES]:  # other libraries' names (num_steps, gen_length)
            name = OPTION_ALIASES[alias]
            if name in given:
                raise SamplingError(f"{alias}={given[alias]!r} and {name}={given[name]!r} name the same option; "
                                    f"give {name} only")
            given[name] = given.pop(alias)
        try:
            base = config if config is not None else self.sampling
            opts = base.replace(**given).validate()
            if config is None and "steps" not in given:  # the checkpoint's default: fit it to the blocks
                opts = opts.replace(steps=fit_steps(opts.max_new_tokens, opts.steps, opts.block_length))
            SAMPLERS.get(opts.sampler)  # an unknown name fails here, before any work
        except (ConfigError, ValueError) as e:
            raise SamplingError(str(e)) from e
        return opts

    def _check_length(self, L: int) -> None:
        if L > self.max_len:
            raise SamplingError(f"the canvas needs {L} tokens but the model's context is {self.max_len}; "
                                "shorten the prompt or lower max_new_tokens")

    def _prompt_batch(self, prompt: Any, attention_mask: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None, str]:
        """str | list[str] | LongTensor -> left-padded ids (B, P), their attention mask or None, and the kind."""
        tok = self.tokenizer
        if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and
                                       all(isinstance(p, str) for p in prompt)):
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            if any(not t for t in texts):
                raise SamplingError("the prompt is empty: give at least one character of text")
            rows = [tok.encode(t) for t in texts]
            if self.bos_prefix:  # trained on [BOS]-prefixed rows (an AR LM adapted by dlm adapt): as in training
                rows = [[tok.bos_id, *r] for r in rows]
            P = max(len(r) for r in rows)
            ids = torch.full((len(rows), P), tok.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), P), dtype=torch.long)
            for i, r in enumerate(rows):  # left padding: every row's generated region starts at P
                ids[i, P - len(r):] = torch.tensor(r, dtype=torch.long)
                mask[i, P - len(r):] = 1
            return ids, (mask if not bool(mask.all()) else None), ("text" if isinstance(prompt, str) else "texts")
        if isinstance(prompt, (list, tuple)):
            raise SamplingError("a prompt is a string, a list of strings, or a LongTensor (B, L) of token ids")
        ids = torch.as_tensor(prompt, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise SamplingError(f"prompt ids must be a non-empty LongTensor (B, L), got shape {tuple(ids.shape)}")
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, dtype=torch.long)
            if attention_mask.shape != ids.shape:
                raise SamplingError(f"attention_mask {tuple(attention_mask.shape)} must match the ids "
                                    f"{tuple(ids.shape)}")
            if bool(attention_mask.all()):
                attention_mask = None
        return ids, attention_mask, "ids"

    def model_fn(self, attention_mask: torch.Tensor | None = None, block_size: int | None = None) -> ModelFn:
        """(B, L) canvas -> float32 logits, with the padding mask and (for DiT) t = process.model_time(canvas).

        A sampler that knows its time (SEDD, D3PM: `model_time`) passes it as `t` (a float or (B,)); every other
        sampler leaves t to the process's reading of the canvas."""
        needs_time = getattr(self.model, "needs_time", False)
        process = self.process if needs_time else None

        windowed = getattr(self.model, "supports_logits_window", False)

        def fn(x: torch.Tensor, window: tuple[int, int] | None = None, t: Any = None) -> torch.Tensor:
            if not needs_time:
                t = None
            elif t is not None:
                t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
            else:  # the process's one definition of the time a canvas shows (dlm.processes.masked: model_time)
                t = process.model_time(x, attention_mask)
            kwargs = {"logits_window": window} if window is not None else {}
            if block_size is not None:  # block-causal attention (models/common.py attention_rule)
                kwargs["block_size"] = block_size
            with torch.no_grad():
                return self.model(x, t, attention_mask=attention_mask, **kwargs).float()

        return ModelFn(fn, supports_window=windowed, accepts_time=True)

    def denoise(self, canvas: torch.Tensor, start: int, opts: GenerationConfig,
                attention_mask: torch.Tensor | None = None, processors: list | tuple = (),
                prompt_mask: torch.Tensor | None = None, generator: Any = None) -> Iterator[StepEvent]:
        """The public canvas primitive: the denoising events of a canvas (B, L) whose [start, L) is generated
        block by block (masks before `start` are filled with the first block), under `opts` (from `options()`),
        the logits processors and, for guidance, the prompt mask (B, L). Uses the KV caches when opts.cache asks.
        The noise: one generator per row, row i seeded row_seed(opts.seed, i) (dlm.sampling.noise), unless `generator`
        gives it (RowGenerators or a list of one torch.Generator per row; a single torch.Generator is shared)."""
        g = self._row_noise(opts, canvas.shape[0], generator)
        tok = self.tokenizer
        sampler = SAMPLERS.build(opts.sampler, mask_id=tok.mask_id, config=opts, eos_id=tok.eos_id, pad_id=tok.pad_id)
        self._check_family(sampler, opts.sampler)
        canvas = canvas.to(self.device)
        am = attention_mask.to(self.device) if attention_mask is not None else None
        if isinstance(sampler, BlockSampler):  # block by block with an exact cache: no canvas to denoise
            yield from self._block_events(canvas, start, opts, am, processors, sampler, g)
            return
        guided = opts.cfg_scale > 0 and prompt_mask is not None
        # With guidance the network sees 2B rows (conditional + unconditional), so the padding mask doubles.
        model_fn = self.model_fn(torch.cat([am, am]) if am is not None and guided else am)
        if guided:
            if opts.cache != "none":
                raise SamplingError("cfg_scale > 0 needs cache='none' (the KV caches hold one copy of each row)")
            model_fn = classifier_free_guidance(model_fn, prompt_mask.to(self.device), opts.cfg_scale, tok.mask_id)
        eos = tok.eos_id if opts.stop_at_eos else None
        if opts.cache != "none" and getattr(self.model, "supports_kv_cache", False):
            yield from denoise_cached_steps(self.model, canvas, start, opts.steps, opts.block_length, sampler, g,
                                            processors, attention_mask=am, mode=opts.cache, eos_id=eos)
            return
        yield from denoise_steps(model_fn, canvas, start, opts.steps, opts.block_length, sampler, g, processors, eos)

    def _row_noise(self, opts: GenerationConfig, rows: int, generator: Any = None) -> Noise:
        """The noise of a call: `generator` when given, else one generator per row seeded row_seed(opts.seed, i)
        (a fresh base seed when opts.seed is None), so a row's samples never depend on the other rows of the batch."""
        if generator is None:
            return RowGenerators.seeded(opts.seed, rows, self.device)
        g = as_noise(generator)
        if not isinstance(g, (torch.Generator, RowGenerators)):
            raise SamplingError(f"generator must be a torch.Generator, a list of them (one per row) or "
                                f"RowGenerators, got {type(generator).__name__}")
        if isinstance(g, RowGenerators) and len(g) != rows:
            raise SamplingError(f"{len(g)} generators for {rows} rows (prompts x num_samples): give one per row")
        return g

    def _block_events(self, canvas: torch.Tensor, start: int, opts: GenerationConfig, am: torch.Tensor | None,
                      processors: list | tuple, sampler: BlockSampler, g: Noise) -> Iterator[StepEvent]:
        """The block sampler's events (dlm.sampling.block): after the prompt canvas[:, :start], block by block. A
        canvas with known tokens after its first [MASK] (infilling, JSON, documents, code) is decoded from that
        [MASK] on as a template: each block sees its own known tokens and everything before it, nothing later."""
        tok = self.tokenizer
        if opts.cfg_scale > 0:
            raise SamplingError("the block sampler does not do classifier-free guidance (cfg_scale > 0)")
        gaps = (canvas == tok.mask_id).any(0).nonzero()
        if len(gaps) and int(gaps[0]) < start:  # a gap inside the text: decode from the first gap on
            start = int(gaps[0])
        new = canvas[:, start:]
        known = bool((new != tok.mask_id).any())  # a template (infill, JSON, documents): known tokens to keep
        bs = self.block_size or opts.block_length or canvas.shape[1] - start
        yield from block_steps(self.model, canvas[:, :start], am[:, :start] if am is not None else None, sampler, g,
                               processors, block_size=bs, max_new_tokens=canvas.shape[1] - start, steps=opts.steps,
                               eos_id=tok.eos_id, sub_block=sampler.options.sub_block, window=max(self.max_len, 2 * bs),
                               stop_ids=sorted(tok.stop_ids), ar_first_token=sampler.options.ar_first_token,
                               whole_blocks=sampler.options.whole_blocks, template=new if known else None)

    def _check_family(self, sampler: Any, name: str) -> None:
        """A SEDD / D3PM checkpoint samples with its family's samplers, which take its process (graph, schedule)."""
        try:
            sampler.use_process(self.process)
        except ValueError as e:
            raise SamplingError(str(e)) from e

    def _prepare(self, prompt: Any, attention_mask: torch.Tensor | None, opts: GenerationConfig):
        if self.is_causal:
            raise SamplingError("this checkpoint is an autoregressive baseline: use generate() (left-to-right "
                                "decoding); it has no denoising steps to stream or fill")
        ids, am, kind = self._prompt_batch(prompt, attention_mask)
        n = opts.num_samples
        if n > 1 and opts.temperature == 0 and opts.remasking != "random" and not opts.options.draws_noise():
            warnings.warn(f"num_samples={n} at temperature 0 gives {n} identical samples (greedy decoding is "
                          "deterministic); set temperature > 0 (or remasking='random') for diverse samples",
                          stacklevel=3)
        if n > 1:
            ids = ids.repeat_interleave(n, 0)
            am = am.repeat_interleave(n, 0) if am is not None else None
        B, P = ids.shape
        L = P + opts.max_new_tokens
        # The block sampler slides its cache over the context: only the prompt and one block must fit in it.
        self._check_length(P + 1 if issubclass(SAMPLERS.get(opts.sampler), BlockSampler) else L)
        canvas = torch.full((B, L), self.tokenizer.mask_id, dtype=torch.long)
        canvas[:, :P] = ids
        full_am = None
        if am is not None:
            full_am = torch.ones((B, L), dtype=torch.long)
            full_am[:, :P] = am
        prompt_mask = torch.zeros((B, L), dtype=torch.bool)
        prompt_mask[:, :P] = True if am is None else am.bool()
        filters = opts
        if SAMPLERS.get(opts.sampler).applies_top_k_top_p:
            filters = opts.replace(top_k=None, top_p=None)  # the sampler filters itself, in its reference's order
        processors = build_processors(filters, self.tokenizer)
        return canvas, P, full_am, processors, prompt_mask, kind

    def generate(self, prompt: str | list[str] | torch.Tensor, max_new_tokens: int | None = None,
                 steps: int | None = None, block_length: int | None = None, temperature: float | None = None,
                 remasking: str | None = None, seed: int | None = None, sampler: str | None = None,
                 callback: Callable[[StepEvent], None] | None = None, attention_mask: torch.Tensor | None = None,
                 config: GenerationConfig | None = None, constraints: dict[str, Any] | None = None,
                 max_length: int | None = None, generator: Any = None, **options: Any) -> Any:
        """Generate after one prompt or a batch; every GenerationConfig field is accepted as a keyword.

        str -> str (the continuation, cut at the first [EOS]); list[str] -> list[str] (prompts of different
        lengths are left-padded and masked out); LongTensor (B, L) [+ attention_mask (B, L)] -> LongTensor
        (B, L + max_new_tokens), prompt included. With num_samples=n > 1: a list of n strings per prompt, or n
        consecutive rows per prompt row. A list[int] (what `tokenizer.encode` returns) is one row of ids and gives
        the list[int] of prompt + new tokens. `max_length` is the total length (Hugging Face's name); other
        libraries' option names (num_steps, num_sampling_steps, gen_length, ...) are accepted as ours.
        Noise: row i (prompt p's sample j is row p * num_samples + j) draws from its own generator seeded
        row_seed(seed, i) (seed itself for row 0; dlm.sampling.noise), so n samples of one seed differ, and a
        row's text does not depend on the other rows; `generator` (RowGenerators, or a list of one
        torch.Generator per row) replaces that rule.
        `constraints={"format": "markdown", "sections": [...], "max_length": n}` writes a Markdown document with
        exactly those headings (dlm.control.documents.generate_markdown); the code constraints of
        `generate_with_constraints` (function_signature, max_lines, ...) give its result.
        """
        if constraints is not None:
            return self._generate_constrained(prompt, constraints, max_new_tokens=max_new_tokens, steps=steps,
                                              temperature=temperature, remasking=remasking, seed=seed,
                                              callback=callback, **options)
        plain_ids = isinstance(prompt, (list, tuple)) and bool(prompt) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in prompt)
        if plain_ids:  # a list[int], as our tokenizers' encode returns: one row of ids -> list[int]
            prompt = torch.tensor([list(prompt)], dtype=torch.long)
        if max_length is not None:  # Hugging Face's name: the total length, prompt included
            if max_new_tokens is not None:
                raise SamplingError("give max_new_tokens or max_length (the total, prompt included), not both")
            n_prompt = self._prompt_batch(prompt, attention_mask)[0].shape[1]
            if max_length <= n_prompt:
                raise SamplingError(f"max_length={max_length} leaves no room after the {n_prompt}-token prompt; "
                                    "it counts the prompt too (or give max_new_tokens)")
            max_new_tokens = max_length - n_prompt
        opts = self.options(config, max_new_tokens=max_new_tokens, steps=steps, block_length=block_length,
                             temperature=temperature, remasking=remasking, seed=seed, sampler=sampler, **options)
        if self.is_causal:
            if callback is not None:
                raise SamplingError("an autoregressive baseline decodes left to right: it has no denoising steps "
                                    "to show (drop callback / --show / --save-trajectory)")
            ids, am, kind = self._prompt_batch(prompt, attention_mask)
            out = self._decode_left_to_right(ids, am, opts, generator)
            P = ids.shape[1]
        else:
            canvas, P, am, processors, prompt_mask, kind = self._prepare(prompt, attention_mask, opts)
            events = self.denoise(canvas, P, opts, am, processors, prompt_mask, generator)
            out = _final_canvas(canvas, events, callback)
        if kind == "ids":
            return out[0].tolist() if plain_ids and out.shape[0] == 1 else out
        texts = [self.decode_new(row[P:].tolist()) for row in out]
        n = opts.num_samples
        grouped = [texts[i: i + n] for i in range(0, len(texts), n)] if n > 1 else texts
        return grouped[0] if kind == "text" else grouped

    @torch.no_grad()
    def _generate_constrained(self, prompt: Any, constraints: dict[str, Any], **options: Any) -> Any:
        """generate(prompt, constraints=...) -> the Markdown document or the constrained code."""
        from dlm.control.code import CONSTRAINTS as CODE_CONSTRAINTS
        from dlm.control.documents import MARKDOWN_CONSTRAINTS, generate_markdown

        if not isinstance(prompt, str):
            raise SamplingError("constraints= needs a text prompt (a str)")
        if not isinstance(constraints, dict) or not constraints:
            raise SamplingError("constraints must be a non-empty dict")
        given = {k: v for k, v in options.items() if v is not None}
        if given.pop("callback", None) is not None:
            raise SamplingError("constraints= runs several fills: callback is not supported with it")
        if constraints.get("format") == "markdown":
            if "max_new_tokens" in given:
                raise SamplingError('with constraints={"format": "markdown"}, give the length as its "max_length"')
            return generate_markdown(self, prompt, constraints, **given)
        if set(constraints) <= set(CODE_CONSTRAINTS):
            return self.generate_with_constraints(prompt, constraints, **given)
        raise SamplingError(f"unsupported constraints {sorted(constraints)}: use {{'format': 'markdown', "
                            f"'sections': [...], 'max_length': n}} ({list(MARKDOWN_CONSTRAINTS)}) or the code "
                            f"constraints {list(CODE_CONSTRAINTS)}")

    def _decode_left_to_right(self, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                              opts: GenerationConfig, generator: Any = None) -> torch.Tensor:
        """Plain autoregressive decoding for the AR baseline: ids (B, P) -> (B, P + max_new_tokens).

        The network sees [BOS] + the prompt, as in training (the `ar` loss); each step appends one token per row:
        argmax at temperature 0, else a float64 Gumbel-max draw, after the same processors as diffusion sampling
        (banned special tokens, repetition penalty, top-k / top-p). A row that emits [EOS] is filled with [EOS].
        """
        from dlm.models.common import BlockCache
        from dlm.sampling.processors import apply_processors
        from dlm.sampling.sampler import gumbel_argmax

        tok = self.tokenizer
        n = opts.num_samples
        if n > 1:
            ids = ids.repeat_interleave(n, 0)
            attention_mask = attention_mask.repeat_interleave(n, 0) if attention_mask is not None else None
        B, P = ids.shape
        self._check_length(1 + P + opts.max_new_tokens)
        g = self._row_noise(opts, B, generator)  # one generator per row, as the diffusion samplers
        # [BOS] + prompt per row, left-padded: (B, 1 + P); the padding mask marks the real tokens.
        seq = torch.full((B, 1 + P), tok.pad_id, dtype=torch.long)
        am = torch.zeros((B, 1 + P), dtype=torch.long)
        for i in range(B):
            real = ids[i] if attention_mask is None else ids[i][attention_mask[i].bool()]
            seq[i, P - len(real)] = tok.bos_id
            seq[i, P + 1 - len(real):] = real
            am[i, P - len(real):] = 1
        seq = seq.to(self.device)
        am = None if bool(am.all()) else am.to(self.device)
        processors = build_processors(opts, tok)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        stops = torch.tensor(sorted(tok.stop_ids), dtype=torch.long, device=self.device)
        # Causal attention is block-causal with blocks of 1, so the block cache is exact here: the prompt is run
        # once and each step runs only the new token against the stored keys and values.
        cache = BlockCache()
        logits = self.model(seq, None, attention_mask=am, cache=cache.extend(), block_size=1)[:, -1:].float()
        for _ in range(opts.max_new_tokens):
            logits = apply_processors(processors, logits, seq[:, 1:])  # (B, 1, V): the next token
            nxt = gumbel_argmax(logits[:, 0], opts.temperature, g)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, tok.eos_id), nxt)
            done |= torch.isin(nxt, stops)
            seq = torch.cat([seq, nxt[:, None]], 1)
            if am is not None:
                am = torch.cat([am, torch.ones((B, 1), dtype=am.dtype, device=am.device)], 1)
            if bool(done.all()) or seq.shape[1] == 1 + P + opts.max_new_tokens:
                break
            logits = self.model(nxt[:, None], None, attention_mask=am, cache=cache.extend(), block_size=1).float()
        out = torch.full((B, P + opts.max_new_tokens), tok.eos_id, dtype=torch.long)
        out[:, :P] = ids
        new = seq[:, 1 + P:].cpu()
        out[:, P:P + new.shape[1]] = new
        return out

    def stream(self, prompt: str | list[str] | torch.Tensor, config: GenerationConfig | None = None,
               attention_mask: torch.Tensor | None = None, generator: Any = None,
               **options: Any) -> Iterator[StepEvent]:
        """Yield every denoising step (canvas, newly committed positions, their confidences) as it happens."""
        opts = self.options(config, **options)
        canvas, P, am, processors, prompt_mask, _ = self._prepare(prompt, attention_mask, opts)
        yield from self.denoise(canvas, P, opts, am, processors, prompt_mask, generator)

    def decode_new(self, new: list[int]) -> str:
        """Generated ids -> text: cut at the first stop id ([EOS], end of turn), [PAD] removed."""
        tok = self.tokenizer
        stops = tok.stop_ids
        end = next((i for i, t in enumerate(new) if t in stops), len(new))
        return tok.decode([i for i in new[:end] if i != tok.pad_id])

    def chat(self, messages: list[dict[str, str]], config: GenerationConfig | None = None, **options: Any) -> str:
        """The assistant's answer to a conversation [{"role": "user", "content": ...}, ...], through the model's
        own chat template; every GenerationConfig field is accepted as a keyword."""
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages) or not messages:
            raise SamplingError('messages must be a non-empty list of {"role": str, "content": str}')
        try:
            ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        except ValueError as e:
            raise SamplingError(str(e)) from e
        prompt = torch.tensor([ids], dtype=torch.long)
        out = self.generate(prompt, config=config, **options)
        return self.decode_new(out[0, prompt.shape[1]:].tolist())

    def fill(self, canvas: torch.Tensor, processors: list | tuple = (), steps: int | None = None,
             callback: Callable[[StepEvent], None] | None = None, **options: Any) -> torch.Tensor:
        """Fill every [MASK] of a canvas (B, L) as one block (each gap sees the whole canvas at every step),
        under extra logits `processors` (constraint masks): -> the final canvas. `steps` defaults to one commit
        per step. What infill, documents, constrained code and JSON build on (dlm.control.canvas)."""
        from dlm.control.canvas import fill_canvas

        return fill_canvas(self, canvas, list(processors), steps=steps, callback=callback, **options)

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
            if n > self.max_len:  # checked before [MASK] * n is built: a huge n must not exhaust memory
                raise SamplingError(f"gap {m.group(0)[:40]} is longer than the model's context ({self.max_len} "
                                    "tokens)")
            gaps.append(Gap(start=len(ids), length=n, fixed=m.group(1) is not None))
            ids += [self.tokenizer.mask_id] * n
            pos = m.end()
        pieces.append(text[pos:])
        ids += self.tokenizer.encode(text[pos:])
        return ids, gaps, pieces

    def infill(self, text: str, steps: int | None = None, max_span: int | None = None,
               temperature: float | None = None, remasking: str | None = None, seed: int | None = None,
               callback: Callable[[StepEvent], None] | None = None, **options: Any) -> str:
        """Fill every [MASK] (up to max_span tokens, pads removed) and [MASK:n] (exactly n tokens) gap.

        The text outside the gaps is returned unchanged, character for character. `steps` defaults to the
        number of masked tokens (one commit per step). `defer_eos` defaults to True here: [PAD] and [EOS] are
        committed after the text of a gap.
        """
        from dlm.control.canvas import fill_canvas

        if self.is_causal:
            raise SamplingError("this checkpoint is an autoregressive baseline; it cannot infill")
        given = dict(temperature=temperature, remasking=remasking, seed=seed, max_span=max_span, **options)
        opts = self.options(None, **given)  # checked before any parsing or model call
        ids, gaps, pieces = self.parse_gaps(text, opts.max_span)
        if not gaps:
            raise SamplingError("no gap in the text: mark each gap with [MASK] (unknown length) or [MASK:n]")
        self._check_length(len(ids))
        canvas = torch.tensor([ids], dtype=torch.long)
        tok = self.tokenizer
        fixed = torch.zeros_like(canvas, dtype=torch.bool)
        for g in gaps:
            if g.fixed:
                fixed[0, g.start: g.start + g.length] = True
        # [PAD] closes a bare [MASK] gap (fill_canvas commits it after the text: defer_eos); a fixed [MASK:n] gap
        # holds n real tokens. The whole canvas is one block: every gap sees both sides at every step.
        out = fill_canvas(self, canvas, [BannedTokens([tok.pad_id, tok.eos_id], where=fixed)], steps=steps,
                          callback=callback, **given)[0].tolist()
        result = [pieces[0]]
        for g, after in zip(gaps, pieces[1:], strict=True):
            fill = [i for i in out[g.start: g.start + g.length] if i not in (tok.pad_id, tok.eos_id)]
            result.append(tok.decode(fill))
            result.append(after)
        return "".join(result)

    # ----- controlled generation (dlm.control) -------------------------------------------------------------------
    def generate_with_constraints(self, prompt: str, constraints: dict[str, Any], **options: Any):
        """Python code for `prompt` with a pinned signature, a docstring, a line limit, and that always parses
        (dlm.control.code) -> ConstrainedResult(code, checks, valid_before_repair, repair_rounds, fallback)."""
        from dlm.control.code import generate_with_constraints

        return generate_with_constraints(self, prompt, constraints, **options)

    def generate_json(self, schema: dict[str, Any], **options: Any) -> Any:
        """A value that always parses and validates against `schema`: keys and punctuation pinned, values
        generated under per-type token constraints (dlm.control.json_schema)."""
        from dlm.control.json_schema import generate_json

        return generate_json(self, schema, **options)

    def generate_document(self, template: str, data: dict[str, Any] | None = None, **options: Any) -> str:
        """A Markdown template with fixed text, {field} placeholders from `data` and [MASK] / [MASK:n] /
        [MASK:<=n] gaps; everything outside the gaps is returned unchanged (dlm.control.documents)."""
        from dlm.control.documents import generate_document

        return generate_document(self, template, data, **options)

    def augment(self, texts: list[str], noise: float = 0.3, n: int = 4, **options: Any) -> list[list[str]]:
        """n variants of each text: a fraction `noise` of its tokens re-masked and denoised (dlm.control.augment)."""
        from dlm.control.augment import augment

        return augment(self, texts, noise=noise, n=n, **options)

    def fill_pattern(self, before: str, pattern: str, after: str = "", **options: Any) -> str:
        """The text between `before` and `after` matching a bounded regex, e.g. r"\\d{4}-\\d{2}-\\d{2}" (always)."""
        from dlm.control.constraints import fill_pattern

        return fill_pattern(self, before, pattern, after, **options)


def _final_canvas(canvas: torch.Tensor, events: Iterator[StepEvent],
                  callback: Callable[[StepEvent], None] | None) -> torch.Tensor:
    """Run the events to the end (showing each to `callback`) -> the last canvas on the CPU."""
    for event in events:
        if callback is not None:
            callback(event)
        canvas = event.output.xt
    return canvas.cpu()
