"""The model's one worker: a bounded queue of jobs, grouped into batches and decoded together on a thread.

Requests whose decoding options are equal (every GenerationConfig field but the prompt, the seed and `n`) share
one call of `DiffusionLM.generate` with a list of prompts, each repeated for its request's n samples: the library
left-pads prompts of different lengths and masks the pads out, and every row draws its noise from its own
generator (dlm.sampling.noise), so a row's text is the one it would get alone. Seeded and unseeded requests batch
together: a request seeded `s` gets the generators seeded s + i for its rows i (the library's own rule, so it gives
the same text alone, batched, or as `DiffusionLM.generate(..., seed=s, num_samples=n)`), an unseeded one fresh
seeds. An infill job is decoded alone (`DiffusionLM.infill` takes one text), and so is a "call" job (structured
outputs and the control endpoints: a function of the model run on this thread, see structured.py). Streaming
jobs get every denoising step of their own rows; a batch whose jobs have all gone (client disconnected or timed
out) is abandoned at the next step.

    batcher = Batcher(lm, batch_size=8, batch_wait_ms=5, queue_size=64); batcher.start()
    job = Job("generate", ["ROMEO:"], lm.sampling, stream=False, timeout=60); batcher.submit(job)
    kind, payload = await job.next()        # ("step", StepUpdate) ... then ("done", JobResult) or ("error", exc)
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from dlm.config import GenerationConfig
from dlm.pipeline import DiffusionLM
from dlm.sampling.noise import RowGenerators

log = logging.getLogger("dlm.server")


class QueueFull(Exception):
    """The queue holds `queue_size` waiting jobs; the request is answered 429."""


class ServerClosing(Exception):
    """The server shut down before the job finished."""


class _Abandoned(Exception):
    """Raised inside the library's callback to stop a batch nobody waits for any more."""


@dataclass
class StepUpdate:
    """One denoising step as a streaming job sees it: its own rows (R) of the batch canvas (R, L)."""

    step: int
    block: int
    start: int  # first position of the generated region (0 for infill: the whole canvas is shown)
    xt: torch.Tensor  # (R, L) canvas after the step
    committed: torch.Tensor  # (R, L) bool, positions unmasked by this step
    confidence: torch.Tensor  # (R, L) their scores


@dataclass
class JobResult:
    texts: list[str]  # one per row; prompt i's sample j is row i * n + j
    finished: list[bool]  # the row's generated region holds [EOS]
    tokens: list[int]  # generated tokens per row (before [EOS], pads excluded)
    steps: int  # denoising steps taken (step events)
    nfe: int  # forward passes of the network
    batch_jobs: int  # requests decoded in the same batch (1: alone)
    value: Any = None  # a "call" job: what its function returned


