"""`dlm train | generate | infill | chat | eval | serve | export`: a thin shell over the library.

    dlm train --data shakespeare --model small --out runs/x
    dlm generate "ROMEO:" --model default --max-new-tokens 128 --steps 64
    dlm infill "To be, or not to be, [MASK] is the question" --model default
    dlm eval --model default --data shakespeare --json
    dlm serve --model default --port 8000 --api-key KEY
    dlm chat "Write a Python function for Fibonacci numbers." --model /models/LLaDA-8B-Instruct --dtype bfloat16
    dlm export --model runs/x --out models/x   [--format sdar | fast_dllm_v2]
    dlm train --data shakespeare --model small --out runs/x --nproc 2        # DDP (torchrun)
    dlm sft --model default --data chats.jsonl --out runs/sft                 # also: dlm lora ... --merge
    dlm adapt /path/to/causal-lm --out runs/a2d --data my.txt --mode shift     # AR -> DLM (docs/adapt.md)
    dlm code "Add two numbers" --signature "def add(a: int, b: int) -> int:" --docstring --max-lines 6
    dlm pattern "Born on " "\\d{4}-\\d{2}-\\d{2}"

Every error the user can fix is printed as one line `dlm: error: ...` with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Sequence
from typing import Any

from dlm.config import ConfigError, ProcessConfig, TrainConfig

# ----- training: train, sft, lora, and their torchrun launcher (docs/training.md) ---------------------------------
# The config fields that are training flags: --name-with-dashes (or the spelling given here), typed and defaulted from
# the dataclass field (a command may change a default: fine-tuning takes smaller and fewer steps). Value: the help.
OPTIM_FLAGS: dict[str, str | None] = {  # TrainConfig, every training command (train, sft, lora, adapt)
    "out": "run folder; re-run the same command to resume from it",
    "max_steps": None,
    "batch_size": "the global batch: all ranks and micro-batches together",
    "grad_accum": "micro-batches per step (gradient accumulation)",
    "seq_len": None,
    "lr": None,
    "warmup_steps": None,
    "ema": None,
    "ckpt_every": None,
    "log_every": None,
    "seed": None,
    "fsdp": "under torchrun: shard the model with FSDP2 instead of DDP",
}
PRETRAIN_FLAGS: dict[str, str | None] = {  # TrainConfig, dlm train only
    "data": "corpus name (shakespeare, python-stdlib, fortunes-it) or a path",
    "tokenizer": "byte, or bpe:<vocab size>",
    "eval_every": None,
    "random_length_prob": "share of batches cut to a random length (LLaDA pretrains with 0.01)",
}
PROCESS_FLAGS: dict[str, str | None] = {  # ProcessConfig, dlm train only; None default: the process's (family's)
    "schedule": "linear (LLaDA), loglinear (MDLM, SEDD absorbing), cosine, geometric (SEDD uniform); default: the "
                "process's",
    "loss": "masked_elbo (masked default), masked_unweighted, ar, score_entropy (SEDD), d3pm_hybrid (D3PM)",
    "eps": "schedule eps (default: the process's; 0 for D3PM)",
    "sigma_min": "geometric schedule: sigma(0) (default 1e-4)",
    "sigma_max": "geometric schedule: sigma(1) (default 20)",
    "timesteps": "D3PM: number T of discrete steps (default 1000)",
    "hybrid_lambda": "D3PM: weight of the x0 cross-entropy (default 0.01)",
    "block_size": "bd3lm: tokens per block (default 16; 1 is AR, seq_len MDLM)",
    "clip_min": "bd3lm: block times t ~ U[clip-min, clip-max] (default 1e-3)",
    "clip_max": "bd3lm: upper end of the clipped schedule (default 1)",
    "infill_prob": "fraction of sequences on the infilling objective",
    "max_span": None,
}
FAMILY_DEFAULTS = ("schedule", "loss", "eps", "sigma_min", "sigma_max", "timesteps", "hybrid_lambda", "block_size",
                   "clip_min", "clip_max")  # unset unless given: dlm.train.process_config fills in the family's
_FLAG_SPELLING = {"warmup_steps": "--warmup"}  # the flag's older, shorter name


def add_config_flags(p: argparse.ArgumentParser, cls: type, flags: dict[str, str | None],
                     defaults: dict[str, Any] | None = None, required: tuple[str, ...] = ()) -> None:
    """One flag per named field of the config dataclass `cls`, typed and defaulted from the field (or `defaults`;
    `required` fields have none); the parsed value is `args.<field name>`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = defaults or {}
    for name, help_text in flags.items():
        flag = _FLAG_SPELLING.get(name, "--" + name.replace("_", "-"))
        tp = next((t for t in typing.get_args(hints[name]) if t is not type(None)), hints[name])
        default = defaults.get(name, fields[name].default)
        if default is not None and name not in required and tp is not bool:  # the default shown is the one used
            help_text = f"{help_text} (default: %(default)s)" if help_text else "default: %(default)s"
        if name in required:
            p.add_argument(flag, dest=name, required=True, help=help_text)
        elif tp is bool:
            p.add_argument(flag, dest=name, action="store_true", default=default, help=help_text)
        else:
            p.add_argument(flag, dest=name, type=tp, default=default, help=help_text)


