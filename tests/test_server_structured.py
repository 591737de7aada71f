"""Issue 15, part 1: structured outputs over the OpenAI API of `dlm serve` and the control endpoints, against a live
uvicorn and driven by the official `openai` client.

A tiny random model (byte tokenizer, a 1024-token context so a tool list fits) writes nonsense, which is the point:
the structure holds by construction, whatever the weights. Every JSON answer is checked with `jsonschema` (an
independent validator), every regex answer with `re.fullmatch`, every tool call parsed by the client.
"""

from __future__ import annotations

import ast
import json
import re
import socket
import threading
import time
from contextlib import closing

import pytest
from server_helpers import live_server

pytest.importorskip("fastapi", reason="the server needs: pip install 'dlm[serve]'")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

import torch  # noqa: E402

from dlm.config import CheckpointConfig, GenerationConfig, ModelConfig  # noqa: E402
from dlm.eval.conditional import conditional_loglik  # noqa: E402
from dlm.models import build_model  # noqa: E402
from dlm.pipeline import DiffusionLM  # noqa: E402
from dlm.server import ServerSettings, create_app  # noqa: E402
from dlm.server.protocol import ChatMessage, render_chat  # noqa: E402
from dlm.server.structured import CHOICE_SAMPLES, call_probability, tools_prompt  # noqa: E402
from dlm.tokenizer import ByteTokenizer  # noqa: E402

SAMPLING = GenerationConfig(max_new_tokens=16, steps=8, block_length=8)
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "score": {"type": "number", "minimum": -5, "maximum": 5},
    "year": {"type": "integer", "minimum": 1900, "maximum": 2100},  # 201 values: chosen among its literals
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    "address": {"type": "object", "properties": {"zip": {"type": "string", "maxLength": 5},
                                                 "main": {"type": "boolean"}},
                "required": ["zip"], "additionalProperties": False},
}, "required": ["name", "age", "tags"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                                   "b": {"type": "integer"}}}}}
ASK = [{"role": "user", "content": "Weather in Rome?"}]


def tiny(seed: int = 0) -> DiffusionLM:
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny", max_len=1024)
    return DiffusionLM(build_model(cfg).eval(), ByteTokenizer(), CheckpointConfig(model=cfg, sampling=SAMPLING))


@pytest.fixture(scope="module")
def lm():
    return tiny()


@pytest.fixture(scope="module")
def url(lm):
    with live_server(create_app(lm, "tiny", ServerSettings())) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120)


def error_of(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


# ----- response_format ---------------------------------------------------------------------------------------
def test_json_schema_chat_validates_for_every_sample(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, response_format=schema_format(PERSON), n=3)
    assert len(r.choices) == 3
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert r.usage.completion_tokens > 0


def test_json_schema_completions_and_seed(client):
    schema = {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 99}, "minItems": 2,
              "maxItems": 4}
    texts = [client.completions.create(model="tiny", prompt="Numbers: ", seed=7, temperature=1.0, extra_body={
        "response_format": schema_format(schema)}).choices[0].text for _ in range(2)]  # not in the client's API
    assert texts[0] == texts[1]  # seeded: the same answer
    jsonschema.validate(json.loads(texts[0]), schema)


def test_json_object_gives_an_object(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, response_format={"type": "json_object"},
                                       max_tokens=12)
    value = json.loads(r.choices[0].message.content)
    assert isinstance(value, dict) and isinstance(value["response"], str)


def test_guided_json_and_stream(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}}}
    with client.chat.completions.create(model="tiny", messages=ASK, stream=True,
                                        extra_body={"guided_json": schema}) as events:
        chunks = list(events)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), schema)
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("schema,names", [
    ({"type": "string", "pattern": "a+"}, ["pattern"]),
    ({"type": "object", "properties": {"x": {"type": "string", "format": "email"}}}, ["format", "$.x"]),
    ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, ["anyOf"]),
])
def test_unsupported_schema_is_a_400_naming_it(url, schema, names):
    for path, body in (("/v1/chat/completions", {"messages": ASK}), ("/v1/completions", {"prompt": "x"})):
        e = error_of(post(url, path, {**body, "response_format": schema_format(schema)}))
        assert e["code"] == "unsupported_schema" and e["param"] == "response_format"
        assert all(name in e["message"] for name in names), e["message"]
    assert httpx.get(url + "/health").status_code == 200


