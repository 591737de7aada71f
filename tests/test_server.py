"""The HTTP API (docs/http-api.md) in process, with FastAPI's TestClient, on a tiny random model.

Every endpoint against the library's own output, the stream formats, limits (413, 429, 504, caps), auth,
metrics, and 200 malformed requests from hypothesis that must all be answered 4xx in the OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs: pip install 'dlm[serve]'")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dlm import CheckpointConfig, DiffusionLM, ModelConfig  # noqa: E402
from dlm.config import GenerationConfig  # noqa: E402
from dlm.models import build_model  # noqa: E402
from dlm.server import ServerSettings, create_app  # noqa: E402
from dlm.server.batching import Batcher, Job  # noqa: E402
from dlm.server.protocol import PrefixDelta, cut_at_stop  # noqa: E402
from dlm.tokenizer import ByteTokenizer  # noqa: E402

SAMPLING = GenerationConfig(max_new_tokens=16, steps=8, block_length=8)
LIMITS = dict(max_tokens=64, max_steps=64, max_n=4, max_body_bytes=4096, max_prompt_tokens=100)


def tiny_lm(wrap=None) -> DiffusionLM:
    torch.manual_seed(0)
    mc = ModelConfig.preset("tiny", max_len=128)
    net = build_model(mc)
    return DiffusionLM(wrap(net) if wrap else net, ByteTokenizer(), CheckpointConfig(model=mc, sampling=SAMPLING))


@pytest.fixture(scope="module")
def lm() -> DiffusionLM:
    return tiny_lm()


@pytest.fixture(scope="module")
def client(lm):
    with TestClient(create_app(lm, "tiny", ServerSettings(**LIMITS))) as c:
        yield c


def events(text: str) -> list:
    """An SSE body -> the parsed `data:` payloads ("[DONE]" kept as a string)."""
    out = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(r, status: int, fragment: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    assert fragment.lower() in err["message"].lower(), err["message"]
    return err


# ----- endpoints --------------------------------------------------------------------------------------------------
def test_models_health_index(client):
    r = client.get("/v1/models").json()
    assert r["object"] == "list" and r["data"][0]["id"] == "tiny" and r["data"][0]["owned_by"] == "dlm"
    assert isinstance(r["data"][0]["created"], int)
    assert client.get("/health").json() == {"status": "ok", "model": "tiny", "device": "cpu"}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_completion_is_the_library_output(client, lm):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "ROMEO:"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["text"] == lm.generate("ROMEO:") and choice["index"] == 0
    assert choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["prompt_tokens"] == 6
    assert body["usage"]["total_tokens"] == 6 + body["usage"]["completion_tokens"]


def test_completion_prompts_list_n_and_options(client, lm):
    r = client.post("/v1/completions", json={"prompt": ["a", "bbb"], "n": 2, "max_tokens": 8, "steps": 4,
                                             "block_length": 4, "temperature": 0.8, "seed": 3})
    assert r.status_code == 200, r.text
    expected = lm.generate(["a", "bbb"], max_new_tokens=8, steps=4, block_length=4, temperature=0.8, seed=3,
                           num_samples=2)
    assert [c["text"] for c in r.json()["choices"]] == [t for group in expected for t in group]
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]


def test_stop_sequences_cut_the_text(client, lm):
    full = lm.generate("abc")
    stop = full[4:6]
    r = client.post("/v1/completions", json={"prompt": "abc", "stop": [stop]}).json()["choices"][0]
    assert r["text"] == full[: full.find(stop)] and r["finish_reason"] == "stop"
    assert cut_at_stop("hello world", ["o w", "l"]) == ("he", True)
    assert cut_at_stop("hello", ["x"]) == ("hello", False)


def test_chat_renders_role_lines(client, lm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text",
                                                                                          "text": "hi"}]}]
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    message = body["choices"][0]["message"]
    # A model without a chat template is served the format dlm sft trains on.
    from dlm.sft import fallback_prompt

    sft_prompt = fallback_prompt([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert sft_prompt == "System: be brief\nUser: hi\nAssistant: "
    assert message == {"role": "assistant", "content": lm.generate(sft_prompt)}


def test_infill_keeps_the_text_around_the_gaps(client, lm):
    text = "To be, [MASK:4] not [MASK] be"
    r = client.post("/v1/infill", json={"text": text, "max_span": 3, "seed": 1})
    assert r.status_code == 200, r.text
    assert r.json() == {"text": lm.infill(text, max_span=3, seed=1)}


def test_generate_reports_steps_and_forward_passes(client, lm):
    r = client.post("/v1/generate", json={"prompt": "x", "max_tokens": 16, "steps": 8})
    assert r.status_code == 200, r.text
    assert r.json() == {"text": lm.generate("x"), "steps": 8, "nfe": 8}


# ----- streams ----------------------------------------------------------------------------------------------------
def test_generate_stream_is_the_denoising(client, lm):
    r = client.post("/v1/generate", json={"prompt": "ab", "stream": True, "remasking": "random", "seed": 0})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    ev = events(r.text)
    assert ev[0] == {"type": "start", "prompt": "ab", "length": 16, "mask": "░"}
    steps, done = ev[1:-2], ev[-2]
    assert ev[-1] == "[DONE]" and done["type"] == "done"
    assert done == {"type": "done", "text": lm.generate("ab", remasking="random", seed=0), "steps": len(steps)}
    masked = [True] * 16
    for i, step in enumerate(steps):
        assert step["type"] == "step" and step["step"] == i and step["block"] == i // 4
        assert len(step["tokens"]) == len(step["masked"]) == 16
        assert len(step["committed"]) == len(step["confidence"]) == 2  # 16 tokens in 8 steps
        assert all(masked[j] and not step["masked"][j] for j in step["committed"])
        assert [t == "░" for t in step["tokens"]] == step["masked"]
        masked = step["masked"]
    assert not any(masked)


def test_infill_stream_shows_the_whole_canvas(client, lm):
    r = client.post("/v1/infill", json={"text": "ab [MASK:3] cd", "stream": True})
    ev = events(r.text)
    assert ev[0] == {"type": "start", "prompt": "ab [MASK:3] cd", "length": 9, "mask": "░"}
    assert all(len(e["tokens"]) == 9 for e in ev[1:-2])
    assert ev[1]["tokens"][:3] == ["a", "b", " "] and ev[-2]["text"] == lm.infill("ab [MASK:3] cd")


def test_completion_stream_sends_the_committed_prefix(client, lm):
    body = {"prompt": ["hello", "hi"], "n": 2, "temperature": 0.9, "seed": 5, "stream": True}
    whole = client.post("/v1/completions", json={**body, "stream": False}).json()["choices"]
    ev = events(client.post("/v1/completions", json=body).text)
    assert ev[-1] == "[DONE]"
    texts, reasons = ["", "", "", ""], [None] * 4
    for chunk in ev[:-1]:
        assert chunk["object"] == "text_completion"
        (choice,) = chunk["choices"]
        assert reasons[choice["index"]] is None, "text after finish_reason"
        texts[choice["index"]] += choice["text"]
        reasons[choice["index"]] = choice["finish_reason"]
    assert texts == [c["text"] for c in whole] and reasons == [c["finish_reason"] for c in whole]


def test_chat_stream_chunks(client):
    body = {"messages": [{"role": "user", "content": "hey"}], "stream": True}
    whole = client.post("/v1/chat/completions", json={**body, "stream": False}).json()["choices"][0]
    ev = events(client.post("/v1/chat/completions", json=body).text)
    assert ev[-1] == "[DONE]" and all(c["object"] == "chat.completion.chunk" for c in ev[:-1])
    assert ev[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in ev[:-1]) == whole["message"]["content"]
    assert ev[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                    "finish_reason": whole["finish_reason"]}


def test_prefix_delta_holds_back_what_may_change():
    tok = ByteTokenizer()
    M = tok.mask_id
    d = PrefixDelta(tok, [])
    assert d.update([M, 104, M]) == ""
    assert d.update([104, 105, M]) == "hi"
    assert d.update([104, 105, 0xC3, M]) == ""  # half of "é": not sent yet
    assert d.update([104, 105, 0xC3, 0xA9, tok.eos_id, M]) == "é"  # [EOS] ends the text
    assert d.finish("hié") == ""
    s = PrefixDelta(tok, ["END"])
    assert s.update(list(b"abcdE") + [M]) == "abc"  # "dE" may begin "END"
    assert s.update(list(b"abcdENDxy")) == "d" and s.stopped
    assert s.finish("abcdENDxyz") == ""


# ----- errors and limits ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_tokens", [1, 7, 12, 13])
def test_any_max_tokens_works_on_the_openai_routes(client, max_tokens):
    # Not a multiple of block_length: the last block is shorter, and the default steps are fitted to the blocks.
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= max_tokens


@pytest.mark.parametrize("path, body, status, fragment", [
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, 400, "unknown field"),
    ("/v1/completions", {"prompt": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "steps": True}, 400, "steps must be int"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_new_tokens must be >= 1"),
    ("/v1/completions", {"prompt": "x", "steps": 3}, 400, "multiple of the number of blocks"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 12, "steps": 7}, 400, "multiple of the number of blocks"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "not found"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 128, "block_length": 0}, 400, "--max-tokens"),
    ("/v1/completions", {"prompt": "x", "steps": 128}, 400, "--max-steps"),
    ("/v1/completions", {"prompt": "x", "n": 5}, 400, "--max-n"),
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2}, 400, "--max-n"),
    ("/v1/completions", {"prompt": "x" * 101}, 400, "--max-prompt-tokens"),
    ("/v1/completions", {"prompt": "x" * 90, "max_tokens": 64, "block_length": 0}, 400, "context"),
    ("/v1/completions", {"prompt": ""}, 400, "empty"),
    ("/v1/completions", {"prompt": []}, 400, "empty"),
    ("/v1/completions", {"prompt": "x", "sampler": "nope"}, 400, "unknown sampler"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 8, "max_new_tokens": 16}, 400, "disagree"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "content"),
    ("/v1/infill", {"text": "no gap here"}, 400, "no gap"),
    ("/v1/infill", {"text": "a [MASK:100000000000] b"}, 400, "--max-tokens"),
    ("/v1/infill", {"text": "a [MASK:0] b"}, 400, "n >= 1"),
    ("/v1/generate", {"prompt": "x", "num_samples": 2}, 400, "one sample"),
    ("/v1/generate", {"prompt": ["x"]}, 400, "prompt"),
    ("/v1/nothing", {}, 404, "not found"),
])
def test_client_mistakes_get_4xx_in_the_openai_shape(client, path, body, status, fragment):
    assert_error(client.post(path, json=body), status, fragment)


def test_raw_bodies_and_methods(client):
    post = client.post
    assert_error(post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400,
                 "not valid JSON")
    assert_error(post("/v1/completions", content=b'{"prompt": "x", "temperature": NaN}'), 400, "finite")
    assert_error(post("/v1/completions", content=b'{"prompt": "x", "cfg_scale": Infinity}'), 400, "finite")
    assert_error(post("/v1/completions", content=b"[1, 2]"), 400, "JSON object")
    assert_error(post("/v1/completions", content=b"\xff\xfe"), 400)
    assert_error(client.get("/v1/completions"), 405, "method not allowed")
    assert_error(post("/v1/completions", json={"prompt": "x" * 5000}), 413, "--max-body-bytes")
    chunks = (b'{"prompt": "' + b"x" * 1000 for _ in range(5))  # chunked: no content-length to check up front
    assert_error(post("/v1/completions", content=chunks), 413)
    assert client.get("/health").json()["status"] == "ok"


JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
JSON_VALUE = st.recursive(JSON_LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                                         max_size=3), max_leaves=6)
NOT_INT = st.text(max_size=5) | st.booleans() | st.floats(allow_nan=False).filter(lambda x: x != int(x) if
                                                                                    abs(x) < 1e300 else True) | \
    st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
NOT_FLOAT = st.text(max_size=5) | st.booleans() | st.lists(st.floats(allow_nan=False), max_size=2)
NOT_STR = st.integers() | st.floats(allow_nan=False) | st.booleans() | st.lists(st.text(max_size=3), max_size=2)
NOT_BOOL = st.integers() | st.text(max_size=5) | st.floats(allow_nan=False)
BASE = {"/v1/completions": {"prompt": "hi"}, "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
        "/v1/infill": {"text": "a [MASK:2] b"}, "/v1/generate": {"prompt": "hi"}}
TYPED = {"steps": NOT_INT, "top_k": NOT_INT, "seed": NOT_INT, "block_length": NOT_INT, "temperature": NOT_FLOAT,
         "cfg_scale": NOT_FLOAT, "repetition_penalty": NOT_FLOAT, "sampler": NOT_STR, "cache": NOT_STR,
         "model": NOT_STR, "stream": NOT_BOOL, "ban_eos": NOT_BOOL}
RANGES = {"steps": st.integers(max_value=0), "top_k": st.integers(max_value=0), "seed": st.integers(max_value=-1),
          "temperature": st.floats(max_value=-1e-9, allow_infinity=False), "max_span": st.integers(max_value=0),
          "repetition_penalty": st.floats(max_value=0, allow_infinity=False),
          "top_p": st.floats(min_value=1.0001, allow_infinity=False) | st.floats(max_value=0, allow_infinity=False)}
KNOWN = {"prompt", "messages", "text", "model", "stream", "max_tokens", "temperature", "top_p", "n", "seed", "stop",
         *GenerationConfig.__dataclass_fields__}


@st.composite
def malformed(draw):
    """(route, body bytes): a valid request with exactly one thing wrong, or not a request at all."""
    path = draw(st.sampled_from(sorted(BASE)))
    body = json.loads(json.dumps(BASE[path]))
    required = next(iter(body))
    kind = draw(st.sampled_from(["type", "range", "unknown", "missing", "caps", "names", "blocks", "model", "raw",
                                 "not_object", "nan", "required_type"]))
    if kind == "type":
        field = draw(st.sampled_from(sorted(TYPED)))
        body[field] = draw(TYPED[field])
    elif kind == "range":
        field = draw(st.sampled_from(sorted(RANGES)))
        body[field] = draw(RANGES[field])
    elif kind == "unknown":
        body[draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in KNOWN))] = draw(JSON_VALUE)
    elif kind == "missing":
        del body[required]
    elif kind == "caps":
        big = st.integers(65, 10**12)  # over the caps of LIMITS (max_span only matters to infill)
        field, value = draw(st.sampled_from([("steps", big)] + ([("max_span", big)] if path == "/v1/infill" else
                                                                [("max_tokens", big)])))
        body[field] = draw(value)
    elif kind == "names":
        field = draw(st.sampled_from(["sampler", "remasking", "cache"]))
        body[field] = draw(st.text(max_size=10).filter(lambda s: s not in ("none", "prefix", "dual")))
    elif kind == "blocks":
        path = draw(st.sampled_from(["/v1/completions", "/v1/generate"]))
        body = {"prompt": "hi", "max_tokens": 16, "block_length": 8, "steps": draw(st.integers(0, 31)) * 2 + 1}
    elif kind == "model":
        body["model"] = draw(st.text(max_size=10).filter(lambda s: s != "tiny"))
    elif kind == "raw":
        return path, draw(st.binary(max_size=64).filter(lambda b: b.strip()[:1] != b"{"))
    elif kind == "not_object":
        return path, json.dumps(draw(JSON_VALUE.filter(lambda v: not isinstance(v, dict)))).encode()
    elif kind == "nan":
        field = draw(st.sampled_from(["temperature", "cfg_scale", "top_p"]))
        raw = json.dumps(body)[:-1] + f', "{field}": {draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))}}}'
        return path, raw.encode()
    else:  # the required field with a wrong type
        body[required] = draw(st.integers() | st.booleans() | st.dictionaries(st.text(max_size=3), st.integers(),
                                                                              max_size=2))
    return path, json.dumps(body).encode()


def test_200_malformed_requests_all_get_4xx_and_the_server_stays_up(client):
    answered = []

    @settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(malformed())
    def check(request):
        path, raw = request
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (path, raw, r.status_code, r.text)
        assert isinstance(r.json()["error"]["message"], str)
        answered.append(r.status_code)

    check()
    assert len(answered) >= 200
    assert client.get("/health").json() == {"status": "ok", "model": "tiny", "device": "cpu"}
    assert client.post("/v1/completions", json={"prompt": "still here"}).status_code == 200


# ----- auth, metrics ----------------------------------------------------------------------------------------------
def test_api_key(lm):
    app = create_app(lm, "tiny", ServerSettings(api_key="sekrit"))
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        err = assert_error(c.get("/v1/models"), 401, "API key")
        assert err["code"] == "invalid_api_key"
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(c.get("/metrics", headers={"Authorization": "sekrit"}), 401)
        assert_error(c.post("/v1/completions", json={"prompt": "x"}), 401)
        ok = {"Authorization": "Bearer sekrit"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.post("/v1/completions", json={"prompt": "x"}, headers=ok).status_code == 200
        assert c.get("/metrics", headers=ok).status_code == 200


def test_metrics_are_prometheus_text(client):
    client.post("/v1/completions", json={"prompt": "count me"})
    client.post("/v1/completions", json={"prompt": ""})
    client.get("/no/such/route")
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    lines = r.text.splitlines()
    value = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if not line.startswith("#")}
    assert value['dlm_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert value['dlm_requests_total{route="/v1/completions",status="400"}'] >= 1
    assert value['dlm_requests_total{route="other",status="404"}'] >= 1
    count = value['dlm_request_latency_seconds_count{route="/v1/completions"}']
    assert value['dlm_request_latency_seconds_bucket{route="/v1/completions",le="+Inf"}'] == count
    assert value["dlm_generated_tokens_total"] >= 16 and value["dlm_queue_depth"] == 0
    assert value["dlm_batches_total"] >= 1 and value["dlm_forward_passes_total"] >= 8
    for family in ("dlm_requests_total counter", "dlm_request_latency_seconds histogram", "dlm_queue_depth gauge"):
        assert f"# TYPE {family}" in lines


# ----- the worker: queue, timeout, grouping, bugs -----------------------------------------------------------------
class Gate(torch.nn.Module):
    """Wraps the network: each forward pass waits until the test opens the gate (or raises when told to)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.open, self.entered, self.fail = net, threading.Event(), threading.Event(), False

    def forward(self, *args, **kwargs):
        self.entered.set()
        if not self.open.wait(30):
            raise RuntimeError("the test never opened the gate")
        if self.fail:
            raise RuntimeError("boom")
        return self.net(*args, **kwargs)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def test_full_queue_is_429_and_waiting_requests_still_finish():
    lm = tiny_lm(Gate)
    app = create_app(lm, "tiny", ServerSettings(queue_size=1, batch_size=1))
    with TestClient(app) as c, ThreadPoolExecutor(2) as pool:
        running = pool.submit(c.post, "/v1/completions", json={"prompt": "a"})
        assert lm.model.entered.wait(10)  # the worker holds the first request
        queued = pool.submit(c.post, "/v1/completions", json={"prompt": "b"})
        wait_for(lambda: app.state.batcher.depth == 1)
        err = assert_error(c.post("/v1/completions", json={"prompt": "c"}), 429, "queue is full")
        assert err["code"] == "queue_full"
        lm.model.open.set()
        assert running.result(30).status_code == 200 and queued.result(30).status_code == 200