def _add_optim_flags(p: argparse.ArgumentParser, **defaults: Any) -> None:
    """The optimisation, checkpoint and launch flags every training command shares; `defaults` override
    TrainConfig's for this command."""
    add_config_flags(p, TrainConfig, OPTIM_FLAGS, defaults, required=("out",))
    _add_precision_flags(p)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (each rank takes its own GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, default=1, help="processes on this node: runs torchrun for you")
    p.add_argument("--nnodes", type=int, default=1, help="nodes taking part (run the same command on each)")
    p.add_argument("--rdzv-endpoint", help="HOST:PORT on one of the nodes where they meet (several nodes)")


def _add_precision_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto (default): bf16 autocast where the device computes bf16 natively (AMX or AVX512_BF16 "
                        "CPUs, CUDA), else fp32; bf16 where it is emulated is far slower and warns")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="the older spelling of --precision bf16 (--no-bf16: fp32)")


def _precision(args: argparse.Namespace) -> str:
    """--precision, or what --bf16 / --no-bf16 says (an error when the two disagree)."""
    if args.bf16 is None:
        return args.precision
    implied = "bf16" if args.bf16 else "fp32"
    if args.precision not in ("auto", implied):
        raise ValueError(f"--{'' if args.bf16 else 'no-'}bf16 contradicts --precision {args.precision}; give one")
    return implied


THREADS_HELP = ("torch threads (default 0: one fewer than the CPUs, so that another busy process cannot stall "
                "torch's threads; OMP_NUM_THREADS is obeyed)")

LAUNCH_FLAGS = ("--nproc", "--nnodes", "--rdzv-endpoint")  # the launcher's own: a torchrun worker gets none


class Parsed(argparse.Namespace):
    """A parsed command line that remembers the words it was parsed from (`argv`, a slot: not among vars())."""

    __slots__ = ("argv",)


class Parser(argparse.ArgumentParser):
    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        ns = super().parse_args(args, Parsed() if namespace is None else namespace)
        if isinstance(ns, Parsed):
            ns.argv = list(sys.argv[1:] if args is None else args)
        return ns


def _command_argv(args: argparse.Namespace) -> list[str]:
    """The command line each torchrun worker runs (`dlm --nproc 2 train ...` relaunches itself): the words the
    command was parsed from, less the launcher's flags (`--nproc 2` or `--nproc=2`). A worker would ignore them
    anyway (it is launched, so it does not launch again); they are dropped so its command reads as one process's."""
    argv, out = list(args.argv), []
    while argv:
        word = argv.pop(0)
        if word in LAUNCH_FLAGS:
            argv = argv[1:]  # and its value
        elif not word.startswith(tuple(f + "=" for f in LAUNCH_FLAGS)):
            out.append(word)
    return out


def _relaunched(args: argparse.Namespace) -> bool:
    """With --nproc / --nnodes (and not already a worker): run the command under torchrun, then True."""
    from dlm.distributed import is_launched, launch

    if (args.nproc <= 1 and args.nnodes <= 1) or is_launched():
        return False
    rc = launch(_command_argv(args), args.nproc, args.nnodes, args.rdzv_endpoint)
    if rc:
        sys.exit(rc)
    return True


def _train_config(args: argparse.Namespace, **fields: Any) -> TrainConfig:
    """The TrainConfig of a training command: its OPTIM_FLAGS, the precision, --threads, then `fields`."""
    return TrainConfig(**{name: getattr(args, name) for name in OPTIM_FLAGS}, precision=_precision(args),
                       threads=args.threads, **fields)


def _print_summary(summary: dict[str, Any]) -> None:
    import os

    if os.environ.get("RANK", "0") == "0":  # one line, from rank 0 only
        print(json.dumps(summary))


def _sft(args: argparse.Namespace, lora: Any = None) -> None:
    if _relaunched(args):
        return
    from dlm.config import SFTConfig
    from dlm.sft import finetune

    sft = SFTConfig(data=args.data, template=args.template, eos_padding=args.eos_padding,
                    max_examples=args.max_examples)
    summary = finetune(sft, _train_config(args, data=args.data), model=args.model, lora=lora, device=args.device,
                       show_progress=not args.quiet)
    _print_summary(summary)


