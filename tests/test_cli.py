"""`dlm` end to end in a subprocess, as a user runs it: train, generate, infill, eval, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def dlm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "dlm.cli", *args], capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"dlm {' '.join(args)} failed ({p.returncode}):\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, text_file):
    run = tmp_path_factory.mktemp("cli") / "run"
    dlm("train", "--data", str(text_file), "--model", "tiny", "--max-len", "64", "--seq-len", "64",
        "--batch-size", "2", "--max-steps", "2", "--eval-every", "100", "--out", str(run), "--threads", "1", "--quiet")
    return run


def test_train_then_generate_infill_eval(tmp_path, text_file):
    out = tmp_path / "run"
    p = dlm("train", "--data", str(text_file), "--model", "tiny", "--max-len", "64", "--seq-len", "64",
            "--batch-size", "8", "--max-steps", "20", "--eval-every", "10", "--ckpt-every", "10", "--out", str(out),
            "--infill-prob", "0.2", "--max-span", "8", "--threads", "1", "--quiet")
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 20 and summary["final_val_bits_per_char"] > 0

    p = dlm("generate", "def ", "--model", str(out), "--max-new-tokens", "16", "--steps", "8", "--block-length", "8",
            "--json")
    rec = json.loads(p.stdout)
    assert rec["prompt"] == "def " and isinstance(rec["completion"], str)

    p = dlm("infill", "import [MASK:4] as np", "--model", str(out), "--json")
    text = json.loads(p.stdout)["text"]
    assert text.startswith("import ") and text.endswith(" as np")

    p = dlm("eval", "--model", str(out), "--data", str(text_file), "--json", "--samples", "1", "--max-windows", "8")
    r = json.loads(p.stdout)
    assert {"bits_per_char", "bits_per_token", "stderr"} <= set(r) and r["bits_per_char"] > 0


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--model", "no-such-model"], "unknown model"),
    (["generate", "", "--model", "{run}"], "prompt is empty"),
    (["generate", "x", "--model", "{run}", "--max-new-tokens", "30", "--block-length", "16", "--steps", "31"],
     "multiple of"),
    (["generate", "x", "--model", "{run}", "--steps", "5", "--max-new-tokens", "32", "--block-length", "16"],
     "multiple of the number of blocks"),
    (["generate", "x" * 100, "--model", "{run}", "--max-new-tokens", "32"], "context"),
    (["train", "--data", "no-such-corpus", "--out", "{tmp}/x"], "unknown corpus"),
    (["train", "--data", "{data}", "--out", "{tmp}/y", "--model", "huge"], "unknown model preset"),
    (["eval", "--model", "{tmp}", "--data", "{data}"], "no model.safetensors"),
])
def test_errors_are_one_line(tmp_path, text_file, small_run, args, message):
    args = [a.format(run=small_run, tmp=tmp_path, data=text_file) for a in args]
    p = dlm(*args, check=False)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlm: error:") and message in lines[0], p.stderr


def test_truncated_checkpoint_is_a_one_line_error(tmp_path, small_run):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(small_run, run)
    w = run / "ckpt-000002" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    p = dlm("generate", "x", "--model", str(run), check=False)
    assert p.returncode == 2 and "corrupt or truncated" in p.stderr and "Traceback" not in p.stderr


def test_generate_show_and_save_trajectory(tmp_path, small_run):
    html = tmp_path / "run.html"
    p = dlm("generate", "de", "--model", str(small_run), "--max-new-tokens", "8", "--steps", "4", "--block-length", "8",
            "--show", "--save-trajectory", str(html), "--sampler", "fast_dllm", "--threshold", "0.5", "--cache", "dual")
    assert p.stdout.startswith("de")
    page = html.read_text()
    assert "<script" in page and "http://" not in page and "https://" not in page


def test_generate_rejects_an_unknown_sampler(small_run):
    p = dlm("generate", "x", "--model", str(small_run), "--sampler", "nope", check=False)
    assert p.returncode == 2 and "unknown sampler" in p.stderr
