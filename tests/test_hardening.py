"""Issue 16, items 7-14: interrupted runs resume with each step logged once; bad values, files and paths get one
line naming what is wrong (never a traceback, a hang or a read of /dev/zero). Tiny models, seconds each."""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

import pytest
import torch

from dlm.checkpoint import CheckpointError, save_pretrained
from dlm.cli import main
from dlm.config import CheckpointConfig, ConfigError, GenerationConfig, ModelConfig, ProcessConfig, TrainConfig
from dlm.models import build_model
from dlm.sampling import SamplingError
from dlm.tokenizer import ByteTokenizer
from dlm.train import train


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `dlm ARGS` in this process -> (exit status, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random model folder in dlm's own format."""
    cfg = CheckpointConfig(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, max_len=64))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hardening") / "m"
    save_pretrained(path, build_model(cfg.model), cfg, ByteTokenizer())
    return path


def copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ----- 7-9: training runs ------------------------------------------------------------------------------------------
def _cfgs(out: Path, data: Path, max_steps: int, **kw):
    tcfg = TrainConfig(data=str(data), out=str(out), max_steps=max_steps, batch_size=2, seq_len=16, lr=3e-3,
                       warmup_steps=2, eval_every=1000, eval_batches=1, ckpt_every=4, log_every=1, threads=1, **kw)
    return tcfg, ModelConfig(d_model=32, n_layers=1, n_heads=2, max_len=16), ProcessConfig()


def _steps(run: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run / "log.jsonl").read_text().splitlines() if "loss" in ln]


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def _crash_at(step: int):
    from dlm import trainer as trainer_mod

    original = trainer_mod.Trainer.train_step

    def dying(self, s):
        if s == step:
            raise RuntimeError("simulated crash")
        return original(self, s)

    return trainer_mod, original, dying


def test_run_killed_before_its_first_checkpoint_logs_each_step_once(tmp_path, text_file):
    out = tmp_path / "run"
    mod, original, dying = _crash_at(3)  # steps 1-3 are logged, the first checkpoint would be step 4
    mod.Trainer.train_step = dying
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(*_cfgs(out, text_file, 6), show_progress=False)
    finally:
        mod.Trainer.train_step = original
    assert _steps(out) == [1, 2, 3] and not (out / "latest").exists()
    train(*_cfgs(out, text_file, 6), show_progress=False)
    assert _steps(out) == [1, 2, 3, 4, 5, 6]


def test_unfinished_checkpoint_folders_are_removed_on_start(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    train(*_cfgs(out, text_file, 4), show_progress=False)
    # What kill -9 during a checkpoint write leaves: the folder before its rename and an atomic file's temporary.
    tmp = out / ".tmp-ckpt-000008-4242"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"half")
    (out / ".latest.k3j2h1.tmp").write_text("ckpt-0000")
    capsys.readouterr()
    train(*_cfgs(out, text_file, 8), show_progress=False)
    assert not tmp.exists() and not (out / ".latest.k3j2h1.tmp").exists()
    assert "removed 2 unfinished file(s)" in capsys.readouterr().err
    assert _steps(out) == list(range(1, 9))


@pytest.fixture(scope="module")
def run12(tmp_path_factory, text_file) -> Path:
    """An uninterrupted 12-step run (checkpoints at 4, 8 and 12): what every damaged copy must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(*_cfgs(out, text_file, 12, keep_checkpoints=3), show_progress=False)
    return out


def _resumed_like_the_reference(run12: Path, out: Path, text_file: Path) -> None:
    """Resume a damaged copy to step 12: each step logged once, with the uninterrupted run's losses."""
    train(*_cfgs(out, text_file, 12, keep_checkpoints=3), show_progress=False)
    assert _steps(out) == list(range(1, 13))
    assert _losses(out) == _losses(run12)


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _garbage(kind: str) -> bytes:
    if kind == "random":
        return bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist())
    if kind == "pickle":  # a pickle that would run a command if loaded without weights_only
        return b"cos\nsystem\n(S'echo owned'\ntR."
    return b""


@pytest.mark.parametrize("kind", ["truncated", "random", "pickle"])
def test_corrupt_trainer_state_falls_back_to_the_newest_intact_checkpoint(run12, tmp_path, text_file, capsys, kind):
    from dlm.checkpoint import read_trainer_state

    out = _copy_run(run12, tmp_path / "run")
    state = out / "ckpt-000012" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2] if kind == "truncated" else _garbage(kind))
    with pytest.raises(CheckpointError, match="ckpt-000012/trainer_state.pt is corrupt"):
        read_trainer_state(out / "ckpt-000012")
    capsys.readouterr()
    _resumed_like_the_reference(run12, out, text_file)  # steps 9-12 are trained again
    err = capsys.readouterr().err
    assert "resuming from ckpt-000008 (step 8)" in err and "ckpt-000012/trainer_state.pt" in err
    assert len([ln for ln in err.splitlines() if "resuming from" in ln]) == 1


