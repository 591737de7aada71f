"""Issue 16, server part: what any client could do to `dlm serve`, each reproduced against a live uvicorn.

Lone surrogates in any text field, clients that leave while queued, decoding or mid-body, an empty API key,
slow bodies, HEAD /health, and the OpenAI fields a DLM does (or cannot) honour, driven by the official client.
Waits on the server are bounded polls of its own state (nothing asserts how long anything took).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from contextlib import closing

import pytest
from server_helpers import free_port, live_server, tiny_lm

pytest.importorskip("fastapi", reason="the server needs: pip install 'dlm[serve]'")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from dlm.config import ConfigError, GenerationConfig  # noqa: E402
from dlm.server import ServerSettings, create_app  # noqa: E402
from dlm.server.protocol import ChatMessage, render_chat  # noqa: E402

SAMPLING = GenerationConfig(max_new_tokens=16, steps=8, block_length=8)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(SAMPLING)


@pytest.fixture(scope="module")
def live(lm):
    app = create_app(lm, "tiny", ServerSettings())
    with live_server(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[1] + "/v1", api_key="unused", max_retries=0, timeout=60)


def wait_until(condition, what: str, limit: float = 30.0) -> None:
    """Poll the server's state until `condition()` holds; fail (saying what) if it never does."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.01)


def raw_request(url: str, path: str, body: bytes, declared: int | None = None) -> socket.socket:
    """Send a POST with `body` (announcing `declared` bytes, default len(body)) and return the open socket."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if declared is None else declared}\r\n\r\n")
    sock.sendall(head.encode() + body)
    return sock


def requests_counted(app, route: str, status: int) -> int:
    return app.state.metrics.requests.get((route, str(status)), 0)


def assert_error(r, status: int, *fragments: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in err["message"], err["message"]
    return err


# ----- 1. lone surrogates -----------------------------------------------------------------------------------------
SURROGATE_BODIES = [  # raw JSON: "\\ud800" is the six characters of the escape, as a client sends them
    ("/v1/completions", rb'{"prompt": "a\ud800", "max_tokens": 8}', "prompt"),
    ("/v1/completions", rb'{"prompt": ["ok", "b\udfff"], "max_tokens": 8}', "prompt"),
    ("/v1/completions", rb'{"prompt": "a\ud800", "stream": true}', "prompt"),
    ("/v1/completions", b'{"prompt": "a\xed\xa0\x80"}', "prompt"),  # the surrogate UTF-8-encoded, not escaped
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "hi\ud83d"}]}', "messages"),
    ("/v1/chat/completions", rb'{"messages": [{"role": "us\udc00er", "content": "hi"}], "stream": true}',
     "messages"),
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}',
     "messages"),
    ("/v1/infill", rb'{"text": "a [MASK:4] b\ud800"}', "text"),
    ("/v1/infill", rb'{"text": "a [MASK:4] b\ud800", "stream": true}', "text"),
    ("/v1/generate", rb'{"prompt": "\ud800x"}', "prompt"),
    ("/v1/generate", rb'{"prompt": "\ud800x", "stream": true}', "prompt"),
    ("/v1/completions", rb'{"prompt": "x", "stop": ["\ud800"]}', "stop"),
]


@pytest.mark.parametrize("path, body, param", SURROGATE_BODIES)
def test_a_lone_surrogate_in_any_text_field_is_a_400(live, path, body, param):
    app, url = live
    r = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    err = assert_error(r, 400, "lone surrogate", "valid Unicode")
    assert err["param"] == param and err["code"] == "invalid_unicode"
    assert requests_counted(app, path, 500) == 0


@pytest.mark.parametrize("body, where", [
    (rb'{"prompt": "x", "\ud800": 1}', "a field name holds"),
    (rb'{"messages": [{"role": "user", "content": "hi", "\udbff": "x"}]}', "a field name in messages.0 holds"),
])
def test_a_lone_surrogate_in_a_field_name_is_named_as_such(live, body, where):
    path = "/v1/completions" if b"prompt" in body else "/v1/chat/completions"
    assert_error(httpx.post(live[1] + path, content=body), 400, where, "valid Unicode")


def test_a_surrogate_pair_is_one_character_and_is_served(live, lm):
    r = httpx.post(live[1] + "/v1/completions", content=rb'{"prompt": "smile \ud83d\ude00", "max_tokens": 8}',
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == lm.generate("smile \U0001f600", max_new_tokens=8)


# ----- 2. a non-streaming client that leaves --------------------------------------------------------------------
def test_a_non_streaming_request_is_withdrawn_when_its_client_leaves():
    """One decoding request (held at its first forward pass) and one queued behind it; both clients leave. The
    queued one's slot is freed at once, the decoding one stops at its next step, and the worker serves on."""
    lm = tiny_lm(SAMPLING)
    started, release, held = threading.Event(), threading.Event(), [False]

    def gate(module, args):  # hold the worker inside the first forward pass of the test until the test says so
        if not held[0]:
            held[0] = True
            started.set()
            release.wait(60)

    hook = lm.model.register_forward_pre_hook(gate)
    app = create_app(lm, "tiny", ServerSettings(batch_size=1, queue_size=1))
    batcher, route = app.state.batcher, "/v1/generate"
    long = {"prompt": "long", "max_tokens": 64, "steps": 64, "block_length": 64}
    try:
        with live_server(app) as url:
            forwards = batcher.stats.forwards
            with closing(raw_request(url, route, json.dumps(long).encode())) as decoding:
                assert started.wait(30), "the first request never reached the model"
                with closing(raw_request(url, route, json.dumps({"prompt": "queued"}).encode())):
                    wait_until(lambda: batcher.depth == 1, "the second request is queued")
                    r = httpx.post(url + route, json={"prompt": "refused"}, timeout=30)
                    assert_error(r, 429, "queue is full")
                wait_until(lambda: batcher.depth == 0, "the queued request's slot is freed when its client leaves")
                wait_until(lambda: requests_counted(app, route, 499) == 1, "the queued request counted as 499")
                decoding.close()
                wait_until(lambda: requests_counted(app, route, 499) == 2, "the decoding request counted as 499")
            release.set()
            r = httpx.post(url + route, json={"prompt": "next"}, timeout=60)
            assert r.status_code == 200, r.text
            spent = batcher.stats.forwards - forwards - r.json()["nfe"]
            assert spent < long["steps"], f"the abandoned request ran {spent} of its {long['steps']} forward passes"
            assert requests_counted(app, route, 500) == 0
    finally:
        release.set()
        hook.remove()


