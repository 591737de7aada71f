"""Seeded requests batch with others (dlm.server.batching): the same seeded request gives the same text alone and
while decoded in one batch with concurrent requests (other prompts, seeds, unseeded); `seed` + `n` gives n
different samples, the same on every call. In process, with FastAPI's TestClient, on a tiny random model.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs: pip install 'dlm[serve]'")

from fastapi.testclient import TestClient  # noqa: E402

from dlm import CheckpointConfig, DiffusionLM, ModelConfig  # noqa: E402
from dlm.config import GenerationConfig  # noqa: E402
from dlm.models import build_model  # noqa: E402
from dlm.server import ServerSettings, create_app  # noqa: E402
from dlm.tokenizer import ByteTokenizer  # noqa: E402

SAMPLING = GenerationConfig(max_new_tokens=12, steps=6, block_length=0, temperature=0.9, remasking="random")
TARGET = {"prompt": "ROMEO:", "n": 3, "seed": 7, "max_tokens": 12}
OTHERS = [{"prompt": "JULIET: O Romeo, Romeo", "n": 2, "seed": 1, "max_tokens": 12},
          {"prompt": "x", "max_tokens": 12},  # unseeded
          {"prompt": ["To be", "or not"], "seed": 8, "max_tokens": 12}]


class Gate(torch.nn.Module):
    """Wraps the network: every forward waits until the test opens the gate, so requests queue up meanwhile."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.open, self.entered = net, threading.Event(), threading.Event()

    def forward(self, *args, **kwargs):
        self.entered.set()
        assert self.open.wait(30), "the test never opened the gate"
        return self.net(*args, **kwargs)


def _lm() -> DiffusionLM:
    torch.manual_seed(0)
    mc = ModelConfig.preset("tiny", max_len=128)
    return DiffusionLM(Gate(build_model(mc)), ByteTokenizer(), CheckpointConfig(model=mc, sampling=SAMPLING))


def texts(r) -> list[str]:
    assert r.status_code == 200, r.text
    return [c["text"] for c in r.json()["choices"]]


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def test_a_seeded_request_gives_the_same_text_alone_and_batched():
    lm = _lm()
    app = create_app(lm, "tiny", ServerSettings(batch_size=16, batch_wait_ms=50, queue_size=16))
    with TestClient(app) as c, ThreadPoolExecutor(len(OTHERS) + 2) as pool:
        blocker = pool.submit(c.post, "/v1/completions", json={"prompt": "hold", "max_tokens": 12})
        assert lm.model.entered.wait(20)  # the worker holds the first request; the next ones queue behind it
        batched = [pool.submit(c.post, "/v1/completions", json=body) for body in (TARGET, *OTHERS)]
        batcher = app.state.batcher
        wait_for(lambda: batcher.depth == len(batched))
        lm.model.open.set()
        assert blocker.result(60).status_code == 200
        together = [texts(f.result(60)) for f in batched]
        assert batcher.stats.max_jobs == len(batched)  # the four requests were decoded in one batch
        alone = texts(c.post("/v1/completions", json=TARGET))
        again = texts(c.post("/v1/completions", json=TARGET))
        other_alone = texts(c.post("/v1/completions", json=OTHERS[0]))
    assert together[0] == alone == again  # the same seeded request: the same text, batched or not
    assert together[1] == other_alone
    assert len(set(alone)) == 3  # seed + n: three different samples
    assert alone == lm.generate("ROMEO:", seed=7, num_samples=3)  # the library's rule: row i seeded row_seed(seed, i)