def test_latest_naming_a_missing_checkpoint_falls_back(run12, tmp_path, text_file, capsys):
    import shutil

    out = _copy_run(run12, tmp_path / "run")
    shutil.rmtree(out / "ckpt-000012")  # `latest` still names it
    capsys.readouterr()
    _resumed_like_the_reference(run12, out, text_file)
    err = capsys.readouterr().err
    assert "latest names ckpt-000012, which is missing" in err and "resuming from ckpt-000008 (step 8)" in err


def test_a_torn_last_log_line_is_dropped_on_resume(run12, tmp_path, text_file, capsys):
    import shutil

    out = _copy_run(run12, tmp_path / "run")
    shutil.rmtree(out / "ckpt-000012")
    (out / "latest").write_text("ckpt-000008\n")
    lines = (out / "log.jsonl").read_text().splitlines()
    kept = [ln for ln in lines if json.loads(ln)["step"] <= 10]
    (out / "log.jsonl").write_text("\n".join(kept) + '\n{"step": 11, "loss": 2.71')  # the kill came mid-line
    capsys.readouterr()
    _resumed_like_the_reference(run12, out, text_file)
    assert "log.jsonl: dropped 1 torn" in capsys.readouterr().err


def test_no_intact_checkpoint_is_one_error_naming_the_files(run12, tmp_path):
    from dlm.checkpoint import latest_intact_state

    out = _copy_run(run12, tmp_path / "run")
    for ck in ("ckpt-000004", "ckpt-000008", "ckpt-000012"):
        (out / ck / "trainer_state.pt").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(CheckpointError) as e:
        latest_intact_state(out)
    msg = str(e.value)
    assert "no intact checkpoint" in msg and "ckpt-000004/trainer_state.pt" in msg and "\n" not in msg


# ----- 10-11: bad values -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["temperature", "repetition_penalty", "cfg_scale", "top_p", "eps", "threshold",
                                   "factor", "alg_temp"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_generation_values_are_refused(field, value):
    # a sampler's own option is given with that sampler (another sampler refuses it by name, before its value)
    owner = {"eps": "dream", "threshold": "fast_dllm", "factor": "fast_dllm", "alg_temp": "dream"}
    sampler = {"sampler": owner[field]} if field in owner else {}
    with pytest.raises(ConfigError, match=f"{field} must be a finite number"):
        GenerationConfig(**sampler, **{field: value}).validate()


def test_non_finite_values_are_refused_by_python_and_cli(model_dir, capsys):
    from dlm.pipeline import DiffusionLM

    lm = DiffusionLM.from_pretrained(model_dir)
    with pytest.raises(SamplingError, match="temperature must be a finite number"):
        lm.generate("hi", max_new_tokens=4, steps=4, temperature=math.nan)
    for flag in ("--temperature", "--repetition-penalty", "--cfg-scale"):
        code, out, err = cli(capsys, "generate", "hi", "--model", str(model_dir), "--max-new-tokens", "4",
                             "--steps", "4", flag, "nan")
        one_line_error(code, err, "must be a finite number")
        assert out == ""


def test_eval_with_zero_samples_is_refused(model_dir, text_file, capsys):
    one_line_error(*cli(capsys, "eval", "--model", str(model_dir), "--data", str(text_file), "--samples", "0")[::2],
                   "--samples must be >= 1")
    from dlm.eval.elbo import elbo_bits

    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        elbo_bits(build_model(ModelConfig(d_model=32, n_layers=1, n_heads=2)), torch.zeros(1, 8, dtype=torch.long),
                  mask_id=256, n_samples=0)


def test_one_rule_for_block_length_and_seed():
    GenerationConfig(block_length=0).validate()  # 0: one block (the SEDD / D3PM / Dream defaults)
    with pytest.raises(ConfigError, match="block_length must be >= 1"):
        GenerationConfig(block_length=-4).validate()
    for seed in (-1, 2**63):
        with pytest.raises(ConfigError, match=r"seed must be in \[0, 2\*\*63\)"):
            GenerationConfig(seed=seed).validate()
        with pytest.raises(ConfigError, match=r"seed must be in \[0, 2\*\*63\)"):
            TrainConfig(seed=seed).validate()
    GenerationConfig(seed=2**63 - 1).validate()


