"""`train()`: corpus -> tokenizer -> model -> Trainer, the recipe behind `dlm train` (and `python -m dlm.train`).

A run folder is self-describing: re-running the same command resumes from its latest checkpoint, with the
tokenizer and configs saved there (a changed model or process config is refused rather than silently mixed).
A family (masked, sedd-absorbing, sedd-uniform, d3pm-absorbing, d3pm-uniform) is a process registered in
dlm.process with its defaults: `process_config(name)` gives its schedule, loss and eps, and its sampler is saved as
the run's default GenerationConfig, so `dlm generate --model RUN` samples it with its own sampler.

    train(TrainConfig(data="shakespeare", out="runs/x", max_steps=2000), ModelConfig.preset("small"))  # precision auto
    train(tcfg, ModelConfig.preset("small", arch="dit"), process_config("sedd-uniform"))
    build_trainer(tcfg, model_cfg, pcfg, tok, train_stream, val_stream).fit()   # the same loop on your own data

Under torchrun (`torchrun --nproc-per-node 2 -m dlm.train --data shakespeare --out runs/x`) every rank runs this
recipe; dlm.distributed joins them and dlm.trainer splits each global batch between them (docs/training.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from dlm.checkpoint import CONFIG, TOKENIZER, prepare_run_dir, resolve_checkpoint_dir, run_checkpoints
from dlm.config import CheckpointConfig, ConfigError, GenerationConfig, ModelConfig, ProcessConfig, TrainConfig
from dlm.data import (
    Batches,
    Objective,
    TokenStream,
    WithObjective,
    load_corpus,
    split_documents,
    tokenize_documents,
    unigram_entropy_bits,
)
from dlm.losses import LOSSES
from dlm.models import MODELS, build_model, count_params
from dlm.process import PROCESSES, build_process
from dlm.schedules import SCHEDULES
from dlm.tokenizer import Tokenizer, build_tokenizer

if TYPE_CHECKING:
    from dlm.callbacks import Callback
    from dlm.distributed import DistEnv
    from dlm.trainer import Trainer

__all__ = ["train", "build_trainer", "validate", "validate_train", "build_process", "process_config",
           "generation_defaults"]


def process_config(name: str, **overrides: Any) -> ProcessConfig:
    """The ProcessConfig of a family: the process's own defaults (schedule, loss, eps), then `overrides`."""
    return ProcessConfig(process=name, **{**PROCESSES.get(name).defaults, **overrides})


def generation_defaults(pcfg: ProcessConfig) -> GenerationConfig:
    """The sampling defaults saved with a run: the family's own sampler (SEDD, D3PM), else GenerationConfig()."""
    return GenerationConfig(**PROCESSES.get(pcfg.process).sampling)


def validate(model_cfg: ModelConfig, pcfg: ProcessConfig, tcfg: TrainConfig) -> None:
    """Refuse inconsistent settings before any work is done."""
    LOSSES.get(pcfg.loss)
    SCHEDULES.get(pcfg.schedule)
    proc = PROCESSES.get(pcfg.process)
    causal_loss = LOSSES.get(pcfg.loss).causal
    if causal_loss != (model_cfg.arch == "ar"):
        raise ConfigError(f"loss {pcfg.loss!r} does not fit arch {model_cfg.arch!r}: use arch 'ar' with loss 'ar', "
                          "and a bidirectional arch (llada, dit) with a masked loss")
    family = f"`dlm train --process {pcfg.process}` (or dlm.train.process_config) gives its defaults"
    if pcfg.loss not in proc.losses:
        raise ConfigError(f"process {pcfg.process!r} trains with loss {' or '.join(proc.losses)}, not "
                          f"{pcfg.loss!r}; {family}")
    if proc.needs_time and not getattr(MODELS.get(model_cfg.arch), "needs_time", False):
        raise ConfigError(f"process {pcfg.process!r} needs a time-conditioned network (arch 'dit'): its noisy tokens "
                          f"do not show how noisy they are; arch {model_cfg.arch!r} does not see t")
    try:
        proc.from_config(pcfg, mask_id=0, vocab_size=model_cfg.vocab_size)
        LOSSES.get(pcfg.loss).from_config(pcfg)
    except ValueError as e:
        raise ConfigError(f"process {pcfg.process!r} with schedule {pcfg.schedule!r}: {e}") from e
    if pcfg.process == "bd3lm" and not getattr(MODELS.get(model_cfg.arch), "supports_attention_modes", False):
        raise ConfigError(f"block diffusion (bd3lm) trains a network that takes an attention mask and positions: "
                          f"use arch 'llada', not {model_cfg.arch!r}")
    if pcfg.process == "bd3lm" and not 1 <= pcfg.block_size <= tcfg.seq_len:
        raise ConfigError(f"block_size must be in [1, seq_len={tcfg.seq_len}] (1 is AR, seq_len is MDLM), "
                          f"got {pcfg.block_size}")
    if causal_loss and pcfg.infill_prob > 0:
        raise ConfigError("the infilling objective needs a bidirectional model; set infill_prob=0 for ar")
    if tcfg.seq_len > model_cfg.max_len:
        raise ConfigError(f"seq_len={tcfg.seq_len} exceeds the model's max_len={model_cfg.max_len}")
    if not 0.0 <= pcfg.infill_prob <= 1.0:
        raise ConfigError(f"infill_prob must be in [0, 1], got {pcfg.infill_prob}")
    validate_train(tcfg)


def validate_train(tcfg: TrainConfig) -> None:
    """The checks of a TrainConfig alone (shared by pretraining and fine-tuning): TrainConfig.validate."""
    tcfg.validate()


