"""Checkpoints: `model.safetensors` + `config.json` (+ `tokenizer.json`), every file written atomically.

A folder saved by `save_pretrained` loads with `load_pretrained`; a training run's folder holds `ckpt-NNNNNN/`
subfolders and a `latest` pointer, and loading the run folder loads its latest checkpoint. Each file goes to a
temporary name in the same folder and is renamed into place, so a killed process never leaves a half-written
file under the real name; a training checkpoint folder is renamed into place only when complete.

    save_pretrained("runs/x/export", model, cfg, tokenizer); model, cfg, tok = load_pretrained("runs/x/export")
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from dlm.config import FORMAT_VERSION, CheckpointConfig
from dlm.errors import CheckpointError
from dlm.io import atomic_save, atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported)
from dlm.tokenizer import HFTokenizer, Tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
GENERATION_CONFIG = "generation_config.json"
TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"
CKPT_NAME = re.compile(r"^ckpt-(\d+)$")
TMP_CKPT = re.compile(r"^\.tmp-ckpt-\d+-\d+$")  # CheckpointCallback.save's folder before its rename
TMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")  # atomic_write_bytes / atomic_save before their rename


def state_dict_for_saving(model: torch.nn.Module | dict[str, torch.Tensor], dtype: torch.dtype | None = None
                          ) -> dict[str, torch.Tensor]:
    """A module's (or a state dict's) tensors, detached, on the CPU, contiguous, floats in `dtype` if given."""
    sd = {}
    for k, v in (model if isinstance(model, dict) else model.state_dict()).items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        sd[k] = v.contiguous()
    return sd


def save_pretrained(folder: str | Path, model: torch.nn.Module | dict[str, torch.Tensor], cfg: CheckpointConfig,
                    tokenizer: Tokenizer, dtype: torch.dtype | None = None) -> None:
    """Write a model folder from a network or its state dict (weights, tokenizer, configs), each file atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict_for_saving(model, dtype)
    atomic_save(lambda p: save_file(sd, p, metadata={"format": "pt", "library": "dlm"}), folder / WEIGHTS)
    tokenizer.save(folder / TOKENIZER)
    cfg.sampling.save_json(folder / GENERATION_CONFIG)
    extra = dict(cfg.extra)
    if isinstance(tokenizer, HFTokenizer):  # its files are the upstream ones; the ids a DLM needs go here
        extra["tokenizer"] = {"mask_id": tokenizer.mask_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
                              "bos_id": tokenizer.bos_id, "stop_ids": sorted(tokenizer.stop_ids)}
    cfg.replace(format_version=FORMAT_VERSION, extra=extra).save(folder / CONFIG)


def resolve_checkpoint_dir(folder: str | Path) -> Path:
    """A model folder (with config.json), or a training run folder (-> its latest complete checkpoint)."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"no checkpoint at {folder}: the folder does not exist")
    if (folder / WEIGHTS).exists() or (folder / CONFIG).exists():
        return folder
    latest = folder / LATEST
    if latest.exists():
        from dlm.io import read_text_file

        name = read_text_file(latest, 4096, CheckpointError).strip()
        if CKPT_NAME.match(name) and (folder / name / WEIGHTS).exists():
            return folder / name
    ckpts = [c for c in run_checkpoints(folder) if (c / WEIGHTS).exists()]
    if ckpts:
        return ckpts[0]
    raise CheckpointError(f"{folder} holds no {WEIGHTS} and no ckpt-* folder; is it a dlm checkpoint?")


def load_pretrained(folder: str | Path, map_location: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    allow_pickle: bool = False) -> tuple[torch.nn.Module, CheckpointConfig, Tokenizer]:
    """Any model folder (ours, a training run, or an upstream LLaDA / Dream folder) -> (network, config, tokenizer).

    Weights go straight to `dtype` on `map_location`, shard by shard (dlm.formats.base.load_weights).
    """
    from dlm.formats import load_folder

    return load_folder(resolve_checkpoint_dir(folder), dtype=dtype, device=map_location, allow_pickle=allow_pickle)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    ckpts = run_checkpoints(run_dir)[::-1]  # oldest first
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


# ----- training run folders: ckpt-NNNNNN/ folders, a `latest` pointer, log.jsonl -----------------------------------

def prepare_run_dir(out: str | Path) -> Path:
    """Create a run folder (or accept the one there) -> its path; a CheckpointError when it cannot hold a run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"the run folder {out} is a file; choose a folder (new or a run's) for --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CheckpointError(f"cannot write the run folder {out}: {e.strerror or e}; choose another --out") from e
    return out