def _lora(args: argparse.Namespace) -> None:
    from dlm.lora import TARGETS, LoRAConfig

    lora = LoRAConfig(r=args.r, alpha=args.alpha, dropout=args.lora_dropout,
                      target_modules=args.target_modules or list(TARGETS), merge=args.merge)
    _sft(args, lora)


def _adapt(args: argparse.Namespace) -> None:
    if _relaunched(args):
        return
    from dlm.adapt import AdaptConfig, adapt

    lora = None
    if args.lora:
        from dlm.lora import LoRAConfig

        lora = LoRAConfig(r=args.r, alpha=args.alpha)
    acfg = AdaptConfig(mode=args.mode, anneal_steps=args.anneal_steps, block_size=args.block_size,
                       complementary=args.complementary).validate()
    summary = adapt(args.model, acfg, _train_config(args, data=args.data), lora=lora, device=args.device,
                    show_progress=not args.quiet)
    _print_summary(summary)


def _add_sft_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="the model to fine-tune: shipped name, folder or hub id")
    p.add_argument("--data", required=True, metavar="CHATS.jsonl", help='one {"messages": [...]} per line')
    p.add_argument("--template", default="auto", choices=["auto", "fallback"],
                   help="auto: the tokenizer's chat template if it has one, else the plain fallback (docs)")
    p.add_argument("--eos-padding", default="response", choices=["response", "context"],
                   help="response (LLaDA): EOS padding is masked and scored as answer; context: left clean")
    p.add_argument("--max-examples", type=int, help="use the first n chats")
    _add_optim_flags(p, lr=1e-4, max_steps=500, warmup_steps=20)


def _train(args: argparse.Namespace) -> None:
    if _relaunched(args):
        return
    from dlm.config import ModelConfig
    from dlm.process import PROCESSES
    from dlm.train import process_config, train

    family = PROCESSES.get(args.process)  # its defaults: schedule, loss, eps, network, sampler
    overrides = {"arch": args.arch or family.default_arch}
    if args.max_len:
        overrides["max_len"] = args.max_len
    model_cfg = ModelConfig.preset(args.model, **overrides)
    loss = args.loss or ("ar" if model_cfg.arch == "ar" else family.defaults.get("loss", "masked_elbo"))
    given = {name: getattr(args, name) for name in PROCESS_FLAGS if name != "loss"}
    pcfg = process_config(args.process, loss=loss, **{k: v for k, v in given.items() if v is not None})
    tcfg = _train_config(args, **{name: getattr(args, name) for name in PRETRAIN_FLAGS})
    summary = train(tcfg, model_cfg, pcfg, device=args.device, show_progress=not args.quiet)
    _print_summary(summary)


def _load(args: argparse.Namespace):
    from dlm.pipeline import DiffusionLM

    return DiffusionLM.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                       allow_pickle=args.allow_pickle, quantize=args.quantize)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model / --device / --dtype / --allow-pickle / --quantize: how a model is found and loaded."""
    p.add_argument("--model", default="default",
                   help="shipped model name, checkpoint or run folder, upstream folder (LLaDA, Dream), or hub id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the weights are converted to this as they are read; auto: bfloat16 where the device "
                        "computes it natively (AMX, AVX512_BF16, CUDA), else float32")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pytorch_model.bin weights (torch.load(weights_only=True)); refused by default")
    p.add_argument("--quantize", choices=["int8"], help="int8 weight-only linear layers (CPU inference)")


def _generation_fields() -> list[tuple[str, Any, str]]:
    """(name, type, help) of every generation option: GenerationConfig's common fields, then each sampler's own
    (its `Options`, declared beside it), named once with the samplers that read it."""
    from dlm.config import GenerationConfig, all_sampler_options

    hints = typing.get_type_hints(GenerationConfig)
    out = [(name, hints[name], "") for name in GenerationConfig.common_names()]
    for name, (readers, tp, _) in all_sampler_options().items():
        out.append((name, tp, f"{', '.join(readers)} sampler{'s' if len(readers) > 1 else ''} only"))
    return out


def add_generation_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per generation option (--max-new-tokens, --cfg-scale, --threshold, ...), typed from the dataclasses
    (GenerationConfig's common fields and each sampler's Options)."""
    for name, tp, doc in _generation_fields():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        args = [t for t in typing.get_args(tp) if t is not type(None)] or [tp]
        base = args[0]
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=doc or None)
        else:
            p.add_argument(flag, type=base, default=None, metavar=base.__name__.upper(), help=doc or None)


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name, _, _ in _generation_fields()
            if getattr(args, name, None) is not None}