def build_trainer(tcfg: TrainConfig, model_cfg: ModelConfig, pcfg: ProcessConfig, tok: Tokenizer, train: Batches,
                  val: TokenStream | None = None, *, chars_per_token: float = 1.0, device: str = "cpu",
                  dist: DistEnv | None = None, show_progress: bool = True, extra: dict[str, Any] | None = None,
                  callbacks: Sequence[Callback] = ()) -> Trainer:
    """A Trainer for a new network of `model_cfg` (its vocab_size sized for `tok`), seeded by tcfg.seed: the loss and
    process of `pcfg`, `train` with the data objective of the configs (dlm.data.Objective), and the run callbacks
    (held-out bound on `val` when given, checkpoints with the family's sampling defaults, the log) then `callbacks`.
    What `dlm train` runs, and the benchmarks; `extra` joins the checkpoint config's extra (data, n_params).

        trainer = build_trainer(tcfg, ModelConfig.preset("tiny", vocab_size=tok.vocab_size), pcfg, tok, stream, val)
        history = trainer.fit()
    """
    from dlm.callbacks import run_callbacks
    from dlm.distributed import DistEnv
    from dlm.trainer import Trainer

    validate(model_cfg, pcfg, tcfg)
    torch.manual_seed(tcfg.seed)
    model = build_model(model_cfg)
    loss_fn = LOSSES.get(pcfg.loss).from_config(pcfg, bos_id=tok.bos_id)
    process = build_process(pcfg, tok, model_cfg.vocab_size)
    ckpt_cfg = CheckpointConfig(model=model_cfg, process=pcfg, sampling=generation_defaults(pcfg),
                                extra={"data": tcfg.data, "n_params": count_params(model), **(extra or {})})
    objective = Objective.from_configs(pcfg, tcfg, tok.pad_id)
    data = WithObjective(train, objective) if objective.active else train
    return Trainer(model, loss_fn, process, data, tcfg, [*run_callbacks(ckpt_cfg, tok, val, chars_per_token),
                                                         *callbacks],
                   dist=dist or DistEnv(device=device), show_progress=show_progress)


def train(tcfg: TrainConfig, model_cfg: ModelConfig | None = None, pcfg: ProcessConfig | None = None,
          device: str = "cpu", show_progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a model; returns a summary with the final held-out bits/char and the unigram baseline.

    Under torchrun each rank calls this; `device` "cuda" means each rank's own GPU.
    """
    from dlm.distributed import init_distributed  # torch.distributed.checkpoint: only when training

    env = init_distributed(device)
    try:
        return _train(tcfg, model_cfg, pcfg, env, show_progress)
    finally:
        env.close()


def _train(tcfg: TrainConfig, model_cfg: ModelConfig | None, pcfg: ProcessConfig | None, env: DistEnv,
           show_progress: bool) -> dict[str, Any]:
    out = prepare_run_dir(tcfg.validate().out)  # a bad value or an unwritable --out fails before any work
    model_cfg = model_cfg or ModelConfig.preset("small")
    pcfg = pcfg or ProcessConfig()

    docs = load_corpus(tcfg.data)
    train_docs, val_docs = split_documents(docs, tcfg.val_fraction)
    resuming = (out / "latest").exists() or bool(run_checkpoints(out))  # the Trainer resumes from either
    if resuming:
        ckpt = resolve_checkpoint_dir(out)
        tok = Tokenizer.load(ckpt / TOKENIZER)
        saved = CheckpointConfig.load(ckpt / CONFIG)
        if saved.model.to_dict() != model_cfg.replace(vocab_size=saved.model.vocab_size).to_dict() or \
                saved.process.to_dict() != pcfg.to_dict():
            raise ConfigError(f"{out} holds a run with a different model or process config; "
                              "use a new --out, or the same options to resume")
        model_cfg = saved.model
    else:
        tok = build_tokenizer(tcfg.tokenizer, (d.text for d in train_docs))
        model_cfg = model_cfg.replace(vocab_size=tok.vocab_size)
    validate(model_cfg, pcfg, tcfg)

    train_tokens = tokenize_documents(train_docs, tok)
    val_tokens = tokenize_documents(val_docs, tok) if val_docs else None
    train_stream = TokenStream(train_tokens, tcfg.seq_len)
    val_stream = TokenStream(val_tokens, tcfg.seq_len) if val_tokens is not None and \
        len(val_tokens) > tcfg.seq_len else None
    n_chars = sum(len(d.text) + 1 for d in val_docs)  # +1: the [EOS] after each document counts as a char
    chars_per_token = (len(val_tokens) / n_chars) if val_tokens is not None and n_chars else 1.0

    trainer = build_trainer(tcfg, model_cfg, pcfg, tok, train_stream, val_stream, chars_per_token=chars_per_token,
                            dist=env, show_progress=show_progress)
    history = trainer.fit()
    evals = [h for h in history if "val_bits_per_char" in h]
    summary = {
        "out": str(out),
        "steps": trainer.step,
        "n_params": count_params(trainer.raw),
        "train_tokens": len(train_tokens),
        "val_tokens": len(val_tokens) if val_tokens is not None else 0,
        "final_val_bits_per_char": evals[-1]["val_bits_per_char"] if evals else None,
        "unigram_bits_per_char": (unigram_entropy_bits(train_tokens, val_tokens, tok.vocab_size) * chars_per_token
                                  if val_tokens is not None else None),
    }
    if env.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":  # python -m dlm.train ... takes the same flags as `dlm train`
    from dlm.cli import main

    main(["train", *__import__("sys").argv[1:]])