def clean_temporaries(run_dir: Path) -> list[str]:
    """Remove what a killed run left half-written (`.tmp-ckpt-NNNNNN-PID/` folders, `.NAME.XXXX.tmp` files) -> their
    names. Called once at the start of a run, before this process writes anything."""
    removed = []
    for p in sorted(run_dir.iterdir()):
        if TMP_CKPT.match(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif TMP_FILE.match(p.name) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
        else:
            continue
        removed.append(p.name)
    return removed


def run_checkpoints(run_dir: Path) -> list[Path]:
    """The ckpt-NNNNNN folders of a run, newest (highest step) first."""
    found = [(int(m.group(1)), p) for p in run_dir.glob("ckpt-*") if (m := CKPT_NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def read_trainer_state(ckpt: Path) -> dict:
    """A checkpoint's trainer_state.pt (tensors and plain types only) or a one-line CheckpointError naming it."""
    from dlm.io import check_regular_file

    path = ckpt / TRAINER_STATE
    check_regular_file(path, None, CheckpointError)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle that asks for code: many error types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is corrupt or not a dlm trainer state ({type(e).__name__}: {reason[:200]})"
                              ) from e
    if not isinstance(state, dict) or not {"step", "model", "optimizer"} <= state.keys() or \
            not isinstance(state["step"], int):
        raise CheckpointError(f"{path} is not a dlm trainer state (it lacks step, model or optimizer)")
    return state


def latest_intact_state(run_dir: Path) -> tuple[Path, dict, str | None] | None:
    """The newest checkpoint of a run whose trainer state loads -> (folder, state, note), or None for a new run.

    `latest` names the checkpoint written last; a run killed between a checkpoint's rename and the pointer's update
    has a newer complete one, so every ckpt-* folder is a candidate, newest first. `note` is one line saying what was
    skipped (None when the newest checkpoint is the one `latest` names and it loads)."""
    from dlm.io import read_text_file

    skipped = []
    pointer = run_dir / LATEST
    named = None
    if pointer.exists() or pointer.is_symlink():
        try:
            named = read_text_file(pointer, 4096, CheckpointError).strip()
        except CheckpointError as e:
            skipped.append(str(e))
        if named is not None and not CKPT_NAME.match(named):
            skipped.append(f"{pointer} names {named[:80]!r}, not a ckpt-NNNNNN folder")
        elif named is not None and not (run_dir / named / TRAINER_STATE).exists():
            skipped.append(f"{pointer} names {named}, which is missing or incomplete")
    ckpts = run_checkpoints(run_dir)
    for ckpt in ckpts:
        try:
            state = read_trainer_state(ckpt)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        note = None
        if skipped or ckpt.name != named:
            note = (f"resuming from {ckpt.name} (step {state['step']}), the newest intact checkpoint"
                    + (f": {'; '.join(skipped)}" if skipped else f", newer than {LATEST}'s {named}"))
        return ckpt, state, note
    if skipped or ckpts:
        raise CheckpointError(f"{run_dir} holds no intact checkpoint to resume from ({'; '.join(skipped)}); remove "
                              "the broken ckpt-* folders and `latest` to start again, or choose a new --out")
    return None


def truncate_log(log: Path, step: int) -> str | None:
    """Keep the records of log.jsonl up to `step` (the rest will be written again) -> a note if torn lines were
    dropped. A kill mid-write leaves a torn last line; it is dropped, not an error."""
    if not log.exists():
        return None
    from dlm.io import read_text_file

    keep, torn = [], 0
    for line in read_text_file(log, 1 << 40, CheckpointError).splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        step_of = rec.get("step", 0) if isinstance(rec, dict) else None
        if not isinstance(step_of, int):
            torn += 1
        elif step_of <= step:
            keep.append(line)
    atomic_write_text(log, "".join(ln + "\n" for ln in keep))
    return f"{log}: dropped {torn} torn or unreadable line(s)" if torn else None


def note(message: str) -> None:
    """One line to the user about a run folder (what was cleaned or skipped), on stderr."""
    print(f"dlm: {message}", file=sys.stderr, flush=True)
