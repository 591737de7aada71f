"""What a training run does besides training: evaluate, save checkpoints, log, as callbacks of dlm.trainer.Trainer.

The trainer runs the optimisation loop and calls each callback's hooks, in list order, at declared points; every
hook is declared on `Callback` with a do-nothing default (as the sampler contract does), so the trainer never asks
what a callback implements:

    restore_state(trainer) -> state | None   before training: the trainer state to resume from (CheckpointCallback)
    on_fit_start(trainer)                    the step is final (resumed or 0), before the first step
    on_log(trainer, record)                  each record the run logs (training stats, evaluations)
    on_step_end(trainer, stats)              after each optimizer step; trainer.step is the number of steps done
    on_eval(trainer, metrics)                after an evaluation (EvalCallback)
    on_save(trainer, path)                   after a checkpoint is complete (CheckpointCallback)
    on_fit_end(trainer)                      after the last step

`EvalCallback` computes the held-out ELBO of the (EMA) weights in bits per token and per char (dlm.eval.elbo) every
`eval_every` steps and at the end; `CheckpointCallback` owns the run folder: it resumes from the newest intact
checkpoint and writes one every `ckpt_every` steps and at the end, atomically (a folder appears complete or not at
all), keeping the last `keep_checkpoints`; `JsonlLog` appends every record to OUT/log.jsonl and, on resume, drops the
records after the checkpoint (they are written again). `run_callbacks` gives the set dlm train, sft and adapt use.

    trainer = Trainer(model, loss_fn, process, data, tcfg, run_callbacks(ckpt_cfg, tok, val=val_stream))
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from collections.abc import Callable

    from dlm.config import CheckpointConfig
    from dlm.data import TokenStream
    from dlm.tokenizer import Tokenizer
    from dlm.trainer import Trainer


class Callback:
    """The hooks a Trainer calls, each a no-op by default; a callback overrides the ones it needs."""

    def restore_state(self, trainer: Trainer) -> dict[str, Any] | None:
        """A trainer state to resume from (Trainer.load_state reads it), or None; the first non-None one wins."""
        return None

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step; trainer.step is where the run starts (resumed or 0)."""

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """A record of the run's log (trainer.log), on every rank; `record["step"]` is the step it describes."""

    def on_step_end(self, trainer: Trainer, stats: dict[str, float]) -> None:
        """After an optimizer step: trainer.step steps are done; `stats` holds loss, nll, lr, grad_norm."""

    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After an evaluation at trainer.step."""

    def on_save(self, trainer: Trainer, path: Path) -> None:
        """After the checkpoint of trainer.step is complete at `path`."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last step."""


def _due(step: int, every: int, max_steps: int) -> bool:
    return step % every == 0 or step == max_steps


class EvalCallback(Callback):
    """Held-out ELBO of the (EMA) weights every `every` steps (default TrainConfig.eval_every) and at the end, on
    `batches` x batch_size windows of `val` (default TrainConfig.eval_batches); logged as val_bits_per_token,
    val_bits_per_char (x `chars_per_token`) and val_stderr. Every rank evaluates the same windows (FSDP needs them
    all); the noise is a function of the run's seed, so every evaluation of a run sees the same draws."""

    def __init__(self, val: TokenStream, tokenizer: Tokenizer, chars_per_token: float = 1.0, every: int | None = None,
                 batches: int | None = None) -> None:
        self.val, self.tokenizer, self.chars_per_token = val, tokenizer, chars_per_token
        self.every, self.batches = every, batches
        self.seconds = 0.0  # spent evaluating so far (a benchmark's training time excludes it)

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        from dlm.eval.elbo import elbo_bits

        t0 = time.perf_counter()
        cfg = trainer.cfg
        windows = self.val.windows((self.batches or cfg.eval_batches) * cfg.batch_size)
        with trainer.ema_weights():
            r = elbo_bits(trainer.raw, windows, self.tokenizer.mask_id, self.tokenizer.bos_id, n_samples=1,
                          batch_size=cfg.batch_size, seed=cfg.seed, autocast=trainer.precision == "bf16",
                          loss_fn=trainer.loss_fn, process=trainer.process)
        self.seconds += time.perf_counter() - t0
        return {"val_bits_per_token": r.bits_per_token, "val_bits_per_char": r.bits_per_token * self.chars_per_token,
                "val_stderr": r.stderr_bits_per_token}

    def on_step_end(self, trainer: Trainer, stats: dict[str, float]) -> None:
        if not _due(trainer.step, self.every or trainer.cfg.eval_every, trainer.cfg.max_steps):
            return
        metrics = self.evaluate(trainer)
        trainer.log({"step": trainer.step, **metrics})
        trainer.print(f"step {trainer.step}: val {metrics['val_bits_per_char']:.4f} bits/char")
        for cb in trainer.callbacks:
            cb.on_eval(trainer, metrics)


