"""The JavaScript client (clients/js) against a live `dlm serve` app on a tiny random model.

Starts the FastAPI app with uvicorn in a thread on a free 127.0.0.1 port, with an API key so that auth is
exercised too, and runs `node --test` in clients/js with DLM_TEST_URL / DLM_TEST_API_KEY set: the SSE parser unit
tests, the mock-server tests and the live tests (clients/js/test/live.test.mjs). Skips when `node` is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs: pip install fastapi uvicorn")
pytest.importorskip("uvicorn", reason="the server needs: pip install fastapi uvicorn")

CLIENT = Path(__file__).resolve().parents[1] / "clients" / "js"
API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app):
    """Runs `app` with uvicorn in a thread on a free 127.0.0.1 port; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def tiny_app(**settings):
    import torch

    from dlm.config import CheckpointConfig, ModelConfig
    from dlm.models import build_model
    from dlm.pipeline import DiffusionLM
    from dlm.server import ServerSettings, create_app
    from dlm.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", max_len=128)
    lm = DiffusionLM(build_model(cfg).eval(), ByteTokenizer(), CheckpointConfig(model=cfg))
    return create_app(lm, "tiny", ServerSettings(**settings))


def test_js_client_against_a_live_server():
    node = shutil.which("node")
    if node is None:
        pytest.skip("`node` is not on PATH: install Node.js 18+ to test clients/js")
    with live_server(tiny_app(api_key=API_KEY)) as url:
        env = {**os.environ, "DLM_TEST_URL": url, "DLM_TEST_API_KEY": API_KEY, "NO_COLOR": "1"}
        # No file arguments: `node --test` finds test/*.test.mjs itself, the same on Node 18, 20 and 22.
        proc = subprocess.run([node, "--test"], cwd=CLIENT, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # The live tests must have run, not skipped (TAP reporter when piped; the spec reporter on newer Node).
    assert re.search(r"^(#|ℹ) skipped 0$", out, re.M), out[-3000:]
