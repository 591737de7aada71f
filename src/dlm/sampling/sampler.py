"""The sampler contract: `set_timesteps` plans a block's commits, `step` turns one forward pass into one denoising
step, and every other hook a loop may use is declared on `Sampler` with its default (diffusers' scheduler style).
Each algorithm lives in a file named for it: llada.py, dream.py, mdlm.py, fast_dllm.py, sedd.py, d3pm.py, block.py;
they register in `SAMPLERS`, which imports them on the first lookup.

    sampler = SAMPLERS.build("llada", mask_id=tok.mask_id, config=GenerationConfig(temperature=0.0))
    sampler.set_timesteps(steps, is_masked[:, lo:hi]); out = sampler.step(logits, xt, lo, hi, generator)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dlm.config import ConfigError, GenerationConfig, SamplerOptions
from dlm.registry import Registry
from dlm.sampling.noise import Noise, uniform
from dlm.sampling.remasking import REMASKING

SAMPLERS: Registry[type[Sampler]] = Registry("sampler", plugins=tuple(
    f"dlm.sampling.{m}" for m in ("llada", "dream", "mdlm", "fast_dllm", "sedd", "d3pm", "block")), name_attr="name")


@dataclass
class ThresholdOptions(SamplerOptions):
    """Confidence-threshold decoding (Fast-dLLM, SDAR, Fast-dLLM v2)."""

    threshold: float | None = None  # commit every masked token with confidence >= threshold (at least one)

    def validate(self) -> ThresholdOptions:
        super().validate()
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in (0, 1], got {self.threshold}")
        return self


@dataclass
class TimestepOptions(SamplerOptions):
    """Samplers that walk a linear schedule of times from 1 down to eps (Dream, MDLM)."""

    eps: float = 1e-3  # the last timestep of the linear schedule 1 -> eps

    def validate(self) -> TimestepOptions:
        super().validate()
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"eps must be in (0, 1), got {self.eps}")
        return self


@dataclass
class SamplerOutput:
    xt: torch.Tensor  # (B, L) the canvas after this step
    committed: torch.Tensor  # (B, L) bool: positions unmasked by this step
    x0: torch.Tensor  # (B, L) the prediction at each position the step could commit (xt elsewhere)
    confidence: torch.Tensor  # (B, L) float64 score of each candidate prediction (-inf where not a candidate)


def num_transfer_tokens(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """n_masked (B,) -> (B, steps) commits per step: n // steps each, the remainder to the first steps."""
    base = n_masked // steps
    remainder = n_masked % steps
    plan = base[:, None].repeat(1, steps)
    plan += (torch.arange(steps, device=n_masked.device)[None, :] < remainder[:, None]).long()
    return plan


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: Noise) -> torch.Tensor:
    """argmax(logits / T + Gumbel) computed in float64 (LLaDA's `add_gumbel_noise`, in log space); T=0: argmax.

    logits (N, V): with RowGenerators, row r's items are drawn from its own generator (`for_items` counts, or
    one row of logits per generator)."""
    if temperature <= 0:
        return logits.argmax(-1)
    u = uniform(generator, logits.shape, dtype=torch.float64, device=logits.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logits.double() + temperature * gumbel).argmax(-1)