def _generate(args: argparse.Namespace) -> None:
    if args.save_trajectory:  # checked before the model loads: a failed write after generating loses the text
        from pathlib import Path

        folder = Path(args.save_trajectory).parent
        if not folder.is_dir():
            raise ValueError(f"--save-trajectory {args.save_trajectory}: the folder {folder} does not exist")
        if Path(args.save_trajectory).is_dir():
            raise ValueError(f"--save-trajectory {args.save_trajectory} is a folder; give an .html file name")
    lm = _load(args)
    opts = generation_options(args)
    callbacks = []
    live = trajectory = None
    if args.show or args.save_trajectory:
        from dlm.sampling import display

        if args.show:
            live = display.LiveCanvas(lm.tokenizer, prompt_len=len(lm.tokenizer.encode(args.prompt)))
            callbacks.append(live)
        if args.save_trajectory:
            trajectory = display.Trajectory()
            callbacks.append(trajectory)

    def callback(event) -> None:
        for cb in callbacks:
            cb(event)

    bar = None
    if not (args.show or args.json or lm.is_causal):  # the denoising steps, on a terminal only (dlm.progress)
        from dlm.progress import Bar

        bar = Bar("generate", total=opts.get("steps", lm.sampling.steps))
        if bar.shown:  # no callback (and no event work) when nothing is drawn
            callbacks.append(bar)
    from contextlib import ExitStack

    with ExitStack() as stack:
        for view in (live, bar):
            if view is not None:
                stack.enter_context(view)
        text = lm.generate(args.prompt, callback=callback if callbacks else None, **opts)
    if trajectory is not None:
        trajectory.save_html(args.save_trajectory, lm.tokenizer, prompt_len=len(lm.tokenizer.encode(args.prompt)))
    texts = text if isinstance(text, list) else [text]
    if args.json:
        print(json.dumps({"prompt": args.prompt, "completion": text}))
    else:
        print("\n\n".join(args.prompt + t for t in texts))


def _chat(args: argparse.Namespace) -> None:
    lm = _load(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.message}]
    answer = lm.chat(messages, **generation_options(args))
    print(json.dumps({"messages": messages, "answer": answer}) if args.json else answer)


def _export(args: argparse.Namespace) -> None:
    from pathlib import Path

    import torch

    from dlm.formats.export import EXPORTERS, export_model

    if args.quantize:
        raise ValueError("export writes float weights; drop --quantize (quantise when loading instead)")
    EXPORTERS.get(args.format)  # an unknown format fails before the model loads
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ValueError(f"{out} exists and is not empty; choose another --out or pass --force")
    lm = _load(args)
    files = export_model(out, lm.model, lm.config, lm.tokenizer, args.format, dtype=getattr(torch, args.save_dtype))
    print(json.dumps({"out": str(out), "format": args.format, "files": files}))


def _infill(args: argparse.Namespace) -> None:
    lm = _load(args)
    text = lm.infill(args.text, **generation_options(args))
    print(json.dumps({"text": text}) if args.json else text)


def _eval(args: argparse.Namespace) -> None:
    from dlm.eval.heldout import evaluate_text

    if (args.data is None) == (args.answer is None):
        raise ValueError("give --data (a held-out bound) or --answer [--prompt] (a conditional log-likelihood)")
    if args.samples is None:  # a held-out split: 1 per window over every window (about a minute); an answer: 4
        args.samples = 1 if args.data is not None else 4
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1 (Monte Carlo samples per window), got {args.samples}")
    lm = _load(args)
    if args.answer is not None:
        _eval_conditional(lm, args)
        return
    result = evaluate_text(lm, args.data, n_samples=args.samples, seed=args.seed, max_windows=args.max_windows,
                           precision=_precision(args), show_progress=not args.json, window=args.window)
    if args.json:
        print(json.dumps(result))
    else:
        kind = "exact NLL" if result["exact"] else "ELBO bound"
        print(f"{result['bits_per_char']:.4f} bits/char ({kind}, ± {result['stderr']:.4f}), "
              f"{result['bits_per_token']:.4f} bits/token over {result['n_tokens']} tokens")


def _eval_conditional(lm, args: argparse.Namespace) -> None:
    from dlm.eval.conditional import conditional_loglik

    enc = lm.tokenizer.encode
    answer = enc(args.answer)
    from dlm.precision import autocast, resolve_precision

    precision = _precision(args)
    precision = resolve_precision("fp32" if precision == "auto" and lm.is_causal else precision, lm.device)
    with autocast(lm.device, precision):  # auto: an exact AR likelihood stays float32
        nats, stderr = conditional_loglik(lm, enc(args.prompt), answer, n_samples=args.samples, seed=args.seed)
    result = {"loglik_nats": nats, "stderr": stderr, "answer_tokens": len(answer), "exact": lm.is_causal,
              "n_samples": 1 if lm.is_causal else args.samples}
    if args.json:
        print(json.dumps(result))
    else:
        kind = "exact" if lm.is_causal else f"lower bound, {args.samples} samples"
        print(f"log p(answer | prompt) = {nats:.4f} nats ({kind}, ± {stderr:.4f}) over {len(answer)} tokens")


