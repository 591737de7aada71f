"""`create_app(lm, model_name, settings)`: the HTTP API of docs/http-api.md as a FastAPI app, a thin shell over
`DiffusionLM` (the options are GenerationConfig's, the errors the library's).

One worker thread owns the model (batching.py); the routes validate a request, queue it and wait for its result
or stream its steps, and withdraw it when its client goes away. Structured outputs on the OpenAI routes
(response_format, tools, guided_*) are checked and planned by structured.py; they and the control endpoints
(/v1/code, /v1/documents, /v1/augment, /v1/patterns) run as "call" jobs, a function of the model on the worker.
Three ASGI middlewares wrap the routes: metrics (outermost, so it counts every answer; a client that left before its
answer counts as status 499), auth (`Authorization: Bearer KEY` with `hmac.compare_digest`), and the body reader
(413 over the size limit, 408 when the body is slower than --body-timeout, one log line when the client leaves
mid-body).

    app = create_app(DiffusionLM.from_pretrained("default"), "default", ServerSettings(api_key="secret"))
    uvicorn.run(app, host="127.0.0.1", port=8000)                     # what `dlm serve` does
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dlm.control.code import check_constraints
from dlm.control.constraints import compile_slots
from dlm.control.documents import generate_markdown
from dlm.pipeline import DiffusionLM
from dlm.server import metrics as prom
from dlm.server.batching import Batcher, Job, JobResult, QueueFull, ServerClosing
from dlm.server.protocol import (
    CONTROL_NAMES,
    GENERATE_NAMES,
    INFILL_NAMES,
    MASK_GLYPH,
    OPENAI_NAMES,
    ApiError,
    AugmentRequest,
    CanvasView,
    ChatRequest,
    CodeRequest,
    CompletionRequest,
    DocumentRequest,
    GenerateRequest,
    InfillRequest,
    PatternRequest,
    PrefixDelta,
    cap_value,
    check_infill,
    check_openai_fields,
    check_prompts,
    describe_validation,
    error_body,
    finish_text,
    library_check,
    new_id,
    now,
    parse_body,
    prompt_texts,
    render_chat,
    resolve_options,
    sampling_overrides,
    stop_list,
)
from dlm.server.settings import ServerSettings
from dlm.server.structured import Answer, Plan, Structurer, tools_prompt

log = logging.getLogger("dlm.server")

STATIC = Path(__file__).parent / "static"
PLACEHOLDER = "<!doctype html><title>dlm</title><p>dlm is serving; the API is described in docs/http-api.md.</p>"
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/models/{model}", "/v1/completions",
          "/v1/chat/completions", "/v1/infill", "/v1/generate", "/v1/code", "/v1/documents", "/v1/augment",
          "/v1/patterns")
TIMEOUTS = (TimeoutError, asyncio.TimeoutError)  # distinct classes before Python 3.11
CLIENT_GONE = 499  # the status counted for a client that left before its answer (nginx's "client closed request")
ARRIVAL = "dlm.arrival"  # scope key: time.monotonic() when the request arrived (--timeout counts from it)


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


# ----- middleware --------------------------------------------------------------------------------------------------
class MetricsMiddleware:
    """Counts every answer by (route, status) and times it to its last byte; unknown paths share one label."""

    def __init__(self, app: ASGIApp, metrics: prom.Metrics) -> None:
        self.app, self.metrics = app, metrics

    @staticmethod
    def route(path: str) -> str:
        if path in ROUTES:
            return path
        if path.startswith("/v1/models/"):
            return "/v1/models/{model}"
        return "/static" if path.startswith("/static/") else "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status, gone = time.perf_counter(), [0], [False]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        async def receive_watched() -> Message:
            message = await receive()
            gone[0] = gone[0] or message["type"] == "http.disconnect"
            return message

        try:
            await self.app(scope, receive_watched, send_status)
        finally:
            # No answer: the client left first (499), or an exception escaped the app (answered 500 outside).
            code = status[0] or (CLIENT_GONE if gone[0] else 500)
            self.metrics.observe(self.route(scope["path"]), code, time.perf_counter() - start)


class AuthMiddleware:
    """With a key, every route but GET (and HEAD) /health, / and the playground's /static/* needs `Bearer KEY`."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app, self.key = app, api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.key is not None:
            path, method = scope["path"], scope["method"]
            public = method in ("GET", "HEAD") and (path in ("/", "/health") or path.startswith("/static/"))
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if not public and not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                                     self.key)):
                body = error_body("missing or wrong API key: send the header `Authorization: Bearer KEY`",
                                  "authentication_error", code="invalid_api_key")
                await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reads the body (at most `limit` bytes, else 413; within `timeout` seconds of arrival, else 408) before the
    app parses it, then replays it. A client that leaves mid-body gets one log line, and the app never runs."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float) -> None:
        self.app, self.limit, self.timeout = app, limit, timeout

    async def refuse(self, scope: Scope, receive: Receive, send: Send, status: int, message: str,
                     code: str) -> None:
        await JSONResponse(error_body(message, code=code), status, headers={"Connection": "close"})(
            scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrival = scope[ARRIVAL] = time.monotonic()
        too_large = f"the request body exceeds {self.limit} bytes (--max-body-bytes)"
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await self.refuse(scope, receive, send, 413, too_large, "body_too_large")
            return
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), arrival + self.timeout - time.monotonic())
            except TIMEOUTS:
                log.info("%s %s: the body did not arrive within %g s (%d bytes came); answered 408",
                         scope["method"], scope["path"], self.timeout, size)
                await self.refuse(scope, receive, send, 408, f"the request body did not arrive within "
                                  f"{self.timeout:g} s (--body-timeout)", "body_timeout")
                return
            if message["type"] != "http.request":  # http.disconnect: nobody is left to answer
                log.info("%s %s: the client disconnected mid-body (after %d bytes)", scope["method"],
                         scope["path"], size)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self.refuse(scope, receive, send, 413, too_large, "body_too_large")
                return
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


