"""Int8 weight-only quantisation for CPU inference: every nn.Linear becomes an `Int8Linear`.

Each output row of a weight W (N, K) gets one scale s = max|W_row| / 127 and is stored as round(W / s) in int8
(symmetric, per channel); activations stay in their dtype, so the weights take a quarter of their float32 memory
(half of bfloat16). Few rows (an AR-style decode, M <= KERNEL_MAX_ROWS) go through PyTorch's own int8 weight-only
kernel (`aten._weight_int8pack_mm`, the one torchao and gpt-fast use); a diffusion step multiplies the whole
canvas (many rows), where that kernel is slow on CPU, so there the int8 matrix is converted to the activation
dtype for a dense matmul and the scales are applied to its output (x W^T = (x Q^T) * s). Measured speed and
logit drift: benchmarks/quantize.py, docs/pretrained.md.

    lm = DiffusionLM.from_pretrained("/models/LLaDA-8B-Instruct", dtype="bfloat16", quantize="int8")
    quantize_model(net, "int8")   # in place
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_KERNEL = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
# Largest number of rows that goes through the int8 kernel, per activation dtype: above it the converted dense
# matmul was faster (2 threads on a 2-core x86 CPU with AMX, K=2048, N=5632, measured once by hand: at 64 rows
# the kernel took 25 ms, the converted matmul 24 ms, dense bf16 8 ms).
KERNEL_MAX_ROWS = {torch.bfloat16: 32, torch.float32: 1}


class Int8Linear(nn.Module):
    """y = x W^T + b with W held as int8 (N, K) and a float scale per row (N,)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()  # (N, K)
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # (N,)
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (B*L, K)
        # The CPU kernel crashes (not raises) on a bfloat16 input whose K is not a multiple of 16: guard it.
        if (_KERNEL is not None and x.device.type == "cpu" and self.in_features % 16 == 0
                and x2.shape[0] <= KERNEL_MAX_ROWS.get(x.dtype, 0)):
            y = _KERNEL(x2.contiguous(), self.weight_int8, self.scale.to(x.dtype))  # (B*L, N)
        else:
            y = F.linear(x2, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)  # (B*L, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def quantize_model(model: nn.Module, mode: str = "int8", skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every nn.Linear (except names in `skip`) by its int8 weight-only version, in place."""
    if mode != "int8":
        raise ValueError(f"unknown quantisation {mode!r}; supported: int8 (weight-only, CPU)")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full not in skip:
                setattr(module, child_name, Int8Linear(child))
    return model
