"""dlm.precision: auto precision from the CPU's flags and probe, the emulated-bf16 warning, the --bf16 alias, old
configs, --threads on every command, dtype="auto" loading, and the progress bar's silence off a terminal.

The CPU is simulated by monkeypatching the flags and the probe, so every test holds on AVX2-only and AMX CPUs."""

from __future__ import annotations

import argparse
import io
import json
import warnings

import pytest
import torch

from dlm import precision as P
from dlm.cli import _precision, _train_config, build_parser
from dlm.config import ConfigError, TrainConfig

AVX2 = {"amx_bf16": False, "avx512_bf16": False}
AMX = {"amx_bf16": True, "avx512_bf16": True}


@pytest.fixture
def cpu(monkeypatch):
    """cpu(flags, ratio): pretend to be a CPU with these bf16 flags whose probe measures `ratio` (None: the probe
    must not run). Clears the one-time warnings."""
    def pretend(flags, ratio):
        def probe():
            if ratio is None:
                raise AssertionError("the probe ran although the flags settle it")
            return ratio

        monkeypatch.setattr(P, "cpu_bf16_flags", lambda: flags)
        monkeypatch.setattr(P, "bf16_matmul_ratio", probe)
        monkeypatch.setattr(P, "_warned", set())
    return pretend


def test_avx2_cpu_gets_fp32_without_a_probe(cpu):
    cpu(AVX2, None)
    assert not P.native_bf16("cpu")
    assert P.resolve_precision("auto", "cpu") == "fp32"
    assert P.resolve_dtype("auto", "cpu") == torch.float32


def test_amx_cpu_gets_bf16(cpu):
    cpu(AMX, 0.27)
    assert P.native_bf16("cpu")
    assert P.resolve_precision("auto", "cpu") == "bf16"
    assert P.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert P.resolve_precision("fp32", "cpu") == "fp32"


def test_flags_are_not_enough_when_the_probe_says_emulated(cpu):
    cpu(AMX, 80.0)  # e.g. oneDNN capped below AMX (ONEDNN_MAX_CPU_ISA=AVX2)
    assert P.resolve_precision("auto", "cpu") == "fp32"
    cpu(None, 0.5)  # a CPU whose flags cannot be read: the probe alone decides
    assert P.resolve_precision("auto", "cpu") == "bf16"


def test_forcing_bf16_where_emulated_warns_once_with_the_ratio(cpu):
    cpu(AMX, 80.0)
    with pytest.warns(RuntimeWarning, match="80x slower"):
        assert P.resolve_precision("bf16", "cpu") == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert P.resolve_precision("bf16", "cpu") == "bf16"
        assert P.resolve_dtype("bfloat16", "cpu") == torch.bfloat16  # the same warning: given already


def test_forcing_bf16_where_native_is_silent(cpu):
    cpu(AMX, 0.27)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert P.resolve_precision("bf16", "cpu") == "bf16"


def test_bad_names_are_one_line_errors():
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        P.resolve_precision("half", "cpu")
    with pytest.raises(ValueError, match="auto, float32"):
        P.resolve_dtype("int4", "cpu")
    with pytest.raises(ValueError, match="resolved precision"):
        P.autocast("cpu", "auto")


def test_the_real_probe_measures_a_positive_ratio():
    assert P.bf16_matmul_ratio() > 0  # native or emulated, it is a ratio of two positive times
    assert P.resolve_precision("auto", "cpu") in ("fp32", "bf16")


def test_cuda_without_a_gpu_is_not_native():
    if not torch.cuda.is_available():
        assert not P.native_bf16("cuda")
        assert P.resolve_precision("auto", "cuda") == "fp32"


def _train_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", "--data", "x.txt", "--out", "runs/x", *extra])


def test_bf16_flag_is_an_alias_of_precision_bf16():
    assert _precision(_train_args()) == "auto"
    assert _precision(_train_args("--bf16")) == "bf16"
    assert _precision(_train_args("--no-bf16")) == "fp32"
    assert _precision(_train_args("--precision", "fp32")) == "fp32"
    assert _train_config(_train_args("--bf16")).precision == "bf16"
    with pytest.raises(ValueError, match="contradicts"):
        _precision(_train_args("--bf16", "--precision", "fp32"))
    for cmd in (["sft", "--data", "c.jsonl", "--out", "o"], ["lora", "--data", "c.jsonl", "--out", "o"],
                ["judge", "--input", "t.jsonl"], ["eval", "--data", "shakespeare"]):
        args = build_parser().parse_args([*cmd, "--bf16"])
        assert _precision(args) == "bf16"
        assert build_parser().parse_args([*cmd, "--precision", "fp32"]).precision == "fp32"


