"""SEDD's reverse samplers for the absorbing and uniform graphs: Euler and the analytic (Tweedie) step.

Score Entropy Discrete Diffusion (Lou, Meng, Ermon 2024; louaaron/Score-Entropy-Discrete-Diffusion `sampling.py`:
`EulerPredictor`, `AnalyticPredictor`, `Denoiser`; `catsample.py`). Time runs over linspace(1, 0, steps + 1); the
network sees t = ts[i] and its output becomes log scores through the graph (processes/sedd.py). From t to s = ts[i + 1]:

  sedd_euler:     p(x_s = y) = 1[y = x] + dsigma(t) (t - s) s(x)_y R[y, x], the reverse rates over the interval;
  sedd_analytic:  p(x_s = z) = [s(x)^T exp(-d R)]_z exp(d R)[z, x] with d = sigma(t) - sigma(s) (Tweedie
                  tau-leaping: exact for one position when the score is exact).

The last step of both is SEDD's `Denoiser`: the Tweedie step with d = sigma(t), down to sigma = 0, so that the
noise left at the smallest time is removed within the `steps` forward passes (the reference spends one more).
On the absorbing graph it must unmask what is left, as the reference does by dropping the [MASK] entry. All the
arithmetic is float64. A negative "stay" probability (Euler with a large step) is clamped to 0, as the reference's
Gumbel draw does. `temperature` reshapes only where a position jumps to: given that it moves (probability of the
step's distribution), the new token is drawn from the move distribution ** (1 / temperature) (the argmax at 0),
so temperature = 1 is the learned reverse process.

Conditional sampling, prompts and infilling alike, is SEDD's `proj_fun`: only the positions that were [MASK] when
the block began are free; every other token stays as given. The absorbing graph denoises block by block as MDLM
does; the uniform graph has no [MASK] state, so its free positions start from uniform random tokens (`begin`) and
the canvas must be one block (`block_length=0`). `remasking`, `defer_eos` and guidance are masked-model options.

    sampler = SAMPLERS.build("sedd_analytic", mask_id=tok.mask_id, config=GenerationConfig(temperature=1.0))
    sampler.use_process(lm.process)   # the graph and schedule of the checkpoint (DiffusionLM does this)
"""

from __future__ import annotations

import torch

from dlm.processes.sedd import AbsorbingGraph, Graph
from dlm.sampling.generate import SamplingError
from dlm.sampling.noise import Noise, for_items, randint, uniform
from dlm.sampling.sampler import SAMPLERS, Sampler, SamplerOutput, gumbel_argmax
from dlm.schedules import LogLinear


class GraphSampler(Sampler):
    """A sampler of a process with its own time (SEDD, D3PM): `use_process`, `begin`, `pending`, `model_time`."""

    process_types: tuple[type, ...] = ()
    family = ""

    def __init__(self, mask_id, config=None, eos_id=None, pad_id=None, **overrides):
        super().__init__(mask_id, config, eos_id, pad_id, **overrides)
        if self.config.cfg_scale > 0:
            raise SamplingError(f"{self.family} samplers have no classifier-free guidance; use cfg_scale=0")
        self.process = self.default_process(mask_id)
        self.free: torch.Tensor | None = None  # (B, L) bool: the positions this block may change

    def default_process(self, mask_id: int):
        raise NotImplementedError

    def use_process(self, process) -> None:
        """Sample the graph / chain a checkpoint was trained with (its schedule, vocabulary, steps)."""
        if not isinstance(process, self.process_types):
            raise ValueError(f"{self.family} samplers sample {self.family} models; this checkpoint's process is "
                             f"{type(process).__name__}: use its own sampler (llada, mdlm, ...)")
        self.process = process

    @property
    def absorbing(self) -> bool:
        return bool(self.process.absorbing)

    def begin(self, x: torch.Tensor, region: slice, generator: Noise) -> torch.Tensor:
        """Mark the free positions (the masks of the region); a uniform chain draws its prior there."""
        self.free = torch.zeros_like(x, dtype=torch.bool)
        self.free[:, region] = x[:, region] == self.mask_id
        if self.absorbing:
            return x
        V = self.process.vocab_size
        if V is None:
            raise SamplingError("a uniform graph needs the vocabulary size: call use_process(process)")
        x = x.clone()  # the prior is drawn at the free positions only, row by row: a row's draws are its own
        r = randint(for_items(generator, self.free.sum(1)), V - 1, (int(self.free.sum()),), x.device)
        x[self.free] = r + (r >= self.mask_id).long()  # uniform over the V - 1 ids that are not [MASK]
        if bool((x == self.mask_id).any()):
            raise SamplingError("a uniform graph has no [MASK] state to hold later blocks: sample the whole canvas "
                                "as one block (block_length=0)")
        return x

    def pending(self, x: torch.Tensor, region: slice) -> bool:
        if self.absorbing:
            return bool((x[:, region] == self.mask_id).any())
        return self.step_index < self.n_steps

    @property
    def commits_planned(self) -> torch.Tensor:
        """(B,) an upper bound: the positions still free to change."""
        assert self.free is not None, "call begin first"
        return self.free.sum(1)

    def candidates(self, xt: torch.Tensor, hi: int) -> torch.Tensor:
        """(B, L) bool: positions this step may change (masked ones on an absorbing chain), before `hi`."""
        free = xt == self.mask_id if self.absorbing else self.free
        return free & (torch.arange(xt.shape[1], device=xt.device) < hi)

    def output(self, xt: torch.Tensor, candidate: torch.Tensor, dest: torch.Tensor, moved: torch.Tensor,
               p_dest: torch.Tensor) -> SamplerOutput:
        """Scatter the per-candidate draws (N,) back onto the canvas."""
        x0 = xt.clone()
        x0[candidate] = dest
        commit = torch.zeros_like(candidate)
        commit[candidate] = moved
        confidence = torch.full(xt.shape, -torch.inf, dtype=torch.float64, device=xt.device)
        confidence[candidate] = p_dest
        self.step_index += 1
        return SamplerOutput(xt=torch.where(commit, x0, xt), committed=commit, x0=x0, confidence=confidence)