def _judge(args: argparse.Namespace) -> None:
    from dlm.eval.judge import generative_perplexity, load_judge

    if (args.model is None) == (args.input is None):
        raise ValueError("give --model (generate samples, then judge them) or --input FILE.jsonl (judge its texts)")
    if args.input is not None:
        from dlm.io import read_jsonl

        recs = [r for _, r in read_jsonl(args.input, fields=("text",),
                                         expect='a JSON object with a string "text" (and an optional "prompt")')]
        texts, prompts = [r["text"] for r in recs], [r.get("prompt", "") for r in recs]
    else:
        lm = _load(args)
        prompts = list(args.prompt or ["\n"])
        opts = generation_options(args)
        seed = opts.pop("seed", 0)
        texts, shown = [], []
        from dlm.progress import Bar

        with Bar("samples", total=len(prompts) * args.n, enabled=not args.json) as bar:
            for p in prompts:
                for k in range(args.n):
                    texts.append(lm.generate(p, seed=seed + k, **opts))
                    shown.append(p)
                    bar.advance()
        prompts = shown
    from dlm.eval.judge import JudgeUnavailable

    try:
        judge = load_judge(precision=_precision(args))
    except JudgeUnavailable as e:
        raise ValueError(str(e)) from e
    report = generative_perplexity(texts, prompts, judge=judge, show_progress=not args.json).to_dict()
    if not args.per_text:
        report.pop("per_text_perplexity")
    if args.json:
        print(json.dumps(report | ({"samples": texts} if args.model else {})))
    else:
        print(f"judge perplexity {report['perplexity']:.2f} over {report['n_tokens']} tokens of {report['n_texts']} "
              f"texts; unigram entropy {report['unigram_entropy']:.3f} bits, distinct-1 {report['distinct_1']:.3f}, "
              f"distinct-2 {report['distinct_2']:.3f}")


