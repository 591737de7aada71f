"""Distributed training on two CPU processes (gloo) takes the same steps as one process on the same global batch.

The two-rank runs are `dlm train` under torchrun (tests/distributed_worker.py; `dlm train --nproc 2` end to end is
marked slow); their checkpoints are compared with one-process runs, resumed on one rank, and loaded as models.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlm.config import ModelConfig, ProcessConfig, TrainConfig
from dlm.data import Batch
from dlm.losses import LOSSES, Rows
from dlm.process import build_process
from dlm.tokenizer import ByteTokenizer
from dlm.train import process_config, train

ATOL = 1e-5  # float32 sums in another order: measured differences are ~3e-7
FLAGS = {"model": "tiny", "max-len": "32", "seq-len": "32", "batch-size": "8", "warmup": "2", "ema": "0.9",
         "eval-every": "100", "ckpt-every": "2", "log-every": "1", "threads": "1",
         "precision": "fp32"}  # equality to 1e-5 is a float32 property; auto would pick bf16 on an AMX CPU


def _tcfg(out: Path, data: Path, steps: int, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), max_steps=steps, batch_size=8, seq_len=32, warmup_steps=2,
                       ema=0.9, eval_every=100, ckpt_every=2, log_every=1, threads=1, keep_checkpoints=5,
                       precision="fp32", **kw)


def _argv(data: Path, steps: int) -> list[str]:
    flags = [x for k, v in FLAGS.items() for x in (f"--{k}", v)]
    return ["--data", str(data), "--max-steps", str(steps), "--quiet", *flags]


def _run(cmd: list[str]) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]


def _state(run: Path, step: int) -> dict:
    return torch.load(run / f"ckpt-{step:06d}" / "trainer_state.pt", weights_only=True)


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < ATOL, worst
    return worst


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory, text_file):
    """One process, 4 steps (checkpoints at 2, 4), then resumed to 6: the reference."""
    out = tmp_path_factory.mktemp("single") / "run"
    for steps in (4, 6):  # the learning rate decays to max_steps: the other runs stop at 4 too
        train(_tcfg(out, text_file, steps), ModelConfig.preset("tiny", max_len=32), ProcessConfig(),
              show_progress=False)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, text_file):
    """`dlm train` on two ranks for 4 steps: OUT/ddp with DDP, OUT/fsdp with FSDP2 and 2 micro-batches per step."""
    out = tmp_path_factory.mktemp("two_ranks")
    worker = Path(__file__).parent / "distributed_worker.py"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(worker),
          str(out), *_argv(text_file, 4)])
    return out


def test_ddp_two_ranks_equal_one_process_and_resume_on_one(two_ranks, text_file, single):
    run = two_ranks / "ddp"
    for step in (2, 4):
        _assert_close(_state(run, step)["model"], _state(single, step)["model"])
        _assert_close(_state(run, step)["ema"], _state(single, step)["ema"])
    assert _losses(run) == pytest.approx(_losses(single)[:4], rel=1e-5)
    records = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4], "one line per step: rank 0 logs alone"
    # The 2-rank checkpoint resumes on one process and continues as the one-process run did.
    train(_tcfg(run, text_file, 6), ModelConfig.preset("tiny", max_len=32), ProcessConfig(), show_progress=False)
    resumed, ref = _state(run, 6), _state(single, 6)
    _assert_close(resumed["model"], ref["model"])
    assert resumed["optimizer"]["state"].keys() == ref["optimizer"]["state"].keys()


def test_fsdp_two_ranks_with_grad_accum_train_and_load_in_one_process(two_ranks, single):
    from dlm.checkpoint import load_pretrained

    run = two_ranks / "fsdp"
    state = _state(run, 4)
    _assert_close(state["model"], _state(single, 4)["model"])  # full, unsharded, named as in one process
    _assert_close(state["ema"], _state(single, 4)["ema"])
    net, _, _ = load_pretrained(run / "ckpt-000004")  # the EMA weights, gathered from the shards
    ref, _, _ = load_pretrained(single / "ckpt-000004")
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_dlm_train_nproc_runs_torchrun_for_you(tmp_path, text_file, single):
    run = tmp_path / "cli"
    p = subprocess.run([sys.executable, "-m", "dlm.cli", "train", "--out", str(run), *_argv(text_file, 4),
                        "--nproc", "2"], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["steps"] == 4  # one summary line, from rank 0
    _assert_close(_state(run, 4)["model"], _state(single, 4)["model"])


def test_grad_accumulation_equals_one_big_batch(tmp_path, text_file, single):
    run = tmp_path / "accum"
    train(_tcfg(run, text_file, 4, grad_accum=4), ModelConfig.preset("tiny", max_len=32), ProcessConfig(),
          show_progress=False)
    _assert_close(_state(run, 4)["model"], _state(single, 4)["model"])


@pytest.mark.parametrize("family", ["masked", "sedd-uniform", "d3pm-absorbing", "sft"])
def test_a_split_batch_draws_the_noise_of_the_whole_batch(family):
    """Rows [0, 4) and [4, 8) of a batch of 8: the same t (stratified over 8) and masks as one call on all 8."""
    tok = ByteTokenizer()
    pcfg = process_config("masked" if family == "sft" else family)
    process = build_process(pcfg, tok)
    loss_fn = LOSSES.get("sft" if family == "sft" else pcfg.loss).from_config(pcfg, bos_id=tok.bos_id)
    calls: list[torch.Tensor] = []

    def model(xt, t=None):
        calls.append(t.clone())
        return torch.nn.functional.one_hot(xt % 256, tok.vocab_size).float()  # (B, L, V)

    x0 = torch.randint(0, 256, (8, 12), generator=torch.Generator().manual_seed(1))
    maskable = torch.rand(8, 12, generator=torch.Generator().manual_seed(2)) < 0.7 if family == "sft" else None
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    whole = loss_fn(model, x0, process, maskable=maskable, generator=g())
    parts = [loss_fn(model, x0[a:a + 4], process, maskable=None if maskable is None else maskable[a:a + 4],
                     generator=g(), rows=Rows(a, 8)) for a in (0, 4)]
    assert torch.equal(torch.cat([p.mask for p in parts]), whole.mask)
    assert torch.equal(torch.cat(calls[1:]), calls[0])
    assert float(sum(p.loss for p in parts) / 2) == pytest.approx(float(whole.loss), rel=1e-5)


def test_micro_batches_cover_the_global_batch_in_order():
    from dlm.distributed import DistEnv
    from dlm.trainer import Trainer

    batch = Batch(torch.arange(16).view(8, 2))
    seen = []
    for rank in (0, 1):
        t = Trainer.__new__(Trainer)
        t.dist, t.cfg = DistEnv(rank=rank, world_size=2), TrainConfig(batch_size=8, grad_accum=2)
        seen += [(part.x0[:, 0] // 2).tolist() + [rows.start] for part, rows in t.micro_batches(batch)]
    assert seen == [[0, 1, 0], [2, 3, 2], [4, 5, 4], [6, 7, 6]]


def test_launcher_passes_the_same_flags_without_its_own(tmp_path):
    from dlm.cli import _command_argv, build_parser
    from dlm.distributed import torchrun_command

    argv = ["train", "--data", "x.txt", "--out", str(tmp_path), "--nproc", "2", "--bf16", "--fsdp", "--lr", "0.01"]
    args = build_parser().parse_args(argv)
    child = _command_argv(args)
    assert "--nproc" not in child and {"--bf16", "--fsdp"} <= set(child)
    again = vars(build_parser().parse_args(child))
    assert {k: v for k, v in again.items() if k not in ("nproc", "func")} == \
        {k: v for k, v in vars(args).items() if k not in ("nproc", "func")}
    cmd = torchrun_command(child, nproc=2, nnodes=2, rdzv_endpoint="node0:29500")
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--rdzv-endpoint" in cmd and cmd[-len(child):] == child
    with pytest.raises(ValueError, match="rdzv-endpoint"):
        torchrun_command(child, nproc=2, nnodes=2)


def test_batch_not_divisible_by_ranks_and_accumulation_is_refused():
    from dlm.config import ConfigError
    from dlm.distributed import DistEnv
    from dlm.models import build_model
    from dlm.trainer import Trainer

    cfg = TrainConfig(batch_size=6, grad_accum=2)
    with pytest.raises(ConfigError, match="multiple of ranks x grad_accum = 2 x 2"):
        Trainer(build_model(ModelConfig.preset("tiny", max_len=32)), LOSSES.build("masked_elbo"), None, None, cfg,
                dist=DistEnv(rank=0, world_size=2))


def test_load_model_state_checks_the_keys_first():
    from dlm.distributed import load_model_state

    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    state = {k: torch.ones_like(v) for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing \['1.bias'\]"):
        load_model_state(net, {k: v for k, v in state.items() if k != "1.bias"})
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        load_model_state(net, {**state, "extra": torch.zeros(1)})
    net[0].requires_grad_(False)  # frozen (LoRA base) weights may be absent and stay as they are
    before = net[0].weight.detach().clone()
    load_model_state(net, {k: v for k, v in state.items() if k.startswith("1.")})
    assert torch.equal(net[0].weight, before) and torch.equal(net[1].weight, torch.ones(2, 3))