def test_timeout_is_504_and_a_worker_bug_is_500_then_the_server_recovers():
    lm = tiny_lm(Gate)
    app = create_app(lm, "tiny", ServerSettings(timeout=0.3))
    with TestClient(app) as c:
        assert_error(c.post("/v1/completions", json={"prompt": "slow"}), 504, "--timeout")
        assert_error(c.post("/v1/generate", json={"prompt": "slow", "stream": True}), 504)
        lm.model.fail = True
        lm.model.open.set()
        err = assert_error(c.post("/v1/completions", json={"prompt": "x"}), 500, "boom")
        assert err["type"] == "server_error"
        lm.model.fail = False
        assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 200
        assert c.get("/health").json()["status"] == "ok"


def test_batches_group_equal_options_and_respect_the_row_budget(lm):
    batcher = Batcher(lm, batch_size=4, batch_wait_ms=0, queue_size=16)
    a, b = SAMPLING, SAMPLING.replace(steps=4)

    async def scenario():
        jobs = [Job("generate", ["p"], a, False, 10), Job("generate", ["q"], b, False, 10),
                Job("generate", ["r", "s"], a, False, 10), Job("generate", ["t"], a.replace(seed=1), False, 10),
                Job("generate", ["u"], a, False, 10), Job("generate", ["v"], a, False, 10),
                Job("infill", ["w [MASK] x"], {}, False, 10)]
        for job in jobs:
            batcher.submit(job)
        taken = [batcher._take() for _ in range(4)]
        return jobs, taken

    jobs, taken = asyncio.run(scenario())
    assert taken == [[jobs[0], jobs[2], jobs[3]],  # 1 + 2 + 1 rows fill the budget of 4 (a seed batches too)
                     [jobs[1]],  # other steps
                     [jobs[4], jobs[5]], [jobs[6]]]  # the rest of `a`; infill alone
    assert batcher.depth == 0


def test_dream_origin_is_accepted_as_the_library_accepts_it(client, lm):
    body = {"prompt": "ab", "max_tokens": 16, "steps": 8, "sampler": "dream", "remasking": "origin", "seed": 0}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["text"] == lm.generate("ab", max_new_tokens=16, steps=8, sampler="dream", remasking="origin",
                                           seed=0)
    bad = client.post("/v1/generate", json={**body, "sampler": "llada"})
    assert bad.status_code == 400 and "origin" in bad.json()["error"]["message"]