def test_response_format_errors(url):
    e = error_of(post(url, "/v1/chat/completions", {"messages": ASK, "response_format": {"type": "json_schema"}}))
    assert "json_schema" in e["message"]
    e = error_of(post(url, "/v1/chat/completions", {"messages": ASK, "response_format": {"type": "xml"}}))
    assert e["param"] == "response_format"
    e = error_of(post(url, "/v1/completions", {"prompt": "x", "response_format": {"type": "json_object"},
                                               "guided_regex": "a"}))
    assert "cannot be combined" in e["message"]
    e = error_of(post(url, "/v1/completions", {"prompt": "x", "response_format": {"type": "json_object"},
                                               "stop": "}"}))
    assert e["param"] == "stop"
    big = {"type": "array", "items": {"type": "string", "minLength": 200}, "minItems": 3}
    e = error_of(post(url, "/v1/completions", {"prompt": "x", "response_format": schema_format(big)}))
    assert "--max-tokens" in e["message"] or "context" in e["message"]


def test_the_clients_pydantic_schemas_parse(client):
    """The openai client's own schema writer (pydantic: $defs / $ref, Optional as anyOf with null, Literal, Field
    bounds): `chat.completions.parse` returns a model instance, and `pydantic_function_tool` calls parse too."""
    from typing import Literal, Optional

    from pydantic import BaseModel, Field

    class Port(BaseModel):
        code: str = Field(max_length=5)
        busy: bool

    class Ship(BaseModel):
        name: str = Field(min_length=1, max_length=8)
        crew: int = Field(ge=1, le=40)
        kind: Literal["brig", "sloop"]
        home: Port
        flag: Optional[str] = None  # noqa: UP045 (what users write; the client turns it into anyOf [str, null])

    r = client.chat.completions.parse(model="tiny", messages=ASK, response_format=Ship)
    ship = r.choices[0].message.parsed
    assert isinstance(ship, Ship) and isinstance(ship.home, Port) and ship.flag is not None
    jsonschema.validate(json.loads(r.choices[0].message.content), Ship.model_json_schema())
    r = client.chat.completions.parse(model="tiny", messages=ASK, tools=[openai.pydantic_function_tool(Port)],
                                      tool_choice="required")
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "Port" and isinstance(call.function.parsed_arguments, Port)


def test_recursive_and_foreign_refs_are_refused(url):
    tree = {"$defs": {"Node": {"type": "object", "properties": {"kids": {"type": "array", "items": {
        "$ref": "#/$defs/Node"}}}}}, "$ref": "#/$defs/Node"}
    e = error_of(post(url, "/v1/completions", {"prompt": "x", "response_format": schema_format(tree)}))
    assert e["code"] == "unsupported_schema" and "recursive" in e["message"]
    far = {"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}
    e = error_of(post(url, "/v1/completions", {"prompt": "x", "guided_json": far}))
    assert e["param"] == "guided_json" and "$ref" in e["message"]


# ----- tools -------------------------------------------------------------------------------------------------
def arguments_of(call, tool: dict) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def test_tool_choice_required_and_named(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, ADD], tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name in ("get_weather", "add")
    arguments_of(call, WEATHER if call.function.name == "get_weather" else ADD)
    for tool in (WEATHER, ADD):
        name = tool["function"]["name"]
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, ADD],
                                           tool_choice={"type": "function", "function": {"name": name}})
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == name
        arguments_of(call, tool)


def test_tool_call_round_trip_and_stream(client):
    """The client sends the answer's message and a tool result back; a streamed call parses too."""
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required")
    call = r.choices[0].message.tool_calls[0]
    follow = [*ASK, r.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "22 C"}]
    r2 = client.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER], tool_choice="none")
    assert r2.choices[0].message.tool_calls is None and isinstance(r2.choices[0].message.content, str)
    with client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required",
                                        stream=True) as events:
        chunks = [c for c in events if c.choices]
    (delta,) = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert delta.function.name == "get_weather"
    arguments_of(delta, WEATHER)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_auto_follows_the_call_probability(lm, client, url):
    prompt = render_chat(lm.tokenizer, [ChatMessage(**m) for m in ASK],
                         tools_prompt([openai_tool(WEATHER)]))
    opens = [i for i in range(256) if chr(i) == "{"]
    wants = call_probability(lm, prompt, opens) >= 0.5
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="auto")
    assert (r.choices[0].finish_reason == "tool_calls") == wants
    # A model that puts all its mass on "{" at every position calls the tool under "auto".
    eager = tiny()
    brace = eager.tokenizer.encode("{")[0]
    eager.model.register_forward_hook(lambda m, args, out: out + 100.0 * torch.nn.functional.one_hot(
        torch.tensor(brace), out.shape[-1]).to(out.dtype))
    with live_server(create_app(eager, "tiny", ServerSettings())) as base:
        c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER])  # tool_choice defaults to auto
    assert r.choices[0].finish_reason == "tool_calls"
    arguments_of(r.choices[0].message.tool_calls[0], WEATHER)


