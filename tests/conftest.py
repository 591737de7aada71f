"""Shared fixtures. Tests are CPU-only, deterministic and download nothing."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)  # CI has 2 cores; keep one test process light and its results reproducible


@pytest.fixture
def byte_tok():
    from dlm.tokenizer import ByteTokenizer

    return ByteTokenizer()
