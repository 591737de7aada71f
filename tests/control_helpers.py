"""Shared by the controlled-generation tests: tiny random models (optionally biased towards some tokens), a model
stand-in whose every call fails (errors must come before any model call), and a saved model folder for CLI tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from dlm.config import CheckpointConfig, GenerationConfig, ModelConfig
from dlm.models import build_model
from dlm.pipeline import DiffusionLM
from dlm.tokenizer import ByteTokenizer


class Biased(torch.nn.Module):
    """A network plus a fixed bias on some token ids (a model that loves them)."""

    def __init__(self, inner: torch.nn.Module, ids: list[int], vocab_size: int = 260, bias: float = 30.0) -> None:
        super().__init__()
        self.inner = inner
        self.bias = torch.zeros(vocab_size)
        self.bias[ids] = bias

    def forward(self, x, t=None, attention_mask=None, **kw):
        return self.inner(x, t, attention_mask=attention_mask, **kw) + self.bias


def tiny(bias_ids: list[int] | None = None, tokenizer=None, vocab_size: int = 260, max_len: int = 256
         ) -> DiffusionLM:
    """A 1-layer random DiffusionLM (byte tokenizer unless given), seeded."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=1, n_heads=2, max_len=max_len)
    net = build_model(cfg).eval()
    if bias_ids is not None:
        net = Biased(net, bias_ids, vocab_size)
    return DiffusionLM(net, tokenizer or ByteTokenizer(), CheckpointConfig(model=cfg))


def no_model(tokenizer=None, max_len: int = 256) -> SimpleNamespace:
    """What the control functions read before any model call; calling the model fails (AttributeError)."""
    return SimpleNamespace(tokenizer=tokenizer or ByteTokenizer(), max_len=max_len, sampling=GenerationConfig())


def saved_model_dir(tmp_path_factory, lm: DiffusionLM, name: str):
    from dlm.checkpoint import save_pretrained

    path = tmp_path_factory.mktemp(name) / "tiny"
    save_pretrained(path, lm.model, lm.config, lm.tokenizer)
    return path