def openai_tool(tool: dict):
    from dlm.server.protocol import ToolSpec

    return ToolSpec.model_validate(tool)


def test_tool_errors(url):
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "[a-z]+"}}}}}
    e = error_of(post(url, "/v1/chat/completions", {"messages": ASK, "tools": [bad], "tool_choice": "required"}))
    assert "tools[0].function.parameters" in e["message"] and "pattern" in e["message"]
    e = error_of(post(url, "/v1/chat/completions", {"messages": ASK, "tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}))
    assert e["param"] == "tool_choice" and "nope" in e["message"]
    e = error_of(post(url, "/v1/chat/completions", {"messages": ASK, "tool_choice": "auto"}))
    assert e["param"] == "tool_choice"
    e = error_of(post(url, "/v1/chat/completions", {"messages": ASK, "tools": [WEATHER, WEATHER]}))
    assert "unique" in e["message"]
    e = error_of(post(url, "/v1/chat/completions", {"messages": ASK, "tools": [WEATHER], "tool_choice": "maybe"}))
    assert e["param"] == "tool_choice"


# ----- guided_regex / guided_choice ---------------------------------------------------------------------------
def test_guided_regex(client, url):
    pattern = r"\d{4}-\d{2}-\d{2}"
    r = client.completions.create(model="tiny", prompt="Date: ", n=2, extra_body={"guided_regex": pattern})
    assert len(r.choices) == 2 and all(re.fullmatch(pattern, c.text) for c in r.choices)
    r = client.chat.completions.create(model="tiny", messages=ASK, extra_body={"guided_regex": r"[A-Z][a-z]{1,5}"})
    assert re.fullmatch(r"[A-Z][a-z]{1,5}", r.choices[0].message.content)
    e = error_of(post(url, "/v1/completions", {"prompt": "x", "guided_regex": "a+"}))
    assert e["param"] == "guided_regex" and "unbounded" in e["message"]


def test_guided_choice_is_the_most_likely(lm, client, url):
    choices = ["positive", "negative", "neutral"]
    prompt = "Sentiment: "
    r = client.completions.create(model="tiny", prompt=prompt, temperature=0, seed=3,
                                  extra_body={"guided_choice": choices})
    tok = lm.tokenizer
    scores = [conditional_loglik(lm, tok.encode(prompt), tok.encode(c), n_samples=CHOICE_SAMPLES, seed=3).nats
              for c in choices]
    assert r.choices[0].text == choices[max(range(3), key=scores.__getitem__)]
    r = client.completions.create(model="tiny", prompt=prompt, temperature=1.0, n=4,
                                  extra_body={"guided_choice": choices})
    assert all(c.text in choices for c in r.choices)
    e = error_of(post(url, "/v1/completions", {"prompt": "x", "guided_choice": []}))
    assert e["param"] == "guided_choice"


# ----- the control endpoints ---------------------------------------------------------------------------------
def test_code_endpoint(url):
    sig = "def add(a: int, b: int) -> int:"
    r = post(url, "/v1/code", {"prompt": "add two numbers", "seed": 0, "line_tokens": 8, "docstring_tokens": 8,
                               "constraints": {"function_signature": sig, "max_lines": 5,
                                               "includes_docstring": True}})
    assert r.status_code == 200, r.text
    out = r.json()
    ast.parse(out["code"])
    assert out["code"].startswith(sig + "\n") and len(out["code"].splitlines()) <= 5
    assert all(out["checks"].values()) and set(out["checks"]) >= {"parses", "max_lines", "function_signature"}
    assert out["repair"]["rounds"] == out["repair_rounds"] and out["repair"]["valid_after"] in (True, False)
    assert (out["note"] is None) == (not out["fallback"])
    e = error_of(post(url, "/v1/code", {"prompt": "x", "constraints": {"lines": 3}}))
    assert e["param"] == "constraints" and "lines" in e["message"]
    e = error_of(post(url, "/v1/code", {"prompt": "x", "stream": True}))
    assert e["param"] == "stream"


def test_documents_endpoint(url):
    template = "# {title}\n\n## Summary\n[MASK:<=12]\n\n## Risks\n[MASK:6]\n"
    r = post(url, "/v1/documents", {"template": template, "data": {"title": "Q3"}, "seed": 0})
    text = r.json()["text"]
    fixed = ["# Q3\n\n## Summary\n", "\n\n## Risks\n"]
    assert text.startswith(fixed[0]) and fixed[1] in text and text.endswith("\n")
    r = post(url, "/v1/documents", {"prompt": "A report", "constraints": {"format": "markdown", "sections": [
        "executive_summary", "analysis"], "max_length": 60}, "seed": 0})
    headings = [line for line in r.json()["text"].splitlines() if line.startswith("#")]
    assert headings == ["## Executive Summary", "## Analysis"]
    e = error_of(post(url, "/v1/documents", {"template": "no gap here"}))
    assert "gap" in e["message"].lower()
    e = error_of(post(url, "/v1/documents", {"template": "[MASK]", "constraints": {"sections": ["a"]}}))
    assert e["param"] == "template"


def test_augment_and_patterns_endpoints(url):
    r = post(url, "/v1/augment", {"texts": ["hello world", "good night"], "n": 2, "noise": 0.5, "seed": 0})
    variants = r.json()["variants"]
    assert [len(v) for v in variants] == [2, 2]
    assert all(len(v) == len(t) for vs, t in zip(variants, ["hello world", "good night"], strict=True) for v in vs)
    e = error_of(post(url, "/v1/augment", {"texts": ["a"], "n": 9}))
    assert "--max-n" in e["message"]
    e = error_of(post(url, "/v1/augment", {"texts": ["a"], "noise": 2.0}))
    assert "noise" in e["message"]
    r = post(url, "/v1/patterns", {"before": "Year: ", "pattern": r"1[0-9]{3}", "after": ".", "seed": 1})
    assert re.fullmatch(r"1[0-9]{3}", r.json()["text"])
    e = error_of(post(url, "/v1/patterns", {"pattern": "(a|b)"}))
    assert e["param"] == "pattern" and e["code"] == "unsupported_pattern"
    e = error_of(post(url, "/v1/patterns", {"pattern": "a", "wat": 1}))
    assert e["param"] == "wat"


def test_a_structured_request_is_withdrawn_when_its_client_leaves():
    """A JSON request held at its first forward pass; its client leaves: it counts as 499, stops at its next step
    (far fewer forward passes than its masked tokens), and the worker serves the next request."""
    lm = tiny()
    started, release, held = threading.Event(), threading.Event(), [False]

    def gate(module, args):
        if not held[0]:
            held[0] = True
            started.set()
            release.wait(60)

    hook = lm.model.register_forward_pre_hook(gate)
    app = create_app(lm, "tiny", ServerSettings())
    batcher, route = app.state.batcher, "/v1/completions"
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 60, "maxLength": 60}}}
    body = json.dumps({"prompt": "x", "response_format": schema_format(schema)}).encode()
    try:
        with live_server(app) as url:
            forwards = batcher.stats.forwards
            host, port = url.removeprefix("http://").split(":")
            with closing(socket.create_connection((host, int(port)), timeout=30)) as sock:
                sock.sendall(f"POST {route} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                assert started.wait(30), "the request never reached the model"
            deadline = time.monotonic() + 30
            while app.state.metrics.requests.get((route, "499"), 0) < 1:
                assert time.monotonic() < deadline, "the request was never counted as 499"
                time.sleep(0.01)
            release.set()
            r = httpx.post(url + "/v1/patterns", json={"pattern": "[a-z]{2}", "seed": 0}, timeout=60)
            assert r.status_code == 200 and re.fullmatch("[a-z]{2}", r.json()["text"]), r.text
            spent = batcher.stats.forwards - forwards
            assert spent < 60, f"the abandoned request ran {spent} forward passes for its 60 masked tokens"
    finally:
        release.set()
        hook.remove()