# ----- errors ------------------------------------------------------------------------------------------------------
def job_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ValueError):  # SamplingError, ConfigError: the library says what to change
        return ApiError(400, str(exc))
    if isinstance(exc, ServerClosing):
        return ApiError(503, str(exc), "server_error", code="shutting_down")
    return ApiError(500, f"internal error ({type(exc).__name__}: {exc}); the server log has the traceback",
                    "server_error")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation(list(exc.errors()))
        return JSONResponse(error_body(message, param=param, code="invalid_request"), 400)

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: Exception) -> Response:
        log.info("%s %s: the client disconnected before its answer; its request was withdrawn", request.method,
                 request.url.path)
        return Response(status_code=CLIENT_GONE)  # nobody reads it: it sets the status the metrics count

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{exc.detail}: {request.method} {request.url.path}"
        if exc.status_code == 404:
            message += f" (routes: {', '.join(ROUTES)})"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(message, code=code), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error ({type(exc).__name__}); the server log has the traceback",
                                       "server_error"), 500)


# ----- the app -----------------------------------------------------------------------------------------------------
def create_app(lm: DiffusionLM, model_name: str, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    metrics = prom.Metrics()
    batcher = Batcher(lm, settings.batch_size, settings.batch_wait_ms, settings.queue_size)
    tok = lm.tokenizer
    structurer = Structurer(lm, settings)
    created = now()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="dlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lm, app.state.settings, app.state.batcher, app.state.metrics = lm, settings, batcher, metrics
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes,
                       timeout=min(settings.body_timeout, settings.timeout))
    app.add_middleware(AuthMiddleware, api_key=settings.api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last: the outermost of the three

    # ----- helpers shared by the routes ---------------------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"model {name!r} not found; this server serves {model_name!r}", param="model",
                           code="model_not_found")

    def submit(request: Request, kind: str, prompts: list[str], options: Any, stream: bool) -> Job:
        arrival = request.scope.get(ARRIVAL, time.monotonic())
        job = Job(kind, prompts, options, stream, arrival + settings.timeout - time.monotonic())
        try:
            batcher.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_error", code="queue_full") from e
        except ServerClosing as e:
            raise job_error(e) from e
        return job

    def timed_out() -> ApiError:
        return ApiError(504, f"the request took longer than {settings.timeout:g} s (--timeout)", "timeout_error",
                        code="timeout")

    async def disconnected(request: Request) -> None:
        """Returns once the client has closed the connection (the body has been read: only that message is left)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def next_or_gone(job: Job, gone: asyncio.Future[None]) -> tuple[str, Any]:
        """The job's next message; ClientGone if the client leaves first."""
        message = asyncio.ensure_future(job.next())
        await asyncio.wait({message, gone}, return_when=asyncio.FIRST_COMPLETED)
        if message.done():
            return message.result()  # TimeoutError past the deadline
        message.cancel()
        raise ClientGone

    async def result(request: Request, job: Job) -> JobResult:
        gone = asyncio.ensure_future(disconnected(request))
        try:
            while True:
                kind, payload = await next_or_gone(job, gone)
                if kind == "done":
                    return payload
                if kind == "error":
                    raise job_error(payload)
        except TIMEOUTS as e:
            raise timed_out() from e
        finally:
            gone.cancel()
            batcher.withdraw(job)  # a no-op once done; else the slot is freed and the worker drops the job

    Render = Callable[[str, Any], Iterator[Any]]

    async def stream(request: Request, job: Job, render: Render) -> StreamingResponse:
        """Wait for the first message (so a refused or queued-too-long request still gets its status), then SSE.
        Once streaming, Starlette cancels `events` when the client leaves; before that, `next_or_gone` notices."""
        gone = asyncio.ensure_future(disconnected(request))
        try:
            first = await next_or_gone(job, gone)
        except TIMEOUTS as e:
            batcher.withdraw(job)
            raise timed_out() from e
        except BaseException:
            batcher.withdraw(job)
            raise
        finally:
            gone.cancel()
        if first[0] == "error":
            batcher.withdraw(job)
            raise job_error(first[1])

        async def events() -> AsyncIterator[bytes]:
            message = first
            try:
                while True:
                    kind, payload = message
                    if kind == "error":
                        yield sse(job_error(payload).body())
                        break
                    for obj in render(kind, payload):
                        yield sse(obj)
                    if kind == "done":
                        break
                    message = await job.next()
            except TIMEOUTS:
                yield sse(timed_out().body())
            finally:
                batcher.withdraw(job)
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def usage(prompt_tokens: list[int], completion_tokens: list[int]) -> dict[str, int]:
        p, c = sum(prompt_tokens), sum(completion_tokens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def openai_head(body: CompletionRequest | ChatRequest, chat: bool) -> dict[str, Any]:
        """The keys an answer (streamed: every chunk) starts with; with include_usage every chunk has `usage`
        (null but in the last one, as OpenAI sends it)."""
        kind = ("chat.completion.chunk" if body.stream else "chat.completion") if chat else "text_completion"
        head = {"id": new_id("chatcmpl" if chat else "cmpl"), "object": kind, "created": now(), "model": model_name}
        if body.stream_options is not None and body.stream_options.include_usage:  # only with stream: true
            head["usage"] = None
        return head

    async def openai_route(request: Request, body: CompletionRequest | ChatRequest, prompts: list[str],
                           chat: bool) -> Any:
        check_model(body.model)
        check_openai_fields(body)
        overrides = sampling_overrides(body, OPENAI_NAMES)
        opts = resolve_options(lm, overrides, settings)
        stops = stop_list(body.stop)
        plan = structurer.plan(body, prompts, overrides, opts)
        if plan is not None:
            return await structured_route(request, body, prompts, opts, plan, chat)
        counts = check_prompts(lm, prompts, opts, settings)
        job = submit(request, "generate", prompts, opts, body.stream)
        head = openai_head(body, chat)
        # echo (completions): row i (prompts x n, prompt-major) starts with its prompt
        echoed = [prompts[i // opts.num_samples] if getattr(body, "echo", False) else "" for i in range(job.rows)]
        if not body.stream:
            r = await result(request, job)
            choices = []
            for i, (raw, eos) in enumerate(zip(r.texts, r.finished, strict=True)):
                text, reason = finish_text(raw, eos, stops)
                text = echoed[i] + text
                content = {"message": {"role": "assistant", "content": text}} if chat else \
                    {"text": text, "logprobs": None}
                choices.append({"index": i, **content, "finish_reason": reason})
            return {**head, "choices": choices, "usage": usage(counts, r.tokens)}

        deltas = [PrefixDelta(tok, stops) for _ in range(job.rows)]
        opened = [False] * job.rows

        def chunk(i: int, text: str | None, reason: str | None = None) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {} if text is None else {"content": text}
                if not opened[i]:
                    opened[i] = True
                    delta = {"role": "assistant", **delta}
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                if not opened[i]:
                    opened[i] = True
                    text = echoed[i] + (text or "")
                choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
            return {**head, "choices": [choice]}

        def render(kind: str, payload: Any) -> Iterator[dict[str, Any]]:
            if kind == "step":
                for i, d in enumerate(deltas):
                    text = d.update(payload.xt[i, payload.start:].tolist())
                    if text or (chat and not opened[i]):
                        yield chunk(i, text)
                return
            for i, d in enumerate(deltas):  # done
                text = d.finish(payload.texts[i])
                _, reason = finish_text(payload.texts[i], payload.finished[i], stops)
                if text or (chat and not opened[i]):
                    yield chunk(i, text)
                yield chunk(i, None, reason)
            if "usage" in head:
                yield {**head, "choices": [], "usage": usage(counts, payload.tokens)}

        return await stream(request, job, render)

    async def structured_route(request: Request, body: CompletionRequest | ChatRequest, prompts: list[str],
                               opts: Any, plan: Plan, chat: bool) -> Any:
        """response_format / tools / guided_*: one call job (structured.py); streamed as whole answers."""
        counts = check_prompts(lm, prompts, opts if plan.mode == "tools" else opts.replace(max_new_tokens=1),
                               settings)
        job = submit(request, "call", prompts, plan.fn, body.stream)
        head = openai_head(body, chat)
        echo = getattr(body, "echo", False)

        def used(answers: list[Answer]) -> dict[str, int]:
            return usage(counts, [len(tok.encode(a.content if a.call is None else a.call[1])) for a in answers])

        def text_of(i: int, a: Answer) -> str:
            return (prompts[i // opts.num_samples] if echo else "") + (a.content or "")

        if not body.stream:
            answers: list[Answer] = (await result(request, job)).value
            choices = []
            for i, a in enumerate(answers):
                if chat:
                    message: dict[str, Any] = {"role": "assistant", "content": a.content}
                    if a.call is not None:
                        message["tool_calls"] = a.tool_calls()
                    choices.append({"index": i, "message": message, "finish_reason": a.finish_reason})
                else:
                    choices.append({"index": i, "text": text_of(i, a), "logprobs": None,
                                    "finish_reason": a.finish_reason})
            return {**head, "choices": choices, "usage": used(answers)}

        def render(kind: str, payload: Any) -> Iterator[dict[str, Any]]:
            if kind != "done":
                return
            answers: list[Answer] = payload.value
            for i, a in enumerate(answers):
                if chat:
                    delta: dict[str, Any] = {"role": "assistant", "content": a.content}
                    if a.call is not None:
                        delta["tool_calls"] = [{"index": 0, **c} for c in a.tool_calls()]
                    yield {**head, "choices": [{"index": i, "delta": delta, "logprobs": None,
                                                "finish_reason": None}]}
                    yield {**head, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                "finish_reason": a.finish_reason}]}
                else:
                    yield {**head, "choices": [{"index": i, "text": text_of(i, a), "logprobs": None,
                                                "finish_reason": a.finish_reason}]}
            if "usage" in head:
                yield {**head, "choices": [], "usage": used(answers)}

        return await stream(request, job, render)

    def control_options(body: Any, names: dict[str, str], path: str) -> dict[str, Any]:
        """A control request's options, checked by the library and capped (--max-steps); stream refused."""
        check_model(body.model)
        if body.stream:
            raise ApiError(400, f"{path} is not streamed: send stream false (or leave it out)", param="stream")
        overrides = sampling_overrides(body, names)
        library_check(lm, overrides)
        cap_value(overrides.get("steps", 0), settings.max_steps, "steps", "--max-steps")
        return overrides

    def check_text(text: str, what: str, param: str) -> None:
        n = len(tok.encode(text)) if text else 0
        if n > settings.max_prompt_tokens:
            raise ApiError(400, f"{what} has {n} tokens; this server takes at most {settings.max_prompt_tokens} "
                                "(--max-prompt-tokens)", param=param)

    async def run_call(request: Request, fn: Callable[[DiffusionLM, Callable[..., None]], Any]) -> Any:
        return (await result(request, submit(request, "call", [""], fn, False))).value

    def denoising(prompt: str, length: int) -> Render:
        view, started = CanvasView(tok), [False]

        def render(kind: str, payload: Any) -> Iterator[dict[str, Any]]:
            if not started[0]:
                started[0] = True
                yield {"type": "start", "prompt": prompt, "length": length, "mask": MASK_GLYPH}
            if kind == "step":
                yield view.step(payload)
            else:
                yield {"type": "done", "text": payload.texts[0], "steps": payload.steps}

        return render

    # ----- routes -------------------------------------------------------------------------------------------------
    model_card = {"id": model_name, "object": "model", "created": created, "owned_by": "dlm"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = parse_body(await request.body(), CompletionRequest)
        return await openai_route(request, body, prompt_texts(tok, body.prompt), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = parse_body(await request.body(), ChatRequest)
        system = tools_prompt(body.tools) if body.tools and body.tool_choice != "none" else None
        return await openai_route(request, body, [render_chat(tok, body.messages, system)], chat=True)

    @app.post("/v1/infill")
    async def infill(request: Request) -> Any:
        body = parse_body(await request.body(), InfillRequest)
        check_model(body.model)
        overrides = sampling_overrides(body, INFILL_NAMES)
        length = check_infill(lm, body.text, overrides, settings)
        job = submit(request, "infill", [body.text], overrides, body.stream)
        if body.stream:
            return await stream(request, job, denoising(body.text, length))
        return {"text": (await result(request, job)).texts[0]}

    @app.post("/v1/generate")
    async def generate(request: Request) -> Any:
        body = parse_body(await request.body(), GenerateRequest)
        check_model(body.model)
        opts = resolve_options(lm, sampling_overrides(body, GENERATE_NAMES), settings)
        if opts.num_samples != 1:
            raise ApiError(400, "/v1/generate decodes one sample; use /v1/completions with n for several",
                           param="num_samples")
        check_prompts(lm, [body.prompt], opts, settings)
        job = submit(request, "generate", [body.prompt], opts, body.stream)
        if body.stream:
            return await stream(request, job, denoising(body.prompt, opts.max_new_tokens))
        r = await result(request, job)
        return {"text": r.texts[0], "steps": r.steps, "nfe": r.nfe}

    @app.post("/v1/code")
    async def code(request: Request) -> Any:
        body = parse_body(await request.body(), CodeRequest)
        options = control_options(body, CONTROL_NAMES, "/v1/code")
        check_text(body.prompt, "the prompt", "prompt")
        try:
            check_constraints(body.constraints)
        except ValueError as e:
            raise ApiError(400, str(e), param="constraints") from e
        extra = {k: getattr(body, k) for k in ("line_tokens", "docstring_tokens", "repair_rounds")
                 if getattr(body, k) is not None}

        def fn(lm: DiffusionLM, check: Callable[..., None]) -> Any:
            return lm.generate_with_constraints(body.prompt, body.constraints, callback=check, **extra, **options)

        r = await run_call(request, fn)
        report = r.report
        return {"code": str(r), "checks": r.checks, "valid_before_repair": r.valid_before_repair,
                "repair_rounds": r.repair_rounds, "fallback": r.fallback, "note": r.note,
                "repair": {"valid_before": report.valid_before, "valid_after": report.valid_after,
                           "rounds": report.rounds, "failures": report.failures}}

    @app.post("/v1/documents")
    async def documents(request: Request) -> Any:
        body = parse_body(await request.body(), DocumentRequest)
        options = control_options(body, {**CONTROL_NAMES, "max_span": "max_span"}, "/v1/documents")
        if (body.template is None) == (body.constraints is None):
            raise ApiError(400, 'give a template, or a prompt with constraints {"format": "markdown", '
                                '"sections": [...]} (one of the two)', param="template")
        if body.template is not None:
            if body.prompt is not None:
                raise ApiError(400, "prompt goes with constraints; a template carries its own text",
                               param="prompt")
            check_text(body.template, "the template", "template")
            template, data, budgets = body.template, body.data, body.budgets

            def fn(lm: DiffusionLM, check: Callable[..., None]) -> Any:
                return lm.generate_document(template, data, budgets=budgets, new_headings=body.new_headings,
                                            callback=check, **options)
        else:
            for name in ("data", "budgets"):
                if getattr(body, name) is not None:
                    raise ApiError(400, f"{name} goes with a template, not with constraints", param=name)
            constraints, prompt = dict(body.constraints or {}), body.prompt or ""
            check_text(prompt, "the prompt", "prompt")
            constraints.setdefault("format", "markdown")
            if constraints["format"] != "markdown":
                raise ApiError(400, f"constraints.format must be \"markdown\", got {constraints['format']!r}",
                               param="constraints")

            def fn(lm: DiffusionLM, check: Callable[..., None]) -> Any:
                return generate_markdown(lm, prompt, constraints, callback=check, **options)

        return {"text": await run_call(request, fn)}

    @app.post("/v1/augment")
    async def augment(request: Request) -> Any:
        body = parse_body(await request.body(), AugmentRequest)
        options = control_options(body, CONTROL_NAMES, "/v1/augment")
        if body.n < 1 or len(body.texts) * body.n > settings.max_n:
            raise ApiError(400, f"texts x n = {len(body.texts)} x {body.n} must be in [1, {settings.max_n}] "
                                "(--max-n)", param="n")
        for i, t in enumerate(body.texts):
            check_text(t, f"text {i}", "texts")
        seed = options.pop("seed", None)

        def fn(lm: DiffusionLM, check: Callable[..., None]) -> Any:
            return lm.augment(body.texts, noise=body.noise, n=body.n, seed=seed, callback=check, **options)

        return {"variants": await run_call(request, fn)}

    @app.post("/v1/patterns")
    async def patterns(request: Request) -> Any:
        body = parse_body(await request.body(), PatternRequest)
        options = control_options(body, CONTROL_NAMES, "/v1/patterns")
        try:
            slots = len(compile_slots(body.pattern))
        except ValueError as e:
            raise ApiError(400, str(e), param="pattern", code="unsupported_pattern") from e
        check_text(body.before + body.after, "before + after", "before")
        if slots > settings.max_tokens:
            raise ApiError(400, f"the pattern needs {slots} tokens, over this server's limit of "
                                f"{settings.max_tokens} (--max-tokens)", param="pattern")

        def fn(lm: DiffusionLM, check: Callable[..., None]) -> Any:
            return lm.fill_pattern(body.before, body.pattern, body.after, callback=check, **options)

        return {"text": await run_call(request, fn)}

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        alive = batcher.alive
        return JSONResponse({"status": "ok" if alive else "error", "model": model_name, "device": lm.device.type},
                            200 if alive else 503)

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        s = batcher.stats
        extra = [
            ("dlm_generated_tokens_total", "counter", "Tokens generated (before [EOS], pads excluded).",
             {(): s.generated_tokens}),
            ("dlm_queue_depth", "gauge", "Requests waiting for the model.", {(): batcher.depth}),
            ("dlm_batches_total", "counter", "Batches decoded.", {(): s.batches}),
            ("dlm_batched_requests_total", "counter", "Requests decoded, summed over batches.", {(): s.jobs}),
            ("dlm_batch_rows_total", "counter", "Rows (prompts x n) decoded, summed over batches.", {(): s.rows}),
            ("dlm_batch_requests_max", "gauge", "Most requests decoded together in one batch.", {(): s.max_jobs}),
            ("dlm_forward_passes_total", "counter", "Forward passes of the network.", {(): s.forwards}),
        ]
        return PlainTextResponse(metrics.render(extra), media_type=prom.CONTENT_TYPE)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> Any:
        page = STATIC / "index.html"
        return FileResponse(page) if page.is_file() else HTMLResponse(PLACEHOLDER)

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
