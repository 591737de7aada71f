"""Evaluation: likelihood bounds (ELBO for diffusion, exact NLL for AR) in bits per token and per char."""

from dlm.eval.elbo import ElboResult, elbo_bits

__all__ = ["ElboResult", "elbo_bits"]
