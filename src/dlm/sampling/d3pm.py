"""D3PM's ancestral sampler: x_s ~ p(x_s | x_k), k going from T down to 0 in `steps` strides.

D3PM (Austin et al. 2021; google-research/d3pm `text/diffusion.py`, `p_sample`), the x0-parameterisation: the
network predicts p~(x0 | x_k) (its [MASK] logit removed, `temperature` applied to it: softmax(logits / T), the
argmax at 0) and p(x_s | x_k) is proportional to (x_k Q_{s->k}^T) * (p~ Qbar_s), with the explicit matrices of
dlm/processes/d3pm.py in float64. Steps k = round(linspace(T, 0, steps + 1)) skip ahead of the T-step chain where
steps < T (the chain from s to k is Q_{s+1} ... Q_k, which is exact for the forward process); the last step lands
on k = 0, where an absorbing chain has no [MASK] left. The network sees t = k / T.

Conditioning (prompts, infilling) and the uniform chain's prior draw are as in the SEDD samplers (sampling/sedd.py).

    sampler = SAMPLERS.build("d3pm", mask_id=tok.mask_id, config=GenerationConfig(temperature=1.0))
    sampler.use_process(lm.process)
"""

from __future__ import annotations

import torch

from dlm.processes.d3pm import D3PM, D3PMAbsorbing
from dlm.sampling.noise import for_items
from dlm.sampling.sampler import SAMPLERS, gumbel_argmax
from dlm.sampling.sedd import GraphSampler
from dlm.schedules import Linear


@SAMPLERS.register("d3pm")
class D3PMSampler(GraphSampler):
    process_types = (D3PM,)
    family = "D3PM"

    def default_process(self, mask_id):
        return D3PMAbsorbing(mask_id, Linear(eps=0.0))  # Austin et al.'s absorbing chain, T = 1000

    def set_timesteps(self, steps: int, is_masked: torch.Tensor) -> None:
        T = self.process.T
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in 1..{T} (the chain's T), got {steps}")
        self.n_steps = steps
        self.ks = torch.linspace(T, 0, steps + 1, dtype=torch.float64).round().long()
        self.step_index = 0

    @property
    def model_time(self) -> float:
        return float(self.ks[self.step_index]) / self.process.T

    def step(self, logits, xt, lo, hi, generator=None, offset=0):
        """logits (B, L, V): x0 logits; xt (B, L). Changes free positions before `hi` only."""
        i = self.step_index
        k, s = int(self.ks[i]), int(self.ks[i + 1])
        candidate = self.candidates(xt, hi)
        x = xt[candidate]  # (N,)
        if x.numel() == 0:
            empty = torch.zeros(0, dtype=torch.float64, device=xt.device)
            return self.output(xt, candidate, x, torch.zeros_like(x, dtype=torch.bool), empty)
        cand = logits[candidate].double()  # (N, V)
        cand[:, self.mask_id] = -torch.inf  # x0 is never [MASK]
        if self.temperature > 0:
            p0 = torch.softmax(cand / self.temperature, -1)
        else:
            p0 = torch.zeros_like(cand).scatter_(-1, cand.argmax(-1, keepdim=True), 1.0)
        probs = self.process.posterior(x, s, k, p0)  # (N, V) float64
        dest = gumbel_argmax(torch.log(probs), 1.0, for_items(generator, candidate.sum(1)))  # row by row
        return self.output(xt, candidate, dest, dest != x, probs.gather(-1, dest[:, None])[:, 0])