# ----- 3. a client that leaves mid-body ----------------------------------------------------------------------------
def test_a_client_leaving_mid_body_is_one_log_line_and_a_client_disconnect(live, caplog):
    app, url = live
    route, before = "/v1/completions", requests_counted(live[0], "/v1/completions", 499)
    caplog.set_level(logging.INFO, logger="dlm.server")
    for _ in range(3):
        raw_request(url, route, b'{"prompt": "a', declared=1000).close()
    wait_until(lambda: requests_counted(app, route, 499) == before + 3, "three disconnects counted as 499")
    assert requests_counted(app, route, 500) == 0
    mine = [r for r in caplog.records if r.name.startswith("dlm")]
    assert all(r.exc_info is None for r in mine), "a client disconnect is not a server error with a traceback"
    lines = [r.getMessage() for r in mine if "mid-body" in r.getMessage()]
    assert len(lines) == 3 and all("\n" not in m and route in m for m in lines), lines
    assert httpx.get(url + "/health").json()["status"] == "ok"


# ----- 4. an empty API key ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, env", [(["--api-key", ""], {}), ([], {"DLM_API_KEY": ""}),
                                       (["--api-key", "  "], {})])
def test_dlm_serve_refuses_an_empty_api_key(tmp_path, lm, monkeypatch, capsys, flag, env):
    """`dlm serve --api-key "$UNSET"` as a user runs it (dlm.cli.main), with uvicorn.run replaced by a failure."""
    import uvicorn

    from dlm import cli
    from dlm.checkpoint import save_pretrained

    def serve(app, **kw):
        pytest.fail(f"dlm serve started with an empty API key: {app.state.settings}")

    save_pretrained(tmp_path / "ckpt", lm.model, lm.config, lm.tokenizer)
    monkeypatch.setattr(uvicorn, "run", serve)
    monkeypatch.delenv("DLM_API_KEY", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--model", str(tmp_path / "ckpt"), "--port", str(free_port()), *flag])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "is empty" in err and len(err.strip().splitlines()) == 1, err


def test_server_settings_refuse_a_blank_key():
    for key in ("", " ", "key\n"):
        with pytest.raises(ConfigError, match="api_key"):
            ServerSettings(api_key=key)


# ----- 5. slow bodies and HEAD /health --------------------------------------------------------------------------
@pytest.mark.parametrize("limits", [dict(timeout=1.0), dict(body_timeout=1.0)])
def test_a_body_slower_than_the_timeout_gets_408(lm, limits):
    app = create_app(lm, "tiny", ServerSettings(**limits))
    with live_server(app) as url, closing(raw_request(url, "/v1/completions", b'{"prompt": "', 100)) as sock:
        answer = b""
        while b"\r\n\r\n" not in answer:  # the server answers while the rest of the body never comes
            chunk = sock.recv(4096)
            assert chunk, "the server closed the connection without an answer"
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
        wait_until(lambda: requests_counted(app, "/v1/completions", 408) == 1, "the 408 counted")


def test_head_health_is_public_when_get_health_is(lm):
    with live_server(create_app(lm, "tiny", ServerSettings(api_key="sekrit"))) as url:
        assert httpx.get(url + "/health").status_code == 200
        r = httpx.head(url + "/health")
        assert r.status_code == 200 and r.content == b""
        assert httpx.head(url + "/").status_code == 200
        assert httpx.head(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models").status_code == 401


# ----- 6. OpenAI compatibility ------------------------------------------------------------------------------------
def test_retrieve_a_model(client):
    m = client.models.retrieve("tiny")
    assert m.id == "tiny" and m.object == "model" and m.owned_by == "dlm"
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.models.retrieve("gpt-4")


def chat_prompt(lm, text: str) -> str:
    return render_chat(lm.tokenizer, [ChatMessage(role="user", content=text)])


def test_accepted_openai_fields(client, lm):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=8, user="user-1", presence_penalty=0,
                                       frequency_penalty=0.0, logprobs=False)
    assert r.choices[0].message.content == lm.generate(chat_prompt(lm, "hi"), max_new_tokens=8)
    assert r.usage.completion_tokens <= 8
    r = client.completions.create(model="tiny", prompt="x", user="user-1", best_of=1, logit_bias={},
                                  extra_body={"max_completion_tokens": 8})
    assert r.choices[0].text == lm.generate("x", max_new_tokens=8)
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens=16 and max_tokens=8 disagree"):
        client.completions.create(model="tiny", prompt="x", max_tokens=8, extra_body={"max_completion_tokens": 16})


def test_stream_options_include_usage(client, lm):
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hey"}],
                                                 stream=True, stream_options={"include_usage": True}))
    *text_chunks, last = chunks
    assert last.choices == [] and all(c.usage is None for c in text_chunks)
    expected = lm.generate(chat_prompt(lm, "hey"))
    assert "".join(c.choices[0].delta.content or "" for c in text_chunks) == expected
    assert last.usage.prompt_tokens == len(lm.tokenizer.encode(chat_prompt(lm, "hey")))
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    plain = list(client.completions.create(model="tiny", prompt="x", stream=True))
    assert all(c.choices for c in plain)  # without the option: no usage chunk
    with pytest.raises(openai.BadRequestError, match="stream_options is only allowed with stream"):
        client.completions.create(model="tiny", prompt="x", stream_options={"include_usage": True})


