"""Typed configuration: one dataclass per component, saved as JSON beside every checkpoint.

Unknown keys are an error (a typo in a config or a CLI override must not pass silently), and
values are type-checked when a config is built from a dict.

    cfg = ModelConfig.preset("small", vocab_size=260)
    ModelConfig.from_dict(json.loads(path.read_text()))
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from dlm.errors import ConfigError  # noqa: F401  (re-exported: raised by every config)
from dlm.io import atomic_write_text, read_text_file

T = TypeVar("T", bound="_Config")

FORMAT_VERSION = 2  # 2: separate q/k/v/o and gate/up/down projections (version 1 fused them; still loaded)



def _check_type(cls_name: str, name: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(cls_name, name, value, inner[0])
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{cls_name}.{name} must be {tp.__name__}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{cls_name}.{name} must be a list, got {value!r}")
        return origin(value)
    return value


# Names other libraries use for our options: accepted by DiffusionLM.generate & co. as these fields, and
# suggested by every unknown-key error.
OPTION_ALIASES = {"num_steps": "steps", "num_sampling_steps": "steps", "sampling_steps": "steps",
                  "gen_length": "max_new_tokens", "max_tokens": "max_new_tokens",
                  "num_return_sequences": "num_samples", "n": "num_samples", "alg": "remasking"}


def did_you_mean(names: list[str], known: set[str]) -> str:
    """' (did you mean: steps for num_step?)' for each unknown name close to a known one or an alias, else ''."""
    import difflib

    hints = []
    for name in names:
        if name in OPTION_ALIASES and OPTION_ALIASES[name] in known:
            hints.append(f"{OPTION_ALIASES[name]!r} for {name!r}")
            continue
        close = difflib.get_close_matches(name, sorted(known | set(OPTION_ALIASES)), n=1, cutoff=0.6)
        if close:
            hints.append(f"{OPTION_ALIASES.get(close[0], close[0])!r} for {name!r}")
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


class _Config:
    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__} must be a JSON object, got {type(d).__name__}")
        hints = _hints(cls)
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} key(s) {unknown}{did_you_mean(unknown, known)}; known keys: "
                              f"{sorted(known)}")
        kwargs = {k: _check_type(cls.__name__, k, v, hints[k]) for k, v in d.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def replace(self: T, **changes: Any) -> T:
        merged = {**self.to_dict(), **changes}
        return type(self).from_dict(merged)

    def save_json(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls: type[T], path: str | Path) -> T:
        try:
            return cls.from_dict(json.loads(read_text_file(path, error=ConfigError)))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e


@dataclass
class ModelConfig(_Config):
    """The network: tokens (B, L) -> logits (B, L, V)."""

    arch: str = "llada"  # registry name in dlm.models: llada (bidirectional), dit (time-conditioned), ar (causal)
    vocab_size: int = 260
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    d_ff: int | None = None  # None: SwiGLU width 8/3 * d_model rounded up to a multiple of 64 (LLaMA)
    max_len: int = 256  # longest canvas the model was trained for; longer inputs are refused
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    time_dim: int = 128  # DiT only: width of the sinusoidal time embedding before its MLP
    n_kv_heads: int | None = None  # grouped-query attention (Dream / Qwen2); None: as many as n_heads
    qkv_bias: bool = False  # biases on the q, k, v projections (Dream / Qwen2); LLaDA has none
    logits_shift: bool = False  # Dream: position i predicts token i + 1, so logits move one place right
    cond_dim: int = 128  # DDiT (MDLM / SEDD): width of the noise-level embedding c that drives adaLN
    time_conditioning: bool = True  # DDiT: False conditions on sigma = 0 always (MDLM's released OWT model)
    sigma_eps: float = 1e-3  # DDiT: the network sees sigma(t) = -log(1 - (1 - eps) t), the log-linear noise
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's queries and keys before RoPE
    d_head: int | None = None  # head width when it is not d_model / n_heads (Qwen3-0.6B: 1024 / 16 heads of 128)
    rotary_dim: int | None = None  # partial RoPE (LLaDA2): only each head's first rotary_dim channels rotate
    # Mixture of experts (LLaDA2 / Ling 2.0: models/moe.py); moe_experts=0 keeps the dense SwiGLU in every layer.
    moe_experts: int = 0  # routed experts of each MoE layer
    moe_top_k: int = 1  # experts per token
    moe_d_ff: int | None = None  # width of each expert (a shared one too)
    moe_shared: int = 0  # shared experts, run on every token (one SwiGLU of width moe_shared * moe_d_ff)
    moe_groups: int = 1  # group-limited routing: the experts in this many groups, ...
    moe_topk_groups: int = 1  # ... of which the best groups (by their top-2 scores) are eligible
    moe_scale: float = 1.0  # the routed output's factor (routed_scaling_factor)
    moe_dense_layers: int = 0  # the first layers keep the dense SwiGLU (first_k_dense_replace)

    def __post_init__(self) -> None:
        sizes = {"vocab_size": self.vocab_size, "d_model": self.d_model, "n_layers": self.n_layers,
                 "n_heads": self.n_heads, "max_len": self.max_len, "time_dim": self.time_dim, "cond_dim": self.cond_dim,
                 "d_ff": self.d_ff if self.d_ff is not None else 1}
        small = [f"{k}={v}" for k, v in sizes.items() if not (isinstance(v, int) and v >= 1)]
        if small:
            raise ConfigError(f"ModelConfig sizes must be integers >= 1, got {', '.join(small)}")
        for k in ("rope_theta", "norm_eps"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"ModelConfig.{k} must be a finite number > 0, got {v!r}")
        for k in ("dropout", "sigma_eps"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                raise ConfigError(f"ModelConfig.{k} must be in [0, 1), got {v!r}")
        if self.d_head is not None and self.d_head < 1:
            raise ConfigError(f"ModelConfig.d_head must be >= 1 (or None: d_model / n_heads), got {self.d_head}")
        if self.d_head is None and self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ConfigError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head width {self.head_dim} (d_head, or d_model/n_heads) must be even for RoPE")
        if self.rotary_dim is not None and not (2 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ConfigError(f"ModelConfig.rotary_dim must be even and in [2, {self.head_dim}], got {self.rotary_dim}")
        if self.moe_experts:
            self._check_moe()

    def _check_moe(self) -> None:
        e, g = self.moe_experts, self.moe_groups
        if not (isinstance(self.moe_d_ff, int) and self.moe_d_ff >= 1):
            raise ConfigError(f"ModelConfig.moe_d_ff must be an integer >= 1 with moe_experts={e}, got {self.moe_d_ff}")
        if e < 2 or g < 1 or e % g or e // g < 2:
            raise ConfigError(f"moe_experts={e} must split into moe_groups={g} groups of at least 2 experts")
        if not 1 <= self.moe_topk_groups <= g:
            raise ConfigError(f"moe_topk_groups={self.moe_topk_groups} must be in [1, moe_groups={g}]")
        if not 1 <= self.moe_top_k <= self.moe_topk_groups * (e // g):
            raise ConfigError(f"moe_top_k={self.moe_top_k} must be in [1, {self.moe_topk_groups * (e // g)}] (the "
                              "experts of the eligible groups)")
        if self.moe_shared < 0 or self.moe_dense_layers < 0 or not math.isfinite(self.moe_scale):
            raise ConfigError("moe_shared and moe_dense_layers must be >= 0 and moe_scale finite, got "
                              f"{self.moe_shared}, {self.moe_dense_layers}, {self.moe_scale}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """The channels of each head that RoPE rotates (all of them unless rotary_dim is set)."""
        return self.rotary_dim if self.rotary_dim is not None else self.head_dim

    @property
    def ff_width(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return ((8 * self.d_model // 3) + 63) // 64 * 64

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
        return cls.from_dict({**MODEL_PRESETS[name], **overrides})


# Parameter counts and CPU throughput of each preset: benchmarks/train_throughput.py (table in docs/training.md).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # tiny: 4 heads left the unigram plateau soonest (docs/training.md)
    "tiny": {"d_model": 128, "n_layers": 2, "n_heads": 4},
    "small": {"d_model": 256, "n_layers": 4, "n_heads": 4},  # head width 64: ~20% faster than 32 on CPU SDPA
    "base": {"d_model": 384, "n_layers": 6, "n_heads": 6},
    "large": {"d_model": 640, "n_layers": 8, "n_heads": 10, "max_len": 512},
}


@dataclass
class ProcessConfig(_Config):
    """Forward process, noise schedule and training objective.

    `dlm.train.process_config(name)` gives a family's defaults (docs/families.md): masked, sedd-absorbing,
    sedd-uniform, d3pm-absorbing, d3pm-uniform.
    """

    process: str = "masked"  # registry name in dlm.processes (PROCESSES)
    schedule: str = "linear"  # registry name in dlm.schedules
    eps: float = 1e-3  # LLaDA: p_mask = (1 - eps) t + eps, so no step has a zero mask rate
    loss: str = "masked_elbo"  # registry name in dlm.losses: masked_elbo, masked_unweighted, ar, score_entropy, ...
    antithetic: bool = True  # stratified t across the batch (MDLM's low-discrepancy sampler)
    infill_prob: float = 0.0  # fraction of sequences trained on the span-infilling objective
    max_span: int = 64  # longest gap (text + [PAD] tail) of the infilling objective
    sigma_min: float = 1e-4  # geometric schedule (SEDD uniform): the noise sigma(0) already present at t = 0
    sigma_max: float = 20.0  # geometric schedule: sigma(1); exp(-20) of the data survives at t = 1
    timesteps: int = 1000  # D3PM: number T of discrete forward steps (Austin et al. use 1000)
    hybrid_lambda: float = 0.01  # D3PM hybrid loss: weight of the auxiliary x0 cross-entropy (0: the pure ELBO)
    block_size: int = 0  # bd3lm: tokens per block (1: AR, seq_len: MDLM); 0 for processes without blocks
    # bd3lm (BD3LM's clipped schedule): each block's time t ~ U[clip_min, clip_max] in training (the reported bound
    # always uses [0, 1]); dlm.processes.block.search_clip finds the interval of least variance on held-out data
    clip_min: float = 0.0
    clip_max: float = 1.0


@dataclass
class TrainConfig(_Config):
    data: str = "shakespeare"  # corpus name from dlm.data, or a path to a file, folder or .jsonl
    out: str = "runs/default"
    tokenizer: str = "byte"  # byte, or bpe:<vocab size> trained on the training split
    max_steps: int = 1000
    batch_size: int = 32
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta2: float = 0.99  # small-model setting (nanoGPT char models); LLaDA uses 0.95 at scale
    grad_clip: float = 1.0
    # auto: bf16 autocast where the device computes bf16 natively (AMX / AVX512_BF16 CPUs, CUDA), else float32;
    # fp32; bf16 (forced: warns where emulated, tens of times slower). dlm.precision decides.
    precision: str = "auto"
    ema: float = 0.0  # 0 disables; e.g. 0.999 keeps an EMA copy that is saved as the inference weights
    eval_every: int = 250
    eval_batches: int = 8
    ckpt_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    threads: int = 0  # torch threads; 0: the default of dlm.precision.set_threads (one fewer than the CPUs)
    val_fraction: float = 0.05
    grad_accum: int = 1  # micro-batches per step: each rank computes batch_size / (ranks x grad_accum) rows at once
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    random_length_prob: float = 0.0  # LLaDA pretrains 1% (0.01) of its batches on a prefix of random length
    # The older spelling: bf16=True / False (and "bf16" in configs saved before `precision`) is read as precision
    # "bf16" / "fp32"; it is not a field, so a config saves and round-trips as `precision` alone.
    bf16: dataclasses.InitVar[bool | None] = None

    def __post_init__(self, bf16: bool | None) -> None:
        if bf16 is not None:
            if not isinstance(bf16, bool):
                raise ConfigError(f"TrainConfig.bf16 must be bool, got {bf16!r}")
            implied = "bf16" if bf16 else "fp32"
            if self.precision not in ("auto", implied):
                raise ConfigError(f"TrainConfig: bf16={bf16} contradicts precision={self.precision!r}; "
                                  "give precision alone")
            self.precision = implied
        if self.precision not in ("auto", "fp32", "bf16"):  # dlm.precision.PRECISIONS
            raise ConfigError(f"TrainConfig.precision must be auto, fp32 or bf16, got {self.precision!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """As every config; a "bf16" key (an old config, or replace(bf16=...)) sets the precision it names."""
        if not isinstance(d, dict) or "bf16" not in d:
            return super().from_dict(d)
        d = dict(d)
        bf16 = d.pop("bf16")
        d.pop("precision", None)
        return dataclasses.replace(super().from_dict(d), bf16=bf16)

    def validate(self) -> TrainConfig:
        """Check every value on its own (before any data is read); errors say which values would work."""
        _check_finite(self)
        at_least = {"max_steps": 1, "batch_size": 1, "seq_len": 1, "eval_every": 1, "eval_batches": 1,
                    "ckpt_every": 1, "log_every": 1, "grad_accum": 1, "warmup_steps": 0, "keep_checkpoints": 0,
                    "threads": 0}
        for k, lo in at_least.items():
            if getattr(self, k) < lo:
                raise ConfigError(f"{k} must be >= {lo}, got {getattr(self, k)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"grad_accum={self.grad_accum} must divide batch_size={self.batch_size}")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ConfigError(f"lr and grad_clip must be > 0, got lr={self.lr}, grad_clip={self.grad_clip}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for k in ("beta2", "ema", "val_fraction"):
            if not 0.0 <= getattr(self, k) < 1.0:
                raise ConfigError(f"{k} must be in [0, 1), got {getattr(self, k)}")
        for k in ("min_lr_ratio", "random_length_prob"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ConfigError(f"{k} must be in [0, 1], got {getattr(self, k)}")
        _check_seed(self.seed)
        return self


@dataclass
class SFTConfig(_Config):
    """Instruction tuning data (dlm.sft): chats rendered with the model's template, the response alone trained."""

    data: str = ""  # JSONL, one {"messages": [{"role": ..., "content": ...}, ...]} per line; the last is the answer
    template: str = "auto"  # auto: the tokenizer's chat template, else dlm.sft's plain fallback; fallback: always it
    # EOS padding of a response to the batch length. response (LLaDA): masked, scored and counted in the answer
    # length like the answer itself, so the model learns to end; context: left clean and outside the loss.
    eos_padding: str = "response"
    max_examples: int | None = None  # use the first n chats only


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@dataclass
class SamplerOptions(_Config):
    """The options one sampler reads beyond GenerationConfig's common ones. Each sampler declares a subclass beside
    its class (`Sampler.Options`: `FastDLLMOptions`, `DreamOptions`, ...); a sampler that reads none keeps this empty
    one. Fields of the same name in two samplers mean the same thing (same type and default: tested)."""

    def validate(self) -> SamplerOptions:
        _check_finite(self)
        return self

    def draws_noise(self) -> bool:
        """Whether these options make even a temperature-0 decode random (Dream's alg_temp)."""
        return False