def test_old_config_with_bf16_loads_and_round_trips(tmp_path):
    old = TrainConfig().to_dict()
    del old["precision"]
    for flag, want in ((True, "bf16"), (False, "fp32")):
        path = tmp_path / f"train_config_{flag}.json"
        path.write_text(json.dumps({**old, "bf16": flag}))
        cfg = TrainConfig.load_json(path)
        assert cfg.precision == want and "bf16" not in cfg.to_dict()
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig(bf16=True).precision == "bf16"
    assert TrainConfig(precision="fp32").replace(bf16=True).precision == "bf16"
    assert TrainConfig().precision == "auto"
    with pytest.raises(ConfigError, match="contradicts"):
        TrainConfig(precision="bf16", bf16=False)
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig.from_dict({"precision": "half"})


def _minimal_argv(parser: argparse.ArgumentParser) -> list[str]:
    """Values for a subcommand's required arguments (positionals and required options)."""
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings and action.nargs in (None, 1):
            argv.append("x")
        elif action.option_strings and action.required:
            argv += [action.option_strings[0], "x"]
    return argv


def test_threads_is_accepted_by_every_command():
    ap = build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    assert {"generate", "infill", "chat", "eval", "judge", "json", "code", "serve", "train"} <= set(sub.choices)
    for name, parser in sub.choices.items():
        args = ap.parse_args([name, *_minimal_argv(parser), "--threads", "3"])
        assert args.threads == 3, name
        assert ap.parse_args([name, *_minimal_argv(parser)]).threads == 0, name


def test_set_threads_lowers_to_the_default_and_obeys_the_user(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(P, "usable_cpus", lambda: 3)
        torch.set_num_threads(3)
        assert P.set_threads(0) == 2  # one core left for the rest of the machine
        torch.set_num_threads(1)
        assert P.set_threads(0) == 1  # never raised
        assert P.set_threads(2) == 2  # an explicit count is applied as given
        monkeypatch.setattr(P, "usable_cpus", lambda: 1)
        assert P.default_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert P.set_threads(0) == 2  # the user's OMP_NUM_THREADS stands
        with pytest.raises(ValueError, match=">= 0"):
            P.set_threads(-1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("native", [False, True])
def test_dtype_auto_loads(monkeypatch, native):
    from dlm.pipeline import DiffusionLM

    monkeypatch.setattr(P, "native_bf16", lambda device="cpu": native)
    lm = DiffusionLM.from_pretrained("default", dtype="auto")
    assert next(lm.model.parameters()).dtype == (torch.bfloat16 if native else torch.float32)
    ids = torch.tensor([lm.tokenizer.encode("ROMEO:")])
    assert torch.isfinite(lm.logits(ids)).all()


def test_eval_auto_keeps_an_exact_likelihood_in_fp32(monkeypatch, tmp_path):
    from dlm.eval.heldout import evaluate_text
    from dlm.pipeline import DiffusionLM

    monkeypatch.setattr(P, "native_bf16", lambda device="cpu": True)
    text = tmp_path / "t.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 8)
    ar = DiffusionLM.from_pretrained("shakespeare-ar")
    assert evaluate_text(ar, str(text), max_windows=1)["precision"] == "fp32"
    dlm_ = DiffusionLM.from_pretrained("default")
    r = evaluate_text(dlm_, str(text), max_windows=1)
    assert r["precision"] == "bf16" and r["bits_per_char"] > 0


def test_progress_bar_prints_nothing_off_a_terminal():
    from rich.console import Console

    from dlm.progress import Bar

    out = io.StringIO()
    with Bar("eval", total=3, console=Console(file=out)) as bar:
        for _ in range(3):
            bar()
    assert out.getvalue() == "" and bar.completed == 3 and not bar.shown
