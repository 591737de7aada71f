"""The trainer learns (the masked-loss plateau at the unigram entropy breaks), and resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dlm.config import ModelConfig, ProcessConfig, TrainConfig
from dlm.train import train
from dlm.trainer import lr_at


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 110))


def test_tiny_model_learns_shakespeare_well_below_unigram(trained_tiny):
    """A few hundred steps on real prose: the held-out ELBO falls far below the unigram entropy."""
    summary = json.loads((trained_tiny / "summary.json").read_text())
    unigram = summary["unigram_bits_per_char"]
    elbo = summary["final_val_bits_per_char"]
    assert 4.0 < unigram < 5.5  # Shakespeare's bytes: about 4.8 bits/char
    assert elbo < unigram - 0.7, (elbo, unigram)  # an upper bound on the NLL, and still far below
    # and the training loss fell from the start
    losses = _losses(trained_tiny)
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < first - 0.5  # nats per token


def _tiny_cfgs(out: Path, data: Path, max_steps: int):
    tcfg = TrainConfig(data=str(data), out=str(out), max_steps=max_steps, batch_size=4, seq_len=32, lr=3e-3,
                       warmup_steps=3, eval_every=10, eval_batches=1, ckpt_every=5, log_every=1, threads=1)
    return tcfg, ModelConfig.preset("tiny", max_len=32), ProcessConfig(infill_prob=0.25, max_span=8)


def test_resume_after_crash_logs_the_same_losses(tmp_path, text_file):
    full, part = tmp_path / "full", tmp_path / "part"
    train(*_tiny_cfgs(full, text_file, 20), show_progress=False)
    # A run that dies after step 12 (its last checkpoint is step 10) ...
    from dlm import trainer as trainer_mod

    original = trainer_mod.Trainer.train_step

    def dying(self, step):
        if step == 12:
            raise RuntimeError("simulated crash")
        return original(self, step)

    trainer_mod.Trainer.train_step = dying
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(*_tiny_cfgs(part, text_file, 20), show_progress=False)
    finally:
        trainer_mod.Trainer.train_step = original
    assert (part / "latest").read_text().strip() == "ckpt-000010"
    # ... resumed with the same command, ends with exactly the same losses.
    train(*_tiny_cfgs(part, text_file, 20), show_progress=False)
    a, b = _losses(full), _losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert [a[s] for s in range(1, 21)] == [b[s] for s in range(1, 21)]


def _cli_train(out: Path, data: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "dlm.cli", "train", "--data", str(data), "--out", str(out), "--model", "tiny",
            "--max-len", "32", "--seq-len", "32", "--batch-size", "4", "--max-steps", str(steps), "--ckpt-every", "5",
            "--eval-every", "1000", "--threads", "1", "--quiet", "--warmup", "3", "--log-every", "1"]


def test_kill_9_mid_run_then_resume_matches_uninterrupted(tmp_path, text_file):
    full, part = tmp_path / "full", tmp_path / "part"
    subprocess.run(_cli_train(full, text_file, 150), check=True, capture_output=True)
    p = subprocess.Popen(_cli_train(part, text_file, 150), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (part / "latest").exists():
        time.sleep(0.01)
    time.sleep(0.2)
    assert p.poll() is None, "the run finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = int((part / "latest").read_text().strip().split("-")[1])
    assert 0 < killed_at < 150
    subprocess.run(_cli_train(part, text_file, 150), check=True, capture_output=True)
    a, b = _losses(full), _losses(part)
    assert sorted(b) == list(range(1, 151))
    assert [a[s] for s in range(1, 151)] == [b[s] for s in range(1, 151)]


def test_checkpoint_is_complete_or_absent(tmp_path, text_file):
    out = tmp_path / "run"
    train(*_tiny_cfgs(out, text_file, 10), show_progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".tmp")]
    assert names.count("ckpt-000005") == 1 and "ckpt-000010" in names
    for ck in ("ckpt-000005", "ckpt-000010"):
        assert {p.name for p in (out / ck).iterdir()} == {"model.safetensors", "config.json", "tokenizer.json",
                                                         "generation_config.json", "trainer_state.pt"}


def test_resume_with_a_different_config_is_refused(tmp_path, text_file):
    from dlm.config import ConfigError

    out = tmp_path / "run"
    tcfg, mcfg, pcfg = _tiny_cfgs(out, text_file, 5)
    train(tcfg, mcfg, pcfg, show_progress=False)
    with pytest.raises(ConfigError, match="different model or process config"):
        train(tcfg.replace(max_steps=10), mcfg.replace(n_layers=3), pcfg, show_progress=False)


def test_ar_baseline_trains_with_the_same_trainer(tmp_path, text_file):
    tcfg, mcfg, _ = _tiny_cfgs(tmp_path / "ar", text_file, 10)
    s = train(tcfg, mcfg.replace(arch="ar"), ProcessConfig(loss="ar"), show_progress=False)
    assert s["steps"] == 10 and s["final_val_bits_per_char"] is not None


def test_mismatched_loss_and_arch_is_refused(tmp_path, text_file):
    from dlm.config import ConfigError

    tcfg, mcfg, _ = _tiny_cfgs(tmp_path / "x", text_file, 5)
    with pytest.raises(ConfigError, match="does not fit arch"):
        train(tcfg, mcfg, ProcessConfig(loss="ar"), show_progress=False)


def test_bf16_autocast_step_runs(tmp_path, text_file):
    tcfg, mcfg, pcfg = _tiny_cfgs(tmp_path / "bf16", text_file, 3)
    s = train(tcfg.replace(bf16=True, eval_every=3), mcfg, pcfg, show_progress=False)
    assert torch.isfinite(torch.tensor(s["final_val_bits_per_char"]))
