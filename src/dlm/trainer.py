"""One explicit training loop that knows nothing of which model or loss it trains.

AdamW, linear warmup + cosine decay, gradient clipping, optional bf16 autocast, EMA of the weights, periodic
held-out ELBO in bits per token / char, atomic checkpoints with the optimizer, EMA and step, exact resume, a
`rich` progress bar and a JSONL log (`log.jsonl`). The batch and the diffusion noise of step s are pure
functions of (seed, s), so a run killed at any point and resumed from its last checkpoint logs the same losses
as an uninterrupted run.

    Trainer(model, loss_fn, process, train, val, cfg, ckpt_cfg, tokenizer).fit()
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from dlm.checkpoint import (
    LATEST,
    TRAINER_STATE,
    atomic_write_text,
    prune_checkpoints,
    save_pretrained,
)
from dlm.config import CheckpointConfig, TrainConfig
from dlm.data import TokenStream, _mix
from dlm.eval.elbo import elbo_bits
from dlm.losses import Loss
from dlm.process import ForwardProcess, span_infill_example
from dlm.tokenizer import Tokenizer


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    def __init__(self, model: torch.nn.Module, loss_fn: Loss, process: ForwardProcess | None,
                 train: TokenStream, val: TokenStream | None, cfg: TrainConfig, ckpt_cfg: CheckpointConfig,
                 tokenizer: Tokenizer, device: str = "cpu", chars_per_token: float = 1.0,
                 show_progress: bool = True) -> None:
        self.model = model.to(device)
        self.loss_fn = loss_fn
        self.process = process
        self.train_data, self.val_data = train, val
        self.cfg, self.ckpt_cfg, self.tokenizer = cfg, ckpt_cfg, tokenizer
        self.device = torch.device(device)
        self.chars_per_token = chars_per_token
        self.show_progress = show_progress
        self.out = Path(cfg.out)
        decay, no_decay = [], []
        for p in model.parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8,
        )
        self.ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema > 0 else None
        self.step = 0
        self.history: list[dict[str, Any]] = []

    # ----- data -----------------------------------------------------------------------------------------------
    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x0 (B, L) and the maskable positions (B, L) or None; a pure function of (seed, step)."""
        x0 = self.train_data.batch(step, self.cfg.batch_size, self.cfg.seed)
        p = self.ckpt_cfg.process.infill_prob
        if p <= 0:
            return x0, None
        g = torch.Generator().manual_seed(_mix(self.cfg.seed + 7, step))
        rows = torch.rand(x0.shape[0], generator=g) < p
        maskable = torch.ones_like(x0, dtype=torch.bool)
        pad = self.tokenizer.pad_id
        for i in rows.nonzero().flatten().tolist():
            x0[i], maskable[i] = span_infill_example(x0[i], pad, self.ckpt_cfg.process.max_span, g)
        return x0, maskable

    # ----- checkpointing --------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        name = f"ckpt-{self.step:06d}"
        final = self.out / name
        tmp = self.out / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        inference = self.ema if self.ema is not None else self.model
        save_pretrained(tmp, inference, self.ckpt_cfg, self.tokenizer)
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "train_config": self.cfg.to_dict(),
        }
        torch.save(state, tmp / TRAINER_STATE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # the checkpoint appears complete or not at all
        atomic_write_text(self.out / LATEST, name + "\n")
        prune_checkpoints(self.out, self.cfg.keep_checkpoints)
        return final

    def maybe_resume(self) -> bool:
        latest = self.out / LATEST
        if not latest.exists():
            return False
        ckpt = self.out / latest.read_text().strip()
        state = torch.load(ckpt / TRAINER_STATE, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        self._truncate_log(self.step)
        return True

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from: they will be written again."""
        log = self.out / "log.jsonl"
        if not log.exists():
            return
        keep = [ln for ln in log.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write_text(log, "".join(ln + "\n" for ln in keep))

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # ----- evaluation -----------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        if self.val_data is None:
            return {}
        model = self.ema if self.ema is not None else self.model
        windows = self.val_data.windows(self.cfg.eval_batches * self.cfg.batch_size)
        r = elbo_bits(model, windows, self.tokenizer.mask_id, self.tokenizer.bos_id, n_samples=1,
                      batch_size=self.cfg.batch_size, seed=self.cfg.seed, autocast=self.cfg.bf16,
                      loss_fn=self.loss_fn, process=self.process)
        return {"val_bits_per_token": r.bits_per_token, "val_bits_per_char": r.bits_per_token * self.chars_per_token,
                "val_stderr": r.stderr_bits_per_token}

    # ----- the loop -------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        self.model.train()
        x0, maskable = self.batch(step)
        x0 = x0.to(self.device)
        maskable = maskable.to(self.device) if maskable is not None else None
        g = torch.Generator().manual_seed(_mix(self.cfg.seed + 1, step))
        lr = lr_at(step, self.cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            out = self.loss_fn(self.model, x0, self.process, maskable=maskable, generator=g)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        if self.ema is not None:
            decay = min(self.cfg.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                    pe.lerp_(p, 1 - decay)
        return {"loss": float(out.loss.detach()), "nll": float(out.nll), "lr": lr, "grad_norm": float(grad_norm)}

    def fit(self) -> list[dict[str, Any]]:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        cfg = self.cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = self.maybe_resume()
        atomic_write_text(self.out / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        tokens_per_step = cfg.batch_size * cfg.seq_len
        progress = Progress(
            TextColumn("[bold]train[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), disable=not self.show_progress,
        )
        with progress:
            task = progress.add_task("train", total=cfg.max_steps, completed=self.step, loss=float("nan"), tps=0.0)
            if resumed:
                progress.console.log(f"resumed from step {self.step} in {self.out}")
            t_last, steps_since = time.perf_counter(), 0
            while self.step < cfg.max_steps:
                stats = self.train_step(self.step)
                self.step += 1
                steps_since += 1
                if not math.isfinite(stats["loss"]):
                    raise FloatingPointError(f"loss is {stats['loss']} at step {self.step}; lower --lr or use fp32")
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    now = time.perf_counter()
                    tps = tokens_per_step * steps_since / max(now - t_last, 1e-9)
                    t_last, steps_since = now, 0
                    self._log({"step": self.step, **stats, "tokens_per_s": tps})
                    progress.update(task, loss=stats["loss"], tps=tps)
                progress.update(task, completed=self.step)
                if self.val_data is not None and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                    ev = self.evaluate()
                    self._log({"step": self.step, **ev})
                    progress.console.log(f"step {self.step}: val {ev['val_bits_per_char']:.4f} bits/char")
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps:
                    self.save_checkpoint()
        return self.history
