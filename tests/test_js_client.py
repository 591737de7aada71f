"""The JavaScript client (clients/js) against a live `dlm serve` app on a tiny random model.

Starts the FastAPI app with uvicorn in a thread on a free 127.0.0.1 port, with an API key so that auth is
exercised too, and runs `node --test` in clients/js with DLM_TEST_URL / DLM_TEST_API_KEY set: the SSE parser unit
tests, the mock-server tests and the live tests (clients/js/test/live.test.mjs). Skips when `node` is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs: pip install fastapi uvicorn")
pytest.importorskip("uvicorn", reason="the server needs: pip install fastapi uvicorn")

from server_helpers import live_server, tiny_app  # noqa: E402

CLIENT = Path(__file__).resolve().parents[1] / "clients" / "js"
API_KEY = "test-key"


def test_js_client_against_a_live_server():
    node = shutil.which("node")
    if node is None:
        pytest.skip("`node` is not on PATH: install Node.js 18+ to test clients/js")
    with live_server(tiny_app(max_len=1024, api_key=API_KEY)) as url:  # a context that holds a tool list
        env = {**os.environ, "DLM_TEST_URL": url, "DLM_TEST_API_KEY": API_KEY, "NO_COLOR": "1"}
        # No file arguments: `node --test` finds test/*.test.mjs itself, the same on Node 18, 20 and 22.
        proc = subprocess.run([node, "--test"], cwd=CLIENT, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # The live tests must have run, not skipped (TAP reporter when piped; the spec reporter on newer Node).
    assert re.search(r"^(#|ℹ) skipped 0$", out, re.M), out[-3000:]