def sampler_options(sampler: str) -> type[SamplerOptions]:
    """The options class of a registered sampler (dlm.sampling.SAMPLERS[sampler].Options)."""
    from dlm.sampling.sampler import SAMPLERS  # the samplers register their options beside their classes

    return SAMPLERS.get(sampler).Options


@functools.cache  # the registry is fixed once its plugins are imported; every GenerationConfig reads this
def all_sampler_options() -> dict[str, tuple[list[str], Any, Any]]:
    """Every sampler option by name -> (the samplers that read it, its type, its default). Read only."""
    from dlm.sampling.sampler import SAMPLERS

    out: dict[str, tuple[list[str], Any, Any]] = {}
    for name in SAMPLERS.names():
        cls = SAMPLERS.get(name).Options
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            entry = out.setdefault(f.name, ([], hints[f.name], f.default))
            entry[0].append(name)
    return out


@dataclass(init=False)  # __init__ takes the options flat
class GenerationConfig(_Config):
    """Every option of DiffusionLM.generate / infill / stream; defaults saved with a checkpoint, overridable per call.

    The fields below are common to every sampler; `options` holds the chosen sampler's own (a `SamplerOptions`
    subclass declared beside the sampler: threshold and factor for fast_dllm, eps and alg_temp for dream, ...).
    Dicts, files and keyword overrides stay flat: `GenerationConfig.from_dict({"sampler": "fast_dllm",
    "threshold": 0.9})`, `cfg.replace(threshold=0.95)`, `lm.generate(p, threshold=0.9)`; an option the sampler does
    not read is an error naming the samplers that do. `validate()` checks the options against each other with
    errors that say which values would work.
    """

    max_new_tokens: int = 128
    steps: int = 64
    block_length: int = 32  # semi-autoregressive block size; 0 or >= max_new_tokens: one block
    sampler: str = "llada"  # registry name in dlm.sampling.SAMPLERS: llada, dream, mdlm, fast_dllm, ...
    remasking: str = "low_confidence"  # registry name in dlm.sampling.REMASKING
    temperature: float = 0.0  # 0 is greedy; > 0 samples (Gumbel-max in float64 for llada)
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # > 1 discourages tokens already on the canvas (CTRL-style)
    cfg_scale: float = 0.0  # classifier-free guidance: uncond + (s + 1) (cond - uncond), prompt masked in uncond
    cache: str = "none"  # none, prefix, dual: Fast-dLLM KV caches, refreshed at each block
    ban_eos: bool = False  # never generate [EOS]
    defer_eos: bool = False  # an [EOS] is committed only when nothing else is left in the block
    stop_at_eos: bool = False  # variable length: a row stops once its block holds [EOS]; the rest becomes [EOS]
    num_samples: int = 1  # n samples of each prompt in one batched call
    max_span: int = 64  # length of a bare [MASK] gap in infill
    seed: int | None = None
    # Ban [MASK] and [BOS] (and [PAD] outside infilling gaps) from every prediction. dlm's own models keep it on;
    # upstream folders (LLaDA, Dream, MDLM, SEDD) load with it off, so that greedy generation equals their reference
    # samplers token for token (a committed [MASK] prediction then leaves the position masked, as upstream).
    suppress_special: bool = True
    options: SamplerOptions = field(default_factory=SamplerOptions)  # the sampler's own (flat in dicts and files)

    @classmethod
    def common_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "options"]

    @classmethod
    def option_names(cls) -> set[str]:
        """Every name a flat dict / keyword override may use: the common fields and every sampler's options."""
        return set(cls.common_names()) | set(all_sampler_options())

    def __init__(self, **kwargs: Any) -> None:
        """Flat keywords, as from_dict: GenerationConfig(max_new_tokens=256, sampler="fast_dllm", threshold=0.9).
        A key of another sampler's options is dropped when it holds that option's default (configs saved before
        the options were split list every one), else refused with the samplers that read it."""
        d = dict(kwargs)
        nested = d.pop("options", {})
        if isinstance(nested, SamplerOptions):
            nested = nested.to_dict()
        if not isinstance(nested, dict):
            raise ConfigError(f"GenerationConfig.options must be an object, got {nested!r}")
        common = {f.name: f for f in fields(self) if f.name != "options"}
        sampler = d.get("sampler", common["sampler"].default)
        if not isinstance(sampler, str):
            raise ConfigError(f"GenerationConfig.sampler must be str, got {sampler!r}")
        try:
            own_cls = sampler_options(sampler)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        own = {f.name for f in fields(own_cls)}
        theirs = all_sampler_options()
        flat = {**nested, **{k: d.pop(k) for k in list(d) if k not in common}}
        unknown = sorted(k for k in flat if k not in own and k not in theirs)
        if unknown:
            known = set(common) | set(theirs)
            raise ConfigError(f"unknown GenerationConfig key(s) {unknown}{did_you_mean(unknown, known)}; known "
                              f"keys: {sorted(known)}")
        for k in [k for k in flat if k not in own]:
            readers, _, default = theirs[k]
            if flat[k] != default:
                raise ConfigError(f"{k} is an option of the {' and '.join(readers)} sampler"
                                  f"{'s' if len(readers) > 1 else ''}, not of {sampler!r}: give sampler="
                                  f"{readers[0]!r} with it (or leave {k} out)")
            del flat[k]
        hints = _hints(type(self))
        for name, f in common.items():
            setattr(self, name, _check_type("GenerationConfig", name, d[name], hints[name]) if name in d else f.default)
        self.options = own_cls.from_dict(flat)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__} must be a JSON object, got {type(d).__name__}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Flat: the common fields, then the sampler's options."""
        return {**{k: getattr(self, k) for k in self.common_names()}, **self.options.to_dict()}

    def replace(self, **changes: Any) -> GenerationConfig:
        """Keyword overrides, flat. A new `sampler` keeps the options of the old one that it reads too and drops
        the rest (a checkpoint's threshold does not follow a switch to llada); a given option it does not read is
        refused."""
        base = self.to_dict()
        sampler = changes.get("sampler", self.sampler)
        if sampler != self.sampler and isinstance(sampler, str):
            try:
                keep = {f.name for f in fields(sampler_options(sampler))}
            except ValueError as e:
                raise ConfigError(str(e)) from None
            for f in fields(self.options):
                if f.name not in keep:
                    base.pop(f.name)
        return type(self).from_dict({**base, **changes})

    def validate(self) -> GenerationConfig:
        def bad(msg: str) -> None:
            raise ConfigError(msg)

        _check_finite(self)  # NaN passes every comparison below, and inf breaks the sampler's arithmetic
        if self.max_new_tokens < 1:
            bad(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.steps < 1:
            bad(f"steps must be >= 1, got {self.steps}")
        if self.block_length < 0:
            bad(f"block_length must be >= 1 (or 0: the whole generation as one block), got {self.block_length}")
        if self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            bad(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.cfg_scale < 0:
            bad(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.cache not in ("none", "prefix", "dual"):
            bad(f"cache must be none, prefix or dual, got {self.cache!r}")
        if self.num_samples < 1:
            bad(f"num_samples must be >= 1, got {self.num_samples}")
        if self.max_span < 1:
            bad(f"max_span must be >= 1, got {self.max_span}")
        if self.seed is not None:
            _check_seed(self.seed)
        self.options.validate()
        return self


SamplingConfig = GenerationConfig  # the name used by checkpoints written before GenerationConfig


@dataclass
class CheckpointConfig(_Config):
    """Everything saved in config.json beside model.safetensors."""

    model: ModelConfig = field(default_factory=ModelConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    sampling: GenerationConfig = field(default_factory=GenerationConfig)
    format_version: int = FORMAT_VERSION
    library: str = "dlm"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"a checkpoint config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            _raise_unknown({k: d[k] for k in unknown})
        if "model" not in d:  # default sizes would build a network the weights do not fit, or fit by chance
            raise ConfigError("the checkpoint config has no 'model' section (the network's sizes); a dlm config.json "
                              "holds model, process and sampling")
        if not isinstance(d.get("extra", {}), dict):
            raise ConfigError("checkpoint config 'extra' must be a JSON object")
        version = d.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ConfigError(
                f"checkpoint format_version {version!r} is newer than this dlm understands ({FORMAT_VERSION}); "
                "upgrade dlm"
            )
        return cls(  # every key is known (checked above)
            model=ModelConfig.from_dict(d["model"]),
            process=ProcessConfig.from_dict(d.get("process", {})),
            sampling=GenerationConfig.from_dict(d.get("sampling", {})),
            format_version=version,
            library=d.get("library", "dlm"),
            extra=d.get("extra", {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sampling": self.sampling.to_dict()}  # the sampling options flat, as saved
    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CheckpointConfig:
        try:
            d = json.loads(read_text_file(path, error=ConfigError))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from e
        return cls.from_dict(d)


def _check_finite(cfg: Any) -> None:
    """Every float field of a config is a finite number (NaN and inf are refused by name)."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{f.name} must be a finite number, got {v}")


SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes [0, 2**64); the server and JSON clients keep to int64


def _check_seed(seed: int) -> None:
    """One rule for a seed everywhere (library, CLI, server): an integer in [0, 2**63)."""
    if not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"seed must be in [0, 2**63), got {seed}")


def _raise_unknown(d: dict[str, Any]) -> dict[str, Any]:
    raise ConfigError(f"unknown checkpoint config key(s) {sorted(d)}")


def is_dataclass_config(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and isinstance(obj, _Config)