class CheckpointCallback(Callback):
    """The run folder (TrainConfig.out): resume from its newest intact checkpoint, save every `every` steps (default
    TrainConfig.ckpt_every) and at the end. A checkpoint is a model folder (model.safetensors with the EMA weights
    when kept, `export`ed: LoRA writes the merged model; config.json; tokenizer.json; generation_config.json) plus
    trainer_state.pt; it is written under a temporary name by rank 0 and renamed, so it is complete or absent."""

    def __init__(self, ckpt_cfg: CheckpointConfig, tokenizer: Tokenizer, every: int | None = None,
                 export: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> None:
        self.ckpt_cfg, self.tokenizer, self.every, self.export = ckpt_cfg, tokenizer, every, export

    def restore_state(self, trainer: Trainer) -> dict[str, Any] | None:
        """The newest intact checkpoint's trainer state (saved on any number of ranks), or None for a new run.

        Temporaries a kill during a write left are removed first; a corrupt trainer_state.pt or a `latest` naming a
        missing folder is skipped with one line saying so."""
        out = prepare_run_dir(trainer.cfg.out)
        if trainer.dist.is_main:
            removed = clean_temporaries(out)  # what a kill during a checkpoint write left
            if removed:
                note(f"removed {len(removed)} unfinished file(s) of an interrupted run in {out}: "
                     f"{', '.join(removed[:4])}{' ...' if len(removed) > 4 else ''}")
        trainer.dist.barrier()
        found = latest_intact_state(out)
        if found is None:
            return None
        _, state, why = found
        if why is not None and trainer.dist.is_main:
            note(why)
        return state

    def on_fit_start(self, trainer: Trainer) -> None:
        out = Path(trainer.cfg.out)
        if trainer.resumed:
            trainer.print(f"resumed from step {trainer.step} in {out}")
        if trainer.dist.is_main:
            atomic_write_text(out / "train_config.json", json.dumps(trainer.cfg.to_dict(), indent=2) + "\n")

    def on_step_end(self, trainer: Trainer, stats: dict[str, float]) -> None:
        if _due(trainer.step, self.every or trainer.cfg.ckpt_every, trainer.cfg.max_steps):
            path = self.save(trainer)
            for cb in trainer.callbacks:
                cb.on_save(trainer, path)

    def save(self, trainer: Trainer) -> Path:
        """Every rank helps gather the full state; rank 0 writes it under a temporary name and renames it."""
        out = Path(trainer.cfg.out)
        name = f"ckpt-{trainer.step:06d}"
        final = out / name
        state, inference = trainer.gather_state()
        if trainer.dist.is_main:
            tmp = out / f".tmp-{name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            weights = self.export(inference) if self.export is not None else inference
            save_pretrained(tmp, weights, self.ckpt_cfg, self.tokenizer)
            torch.save(state, tmp / TRAINER_STATE)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # the checkpoint appears complete or not at all
            atomic_write_text(out / LATEST, name + "\n")
            prune_checkpoints(out, trainer.cfg.keep_checkpoints)
        trainer.dist.barrier()
        return final


class JsonlLog(Callback):
    """Every record (trainer.log) as one JSON line of `path` (default OUT/log.jsonl), written by rank 0. At the
    start, the lines after the step the run starts from (all of them, for a new run) and a torn last line are
    dropped, so the log holds each step once however often the run was killed and resumed."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None

    def _file(self, trainer: Trainer) -> Path:
        return self.path if self.path is not None else Path(trainer.cfg.out) / "log.jsonl"

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.dist.is_main:
            self._file(trainer).parent.mkdir(parents=True, exist_ok=True)
            why = truncate_log(self._file(trainer), trainer.step)
            if why is not None:
                note(why)

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if trainer.dist.is_main:
            with open(self._file(trainer), "a") as f:
                f.write(json.dumps(record) + "\n")


def run_callbacks(ckpt_cfg: CheckpointConfig, tokenizer: Tokenizer, val: TokenStream | None = None,
                  chars_per_token: float = 1.0,
                  export: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
                  ) -> list[Callback]:
    """A run folder's callbacks: evaluation on `val` (when given), checkpoints, the JSONL log. In this order, so a
    step's log holds its training record, then its evaluation, before its checkpoint is written."""
    evals: list[Callback] = [EvalCallback(val, tokenizer, chars_per_token)] if val is not None else []
    return [*evals, CheckpointCallback(ckpt_cfg, tokenizer, export=export), JsonlLog()]