class Job:
    """One request waiting for the worker. Created inside the event loop whose coroutine awaits `next()`."""

    def __init__(self, kind: str, prompts: list[str], options: GenerationConfig | dict[str, Any], stream: bool,
                 timeout: float) -> None:
        if kind not in ("generate", "infill", "call"):
            raise ValueError(f"unknown job kind {kind!r}")
        self.kind = kind
        self.prompts = prompts
        # generate: the resolved GenerationConfig; infill: overrides for DiffusionLM.infill; call: a function
        # fn(lm, callback) -> value, run on the worker thread (callback(event) stops it once the job is withdrawn)
        self.options = options
        self.stream = stream
        self.deadline = time.monotonic() + timeout
        self.cancelled = False
        self.loop = asyncio.get_running_loop()
        self._messages: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        n = options.num_samples if isinstance(options, GenerationConfig) else 1
        self.rows = len(prompts) * n
        if kind == "generate" and isinstance(options, GenerationConfig):  # seed and n are per job: not in the key
            self.key: Any = json.dumps(options.replace(seed=None, num_samples=1).to_dict(), sort_keys=True)
        else:
            self.key = ("alone", id(self))

    def post(self, kind: str, payload: Any) -> None:
        """From the worker thread: hand a message to the waiting coroutine."""
        try:
            self.loop.call_soon_threadsafe(self._messages.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            self.cancelled = True

    async def next(self) -> tuple[str, Any]:
        """The next message; TimeoutError once the request's deadline has passed."""
        if not self._messages.empty():
            return self._messages.get_nowait()
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        return await asyncio.wait_for(self._messages.get(), remaining)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class BatchStats:
    batches: int = 0
    jobs: int = 0
    rows: int = 0
    max_jobs: int = 0  # most requests one batch held
    max_rows: int = 0
    generated_tokens: int = 0
    forwards: int = 0  # forward passes of the network (a pre-hook on the model)

    def record(self, jobs: int, rows: int) -> None:
        self.batches += 1
        self.jobs += jobs
        self.rows += rows
        self.max_jobs = max(self.max_jobs, jobs)
        self.max_rows = max(self.max_rows, rows)


class Batcher:
    """Owns the model: one daemon thread takes compatible jobs from the queue and decodes them together."""

    def __init__(self, lm: DiffusionLM, batch_size: int = 8, batch_wait_ms: float = 5.0,
                 queue_size: int = 64) -> None:
        self.lm = lm
        self.batch_size = batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.queue_size = queue_size
        self.stats = BatchStats()
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._hook: Any = None

    # ----- the request side (event loop) ------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise ServerClosing("the server is shutting down")
            if len(self._pending) >= self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} requests waiting); retry later")
            self._pending.append(job)
            self._cond.notify()

    def withdraw(self, job: Job) -> None:
        """The request is over (answered, failed, or its client went away): cancel the job and free its queue
        slot. A batch already decoding stops at its next step once every job in it is withdrawn."""
        with self._cond:
            job.cancel()
            try:
                self._pending.remove(job)
            except ValueError:  # taken by the worker already, or never queued
                pass

    def start(self) -> None:
        if self._thread is not None:
            return

        def count_forward(module: torch.nn.Module, args: Any) -> None:
            self.stats.forwards += 1

        self._hook = self.lm.model.register_forward_pre_hook(count_forward)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="dlm-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            pending, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for job in pending:
            job.post("error", ServerClosing("the server shut down before this request was decoded"))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ----- the worker thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _compatible_rows(self, first: Job) -> int:
        return sum(j.rows for j in self._pending if j.key == first.key and not j.cancelled)

    def _take(self) -> list[Job] | None:
        """Block until a job waits; then, for up to batch_wait, let compatible jobs join it. None: stop."""
        with self._cond:
            while True:
                while self._pending and self._pending[0].cancelled:
                    self._pending.popleft()
                if self._stopping:
                    return None
                if self._pending:
                    break
                self._cond.wait()
            first = self._pending[0]
            if self.batch_size > 1 and self.batch_wait > 0 and not isinstance(first.key, tuple):
                deadline = time.monotonic() + self.batch_wait
                while self._compatible_rows(first) < self.batch_size and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            batch: list[Job] = []
            keep: list[Job] = []
            rows = 0
            for job in self._pending:
                if job.cancelled:
                    continue
                if job.key == first.key and (not batch or rows + job.rows <= self.batch_size):
                    batch.append(job)
                    rows += job.rows
                else:
                    keep.append(job)
            self._pending.clear()
            self._pending.extend(keep)
            return batch

    def _run(self, batch: list[Job]) -> None:
        emitted = [False]
        try:
            if batch[0].kind == "generate":
                results = self._decode_generate(batch, emitted)
            elif batch[0].kind == "infill":
                results = self._decode_infill(batch[0], emitted)
            else:
                results = self._decode_call(batch[0])
        except _Abandoned:
            if self._stopping:
                for job in batch:
                    job.post("error", ServerClosing("the server shut down while this request was decoded"))
            return
        except ValueError as e:  # SamplingError, ConfigError: options the library refuses (the client's to fix)
            if len(batch) > 1 and not emitted[0]:
                for job in batch:  # one job's prompt must not fail its neighbours: decode each alone
                    self._run([job])
                return
            for job in batch:
                job.post("error", e)
            return
        except Exception as e:  # a bug: the request gets a 500 and the worker keeps serving
            log.exception("decoding a batch of %d request(s) failed", len(batch))
            for job in batch:
                job.post("error", e)
            return
        self.stats.record(len(batch), sum(j.rows for j in batch))
        for job, result in zip(batch, results, strict=True):
            self.stats.generated_tokens += sum(result.tokens)
            job.post("done", result)

    def _check(self, batch: list[Job]) -> None:
        if self._stopping or all(j.cancelled for j in batch):
            raise _Abandoned

    def _decode_generate(self, batch: list[Job], emitted: list[bool]) -> list[JobResult]:
        opts: GenerationConfig = batch[0].options  # type: ignore[assignment]
        # Each job's prompts repeated n times (its own n), as the library lays out num_samples: prompt p's sample j
        # is the job's row p * n + j. So jobs with different n share the call too.
        prompts = [p for job in batch for p in job.prompts for _ in range(job.options.num_samples)]  # type: ignore
        spans, row = [], 0
        for job in batch:
            spans.append((row, row + job.rows))
            row += job.rows
        last: dict[str, Any] = {"xt": None, "steps": 0}
        forwards = self.stats.forwards

        def callback(event: Any) -> None:
            self._check(batch)
            out = event.output
            start = out.xt.shape[1] - opts.max_new_tokens
            for job, (a, b) in zip(batch, spans, strict=True):
                if job.stream and not job.cancelled:
                    emitted[0] = True
                    # Copies: the loop may write into its canvas after the step (the [EOS] fill of stop_at_eos).
                    job.post("step", StepUpdate(event.step, event.block, start, out.xt[a:b].cpu().clone(),
                                                out.committed[a:b].cpu().clone(), out.confidence[a:b].cpu().clone()))
            last["xt"] = out.xt
            last["steps"] += 1

        # One generator per row: job j's rows i seeded seed_j + i (fresh seeds for an unseeded job).
        device = self.lm.device
        generators = [g for job in batch for g in RowGenerators.seeded(job.options.seed, job.rows,  # type: ignore
                                                                       device).generators]
        texts = self.lm.generate(prompts, config=opts.replace(seed=None, num_samples=1), callback=callback,
                                 generator=RowGenerators(generators))
        rows = list(texts)
        xt = last["xt"].cpu()  # the final canvas (B, L): which rows reached [EOS], how many tokens they hold
        region = xt[:, xt.shape[1] - opts.max_new_tokens:]
        tok = self.lm.tokenizer
        finished, counts = [], []
        stops = tok.stop_ids  # EOS, and a chat model's end-of-turn token
        for ids in region.tolist():
            end = next((k for k, i in enumerate(ids) if i in stops), None)
            finished.append(end is not None)
            counts.append(sum(1 for i in ids[:end] if i != tok.pad_id))
        nfe = self.stats.forwards - forwards
        return [JobResult(rows[a:b], finished[a:b], counts[a:b], last["steps"], nfe, len(batch)) for a, b in spans]

    def _decode_infill(self, job: Job, emitted: list[bool]) -> list[JobResult]:
        state = {"steps": 0, "filled": 0}
        forwards = self.stats.forwards

        def callback(event: Any) -> None:
            self._check([job])
            out = event.output
            if job.stream:
                emitted[0] = True
                job.post("step", StepUpdate(event.step, event.block, 0, out.xt.cpu().clone(),
                                            out.committed.cpu().clone(), out.confidence.cpu().clone()))
            state["steps"] += 1
            state["filled"] += int(out.committed.sum())

        text = self.lm.infill(job.prompts[0], callback=callback, **job.options)  # type: ignore[arg-type]
        return [JobResult([text], [True], [state["filled"]], state["steps"], self.stats.forwards - forwards, 1)]

    def _decode_call(self, job: Job) -> list[JobResult]:
        state = {"steps": 0}
        forwards = self.stats.forwards

        def callback(event: Any = None) -> None:  # also called with no event, as a bare check between model calls
            self._check([job])
            state["steps"] += event is not None

        value = job.options(self.lm, callback)  # type: ignore[operator]
        return [JobResult([], [], [0], state["steps"], self.stats.forwards - forwards, 1, value)]
