"""Every family end to end through the CLI: `dlm train --process NAME`, then `dlm generate / infill / eval` on the
run with the family's own sampler, chosen from the checkpoint; and one-line errors for combinations that cannot work.

The runs are tiny (3 steps) and in-process (`dlm.cli.main`); one subprocess call checks the real entry point.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dlm.cli import main
from dlm.config import CheckpointConfig, GenerationConfig
from dlm.pipeline import DiffusionLM
from dlm.sampling import SamplingError

FAMILIES = {"sedd-absorbing": ("sedd_analytic", "score_entropy", "loglinear"),
            "sedd-uniform": ("sedd_analytic", "score_entropy", "geometric"),
            "d3pm-absorbing": ("d3pm", "d3pm_hybrid", "linear"),
            "d3pm-uniform": ("d3pm", "d3pm_hybrid", "cosine")}


def cli(capsys, *args: str) -> str:
    main(list(args))
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_file):
    out = {}
    root = tmp_path_factory.mktemp("families")
    for name in FAMILIES:
        run = root / name
        main(["train", "--data", str(text_file), "--out", str(run), "--process", name, "--model", "tiny",
              "--max-len", "32", "--seq-len", "32", "--batch-size", "4", "--max-steps", "3", "--eval-every", "3",
              "--ckpt-every", "3", "--warmup", "1", "--threads", "1", "--quiet"]
             + (["--timesteps", "50"] if "d3pm" in name else []))
        out[name] = run
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_train_saves_the_family_and_its_sampler(runs, name):
    sampler, loss, schedule = FAMILIES[name]
    ckpt = sorted(runs[name].glob("ckpt-*"))[-1]
    cfg = CheckpointConfig.load(ckpt / "config.json")
    assert (cfg.process.process, cfg.process.loss, cfg.process.schedule) == (name, loss, schedule)
    assert cfg.model.arch == "dit"
    gen = GenerationConfig.load_json(ckpt / "generation_config.json")
    assert (gen.sampler, gen.temperature, gen.block_length) == (sampler, 1.0, 0)
    summary = json.loads((runs[name] / "summary.json").read_text())
    assert summary["steps"] == 3 and 0 < summary["final_val_bits_per_char"] < 40


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_infill_and_eval_with_the_familys_sampler(runs, name, capsys, text_file):
    rec = json.loads(cli(capsys, "generate", "def ", "--model", str(runs[name]), "--max-new-tokens", "8",
                         "--steps", "4", "--seed", "1", "--json"))
    assert rec["prompt"] == "def " and isinstance(rec["completion"], str)
    lm = DiffusionLM.from_pretrained(str(runs[name]))
    events = list(lm.stream("def ", max_new_tokens=8, steps=4, seed=1))
    assert len(events) <= 4 and not (events[-1].output.xt == lm.tokenizer.mask_id).any()
    assert lm.generate("def ", max_new_tokens=8, steps=4, seed=1) == rec["completion"]
    assert type(lm.model).needs_time
    text = json.loads(cli(capsys, "infill", "import [MASK:4] as np", "--model", str(runs[name]), "--json"))["text"]
    assert text.startswith("import ") and text.endswith(" as np")
    r = json.loads(cli(capsys, "eval", "--model", str(runs[name]), "--data", str(text_file), "--json",
                       "--samples", "2", "--max-windows", "4"))
    assert r["bits_per_char"] > 0 and r["stderr"] > 0 and not r["exact"]


def test_masked_samplers_refuse_a_graph_checkpoint_and_back(runs):
    lm = DiffusionLM.from_pretrained(str(runs["sedd-uniform"]))
    with pytest.raises(SamplingError, match="sedd_analytic"):
        lm.generate("ab", max_new_tokens=4, steps=4, sampler="llada")
    with pytest.raises(SamplingError, match="block_length=0"):
        lm.generate("ab", max_new_tokens=8, steps=4, block_length=4)
    assert isinstance(lm.generate("ab", max_new_tokens=4, steps=4, sampler="sedd_euler"), str)
    with pytest.raises(SamplingError, match="D3PM"):
        lm.generate("ab", max_new_tokens=4, steps=4, sampler="d3pm")


def test_the_entry_point_samples_a_run(runs):
    p = subprocess.run([sys.executable, "-m", "dlm.cli", "generate", "x", "--model", str(runs["d3pm-uniform"]),
                        "--max-new-tokens", "4", "--steps", "2", "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["prompt"] == "x"


@pytest.mark.parametrize(("args", "message"), [
    (["--process", "sedd-uniform", "--arch", "llada"], "time-conditioned"),
    (["--process", "d3pm-uniform", "--arch", "llada"], "time-conditioned"),
    (["--process", "masked", "--loss", "score_entropy"], "trains with loss masked_elbo"),
    (["--process", "sedd-absorbing", "--loss", "masked_elbo"], "trains with loss score_entropy"),
    (["--process", "d3pm-absorbing", "--eps", "0.01"], "alpha"),
    (["--process", "sedd-absorbing", "--arch", "ar"], "trains with loss score_entropy"),
    (["--process", "nope"], "unknown forward process"),
])
def test_bad_combinations_are_one_line_errors(tmp_path, text_file, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(text_file), "--out", str(tmp_path / "x"), "--model", "tiny", "--max-steps", "1",
              "--quiet", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dlm: error:") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x" / "latest").exists()
