"""Classifier-free guidance for masked diffusion LMs, as LLaDA's `generate.py` (Nie et al. 2025, ML-GSAI/LLaDA).

The unconditional input is the canvas with every prompt position replaced by [MASK]; the model needs no separate
unconditional training because it has learned to predict from fully masked contexts. Both copies go through
ONE batched forward (2B rows) and are combined as

    logits = uncond + (scale + 1) * (cond - uncond)

so scale = 0 is plain conditional sampling. Guidance wraps a `model_fn: xt (B, L) -> logits (B, L, V)` into a
new one of the same signature, so the denoising loop and every sampler stay unaware of it.

    model_fn = classifier_free_guidance(lm.logits, prompt_mask=canvas != mask_id, scale=1.5, mask_id=mask_id)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dlm.sampling.generate import ModelFn as LoopModelFn

ModelFn = Callable[[torch.Tensor], torch.Tensor]


class ClassifierFreeGuidance(LoopModelFn):
    """A model_fn that runs `model_fn` on [xt; xt with the prompt masked] and mixes the two halves.

    prompt_mask: bool (B, L) or (1, L), True at the prompt (conditioning) positions. LLaDA takes it once, from
    the initial canvas (`canvas != mask_id`), so tokens generated later stay visible in the unconditional copy.
    """

    def __init__(self, model_fn: ModelFn, prompt_mask: torch.Tensor, scale: float, mask_id: int) -> None:
        if scale < 0:
            raise ValueError(f"cfg_scale must be >= 0 (0 disables guidance), got {scale}")
        if prompt_mask.dim() != 2 or prompt_mask.dtype != torch.bool:
            raise ValueError("prompt_mask must be a bool tensor (B, L), True at the prompt positions; "
                             f"got dtype {prompt_mask.dtype} and shape {tuple(prompt_mask.shape)}")
        self.model_fn = model_fn
        self.prompt_mask = prompt_mask
        self.scale = float(scale)
        self.mask_id = int(mask_id)

    def __call__(self, xt: torch.Tensor, window: tuple[int, int] | None = None, t=None) -> torch.Tensor:
        B, L = xt.shape
        if self.prompt_mask.shape[1] != L or self.prompt_mask.shape[0] not in (1, B):
            raise ValueError(f"prompt_mask has shape {tuple(self.prompt_mask.shape)} but the canvas is ({B}, {L})")
        uncond = xt.masked_fill(self.prompt_mask.to(xt.device), self.mask_id)  # (B, L)
        logits = self.model_fn(torch.cat([xt, uncond], dim=0))  # (2B, L, V): one forward for both
        cond_logits, uncond_logits = logits.chunk(2, dim=0)
        return uncond_logits + (self.scale + 1) * (cond_logits - uncond_logits)


def classifier_free_guidance(model_fn: ModelFn, prompt_mask: torch.Tensor, scale: float, mask_id: int) -> ModelFn:
    """`model_fn` itself when scale == 0 (no extra forward), else a ClassifierFreeGuidance around it."""
    if scale == 0:
        return model_fn
    return ClassifierFreeGuidance(model_fn, prompt_mask, scale, mask_id)
