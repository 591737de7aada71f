"""The autoregressive baseline: LLaDA-style blocks with causal attention, trained by the same trainer.

Position i predicts token i+1 (the `ar` loss shifts targets); same size presets as the diffusion models.
"""

from __future__ import annotations

from dlm.models.transformer import Transformer


class CausalTransformer(Transformer):
    causal = True
