"""Sampling: samplers (set_timesteps / step), remasking rules, logits processors and the denoising loop."""

from dlm.sampling.block import BlockSampler, block_steps  # registers "block"
from dlm.sampling.cache import denoise_cached, denoise_cached_steps
from dlm.sampling.d3pm import D3PMSampler  # registers "d3pm"
from dlm.sampling.display import LiveCanvas, Trajectory
from dlm.sampling.dream import DreamSampler  # registers "dream" and maskgit_plus / topk_margin / entropy
from dlm.sampling.fast_dllm import FastDLLMSampler  # registers "fast_dllm"
from dlm.sampling.generate import SamplingError, StepEvent, denoise, denoise_steps, plan_blocks
from dlm.sampling.guidance import ClassifierFreeGuidance, classifier_free_guidance
from dlm.sampling.llada import LLaDASampler  # registers "llada"
from dlm.sampling.mdlm import MDLMCacheSampler, MDLMSampler  # registers "mdlm", "mdlm_cache"
from dlm.sampling.noise import RowGenerators
from dlm.sampling.processors import (
    AllowedTokens,
    BannedTokens,
    LogitsProcessor,
    RepetitionPenalty,
    SuppressTokens,
    Temperature,
    TopK,
    TopP,
    apply_processors,
    build_processors,
)
from dlm.sampling.remasking import REMASKING, Remasking
from dlm.sampling.sampler import SAMPLERS, Sampler, SamplerOutput, num_transfer_tokens
from dlm.sampling.sedd import GraphSampler, SEDDAnalyticSampler, SEDDEulerSampler  # registers "sedd_*"

__all__ = ["SAMPLERS", "REMASKING", "Sampler", "LLaDASampler", "SamplerOutput", "Remasking", "LogitsProcessor",
           "SuppressTokens", "apply_processors", "denoise", "plan_blocks", "num_transfer_tokens", "StepEvent",
           "SamplingError", "denoise_steps", "LiveCanvas", "Trajectory", "ClassifierFreeGuidance",
           "classifier_free_guidance", "AllowedTokens", "BannedTokens", "RepetitionPenalty", "Temperature", "TopK",
           "TopP",
           "build_processors", "DreamSampler", "MDLMSampler", "MDLMCacheSampler", "denoise_cached",
           "denoise_cached_steps", "FastDLLMSampler", "GraphSampler", "SEDDEulerSampler", "SEDDAnalyticSampler",
           "D3PMSampler", "BlockSampler", "block_steps", "RowGenerators"]
