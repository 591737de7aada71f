"""One explicit training loop that knows nothing of which model or loss it trains.

AdamW, linear warmup + cosine decay, gradient clipping, optional bf16 autocast, EMA of the weights, periodic
held-out ELBO in bits per token / char, atomic checkpoints with the optimizer, EMA and step, exact resume, a
`rich` progress bar and a JSONL log (`log.jsonl`). The batch and the diffusion noise of step s are pure
functions of (seed, s), so a run killed at any point and resumed from its last checkpoint logs the same losses
as an uninterrupted run.

Under torchrun (dlm.distributed) each of N ranks builds the step's global batch of B rows and computes its rows
[rank B/N, (rank + 1) B/N), in `grad_accum` micro-batches; the loss draws its noise for the whole global batch
(dlm.losses.Rows), and the gradients of the micro-batches and ranks are averaged, so N ranks take the same step as
one process on the B rows (exactly, for losses averaged over whole rows; losses averaged over a data-dependent
count, such as masked_unweighted or the infilling objective's maskable tokens, are averaged per micro-batch).
Rank 0 alone logs, shows progress and writes checkpoints; those hold full state dicts keyed by name, so a run
resumes on any number of ranks. Only parameters that require gradients are trained (LoRA freezes the rest).

    Trainer(model, loss_fn, process, train, val, cfg, ckpt_cfg, tokenizer).fit()
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dlm.checkpoint import (
    LATEST,
    TRAINER_STATE,
    atomic_write_text,
    clean_temporaries,
    latest_intact_state,
    note,
    prepare_run_dir,
    prune_checkpoints,
    save_pretrained,
    truncate_log,
)
from dlm.config import CheckpointConfig, ConfigError, TrainConfig
from dlm.data import Batch, Batches, TokenStream, _mix, random_length
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
from dlm.eval.elbo import elbo_bits
from dlm.losses import Loss, Rows
from dlm.precision import autocast, resolve_precision, set_threads
from dlm.process import ForwardProcess, span_infill_example
from dlm.tokenizer import Tokenizer

STATE_FORMAT = 2  # 2: state dicts keyed by parameter name (any number of ranks); 1: optimizer state by index


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    def __init__(self, model: torch.nn.Module, loss_fn: Loss, process: ForwardProcess | None,
                 train: Batches, val: TokenStream | None, cfg: TrainConfig, ckpt_cfg: CheckpointConfig,
                 tokenizer: Tokenizer, device: str = "cpu", chars_per_token: float = 1.0,
                 show_progress: bool = True, dist: DistEnv | None = None,
                 export: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> None:
        """`train` gives each step's global batch (TokenStream, dlm.sft.ChatData); `dist` the rank (one process by
        default); `export` maps the gathered weights to those a checkpoint saves as its model (LoRA: merged)."""
        cfg.validate()
        self.dist = dist or DistEnv(device=device)
        split = self.dist.world_size * cfg.grad_accum
        if cfg.batch_size % split:
            raise ConfigError(f"batch_size={cfg.batch_size} must be a multiple of ranks x grad_accum = "
                              f"{self.dist.world_size} x {cfg.grad_accum}")
        self.device = torch.device(self.dist.device)
        self.precision = resolve_precision(cfg.precision, self.device)  # auto: bf16 where native (dlm.precision)
        self.model = self.dist.wrap(model.to(self.device), fsdp=cfg.fsdp)  # what forward and backward go through
        self.raw = unwrap(self.model)  # the network itself (FSDP2 shards it in place)
        self.loss_fn = loss_fn
        self.process = process
        self.train_data, self.val_data = train, val
        self.cfg, self.ckpt_cfg, self.tokenizer = cfg, ckpt_cfg, tokenizer
        self.chars_per_token = chars_per_token
        self.show_progress = show_progress and self.dist.is_main
        self.export = export
        self.out = Path(cfg.out)
        self.params = [(n, p) for n, p in self.raw.named_parameters() if p.requires_grad]
        decay = [p for _, p in self.params if p.dim() >= 2]
        no_decay = [p for _, p in self.params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8)
        # EMA of the trained parameters, sharded like them under FSDP; swapped in to evaluate and to save.
        self.ema = [p.detach().clone() for _, p in self.params] if cfg.ema > 0 else None
        self.step = 0
        self.history: list[dict[str, Any]] = []

    # ----- data -----------------------------------------------------------------------------------------------
    def batch(self, step: int) -> Batch:
        """The global batch of a step, (B, L): a pure function of (seed, step); every rank builds it whole."""
        b = self.train_data.sample(step, self.cfg.batch_size, self.cfg.seed)
        p = self.ckpt_cfg.process.infill_prob
        if p > 0 and b.maskable is None:  # pretraining windows; SFT batches come with their response mask
            g = torch.Generator().manual_seed(_mix(self.cfg.seed + 7, step))
            x0 = b.x0
            rows = torch.rand(x0.shape[0], generator=g) < p
            maskable = torch.ones_like(x0, dtype=torch.bool)
            pad = self.tokenizer.pad_id
            for i in rows.nonzero().flatten().tolist():
                x0[i], maskable[i] = span_infill_example(x0[i], pad, self.ckpt_cfg.process.max_span, g)
            b = Batch(x0, maskable)
        if self.cfg.random_length_prob > 0:
            g = torch.Generator().manual_seed(_mix(self.cfg.seed + 11, step))
            b = random_length(b, self.cfg.random_length_prob, g)
        return b

    # ----- weights and checkpoints ----------------------------------------------------------------------------
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

    def save_checkpoint(self) -> Path:
        """Every rank helps gather the full state; rank 0 writes it under a temporary name and renames it."""
        name = f"ckpt-{self.step:06d}"
        final = self.out / name
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
        if self.dist.is_main:
            tmp = self.out / f".tmp-{name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            weights = self.export(inference) if self.export is not None else inference
            save_pretrained(tmp, weights, self.ckpt_cfg, self.tokenizer)
            state = {"format": STATE_FORMAT, "step": self.step, "model": model_state, "optimizer": opt_state,
                     "ema": ema_state, "train_config": self.cfg.to_dict()}
            torch.save(state, tmp / TRAINER_STATE)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # the checkpoint appears complete or not at all
            atomic_write_text(self.out / LATEST, name + "\n")
            prune_checkpoints(self.out, self.cfg.keep_checkpoints)
        self.dist.barrier()
        return final

    def maybe_resume(self) -> bool:
        """Load the newest intact checkpoint of the run folder (saved on any number of ranks), if there is one.

        A corrupt trainer_state.pt or a `latest` naming a missing folder is skipped with one line saying so; the
        log keeps each step once: records after the checkpoint (or all of them, for a new run) are dropped.
        """
        found = latest_intact_state(self.out)
        if found is None:
            if self.dist.is_main:
                self._truncate_log(0)  # a run killed before its first checkpoint starts again from step 0
            return False
        _, state, why = found
        if why is not None and self.dist.is_main:
            note(why)
        if self.ema is not None and state["ema"] is not None:
            load_model_state(self.model, state["ema"])  # through the model: it shards them as it shards weights
            self.ema = [p.detach().clone() for _, p in self.params]
        load_model_state(self.model, state["model"])
        if state.get("format", 1) >= 2:
            load_optimizer_state(self.model, self.opt, state["optimizer"])
        else:  # written by one process before distributed training: the same parameter order
            self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        if self.dist.is_main:
            self._truncate_log(self.step)
        return True

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be written again) and torn ones."""
        why = truncate_log(self.out / "log.jsonl", step)
        if why is not None:
            note(why)

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.dist.is_main:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # ----- evaluation -----------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Held-out ELBO of the (EMA) weights; every rank evaluates the same windows (FSDP needs them all)."""
        if self.val_data is None:
            return {}
        windows = self.val_data.windows(self.cfg.eval_batches * self.cfg.batch_size)
        with self.ema_weights():
            r = elbo_bits(self.raw, windows, self.tokenizer.mask_id, self.tokenizer.bos_id, n_samples=1,
                          batch_size=self.cfg.batch_size, seed=self.cfg.seed, autocast=self.precision == "bf16",
                          loss_fn=self.loss_fn, process=self.process)
        return {"val_bits_per_token": r.bits_per_token, "val_bits_per_char": r.bits_per_token * self.chars_per_token,
                "val_stderr": r.stderr_bits_per_token}

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
        prepare_run_dir(self.out)
        if self.dist.is_main:
            removed = clean_temporaries(self.out)  # what a kill during a checkpoint write left
            if removed:
                note(f"removed {len(removed)} unfinished file(s) of an interrupted run in {self.out}: "
                     f"{', '.join(removed[:4])}{' ...' if len(removed) > 4 else ''}")
        self.dist.barrier()
        resumed = self.maybe_resume()
        if self.dist.is_main:
            atomic_write_text(self.out / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        progress = Progress(
            TextColumn("[bold]train[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), disable=not self.show_progress,
        )
        with progress:
            task = progress.add_task("train", total=cfg.max_steps, completed=self.step, loss=float("nan"), tps=0.0)
            if resumed and self.dist.is_main:
                progress.console.log(f"resumed from step {self.step} in {self.out}")
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
                    self._log({"step": self.step, **stats, "tokens_per_s": tps})
                    progress.update(task, loss=stats["loss"], tps=tps)
                progress.update(task, completed=self.step)
                if self.val_data is not None and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                    ev = self.evaluate()
                    self._log({"step": self.step, **ev})
                    if self.dist.is_main:
                        progress.console.log(f"step {self.step}: val {ev['val_bits_per_char']:.4f} bits/char")
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps:
                    self.save_checkpoint()
        return self.history
