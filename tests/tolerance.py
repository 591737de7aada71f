"""Tolerances derived from the dtype and the size of the computation, never from one machine's output.

A dot product of K terms computed in a floating type with unit roundoff u has a typical error of sqrt(K) * u times
the size of its terms (the error of a sum grows like a random walk over its K roundings); a network of n layers
chains n + 1 such stages (the blocks and the head), each bounded by the scale of the output. Different CPUs
(AVX2, AVX-512, AMX) differ exactly in how they associate these sums, so this is the spread to allow.
"""

from __future__ import annotations

import math

import torch


def network_atol(dtype: torch.dtype, width: int, n_layers: int, scale: float) -> float:
    """Absolute tolerance for the logits of a network of `n_layers` whose widest reduction is `width` terms,
    computed in `dtype`, with outputs of magnitude up to `scale`."""
    eps = torch.finfo(dtype).eps  # 2u: the gap above 1.0
    return eps * math.sqrt(width) * (n_layers + 1) * max(scale, 1.0)


def model_atol(lm, dtype: torch.dtype, reference: torch.Tensor) -> float:
    m = lm.config.model
    return network_atol(dtype, max(m.d_model, m.ff_width), m.n_layers, float(reference.abs().max()))