def _serve(args: argparse.Namespace) -> None:
    import os
    from pathlib import Path

    try:
        import uvicorn

        from dlm.server import ServerSettings, create_app
    except ImportError as e:
        raise ValueError(f"dlm serve needs the serve extra: pip install 'dlm[serve]' ({e})") from e
    key = args.api_key if args.api_key is not None else os.environ.get("DLM_API_KEY")
    if key is not None and not key.strip():  # `--api-key "$UNSET"` must not start a server without auth
        where = "--api-key" if args.api_key is not None else "$DLM_API_KEY"
        raise ValueError(f"{where} is empty (an unset variable?): give a key, or leave out --api-key and "
                         "$DLM_API_KEY to serve without auth")
    settings = ServerSettings(api_key=key, max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                              max_steps=args.max_steps, max_n=args.max_n, max_body_bytes=args.max_body_bytes,
                              queue_size=args.queue_size, timeout=args.timeout, body_timeout=args.body_timeout,
                              batch_size=args.batch_size, batch_wait_ms=args.batch_wait_ms)
    import logging

    handler = logging.StreamHandler()  # the server's own lines (disconnects, slow bodies, bugs), as uvicorn's
    handler.setFormatter(logging.Formatter("%(levelname)s:     dlm: %(message)s"))
    server_log = logging.getLogger("dlm.server")
    server_log.addHandler(handler)
    server_log.setLevel(args.log_level.upper())
    name = args.model_name or (Path(args.model).name if "/" in args.model else args.model)
    app = create_app(_load(args), name, settings)
    auth = "with an API key" if settings.api_key else "without auth"
    print(f"dlm: serving {name} on http://{args.host}:{args.port} ({auth})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def _port(text: str) -> int:
    """argparse type of --port: an integer in [0, 65535] (argparse prints the one-line error)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0-65535)")
    return port


def _read_json(path: str, what: str) -> Any:
    from pathlib import Path

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the {what} {path}: {e}") from e
    except RecursionError as e:  # json.loads gives up on nesting about 1,000 deep
        raise ValueError(f"cannot read the {what} {path}: it nests too deeply to be parsed") from e


def _augment(args: argparse.Namespace) -> None:
    from dlm.control.augment import augment
    from dlm.io import read_jsonl

    # every line is checked before the model loads
    texts = [r["text"] for _, r in read_jsonl(args.input, fields=("text",),
                                              expect='a JSON object with a string "text" field')]
    opts = generation_options(args)
    variants = augment(_load(args), texts, noise=args.noise, n=args.n, seed=opts.pop("seed", None), **opts)
    for i, vs in enumerate(variants):
        for k, text in enumerate(vs):
            print(json.dumps({"source": i, "variant": k, "text": text}, ensure_ascii=False))


def _json(args: argparse.Namespace) -> None:
    from dlm.control.json_schema import generate_json_text

    schema = _read_json(args.schema, "schema")
    print(generate_json_text(_load(args), schema, **generation_options(args)))


def _document(args: argparse.Namespace) -> None:
    from pathlib import Path

    from dlm.control.documents import generate_document, parse_template

    try:
        template = Path(args.template).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the template {args.template}: {e}") from e
    data = _read_json(args.data, "data") if args.data else None
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"{args.data} must hold a JSON object of field values")
    budgets = {}
    for b in args.budget:
        heading, sep, n = b.rpartition("=")
        if not sep or not n.strip().isdigit():
            raise ValueError(f"--budget {b!r}: write HEADING=TOKENS, e.g. --budget '## Summary=80'")
        budgets[heading] = int(n)
    parse_template(template, data)  # a bad template or data fails before the model loads
    text = generate_document(_load(args), template, data=data, budgets=budgets, **generation_options(args))
    print(json.dumps({"text": text}) if args.json else text.removesuffix("\n"))  # the template's last newline


def _code(args: argparse.Namespace) -> None:
    constraints: dict[str, Any] = {"language": args.language, "max_lines": args.max_lines,
                                   "includes_docstring": args.docstring}
    if args.signature:
        constraints["function_signature"] = args.signature
    lm = _load(args)
    r = lm.generate_with_constraints(args.prompt, constraints, line_tokens=args.line_tokens,
                                     docstring_tokens=args.docstring_tokens, repair_rounds=args.repair_rounds,
                                     **generation_options(args))
    if args.json:
        print(json.dumps({"code": r.code, "checks": r.checks, "valid_before_repair": r.valid_before_repair,
                          "repair_rounds": r.repair_rounds, "fallback": r.fallback}))
    else:
        print(r.code, end="")
        if r.note:  # the last resort changed the code: say so in the plain output too
            print(f"# {r.note}")


def _pattern(args: argparse.Namespace) -> None:
    lm = _load(args)
    value = lm.fill_pattern(args.before, args.pattern, args.after, **generation_options(args))
    print(json.dumps({"value": value}) if args.json else value)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="dlm", description="Diffusion language models: train, sample, infill, evaluate.")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from scratch (re-run the same command to resume)")
    t.add_argument("--model", default="small", help="size preset: tiny, small, base, large")
    t.add_argument("--arch", choices=["llada", "dit", "ar"],
                   help="network (default: the process's: llada for masked, dit for SEDD and D3PM)")
    t.add_argument("--process", default="masked",
                   help="masked, bd3lm (block diffusion, docs/block.md), sedd-absorbing, sedd-uniform, "
                        "d3pm-absorbing, d3pm-uniform (docs/families.md)")
    t.add_argument("--max-len", type=int, help="model context (default: the preset's)")
    add_config_flags(t, ProcessConfig, PROCESS_FLAGS, dict.fromkeys(FAMILY_DEFAULTS))
    add_config_flags(t, TrainConfig, PRETRAIN_FLAGS, required=("data",))
    _add_optim_flags(t)
    t.set_defaults(func=_train)

    ft = sub.add_parser("sft", help="instruction-tune a model on chats (LLaDA's SFT: only the response is masked)")
    _add_sft_flags(ft)
    ft.set_defaults(func=_sft)

    lo = sub.add_parser("lora", help="SFT with LoRA adapters (peft) on a loaded model; saves the adapter")
    _add_sft_flags(lo)
    lo.add_argument("--r", type=int, default=8, help="adapter rank")
    lo.add_argument("--alpha", type=float, default=16.0, help="the update is scaled by alpha / r")
    lo.add_argument("--lora-dropout", type=float, default=0.0)
    lo.add_argument("--target-modules", nargs="+", help="linear layers to adapt (default: attention and MLP)")
    lo.add_argument("--merge", action="store_true", help="also write OUT/merged: a model folder, adapters folded in")
    lo.set_defaults(func=_lora)

    ad = sub.add_parser("adapt", help="turn a causal LM (a Llama / Qwen2 / Qwen3 folder) into a diffusion LM")
    ad.add_argument("model", help="a Hugging Face causal-LM folder (or a dlm AR baseline)")
    ad.add_argument("--data", required=True, help="corpus name (shakespeare, ...) or a text file / folder")
    ad.add_argument("--mode", default="shift", choices=["shift", "block"],
                    help="shift: Dream / DiffuGPT logit shift, annealed to full attention; block: block diffusion "
                         "(BD3LM, block-causal; the Fast-dLLM v2 / SDAR route)")
    ad.add_argument("--anneal-steps", type=int, help="causal -> full attention over the first N steps "
                                                     "(DiffuLLaMA; default: a tenth of --max-steps)")
    ad.add_argument("--block-size", type=int, default=4, help="--mode block: tokens per block")
    ad.add_argument("--complementary", action="store_true",
                    help="--mode block: train each row under its mask and its complement (Fast-dLLM v2)")
    ad.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight")
    ad.add_argument("--r", type=int, default=8, help="LoRA rank")
    ad.add_argument("--alpha", type=float, default=16.0, help="LoRA: the update is scaled by alpha / r")
    _add_optim_flags(ad, lr=5e-5, max_steps=1000, warmup_steps=20)
    ad.set_defaults(func=_adapt)

    g = sub.add_parser("generate", help="continue a prompt (every GenerationConfig option is a flag)")
    g.add_argument("prompt")
    add_model_flags(g)
    g.add_argument("--json", action="store_true")
    g.add_argument("--show", action="store_true", help="render the canvas resolving live in the terminal")
    g.add_argument("--save-trajectory", metavar="HTML", help="write a self-contained HTML animation of the steps")
    add_generation_flags(g)
    g.set_defaults(func=_generate, seed=0)

    i = sub.add_parser("infill", help="fill [MASK] / [MASK:n] gaps in a text (GenerationConfig options are flags)")
    i.add_argument("text")
    add_model_flags(i)
    i.add_argument("--json", action="store_true")
    # infill sizes the canvas from the gaps and decodes it as one block with the llada sampler
    add_generation_flags(i, skip=("max_new_tokens", "block_length", "sampler", "num_samples", "cache"))
    i.set_defaults(func=_infill, seed=0)

    e = sub.add_parser("eval", help="held-out likelihood bound in bits per char / token")
    add_model_flags(e)
    e.add_argument("--data", help="a corpus name (its validation split) or a text file")
    e.add_argument("--prompt", default="", help="with --answer: the text the answer is conditioned on")
    e.add_argument("--answer", help="log p(answer | prompt) instead of a held-out bound (docs/evaluation.md)")
    e.add_argument("--samples", type=int, default=None,
                   help="Monte Carlo samples per window (default 1) or per answer (default 4)")
    _add_precision_flags(e)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's max_len; "
                   "a large model's 8192 wants less)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_eval)
    jd = sub.add_parser("judge", help="generative perplexity under SmolLM2-135M, unigram entropy and distinct-n")
    add_model_flags(jd)
    jd.set_defaults(model=None)  # no default model: --model generates samples, --input judges a file
    jd.add_argument("--input", metavar="IN.jsonl", help='texts to judge: {"text": ..., "prompt": ...} per line')
    jd.add_argument("--prompt", action="append", help="prompt of the samples (repeatable; default: a newline)")
    jd.add_argument("-n", type=int, default=4, help="samples per prompt")
    _add_precision_flags(jd)
    jd.add_argument("--per-text", action="store_true", help="also print each text's perplexity")
    jd.add_argument("--json", action="store_true")
    add_generation_flags(jd, skip=("num_samples",))
    jd.set_defaults(func=_judge)

    s = sub.add_parser("serve", help="HTTP API: OpenAI-compatible completions, infilling, live denoising")
    add_model_flags(s)
    s.add_argument("--model-name", help="the name clients use (default: the --model name or folder name)")
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    s.add_argument("--port", type=_port, default=8000, help="TCP port, 1-65535 (0: any free port)")
    s.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $DLM_API_KEY, else no auth; "
                   "an empty key is refused)")
    s.add_argument("--max-prompt-tokens", type=int, default=1024)
    s.add_argument("--max-tokens", type=int, default=512, help="cap on a request's max_tokens and infill gaps")
    s.add_argument("--max-steps", type=int, default=1024)
    s.add_argument("--max-n", type=int, default=8, help="cap on n (and prompts x n) of one request")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20)
    s.add_argument("--queue-size", type=int, default=64, help="requests waiting; one more gets 429")
    s.add_argument("--timeout", type=float, default=300.0, help="seconds per request, body upload included; "
                   "504 after")
    s.add_argument("--body-timeout", type=float, default=30.0, help="seconds to receive a request's body; 408 after")
    s.add_argument("--batch-size", type=int, default=8, help="rows decoded together; 1 disables batching")
    s.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long an idle worker waits for a batch")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=_serve)

    c = sub.add_parser("chat", help="one answer from an instruction-tuned model, through its chat template")
    c.add_argument("message")
    c.add_argument("--system", help="a system message before the user's")
    add_model_flags(c)
    c.add_argument("--json", action="store_true")
    add_generation_flags(c, skip=("num_samples",))
    c.set_defaults(func=_chat, seed=0)

    x = sub.add_parser("export", help="write any loadable model (a run, an upstream folder) as a dlm model folder, "
                                      "or a block model as an SDAR / Fast-dLLM v2 folder (docs/block.md)")
    add_model_flags(x)
    x.add_argument("--out", required=True)
    x.add_argument("--format", default="dlm", metavar="FORMAT",
                   help="dlm (default), sdar or fast_dllm_v2 (dlm.formats.export.EXPORTERS); a model the layout "
                        "cannot express exactly is refused, naming what differs")
    x.add_argument("--save-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    x.add_argument("--force", action="store_true", help="write into a non-empty folder")
    x.set_defaults(func=_export)
    # controlled generation: structured documents, JSON from a schema, augmentation (docs/control.md)
    canvas_only = ("max_new_tokens", "block_length", "sampler", "num_samples", "cache")  # one block, llada
    a = sub.add_parser("augment", help="variants of each text of a JSONL file by re-masking and denoising")
    a.add_argument("input", metavar="IN.jsonl", help='one JSON object with a "text" field per line')
    a.add_argument("--noise", type=float, default=0.3, help="fraction of tokens re-masked per variant")
    a.add_argument("-n", type=int, default=4, help="variants per text")
    add_model_flags(a)
    add_generation_flags(a, skip=canvas_only + ("max_span",))
    a.set_defaults(func=_augment, seed=0)

    js = sub.add_parser("json", help="a JSON value generated to a JSON schema (always parses and validates)")
    js.add_argument("schema", metavar="SCHEMA.json")
    add_model_flags(js)
    add_generation_flags(js, skip=canvas_only + ("max_span",))
    js.set_defaults(func=_json, seed=0)

    d = sub.add_parser("document", help="fill the [MASK] gaps of a Markdown template, {fields} from --data")
    d.add_argument("template", metavar="TEMPLATE.md")
    d.add_argument("--data", metavar="DATA.json", help="a JSON object of field values")
    d.add_argument("--budget", action="append", default=[], metavar="HEADING=TOKENS",
                   help="token budget of a section's gaps, e.g. '## Summary=80' (repeatable)")
    d.add_argument("--json", action="store_true")
    add_model_flags(d)
    add_generation_flags(d, skip=canvas_only)
    d.set_defaults(func=_document, seed=0)

    k = sub.add_parser("code", help="Python code under constraints: pinned signature, docstring, line limit; parses")
    k.add_argument("prompt", help="what the code should do (a comment above it)")
    k.add_argument("--signature", help="the def line to pin, e.g. 'def add(a: int, b: int) -> int:'")
    k.add_argument("--docstring", action="store_true", help="pin a docstring under the signature")
    k.add_argument("--max-lines", type=int, default=50)
    k.add_argument("--language", default="python")
    k.add_argument("--line-tokens", type=int, default=32, help="tokens per body line")
    k.add_argument("--docstring-tokens", type=int, default=48)
    k.add_argument("--repair-rounds", type=int, default=3, help="re-mask-and-fill rounds when it does not parse")
    add_model_flags(k)
    k.add_argument("--json", action="store_true")
    add_generation_flags(k, skip=("max_new_tokens", "block_length", "num_samples", "cache"))
    k.set_defaults(func=_code, seed=0)

    q = sub.add_parser("pattern", help="fill the text between BEFORE and AFTER with a match of a bounded regex")
    q.add_argument("before")
    q.add_argument("pattern", help=r"literals, classes and bounded repeats, e.g. '\d{4}-\d{2}-\d{2}'")
    q.add_argument("after", nargs="?", default="")
    add_model_flags(q)
    q.add_argument("--json", action="store_true")
    add_generation_flags(q, skip=("max_new_tokens", "block_length", "num_samples", "cache"))
    q.set_defaults(func=_pattern, seed=0)
    for p in sub.choices.values():  # every command; applied once, in main()
        p.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    return ap


def main(argv: Sequence[str] | None = None) -> None:
    from dlm.checkpoint import CheckpointError
    from dlm.data import CorpusError
    from dlm.sampling import SamplingError

    args = build_parser().parse_args(argv)
    try:
        if isinstance(getattr(args, "device", None), str):  # one check for every command: cpu, cuda[:N], mps
            from dlm.formats.base import check_device

            check_device(args.device)
        from dlm.precision import set_threads

        set_threads(args.threads)  # --threads, once, for every command
        args.func(args)
    except (ConfigError, CorpusError, CheckpointError, SamplingError, ValueError) as e:
        print(f"dlm: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a path the user gave that cannot be read or written (the message names it)
        print(f"dlm: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("dlm: interrupted (a training run resumes from its last checkpoint when re-run)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