class Sampler:
    """A denoising rule. Options live on `self.config` (a GenerationConfig: the common ones) and `self.options`
    (its `Options`, this sampler's own, declared on its class); `step` takes only tensors.

    Subclasses implement `set_timesteps` (plan a block) and `step` (one forward pass -> one update). The base
    plans LLaDA's even split; `commits_planned` is what the next step commits when the rule fixes a count.

    The contract: every hook a denoising loop may use is declared here with its default, as diffusers' schedulers
    do, so loops never probe for attributes; tests/test_sampler_contract.py checks every registered sampler.
    """

    name: ClassVar[str] = ""  # the name it is registered under in SAMPLERS (set by the registry)
    Options: ClassVar[type[SamplerOptions]] = SamplerOptions  # the options it reads beyond GenerationConfig's

    # ----- what the loop may rely on (class-level defaults; a subclass overrides what differs) -----------------
    fixed_plan: bool = False  # `commits_planned` is exact: a step planned to commit nothing may skip its forward
    variable_steps: bool = False  # step until the block holds no mask (threshold decoding), not a fixed count
    windowed: bool = False  # `step(..., offset=w0)` accepts the logits of [w0, hi) only
    reuse_logits_when_unchanged: bool = False  # an unchanged canvas may reuse the last logits (MDLM's cache)
    applies_top_k_top_p: bool = False  # filters top-k / top-p itself, in its reference's order (not processors)

    @property
    def model_time(self) -> float | None:
        """The time t of the next forward when the sampler owns its time (SEDD, D3PM); None leaves a
        time-conditioned network's t to the process (`ForwardProcess.model_time` of the canvas)."""
        return None

    def use_process(self, process: Any) -> None:
        """Take the forward process of the checkpoint; a masked-diffusion sampler refuses a family that has its
        own samplers (SEDD, D3PM: `process.sampling["sampler"]`), with the name to use."""
        own = getattr(process, "sampling", {}).get("sampler")
        if own is not None:
            raise ValueError(f"this sampler samples masked diffusion, but the checkpoint is a "
                             f"{type(process).__name__} model: use sampler={own!r}")

    def begin(self, x: torch.Tensor, region: slice, generator: Noise) -> torch.Tensor:
        """Called once a block is planned, before its first step -> the canvas (a uniform graph draws its prior)."""
        return x

    def pending(self, x: torch.Tensor, region: slice) -> bool:
        """Whether the block needs another step: by default, while it holds a [MASK]."""
        return bool((x[:, region] == self.mask_id).any())

    def remasking_rule(self, name: str) -> Any:
        """The rule that ranks positions to commit (dlm.sampling.remasking), by name; a sampler with a rule of its
        own (Dream's `origin`, which ranks nothing) overrides this."""
        return REMASKING.build(name)

    def skip_step(self) -> None:
        """Advance past a step that commits nothing (`fixed_plan`), whose forward the loop skipped."""
        self.step_index += 1

    def __init__(self, mask_id: int, config: GenerationConfig | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, **overrides: Any) -> None:
        # A config made for another sampler keeps the options this one reads too (GenerationConfig.replace).
        self.config = (config or GenerationConfig()).replace(sampler=self.name, **overrides).validate()
        self.options = self.config.options
        self.mask_id = mask_id
        self.eos_id = eos_id
        # The end-of-text markers that `defer_eos` commits last: [EOS], and [PAD] that closes an infilling gap.
        self.end_ids = torch.tensor([i for i in (eos_id, pad_id) if i is not None], dtype=torch.long)
        self.temperature = self.config.temperature
        self.remasking = self.remasking_rule(self.config.remasking)
        self.plan: torch.Tensor | None = None  # (B, steps)
        self.step_index = 0

    def defer_end_markers(self, pred: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
        """With `defer_eos`, predictions of [EOS] / [PAD] rank below every other one (scores in [0, 1])."""
        if not self.config.defer_eos or self.end_ids.numel() == 0:
            return conf
        return torch.where(torch.isin(pred, self.end_ids.to(pred.device)), conf - 2.0, conf)

    def set_timesteps(self, steps: int, is_masked: torch.Tensor) -> None:
        """is_masked: (B, Lb) masks of the block about to be denoised."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.plan = num_transfer_tokens(is_masked.sum(1), steps)
        self.step_index = 0

    @property
    def commits_planned(self) -> torch.Tensor:
        """(B,) how many tokens the next step commits."""
        assert self.plan is not None, "call set_timesteps first"
        return self.plan[:, self.step_index]

    def step(self, logits: torch.Tensor, xt: torch.Tensor, lo: int, hi: int,
             generator: Noise = None, offset: int = 0) -> SamplerOutput:
        """logits (B, L, V) (windowed: (B, hi - offset, V)), xt (B, L) -> SamplerOutput; commits before `hi`.

        `generator`: a torch.Generator, None (the global RNG) or RowGenerators (dlm.sampling.noise: one per row). A
        row draws only at the positions the step may change in it, so its noise never depends on its neighbours."""
        raise NotImplementedError
