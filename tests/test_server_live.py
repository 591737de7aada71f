"""The server over real sockets: uvicorn on 127.0.0.1 with a free port, the official `openai` client unchanged,
32 concurrent clients decoded in shared batches, and `dlm serve` as a user starts it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
import torch
from server_helpers import free_port, live_server

pytest.importorskip("fastapi", reason="the server needs: pip install 'dlm[serve]'")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from dlm import CheckpointConfig, DiffusionLM, ModelConfig  # noqa: E402
from dlm.checkpoint import save_pretrained  # noqa: E402
from dlm.config import GenerationConfig  # noqa: E402
from dlm.models import build_model  # noqa: E402
from dlm.server import ServerSettings, create_app  # noqa: E402
from dlm.tokenizer import ByteTokenizer  # noqa: E402

SAMPLING = GenerationConfig(max_new_tokens=16, steps=8, block_length=8)


@pytest.fixture(scope="module")
def lm() -> DiffusionLM:
    torch.manual_seed(0)
    mc = ModelConfig.preset("tiny", max_len=128)
    return DiffusionLM(build_model(mc), ByteTokenizer(), CheckpointConfig(model=mc, sampling=SAMPLING))


@pytest.fixture(scope="module")
def live(lm):
    app = create_app(lm, "tiny", ServerSettings(batch_size=32, batch_wait_ms=100, queue_size=64))
    with live_server(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[1] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_completions_and_chat(client, lm):
    assert [m.id for m in client.models.list()] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=16)
    assert r.choices[0].text == lm.generate("ROMEO:") and r.usage.prompt_tokens == 6
    r = client.completions.create(model="tiny", prompt="x", max_tokens=8, n=2, temperature=0.5, seed=1,
                                  extra_body={"steps": 4, "remasking": "random"})
    assert [c.text for c in r.choices] == lm.generate("x", max_new_tokens=8, num_samples=2, temperature=0.5, seed=1,
                                                      steps=4, remasking="random")
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == lm.generate("User: hi\nAssistant: ")
    with pytest.raises(openai.BadRequestError, match="multiple of the number of blocks"):
        client.completions.create(model="tiny", prompt="x", extra_body={"steps": 3})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")


def test_openai_streams(client, lm):
    chunks = list(client.completions.create(model="tiny", prompt="hello", max_tokens=16, stream=True))
    assert len(chunks) > 2  # the committed prefix arrives in pieces, then the finish chunk
    assert "".join(c.choices[0].text for c in chunks) == lm.generate("hello")
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hey"}],
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == lm.generate("User: hey\nAssistant: ")
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_openai_client_with_an_api_key(lm):
    with live_server(create_app(lm, "tiny", ServerSettings(api_key="sekrit"))) as url:
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0)
        assert good.completions.create(model="tiny", prompt="x", max_tokens=8).choices[0].text
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt="x")
        assert httpx.get(url + "/health").json()["status"] == "ok"


def test_32_concurrent_clients_are_batched_and_answered_correctly(live, lm):
    app, url = live
    prompts = [f"client {i}: " + "ab" * (i % 5) for i in range(32)]  # different lengths: left-padded together
    expected = [lm.generate(p) for p in prompts]
    before = app.state.batcher.stats.batches

    async def clients():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json={"prompt": p}) for p in prompts))

    answers = asyncio.run(clients())
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    assert [r.json()["choices"][0]["text"] for r in answers] == expected
    stats = app.state.batcher.stats
    assert stats.max_jobs > 1 and stats.batches - before < 32
    assert "dlm_batch_requests_max" in httpx.get(url + "/metrics").text


def test_a_stream_the_client_drops_is_abandoned(live):
    app, url = live
    stats = app.state.batcher.stats
    body = {"prompt": "long", "max_tokens": 120, "steps": 120, "block_length": 120, "stream": True}
    with httpx.Client(base_url=url, timeout=60) as http:
        batches, forwards = stats.batches, stats.forwards
        with http.stream("POST", "/v1/generate", json=body) as r:
            assert r.status_code == 200
            assert next(r.iter_lines()).startswith('data: {"type": "start"')
        # The worker notices at its next step that nobody listens, and is free for the next request.
        assert http.post("/v1/generate", json={"prompt": "next"}).status_code == 200
    assert stats.batches == batches + 1 and stats.forwards - forwards < 120 + 8


def test_dlm_serve_command(tmp_path, lm):
    save_pretrained(tmp_path / "tiny-ckpt", lm.model, lm.config, lm.tokenizer)
    port = free_port()
    env = {**os.environ, "DLM_API_KEY": "from-env"}
    proc = subprocess.Popen([sys.executable, "-m", "dlm.cli", "serve", "--model", str(tmp_path / "tiny-ckpt"),
                             "--port", str(port), "--threads", "1", "--log-level", "warning", "--max-tokens", "32"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "dlm serve did not come up"
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        auth = {"Authorization": "Bearer from-env"}
        assert httpx.get(url + "/v1/models", headers=auth).json()["data"][0]["id"] == "tiny-ckpt"
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 64}, headers=auth)
        assert r.status_code == 400 and "--max-tokens" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={"prompt": "x"}, headers=auth, timeout=60)
        assert r.json()["choices"][0]["text"] == lm.generate("x")
    finally:
        proc.terminate()
        proc.wait(30)