class SEDDSampler(GraphSampler):
    process_types = (Graph,)
    family = "SEDD"

    def default_process(self, mask_id):
        return AbsorbingGraph(mask_id, LogLinear(eps=1e-3))  # SEDD's absorbing setting

    def set_timesteps(self, steps: int, is_masked: torch.Tensor) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.n_steps = steps
        self.timesteps = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        self.step_index = 0

    @property
    def model_time(self) -> float:
        return float(self.timesteps[self.step_index])

    def step_probs(self, score: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        """score (N, V), x (N,) -> the distribution (N, V) of x at ts[i + 1], before the last step."""
        raise NotImplementedError

    def step(self, logits, xt, lo, hi, generator=None, offset=0):
        """logits (B, L, V): raw network output; xt (B, L). Changes free positions before `hi` only."""
        i = self.step_index
        last = i == self.n_steps - 1
        candidate = self.candidates(xt, hi)
        N = int(candidate.sum())
        x = xt[candidate]  # (N,)
        if N == 0:
            empty = torch.zeros(0, dtype=torch.float64, device=xt.device)
            return self.output(xt, candidate, x, torch.zeros_like(x, dtype=torch.bool), empty)
        sched, graph = self.process.schedule, self.process
        sigma = sched.sigma(self.timesteps[i]).to(xt.device)
        score = graph.log_score(logits[candidate].double(), x, sigma).exp()  # (N, V) float64
        if last:  # the denoiser: Tweedie all the way down to sigma = 0
            probs = graph.tweedie_probs(score, x, sigma)
        else:
            probs = self.step_probs(score, x, i)
        gen = for_items(generator, candidate.sum(1))  # each row draws for its own candidates only
        dest, moved, p_dest = draw(probs, x, self.temperature, gen, force_move=last and self.absorbing)
        return self.output(xt, candidate, dest, moved, p_dest)


def draw(probs: torch.Tensor, x: torch.Tensor, temperature: float, generator: Noise,
         force_move: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """probs (N, V) float64 (may hold small negatives), x (N,) -> destination (N,), moved (N,) bool, its prob (N,).

    Whether to move: the mass off x. Where to: the rest of the distribution ** (1 / temperature)."""
    probs = probs.clamp_min(0.0)
    stay = probs.gather(-1, x[:, None])[:, 0]
    move = probs.scatter(-1, x[:, None], 0.0)
    move_total = move.sum(-1)
    total = (move_total + stay).clamp_min(1e-300)
    u = uniform(generator, x.shape, dtype=torch.float64, device=x.device)
    dest = gumbel_argmax(torch.log(move), temperature, generator)
    moved = torch.ones_like(x, dtype=torch.bool) if force_move else (u * total < move_total)
    return dest, moved, move.gather(-1, dest[:, None])[:, 0] / total


@SAMPLERS.register("sedd_euler")
class SEDDEulerSampler(SEDDSampler):
    """Euler steps of the reverse rates, then the Tweedie denoiser at the last step."""

    def step_probs(self, score, x, i):
        t, s = self.timesteps[i], self.timesteps[i + 1]
        rate_dt = (self.process.schedule.dsigma(t) * (t - s)).to(x.device)
        return self.process.euler_probs(score, x, rate_dt.expand(x.shape))


@SAMPLERS.register("sedd_analytic")
class SEDDAnalyticSampler(SEDDSampler):
    """Tweedie tau-leaping: staggered score times the transition's column, every step."""

    def step_probs(self, score, x, i):
        sched = self.process.schedule
        d = (sched.sigma(self.timesteps[i]) - sched.sigma(self.timesteps[i + 1])).to(x.device)
        return self.process.tweedie_probs(score, x, d.expand(x.shape))