def test_seed_minus_one_is_refused_by_the_cli_as_by_the_server(model_dir, capsys):
    code, out, err = cli(capsys, "generate", "hi", "--model", str(model_dir), "--max-new-tokens", "4", "--steps", "4",
                         "--seed", "-1")
    one_line_error(code, err, "seed must be in [0, 2**63)")
    from dlm.pipeline import DiffusionLM
    from dlm.server.protocol import resolve_options
    from dlm.server.settings import ServerSettings

    lm = DiffusionLM.from_pretrained(model_dir)
    with pytest.raises(Exception, match=r"seed must be in \[0, 2\*\*63\)"):
        resolve_options(lm, {"seed": -1}, ServerSettings())


def test_zero_steps_are_refused_by_infill_and_augment(model_dir, capsys):
    from dlm.pipeline import DiffusionLM

    lm = DiffusionLM.from_pretrained(model_dir)
    with pytest.raises(SamplingError, match="steps must be >= 1"):
        lm.infill("a [MASK:3] b", steps=0)
    with pytest.raises(SamplingError, match="steps must be >= 1"):
        lm.augment(["some text"], n=1, steps=0)
    one_line_error(*cli(capsys, "infill", "a [MASK:3] b", "--model", str(model_dir), "--steps", "0")[::2],
                   "steps must be >= 1")


# ----- 12: loader paths that exhaust memory or hang ----------------------------------------------------------------
def _with_config(model_dir: Path, dst: Path, edit) -> Path:
    folder = copy_model(model_dir, dst)
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_a_million_layers_are_refused_before_building(model_dir, tmp_path):
    from dlm.checkpoint import load_pretrained

    folder = _with_config(model_dir, tmp_path / "m", lambda c: c["model"].update(n_layers=1_000_000))
    with pytest.raises(CheckpointError, match="n_layers=1000000"):
        load_pretrained(folder)
    # Sizes that cannot fit the memory are refused from the config alone, by the layers they count.
    from dlm.formats.base import free_memory, min_params

    free = free_memory(torch.device("cpu"))
    width = 1024
    layers = 1 + (free or 2**40) // (2 * width * width * 4)
    assert min_params(ModelConfig(d_model=width, n_heads=8, n_layers=layers)) * 4 > (free or 2**40)
    if free is not None and not os.environ.get("DLM_SKIP_MEMORY_CHECK") and layers <= 4096:
        folder = _with_config(model_dir, tmp_path / "m2",
                              lambda c: c["model"].update(n_layers=int(layers), d_model=width, n_heads=8))
        with pytest.raises(CheckpointError, match="GiB is free"):
            load_pretrained(folder)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
@pytest.mark.parametrize("target", ["/dev/zero", "/dev/urandom"])
def test_a_config_or_tokenizer_linked_to_a_device_is_refused(model_dir, tmp_path, name, target):
    if not os.path.exists(target):
        pytest.skip(f"{target} is not on this system")
    from dlm.checkpoint import load_pretrained

    folder = copy_model(model_dir, tmp_path / "m")
    (folder / name).unlink()
    (folder / name).symlink_to(target)
    with pytest.raises(CheckpointError, match=f"{name} is a device, not a regular file"):
        load_pretrained(folder)


def test_a_fifo_config_is_refused_without_hanging(model_dir, tmp_path):
    from dlm.checkpoint import load_pretrained

    folder = copy_model(model_dir, tmp_path / "m")
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    done = threading.Event()

    def writer() -> None:  # should a reader block on the FIFO, feed it (and the test fails on the message)
        while not done.is_set():
            try:
                fd = os.open(folder / "config.json", os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                done.wait(0.01)
                continue
            os.write(fd, b"{}")
            os.close(fd)
            return

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        with pytest.raises(CheckpointError, match="config.json is a FIFO, not a regular file"):
            load_pretrained(folder)
    finally:
        done.set()
        t.join()


# ----- 13: JSON schemas ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schema", [{"type": "string", "minLength": 10**9},
                                    {"type": "array", "items": {"type": "boolean"}, "minItems": 10**9},
                                    {"type": "array", "items": {"type": "null"}, "minItems": 10**9}])
def test_huge_json_layouts_are_refused_while_compiling(model_dir, schema):
    from dlm.control.json_schema import SchemaError, compile_schema, generate_json
    from dlm.pipeline import DiffusionLM

    lm = DiffusionLM.from_pretrained(model_dir)
    with pytest.raises(SchemaError, match="the model's context is 64"):
        generate_json(lm, schema)
    with pytest.raises(SchemaError, match="the JSON layout needs more than"):
        compile_schema(schema)  # no model: bounded all the same


