"""Helpers shared by the live-server tests: a free port, uvicorn in a thread, a tiny random model's app."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app):
    """uvicorn in a thread on 127.0.0.1 and a free port -> the base URL; stopped (and joined) on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def tiny_lm(sampling=None, max_len: int = 128):
    import torch

    from dlm.config import CheckpointConfig, GenerationConfig, ModelConfig
    from dlm.models import build_model
    from dlm.pipeline import DiffusionLM
    from dlm.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", max_len=max_len)
    return DiffusionLM(build_model(cfg).eval(), ByteTokenizer(),
                       CheckpointConfig(model=cfg, sampling=sampling or GenerationConfig()))


def tiny_app(max_len: int = 128, **settings):
    from dlm.server import ServerSettings, create_app

    return create_app(tiny_lm(max_len=max_len), "tiny", ServerSettings(**settings))
