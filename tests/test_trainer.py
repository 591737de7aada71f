"""The trainer learns (the masked-loss plateau at the unigram entropy breaks), and resumes exactly."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tolerance import network_atol

from dlm.callbacks import Callback
from dlm.config import ModelConfig, ProcessConfig, TrainConfig
from dlm.data import Batch, Document, Objective, TokenStream, WithObjective, tokenize_documents
from dlm.losses import LOSSES
from dlm.models import build_model
from dlm.process import build_process
from dlm.tokenizer import ByteTokenizer
from dlm.train import build_trainer, train
from dlm.trainer import Trainer, lr_at


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
    # the held-out NLL of an AR that learned anything is below a uniform guess over the vocabulary, and the loss fell
    cfg = json.loads((tmp_path / "ar" / "ckpt-000010" / "config.json").read_text())
    evals = [json.loads(ln) for ln in (tmp_path / "ar" / "log.jsonl").read_text().splitlines() if "val_" in ln]
    assert [e["step"] for e in evals] == [10]
    assert evals[0]["val_bits_per_token"] < math.log2(cfg["model"]["vocab_size"])
    losses = _losses(tmp_path / "ar")
    assert losses[10] < losses[1]


def test_mismatched_loss_and_arch_is_refused(tmp_path, text_file):
    from dlm.config import ConfigError

    tcfg, mcfg, _ = _tiny_cfgs(tmp_path / "x", text_file, 5)
    with pytest.raises(ConfigError, match="does not fit arch"):
        train(tcfg, mcfg, ProcessConfig(loss="ar"), show_progress=False)


def test_bf16_autocast_step_runs(tmp_path, text_file):
    tcfg, mcfg, pcfg = _tiny_cfgs(tmp_path / "bf16", text_file, 3)
    s = train(tcfg.replace(bf16=True, eval_every=3), mcfg, pcfg, show_progress=False)
    assert torch.isfinite(torch.tensor(s["final_val_bits_per_char"]))
    # the steps really ran in bf16: the same run in fp32 (same weights, batches and noise) differs, within what
    # bf16's rounding allows a network of this width and depth (tests/tolerance.py)
    assert json.loads((tmp_path / "bf16" / "train_config.json").read_text())["precision"] == "bf16"
    train(tcfg.replace(out=str(tmp_path / "fp32"), precision="fp32", eval_every=3), mcfg, pcfg, show_progress=False)
    bf16, fp32 = _losses(tmp_path / "bf16")[1], _losses(tmp_path / "fp32")[1]
    assert bf16 != fp32
    assert abs(bf16 - fp32) <= network_atol(torch.bfloat16, max(mcfg.d_model, mcfg.ff_width), mcfg.n_layers, fp32)


# ----- the parts: the data objective, the callbacks, the loop on its own --------------------------------------------
def _stream(text_file: Path, seq_len: int = 32) -> tuple[ByteTokenizer, TokenStream]:
    tok = ByteTokenizer()
    return tok, TokenStream(tokenize_documents([Document("t", text_file.read_text())], tok), seq_len)


@pytest.mark.parametrize("seed", [0, 1])
def test_infilling_objective_has_the_documented_span_statistics(seed):
    """Rows become infilling examples with probability p; each is one gap of G in [2, min(max_span, L // 2)]
    positions, alone maskable, holding m in [1, G) text tokens then G - m [PAD]; the other rows are untouched."""
    B, L, max_span, pad, p = 400, 64, 16, 99, 0.3
    x0 = torch.randint(0, 50, (B, L), generator=torch.Generator().manual_seed(seed))
    out = Objective(infill_prob=p, max_span=max_span, pad_id=pad)(Batch(x0.clone()), step=3, seed=seed)
    infilled = ~out.maskable.all(1)  # (B,)
    assert abs(infilled.float().mean().item() - p) <= 4 * math.sqrt(p * (1 - p) / B)  # 4 sigma of a binomial
    assert torch.equal(out.x0[~infilled], x0[~infilled])
    for i in infilled.nonzero().flatten().tolist():
        gap = out.maskable[i].nonzero().flatten()
        a, G = int(gap[0]), len(gap)
        assert torch.equal(gap, torch.arange(a, a + G)) and 2 <= G <= min(max_span, L // 2)
        m = int((out.x0[i, a:a + G] != pad).sum())
        assert 1 <= m < G and (out.x0[i, a + m:a + G] == pad).all()
        assert torch.equal(out.x0[i, :a + m], x0[i, :a + m])  # the left context and the span's text
        assert torch.equal(out.x0[i, a + G:], x0[i, a + m:L - (G - m)])  # the right context, shifted by the pads
    # a pure function of (seed, step); a batch that says what is maskable (SFT, adapt) is left as it is
    again = Objective(infill_prob=p, max_span=max_span, pad_id=pad)(Batch(x0.clone()), step=3, seed=seed)
    assert torch.equal(again.x0, out.x0) and torch.equal(again.maskable, out.maskable)
    given = Batch(x0.clone(), torch.rand(B, L) < 0.5)
    kept = Objective(infill_prob=1.0, pad_id=pad)(given, step=3, seed=seed)
    assert torch.equal(kept.x0, x0) and torch.equal(kept.maskable, given.maskable)


def test_random_length_objective_cuts_the_whole_batch_to_one_length():
    x0 = torch.arange(8 * 32).view(8, 32)
    lengths = set()
    for step in range(40):
        out = Objective(random_length_prob=1.0)(Batch(x0.clone()), step=step, seed=0)
        assert 1 <= out.x0.shape[1] <= 32 and torch.equal(out.x0, x0[:, :out.x0.shape[1]])
        lengths.add(out.x0.shape[1])
        assert Objective(random_length_prob=0.0)(Batch(x0.clone()), step, 0).x0.shape == (8, 32)
    assert len(lengths) > 1  # drawn per step
    # WithObjective is the data with the objective applied as each batch is drawn
    stream = TokenStream(np.arange(1000, dtype=np.int32) % 200, 32)
    obj = Objective(infill_prob=0.5, max_span=8, pad_id=255, random_length_prob=0.5)
    for step in range(5):
        a, b = WithObjective(stream, obj).sample(step, 4, 7), obj(stream.sample(step, 4, 7), step, 7)
        assert torch.equal(a.x0, b.x0) and torch.equal(a.maskable, b.maskable)


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_fit_start(self, trainer):
        self.calls.append(("start", trainer.step))

    def on_log(self, trainer, record):
        self.calls.append(("log", record["step"], "loss" in record))

    def on_eval(self, trainer, metrics):
        self.calls.append(("eval", trainer.step))

    def on_save(self, trainer, path):
        self.calls.append(("save", trainer.step, path.name))

    def on_step_end(self, trainer, stats):
        self.calls.append(("step", trainer.step))

    def on_fit_end(self, trainer):
        self.calls.append(("end", trainer.step))


def _expected_calls(start: int, max_steps: int, log_every: int, eval_every: int, ckpt_every: int) -> list[tuple]:
    """The documented order: the step's training record, its evaluation (logged), its checkpoint, then the step."""
    calls: list[tuple] = [("start", start)]
    for s in range(start + 1, max_steps + 1):
        last = s == max_steps
        calls += [("log", s, True)] if s % log_every == 0 or last else []
        calls += [("log", s, False), ("eval", s)] if s % eval_every == 0 or last else []
        calls += [("save", s, f"ckpt-{s:06d}")] if s % ckpt_every == 0 or last else []
        calls.append(("step", s))
    return calls + [("end", max_steps)]


def test_callbacks_fire_at_the_right_steps_and_resume_where_the_checkpoint_is(tmp_path, text_file):
    tok, stream = _stream(text_file)
    tcfg = TrainConfig(data=str(text_file), out=str(tmp_path / "run"), max_steps=7, batch_size=4, seq_len=32,
                       warmup_steps=2, eval_every=3, eval_batches=1, ckpt_every=2, log_every=2, threads=1)
    mcfg = ModelConfig.preset("tiny", max_len=32, vocab_size=tok.vocab_size)
    rec = Recorder()
    trainer = build_trainer(tcfg, mcfg, ProcessConfig(), tok, stream, stream, show_progress=False, callbacks=[rec])
    assert [type(cb).__name__ for cb in trainer.callbacks] == ["EvalCallback", "CheckpointCallback", "JsonlLog",
                                                              "Recorder"]
    history = trainer.fit()
    assert rec.calls == _expected_calls(0, 7, log_every=2, eval_every=3, ckpt_every=2)
    logged = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logged == json.loads(json.dumps(history)) and [r["step"] for r in logged] == [2, 3, 4, 6, 6, 7, 7]
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt-*")) == ["ckpt-000006", "ckpt-000007"]  # keep 2
    # the same run asked for 9 steps resumes at 7 and carries on with the same rules
    rec2 = Recorder()
    again = build_trainer(tcfg.replace(max_steps=9), mcfg, ProcessConfig(), tok, stream, stream, show_progress=False,
                          callbacks=[rec2])
    again.fit()
    assert again.resumed and rec2.calls == _expected_calls(7, 9, log_every=2, eval_every=3, ckpt_every=2)


def test_the_loop_alone_writes_nothing_and_learns_a_fixed_batch(tmp_path, text_file):
    """Without callbacks the trainer touches no file; on one batch shown every step the AR loss (no noise in it)
    falls to under half its first value."""
    tok, stream = _stream(text_file)
    batch = stream.sample(0, 4, 0)

    class Fixed:
        def sample(self, step, batch_size, seed):
            return Batch(batch.x0.clone())

    tcfg = TrainConfig(out=str(tmp_path / "never"), max_steps=30, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=3,
                       log_every=1, threads=1)
    pcfg = ProcessConfig(loss="ar")
    model = build_model(ModelConfig.preset("tiny", arch="ar", max_len=32, vocab_size=tok.vocab_size))
    loss_fn = LOSSES.get("ar").from_config(pcfg, bos_id=tok.bos_id)
    history = Trainer(model, loss_fn, build_process(pcfg, tok, tok.vocab_size), Fixed(), tcfg,
                      show_progress=False).fit()
    assert not (tmp_path / "never").exists()
    losses = [h["loss"] for h in history]
    assert len(losses) == 30 and losses[-1] < losses[0] / 2


def test_resume_with_the_objective_and_ema_is_bit_for_bit(tmp_path, text_file, monkeypatch):
    """Infilling, random-length cropping and EMA on: a run killed after its step-5 checkpoint and resumed ends with
    the same weights, EMA, optimizer state and log as an uninterrupted one, bit for bit."""
    from safetensors.torch import load_file

    from dlm import trainer as trainer_mod

    def cfgs(out):
        tcfg, mcfg, _ = _tiny_cfgs(out, text_file, 9)
        return (tcfg.replace(ema=0.9, random_length_prob=0.5), mcfg,
                ProcessConfig(infill_prob=0.5, max_span=8))

    train(*cfgs(tmp_path / "full"), show_progress=False)
    original = trainer_mod.Trainer.train_step

    def dying(self, step):
        if step == 7:
            raise RuntimeError("simulated crash")
        return original(self, step)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", dying)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(*cfgs(tmp_path / "part"), show_progress=False)
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", original)
    assert (tmp_path / "part" / "latest").read_text().strip() == "ckpt-000005"
    train(*cfgs(tmp_path / "part"), show_progress=False)
    a, b = (load_file(str(tmp_path / r / "ckpt-000009" / "model.safetensors")) for r in ("full", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(tmp_path / r / "ckpt-000009" / "trainer_state.pt", weights_only=True)
              for r in ("full", "part"))
    for part in ("model", "ema"):
        assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part])
    assert all(torch.equal(x, y) for x, y in zip(_tensors(sa["optimizer"]), _tensors(sb["optimizer"]), strict=True))
    strip = lambda run: [{k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"}  # noqa: E731
                         for ln in (tmp_path / run / "log.jsonl").read_text().splitlines()]
    assert strip("full") == strip("part")


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []
