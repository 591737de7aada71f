"""The training flags are generated from TrainConfig / ProcessConfig: same names, meanings and defaults as the
hand-written flags they replaced; the torchrun relaunch keeps the command's words less the launcher's; one JSONL
reader with one-line errors naming the file and the line."""

from __future__ import annotations

import dataclasses

import pytest

from dlm.cli import (
    FAMILY_DEFAULTS,
    OPTIM_FLAGS,
    PRETRAIN_FLAGS,
    PROCESS_FLAGS,
    _command_argv,
    _train_config,
    build_parser,
)
from dlm.config import ProcessConfig, TrainConfig
from dlm.io import read_jsonl

# The defaults the flags had when they were written by hand (before they were derived from the dataclasses): a
# change of a config default that would change a CLI default shows here.
HAND_WRITTEN = {"max_steps": 1000, "batch_size": 32, "grad_accum": 1, "seq_len": 256, "lr": 1e-3,
                "warmup_steps": 100, "ema": 0.0, "ckpt_every": 250, "log_every": 10, "seed": 0, "fsdp": False,
                "tokenizer": "byte", "eval_every": 250, "random_length_prob": 0.0, "infill_prob": 0.0, "max_span": 64}
FINE_TUNING = {"sft": {"lr": 1e-4, "max_steps": 500, "warmup_steps": 20},
               "lora": {"lr": 1e-4, "max_steps": 500, "warmup_steps": 20},
               "adapt": {"lr": 5e-5, "max_steps": 1000, "warmup_steps": 20}}
REQUIRED = {"train": ["train", "--data", "x.txt", "--out", "o"], "sft": ["sft", "--data", "c.jsonl", "--out", "o"],
            "lora": ["lora", "--data", "c.jsonl", "--out", "o"],
            "adapt": ["adapt", "/m", "--data", "x.txt", "--out", "o"]}


def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def test_train_flag_defaults_are_the_dataclass_defaults_and_the_old_ones():
    args = build_parser().parse_args(REQUIRED["train"])
    train_defaults, process_defaults = _defaults(TrainConfig), _defaults(ProcessConfig)
    for name in [*OPTIM_FLAGS, *PRETRAIN_FLAGS]:
        if name not in ("out", "data"):
            assert getattr(args, name) == train_defaults[name] == HAND_WRITTEN[name], name
    for name in PROCESS_FLAGS:
        expected = None if name in FAMILY_DEFAULTS else process_defaults[name]  # None: the family's default
        assert getattr(args, name) == expected, name
    assert {k: HAND_WRITTEN[k] for k in ("infill_prob", "max_span")} == {"infill_prob": args.infill_prob,
                                                                        "max_span": args.max_span}
    # the config built from the flags is TrainConfig's defaults with the given fields and --threads
    assert _train_config(args, data="x.txt") == TrainConfig(data="x.txt", out="o", threads=args.threads)


@pytest.mark.parametrize("command", ["sft", "lora", "adapt"])
def test_fine_tuning_commands_keep_their_own_defaults(command):
    args = build_parser().parse_args(REQUIRED[command])
    tcfg = _train_config(args)
    for name, value in FINE_TUNING[command].items():
        assert getattr(tcfg, name) == value
    for name in OPTIM_FLAGS:
        if name not in FINE_TUNING[command] and name != "out":
            assert getattr(tcfg, name) == getattr(TrainConfig(), name), name


def test_every_train_flag_sets_its_field():
    given = {"--max-steps": "9", "--batch-size": "8", "--grad-accum": "2", "--seq-len": "64", "--lr": "0.01",
             "--warmup": "3", "--ema": "0.5", "--ckpt-every": "4", "--log-every": "2", "--seed": "5",
             "--tokenizer": "bpe:300", "--eval-every": "6", "--random-length-prob": "0.25", "--infill-prob": "0.2",
             "--max-span": "8", "--eps": "0.01", "--schedule": "cosine", "--block-size": "4"}
    argv = REQUIRED["train"] + [w for kv in given.items() for w in kv] + ["--fsdp"]
    args = build_parser().parse_args(argv)
    tcfg = _train_config(args, **{n: getattr(args, n) for n in PRETRAIN_FLAGS})
    assert (tcfg.max_steps, tcfg.batch_size, tcfg.grad_accum, tcfg.seq_len, tcfg.lr, tcfg.warmup_steps, tcfg.ema,
            tcfg.ckpt_every, tcfg.log_every, tcfg.seed, tcfg.tokenizer, tcfg.eval_every, tcfg.random_length_prob,
            tcfg.fsdp) == (9, 8, 2, 64, 0.01, 3, 0.5, 4, 2, 5, "bpe:300", 6, 0.25, True)
    assert (args.infill_prob, args.max_span, args.eps, args.schedule, args.block_size) == (0.2, 8, 0.01, "cosine", 4)
    with pytest.raises(SystemExit):  # typed from the field: an int flag refuses a float
        build_parser().parse_args(REQUIRED["train"] + ["--max-steps", "1.5"])


def test_workers_get_the_command_less_the_launcher_flags_in_either_spelling():
    argv = ["train", "--data", "x.txt", "--nproc", "2", "--out", "o", "--nnodes=2", "--rdzv-endpoint", "h:1",
            "--lr", "0.01", "--fsdp"]
    assert _command_argv(build_parser().parse_args(argv)) == ["train", "--data", "x.txt", "--out", "o", "--lr",
                                                              "0.01", "--fsdp"]


def test_jsonl_reader_names_the_file_and_the_line(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": "b", "prompt": "p"}\n')
    assert read_jsonl(f, fields=("text",)) == [(1, {"text": "a"}), (3, {"text": "b", "prompt": "p"})]
    for content, line, what in [('{"text": "a"}\n{oops\n', 2, "not JSON"), ('[1]\n', 1, "expected an object"),
                                ('{"text": 3}\n', 1, "expected an object")]:
        f.write_text(content)
        with pytest.raises(ValueError) as e:
            read_jsonl(f, fields=("text",), expect="an object")
        assert str(e.value).startswith(f"{f}, line {line}: {what}") and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="cannot read"):
        read_jsonl(tmp_path / "missing.jsonl")
