"""One explicit training loop that knows nothing of which model, loss, data objective or metric it trains.

AdamW, linear warmup + cosine decay, gradient clipping, optional bf16 autocast, an EMA of the weights, a `rich`
progress bar; the rest of a run is callbacks (dlm.callbacks): the held-out ELBO (EvalCallback), atomic checkpoints
with the optimizer, EMA and step, and exact resume (CheckpointCallback), the JSONL log (JsonlLog). The data objective
(span infilling, random-length cropping) is the data's: dlm.data.Objective, applied as the batches are drawn. The
batch and the diffusion noise of step s are pure functions of (seed, s), so a run killed at any point and resumed
from its last checkpoint logs the same losses as an uninterrupted run.

Under torchrun (dlm.distributed) each of N ranks builds the step's global batch of B rows and computes its rows
[rank B/N, (rank + 1) B/N), in `grad_accum` micro-batches; the loss draws its noise for the whole global batch
(dlm.losses.Rows), and the gradients of the micro-batches and ranks are averaged, so N ranks take the same step as
one process on the B rows (exactly, for losses averaged over whole rows; losses averaged over a data-dependent
count, such as masked_unweighted or the infilling objective's maskable tokens, are averaged per micro-batch).
Rank 0 alone logs, shows progress and writes checkpoints; those hold full state dicts keyed by name, so a run
resumes on any number of ranks. Only parameters that require gradients are trained (LoRA freezes the rest).

    Trainer(model, loss_fn, process, data, tcfg, run_callbacks(ckpt_cfg, tok, val=val)).fit()
    dlm.train.build_trainer(tcfg, model_cfg, pcfg, tok, train, val)   # the same, built from configs
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from dlm.callbacks import Callback
from dlm.config import ConfigError, TrainConfig
from dlm.data import Batch, Batches, _mix
from dlm.distributed import (
    DistEnv,
    as_local,
    gather_model_state,
    gather_optimizer_state,
    gradient_sync,
    load_model_state,
    load_optimizer_state,
    unwrap,
)
from dlm.losses import Loss, Rows
from dlm.precision import autocast, resolve_precision, set_threads
from dlm.process import ForwardProcess

STATE_FORMAT = 2  # 2: state dicts keyed by parameter name (any number of ranks); 1: optimizer state by index


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    def __init__(self, model: torch.nn.Module, loss_fn: Loss, process: ForwardProcess | None, data: Batches,
                 cfg: TrainConfig, callbacks: Sequence[Callback] = (), *, dist: DistEnv | None = None,
                 show_progress: bool = True) -> None:
        """`data` gives each step's global batch (a TokenStream, dlm.data.WithObjective, dlm.sft.ChatData);
        `callbacks` evaluate, save and log (dlm.callbacks.run_callbacks); `dist` the rank and device (one process
        on the CPU by default)."""
        cfg.validate()
        self.dist = dist or DistEnv()
        split = self.dist.world_size * cfg.grad_accum
        if cfg.batch_size % split:
            raise ConfigError(f"batch_size={cfg.batch_size} must be a multiple of ranks x grad_accum = "
                              f"{self.dist.world_size} x {cfg.grad_accum}")
        self.device = torch.device(self.dist.device)
        self.precision = resolve_precision(cfg.precision, self.device)  # auto: bf16 where native (dlm.precision)
        self.model = self.dist.wrap(model.to(self.device), fsdp=cfg.fsdp)  # what forward and backward go through
        self.raw = unwrap(self.model)  # the network itself (FSDP2 shards it in place)
        self.loss_fn, self.process, self.data, self.cfg = loss_fn, process, data, cfg
        self.callbacks = list(callbacks)
        self.show_progress = show_progress and self.dist.is_main
        self.params = [(n, p) for n, p in self.raw.named_parameters() if p.requires_grad]
        decay = [p for _, p in self.params if p.dim() >= 2]
        no_decay = [p for _, p in self.params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8)
        # EMA of the trained parameters, sharded like them under FSDP; swapped in to evaluate and to save.
        self.ema = [p.detach().clone() for _, p in self.params] if cfg.ema > 0 else None
        self.step = 0
        self.resumed = False
        self.history: list[dict[str, Any]] = []
        self._console: Any = None  # the progress bar's console while fit() runs

    def batch(self, step: int) -> Batch:
        """The global batch of a step, (B, L): a pure function of (seed, step); every rank builds it whole."""
        return self.data.sample(step, self.cfg.batch_size, self.cfg.seed)

    # ----- weights and state ----------------------------------------------------------------------------------
    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The EMA weights in place of the trained ones (evaluation, saving); nothing without EMA."""
        if self.ema is None:
            yield
            return
        with torch.no_grad():
            saved = [p.detach().clone() for _, p in self.params]
            for e, (_, p) in zip(self.ema, self.params, strict=True):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for s, (_, p) in zip(saved, self.params, strict=True):
                    p.copy_(s)

    def gather_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(the trainer state to resume from, the inference weights: the EMA ones when kept, frozen weights
        included). Every rank must call it: under DDP / FSDP it gathers the full state dicts, keyed by name."""
        model_state = gather_model_state(self.model, trainable_only=True)
        opt_state = gather_optimizer_state(self.model, self.opt)
        with self.ema_weights():  # the weights a checkpoint's model.safetensors holds
            if self.ema is not None:  # on one process or DDP the gathered tensors are the parameters: copy them
                inference = {k: v.clone() for k, v in gather_model_state(self.model).items()}
            elif len(self.params) < len(list(self.raw.parameters())):  # frozen weights (LoRA) belong there too
                inference = gather_model_state(self.model)
            else:
                inference = model_state
        ema_state = {k: inference[k] for k in model_state} if self.ema is not None else None
        state = {"format": STATE_FORMAT, "step": self.step, "model": model_state, "optimizer": opt_state,
                 "ema": ema_state, "train_config": self.cfg.to_dict()}
        return state, inference

    def load_state(self, state: dict[str, Any]) -> None:
        """Resume from a `gather_state` state (written on any number of ranks, or format 1 by one process)."""
        if self.ema is not None and state["ema"] is not None:
            load_model_state(self.model, state["ema"])  # through the model: it shards them as it shards weights
            self.ema = [p.detach().clone() for _, p in self.params]
        load_model_state(self.model, state["model"])
        if state.get("format", 1) >= 2:
            load_optimizer_state(self.model, self.opt, state["optimizer"])
        else:  # written by one process before distributed training: the same parameter order
            self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.resumed = True

    # ----- what callbacks call --------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        """One record of the run (kept in `history`, handed to every callback's on_log)."""
        self.history.append(record)
        for cb in self.callbacks:
            cb.on_log(self, record)

    def print(self, message: str) -> None:
        """A line for the user, from rank 0, through the progress bar's console while it is drawn."""
        if self.dist.is_main:
            if self._console is None:
                from rich.console import Console

                self._console = Console()
            self._console.log(message)

    # ----- the loop -------------------------------------------------------------------------------------------
    def micro_batches(self, batch: Batch) -> Iterator[tuple[Batch, Rows | None]]:
        """This rank's rows of the global batch in `grad_accum` slices, with their place in it (None: all of it)."""
        B = batch.x0.shape[0]
        per_rank = B // self.dist.world_size
        m = per_rank // self.cfg.grad_accum
        for j in range(self.cfg.grad_accum):
            start = self.dist.rank * per_rank + j * m
            yield batch.rows(start, start + m), (None if m == B else Rows(start, B))

    def train_step(self, step: int) -> dict[str, float]:
        self.model.train()
        cfg = self.cfg
        batch = self.batch(step)
        lr = lr_at(step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        sums = torch.zeros(2, dtype=torch.float64)  # loss, nll: means over this rank's micro-batches
        for j, (part, rows) in enumerate(self.micro_batches(batch)):
            x0 = part.x0.to(self.device)
            maskable = part.maskable.to(self.device) if part.maskable is not None else None
            # Every call draws the noise of the whole global batch from the step's generator and keeps its rows.
            g = torch.Generator().manual_seed(_mix(cfg.seed + 1, step))
            where = {"rows": rows} if rows is not None else {}
            with gradient_sync(self.model, enabled=j == cfg.grad_accum - 1):
                with autocast(self.device, self.precision):
                    out = self.loss_fn(self.model, x0, self.process, maskable=maskable, generator=g, **where)
                (out.loss / cfg.grad_accum).backward()  # DDP / FSDP average the ranks' gradients
            sums += torch.tensor([float(out.loss.detach()), float(out.nll)], dtype=torch.float64) / cfg.grad_accum
        grad_norm = as_local(torch.nn.utils.clip_grad_norm_([p for _, p in self.params], cfg.grad_clip))
        self.opt.step()
        if self.ema is not None:
            decay = min(cfg.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, (_, p) in zip(self.ema, self.params, strict=True):
                    e.lerp_(p, 1 - decay)
        loss, nll = self.dist.mean(sums).tolist()
        return {"loss": loss, "nll": nll, "lr": lr, "grad_norm": float(grad_norm),
                "tokens": float(batch.x0.numel())}

    def fit(self) -> list[dict[str, Any]]:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        cfg = self.cfg
        set_threads(cfg.threads)
        state = next((st for cb in self.callbacks if (st := cb.restore_state(self)) is not None), None)
        if state is not None:
            self.load_state(state)
        progress = Progress(
            TextColumn("[bold]train[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), disable=not self.show_progress,
        )
        self._console = progress.console
        with progress:
            task = progress.add_task("train", total=cfg.max_steps, completed=self.step, loss=float("nan"), tps=0.0)
            for cb in self.callbacks:
                cb.on_fit_start(self)
            t_last, tokens_since = time.perf_counter(), 0.0
            while self.step < cfg.max_steps:
                stats = self.train_step(self.step)
                self.step += 1
                tokens_since += stats.pop("tokens")
                if not math.isfinite(stats["loss"]):
                    raise FloatingPointError(f"loss is {stats['loss']} at step {self.step}; lower --lr or use fp32")
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    now = time.perf_counter()
                    tps = tokens_since / max(now - t_last, 1e-9)  # the global batch's tokens, all ranks together
                    t_last, tokens_since = now, 0.0
                    self.log({"step": self.step, **stats, "tokens_per_s": tps})
                    progress.update(task, loss=stats["loss"], tps=tps)
                progress.update(task, completed=self.step)
                for cb in self.callbacks:
                    cb.on_step_end(self, stats)
            for cb in self.callbacks:
                cb.on_fit_end(self)
        self._console = None
        return self.history