def test_a_schema_nested_2000_deep_is_a_clear_error(model_dir, tmp_path, capsys):
    from dlm.control.json_schema import MAX_DEPTH, SchemaError, compile_schema

    schema: dict = {"type": "null"}
    for _ in range(2000):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(SchemaError, match=f"nests deeper than {MAX_DEPTH} levels"):
        compile_schema(schema)
    path = tmp_path / "deep.json"
    path.write_text('{"type": "object", "properties": {"a": ' * 2000 + '{"type": "null"}' + "}}" * 2000)
    one_line_error(*cli(capsys, "json", str(path), "--model", str(model_dir))[::2], "deep.json", "nests too deeply")


# ----- 14: one-line errors instead of tracebacks ----------------------------------------------------------------------
def test_unknown_or_unavailable_devices(model_dir, capsys):
    one_line_error(*cli(capsys, "generate", "hi", "--model", str(model_dir), "--device", "evil")[::2],
                   "unknown device 'evil'")
    if not torch.cuda.is_available():
        one_line_error(*cli(capsys, "generate", "hi", "--model", str(model_dir), "--device", "cuda")[::2],
                       "device 'cuda' is not available here")
    one_line_error(*cli(capsys, "train", "--data", "x", "--out", "y", "--device", "evil")[::2], "unknown device")


def test_save_trajectory_to_a_missing_folder_fails_before_generating(model_dir, tmp_path, capsys):
    code, out, err = cli(capsys, "generate", "hi", "--model", str(model_dir), "--max-new-tokens", "4", "--steps", "4",
                         "--save-trajectory", str(tmp_path / "missing" / "t.html"))
    one_line_error(code, err, "the folder", "does not exist")
    assert out == ""


def test_a_document_gap_too_long_for_any_int_is_an_error(model_dir, tmp_path, capsys):
    template = tmp_path / "t.md"
    template.write_text("# Title\n[MASK:99999999999999999999999]\n")
    one_line_error(*cli(capsys, "document", str(template), "--model", str(model_dir))[::2],
                   "the gaps need 99999999999999999999999 tokens but the model's context is 64")


def test_an_infill_gap_too_long_for_any_int_is_an_error(model_dir, capsys):
    code, _, err = cli(capsys, "infill", "a [MASK:99999999999999999999999] b", "--model", str(model_dir))
    one_line_error(code, err, "[MASK:99999999999999999999999]")


@pytest.mark.parametrize("flag, value, message", [("--seq-len", "0", "seq_len must be >= 1"),
                                                  ("--ckpt-every", "0", "ckpt_every must be >= 1"),
                                                  ("--log-every", "0", "log_every must be >= 1"),
                                                  ("--lr", "nan", "lr must be a finite number")])
def test_train_values_are_checked_before_any_work(tmp_path, text_file, capsys, flag, value, message):
    code, _, err = cli(capsys, "train", "--data", str(text_file), "--out", str(tmp_path / "r"), "--model", "tiny",
                       "--quiet", flag, value)
    one_line_error(code, err, message)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("where", ["proc", "file"])
def test_train_out_that_cannot_hold_a_run(tmp_path, text_file, capsys, where):
    if where == "proc" and not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    out = Path("/proc/dlm-run") if where == "proc" else tmp_path / "a-file"
    if where == "file":
        out.write_text("not a folder")
    code, _, err = cli(capsys, "train", "--data", str(text_file), "--out", str(out), "--model", "tiny", "--quiet")
    one_line_error(code, err, str(out))


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_serve_port_out_of_range(model_dir, capsys, port):
    code, _, err = cli(capsys, "serve", "--model", str(model_dir), "--port", port)
    assert code == 2 and "is not a TCP port" in err and "Traceback" not in err


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model"].update(d_model=-256), "d_model=-256"),
    (lambda c: c["model"].update(n_heads=0), "n_heads=0"),
    (lambda c: c.pop("model"), "no 'model' section"),
])
def test_bad_model_configs_are_refused(model_dir, tmp_path, capsys, edit, message):
    folder = _with_config(model_dir, tmp_path / "m", edit)
    from dlm.checkpoint import load_pretrained

    with pytest.raises(CheckpointError, match=message):
        load_pretrained(folder)
    one_line_error(*cli(capsys, "generate", "hi", "--model", str(folder))[::2], message)


def test_a_non_utf8_config_is_named(model_dir, tmp_path, capsys):
    folder = copy_model(model_dir, tmp_path / "m")
    (folder / "config.json").write_bytes(b'{"library": "dlm", "model": {"arch": "\xff\xfe"}}')
    one_line_error(*cli(capsys, "generate", "hi", "--model", str(folder))[::2],
                   f"{folder}/config.json is not UTF-8 text")
