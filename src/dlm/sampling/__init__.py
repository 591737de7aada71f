"""Sampling: samplers (set_timesteps / step), remasking rules, logits processors and the denoising loop."""

from dlm.sampling.generate import SamplingError, StepEvent, denoise, denoise_steps, plan_blocks
from dlm.sampling.processors import LogitsProcessor, SuppressTokens, apply_processors
from dlm.sampling.remasking import REMASKING, Remasking
from dlm.sampling.sampler import SAMPLERS, LLaDASampler, Sampler, SamplerOutput, num_transfer_tokens

__all__ = ["SAMPLERS", "REMASKING", "Sampler", "LLaDASampler", "SamplerOutput", "Remasking", "LogitsProcessor",
           "SuppressTokens", "apply_processors", "denoise", "plan_blocks", "num_transfer_tokens", "StepEvent",
           "SamplingError", "denoise_steps"]