def test_echo_and_token_id_prompts(client, lm):
    r = client.completions.create(model="tiny", prompt="ROMEO:", echo=True)
    assert r.choices[0].text == "ROMEO:" + lm.generate("ROMEO:")
    chunks = list(client.completions.create(model="tiny", prompt="ROMEO:", echo=True, stream=True))
    assert chunks[0].choices[0].text.startswith("ROMEO:")
    assert "".join(c.choices[0].text for c in chunks) == "ROMEO:" + lm.generate("ROMEO:")
    ids = lm.tokenizer.encode("hi there")
    r = client.completions.create(model="tiny", prompt=ids)
    assert r.choices[0].text == lm.generate("hi there") and r.usage.prompt_tokens == len(ids)
    r = client.completions.create(model="tiny", prompt=[ids, lm.tokenizer.encode("x")])
    assert [c.text for c in r.choices] == lm.generate(["hi there", "x"])
    tok = lm.tokenizer
    with pytest.raises(openai.BadRequestError, match="not a text token"):
        client.completions.create(model="tiny", prompt=[ids[0], tok.mask_id])
    with pytest.raises(openai.BadRequestError, match="not a text token"):
        client.completions.create(model="tiny", prompt=[tok.vocab_size])
    with pytest.raises(openai.BadRequestError, match="round-trip"):
        client.completions.create(model="tiny", prompt=list("é".encode())[:1])  # half a UTF-8 character


@pytest.mark.parametrize("chat, fields, param", [
    (False, {"logprobs": 1}, "logprobs"),
    (False, {"logprobs": 0}, "logprobs"),  # completions' 0 still asks for the chosen tokens' log-probabilities
    (True, {"logprobs": True}, "logprobs"),
    (True, {"top_logprobs": 2}, "top_logprobs"),
    (False, {"presence_penalty": 0.5}, "presence_penalty"),
    (True, {"frequency_penalty": -1.0}, "frequency_penalty"),
    (False, {"best_of": 3}, "best_of"),
    (True, {"logit_bias": {"65": 5}}, "logit_bias"),
    (False, {"suffix": " end"}, "suffix"),
])
def test_openai_fields_a_dlm_cannot_honour(client, chat, fields, param):
    with pytest.raises(openai.BadRequestError) as info:
        if chat:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], **fields)
        else:
            client.completions.create(model="tiny", prompt="x", **fields)
    err = info.value.body
    assert "is not supported for diffusion models" in err["message"] and "unknown" not in err["message"]
    assert err["param"] == param and err["code"] == "unsupported_parameter"


def test_a_penalty_out_of_openai_range_is_a_plain_400(live):
    r = httpx.post(live[1] + "/v1/completions", json={"prompt": "x", "presence_penalty": 3})
    assert_error(r, 400, "presence_penalty must be in [-2, 2]")
