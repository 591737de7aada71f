"""The families side by side: masked (LLaDA-style), SEDD absorbing and uniform, D3PM absorbing and uniform, and the
AR baseline, trained at the same size for the same wall-clock budget on Shakespeare (byte-level, bf16).

    python benchmarks/families.py --minutes 20 --threads 2      # the measurement: ~2 h 15 min on this machine
    python benchmarks/families.py --max-steps 1500 --threads 2  # the same tokens for each family instead
    python benchmarks/families.py --quick --out /tmp/families   # a smoke run (tiny model, 0.5 min each)

On two cores the families can train in two processes of one thread each, then be sampled and tabulated together
(`--reuse` takes a family's finished run and its scores from `--runs` instead of training it again):

    python benchmarks/families.py --max-steps 800 --threads 1 --train-only --families ar masked sedd-absorbing &
    python benchmarks/families.py --max-steps 800 --threads 1 --train-only --families sedd-uniform d3pm-absorbing \
        d3pm-uniform
    python benchmarks/families.py --max-steps 800 --reuse        # samples, JSON, plot and table of all six

For each family: a few timed steps fix `max_steps` so that training fills `--minutes` (the cosine schedule then
ends on time); the held-out bound is logged `--points` times during training against the training seconds spent
(evaluation excluded); at the end `dlm eval`'s code scores the validation plays (ELBO bound for the diffusion
families, each with its own estimator, exact NLL for AR) in bits/char. Samples: `--samples` continuations of
`--new-tokens` bytes after prompts from the validation plays, for each step count in `--steps`, with the family's
own sampler at temperature 1 (mdlm for the masked family), scored by the AR baseline of this run (bits/char of
the continuation given the prompt; lower is more Shakespeare-like to the judge) and by their share of distinct
4-grams (repetition shows as a low share). The AR baseline samples itself token by token (one forward per token).

Every diffusion family uses the same time-conditioned network (`--arch`, default dit), so they differ only in the
objective and sampler; the AR baseline is the causal transformer of the same width and depth. Writes JSON and a
PNG to `--out` (default benchmarks/results/families.{json,png}) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dlm.callbacks import Callback, EvalCallback  # noqa: E402
from dlm.config import ModelConfig, ProcessConfig, TrainConfig  # noqa: E402
from dlm.data import (  # noqa: E402
    TokenStream,
    load_corpus,
    split_documents,
    tokenize_documents,
    unigram_entropy_bits,
)
from dlm.eval.heldout import evaluate_text  # noqa: E402
from dlm.models import count_params  # noqa: E402
from dlm.pipeline import DiffusionLM  # noqa: E402
from dlm.precision import set_threads  # noqa: E402
from dlm.tokenizer import build_tokenizer  # noqa: E402
from dlm.train import build_trainer, process_config  # noqa: E402
from dlm.trainer import Trainer  # noqa: E402

FAMILIES = ["masked", "sedd-absorbing", "sedd-uniform", "d3pm-absorbing", "d3pm-uniform", "ar"]
# The masked family samples like the others: ancestrally from the model at temperature 1 (MDLM's sampler), not with
# LLaDA's greedy low-confidence default.
MASKED_SAMPLING = {"sampler": "mdlm", "temperature": 1.0, "block_length": 0}


class TrainClock(Callback):
    """The training seconds (evaluation excluded) at every evaluation: the run's learning curve."""

    def on_fit_start(self, trainer: Trainer) -> None:
        self.evals = next(cb for cb in trainer.callbacks if isinstance(cb, EvalCallback))
        self.t_start, self.curve = time.perf_counter(), []

    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        train_s = time.perf_counter() - self.t_start - self.evals.seconds
        self.curve.append({"step": trainer.step, "train_seconds": train_s,
                           "val_bits_per_char": metrics["val_bits_per_char"]})


def configs(family: str, args) -> tuple[ModelConfig, ProcessConfig]:
    if family == "ar":
        return ModelConfig.preset(args.preset, arch="ar", max_len=args.seq_len), ProcessConfig(loss="ar")
    return ModelConfig.preset(args.preset, arch=args.arch, max_len=args.seq_len), process_config(family)


def setup(args) -> dict[str, Any]:
    docs = load_corpus("shakespeare")
    train_docs, val_docs = split_documents(docs, TrainConfig.val_fraction)
    tok = build_tokenizer("byte", (d.text for d in train_docs))
    train_tokens, val_tokens = tokenize_documents(train_docs, tok), tokenize_documents(val_docs, tok)
    n_chars = sum(len(d.text) + 1 for d in val_docs)
    return {"tok": tok, "train": TokenStream(train_tokens, args.seq_len), "val": TokenStream(val_tokens, args.seq_len),
            "val_docs": val_docs, "chars_per_token": len(val_tokens) / n_chars,
            "unigram_bits_per_char": unigram_entropy_bits(train_tokens, val_tokens, tok.vocab_size)
            * len(val_tokens) / n_chars}


def build(family: str, args, data, max_steps: int, out: Path) -> Trainer:
    tok = data["tok"]
    mcfg, pcfg = configs(family, args)
    warmup = max(1, min(200, max_steps // 10))
    tcfg = TrainConfig(data="shakespeare", out=str(out), max_steps=max_steps, batch_size=args.batch_size,
                       seq_len=args.seq_len, lr=args.lr, warmup_steps=warmup, bf16=not args.fp32, ema=args.ema,
                       eval_every=max(1, max_steps // args.points), eval_batches=args.eval_batches,
                       ckpt_every=max_steps, log_every=max(1, max_steps // 50), seed=0, threads=args.threads)
    return build_trainer(tcfg, mcfg.replace(vocab_size=tok.vocab_size), pcfg, tok, data["train"], data["val"],
                         chars_per_token=data["chars_per_token"], device=args.device, show_progress=False,
                         callbacks=[TrainClock()])


def calibrate(family: str, args, data, tmp: Path) -> float:
    """Seconds per optimizer step: two warm-up steps, then the median of `--calibration-steps` timed ones (robust
    to a neighbour's burst of work on a shared machine)."""
    trainer = build(family, args, data, 1000, tmp)
    times = []
    for s in range(2 + args.calibration_steps):
        t0 = time.perf_counter()
        trainer.train_step(s)
        times.append(time.perf_counter() - t0)
    return sorted(times[2:])[len(times[2:]) // 2]


@torch.no_grad()
def judge_bits_per_char(judge, tok, prompt: list[int], new: list[int]) -> float:
    """Bits per byte of `new` after `prompt` under the AR judge (byte-level: a token is a char)."""
    seq = torch.tensor([[tok.bos_id] + prompt + new], device=next(judge.parameters()).device)
    logp = torch.log_softmax(judge(seq[:, :-1], None).float(), -1).gather(-1, seq[:, 1:, None])[0, :, 0]
    return float(-logp[len(prompt):].mean()) / math.log(2)


def distinct_4grams(ids: list[int]) -> float:
    grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
    return len(set(grams)) / max(1, len(grams))


@torch.no_grad()
def ar_sample(model, tok, prompt: list[int], n: int, generator: torch.Generator) -> list[int]:
    seq, device = [tok.bos_id] + prompt, next(model.parameters()).device
    for _ in range(n):
        logits = model(torch.tensor([seq], device=device), None)[0, -1].float().cpu()
        logits[[tok.mask_id, tok.pad_id, tok.bos_id]] = -torch.inf
        seq.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)))
    return seq[1 + len(prompt):]


def sample_rows(family: str, lm: DiffusionLM, judge, prompts: list[list[int]], args) -> list[dict[str, Any]]:
    tok, rows = lm.tokenizer, []
    for steps in ([args.new_tokens] if family == "ar" else args.steps):
        bits, distinct, secs, example = [], [], 0.0, None
        for i, p in enumerate(prompts):
            g = torch.Generator().manual_seed(i)
            t0 = time.perf_counter()
            if family == "ar":
                new = ar_sample(lm.model, tok, p, args.new_tokens, g)
            else:
                out = lm.generate(torch.tensor([p]), max_new_tokens=args.new_tokens, steps=steps, seed=i,
                                  **(MASKED_SAMPLING if family == "masked" else {}))
                new = out[0, len(p):].tolist()
            secs += time.perf_counter() - t0
            bits.append(judge_bits_per_char(judge, tok, p, new))
            distinct.append(distinct_4grams(new))
            example = example or tok.decode(p) + "|" + tok.decode(new)
        rows.append({"steps": steps, "nfe_per_token": steps / args.new_tokens,
                     "judge_bits_per_char": sum(bits) / len(bits), "distinct_4grams": sum(distinct) / len(distinct),
                     "seconds_per_sample": secs / len(prompts), "example": example})
        print(json.dumps({"family": family, **{k: v for k, v in rows[-1].items() if k != "example"}}), flush=True)
    return rows


def prompts_from(val_docs, tok, n: int, length: int) -> list[list[int]]:
    text = "\n".join(d.text for d in val_docs)
    step = len(text) // (n + 1)
    out = []
    for i in range(1, n + 1):
        start = text.index("\n", i * step) + 1  # start at a line
        out.append(tok.encode(text[start:start + length]))
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_tokens = bool(result.get("max_steps"))  # same steps for all: tokens are the compute (minutes vary with load)
    per_step = result["batch_size"] * result["seq_len"] / 1e6
    for fam, r in result["families"].items():
        curve = [(e["step"] * per_step if by_tokens else e["train_seconds"] / 60, e["val_bits_per_char"])
                 for e in r["curve"]]
        color = f"C{FAMILIES.index(fam)}"  # the same colour in both panels
        if curve:
            a.plot(*zip(*curve, strict=True), marker="o", color=color, label=fam)
        if fam != "ar":
            pts = [(s["nfe_per_token"], s["judge_bits_per_char"]) for s in r["samples"]]
            b.plot(*zip(*pts, strict=True), marker="o", color=color, label=fam)
        else:
            b.axhline(r["samples"][0]["judge_bits_per_char"], color=color, ls="--", label="ar (1 NFE/token)")
    a.axhline(result["unigram_bits_per_char"], color="gray", ls=":", label="unigram")
    a.set(xlabel="training tokens (millions)" if by_tokens else "training minutes (bf16, evaluation excluded)",
          ylabel="held-out bits/char (bound; AR exact)",
          title=f"Held-out likelihood over training ({result.get('eval_batches', '?')} batches per point)")
    b.set(xscale="log", xlabel="forward passes per token", ylabel="AR-judge bits/char of samples",
          title="Sample quality per forward pass")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(result: dict[str, Any]) -> str:
    steps = sorted({s["steps"] for f, r in result["families"].items() if f != "ar" for s in r["samples"]})
    head = ["family", "params", "steps", "train min", "held-out bits/char"] + [f"judge @{s}" for s in steps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fam, r in result["families"].items():
        by = {s["steps"]: s for s in r["samples"]}
        judged = [f"{by[s]['judge_bits_per_char']:.2f}" if s in by else "" for s in steps]
        if fam == "ar":
            judged = [f"{r['samples'][0]['judge_bits_per_char']:.2f} (1/token)"] + [""] * (len(steps) - 1)
        ev = r["heldout"]
        bound = f"{ev['bits_per_char']:.3f}" + ("" if ev["exact"] else f" ± {ev['stderr']:.3f}")
        lines.append(f"| {fam} | {r['n_params'] / 1e6:.2f}M | {r['steps']} | {r['train_seconds'] / 60:.1f} | "
                     f"{bound} | " + " | ".join(judged) + " |")
    return "\n".join(lines)


def settings(args) -> dict[str, Any]:
    """What makes two runs of a family the same (threads and sampling options excluded)."""
    keys = ["minutes", "max_steps", "preset", "arch", "batch_size", "seq_len", "lr", "ema", "fp32", "eval_samples",
            "eval_windows", "points", "eval_batches"]
    return {k: getattr(args, k) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="training budget of each family (wall clock)")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="train every family for exactly this many steps (the same tokens) instead of --minutes: "
                         "reproducible on a shared machine, where timing a few steps is noisy")
    ap.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--arch", default="dit", help="network of every diffusion family (dit: time-conditioned)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--fp32", action="store_true", help="train in float32 instead of bf16 autocast")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (training, scoring and sampling)")
    ap.add_argument("--points", type=int, default=8, help="held-out evaluations during training")
    ap.add_argument("--eval-batches", type=int, default=4, help="batches of windows per evaluation during training")
    ap.add_argument("--eval-samples", type=int, default=4, help="Monte Carlo samples per window, final evaluation")
    ap.add_argument("--eval-windows", type=int, default=256, help="validation windows of the final evaluation")
    ap.add_argument("--calibration-steps", type=int, default=10)
    ap.add_argument("--samples", type=int, default=8, help="prompts sampled per setting")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, nargs="+", default=[16, 32, 64, 128], help="sampler steps per sample")
    ap.add_argument("--runs", default=str(ROOT / "runs/families"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/families"), help="path without extension")
    ap.add_argument("--train-only", action="store_true", help="train and score the families, sample none")
    ap.add_argument("--reuse", action="store_true",
                    help="take a family's finished run and scores from --runs (written by an earlier run with the "
                         "same settings) instead of training it again")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny preset, 64-token windows, 0.5 min each, few evaluations and samples")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.seq_len, args.batch_size, args.points, args.eval_batches = "tiny", 64, 16, 2, 2
        args.eval_samples, args.eval_windows, args.samples, args.new_tokens = 1, 16, 2, 32
        args.steps, args.calibration_steps = [8, 32], 3
        if args.minutes == ap.get_default("minutes"):
            args.minutes = 0.5
    set_threads(args.threads)
    data = setup(args)
    runs = Path(args.runs)
    result: dict[str, Any] = {"minutes_per_family": None if args.max_steps else args.minutes,
                              "max_steps": args.max_steps, "preset": args.preset, "arch": args.arch,
                              "batch_size": args.batch_size, "seq_len": args.seq_len,
                              "eval_batches": args.eval_batches, "bf16": not args.fp32,
                              "threads": args.threads, "device": args.device, "torch": torch.__version__,
                              "machine": platform.processor() or platform.machine(),
                              "unigram_bits_per_char": data["unigram_bits_per_char"], "families": {}}
    order = ["ar"] + [f for f in args.families if f != "ar"] if "ar" in args.families else args.families
    for fam in order:  # the AR baseline first: it judges the samples of the others
        saved = runs / fam / "family_result.json"
        if args.reuse and saved.exists():
            prev = json.loads(saved.read_text())
            if prev["settings"] != settings(args):
                raise SystemExit(f"{saved} was trained with {prev['settings']}, not {settings(args)}")
            result["families"][fam] = prev["result"]
            print(f"{fam}: reusing {runs / fam} ({prev['result']['steps']} steps)", flush=True)
            continue
        shutil.rmtree(runs / fam, ignore_errors=True)
        if args.max_steps:
            max_steps = args.max_steps
        else:
            sec_per_step = calibrate(fam, args, data, runs / f".calibrate-{fam}")
            shutil.rmtree(runs / f".calibrate-{fam}", ignore_errors=True)
            max_steps = max(2, int(args.minutes * 60 / sec_per_step))
            print(f"{fam}: {sec_per_step:.3f} s/step -> {max_steps} steps in {args.minutes} min", flush=True)
        trainer = build(fam, args, data, max_steps, runs / fam)
        t0 = time.perf_counter()
        trainer.fit()
        wall = time.perf_counter() - t0
        clock = next(cb for cb in trainer.callbacks if isinstance(cb, TrainClock))
        curve = clock.curve
        lm = DiffusionLM.from_pretrained(str(runs / fam), device=args.device)
        heldout = evaluate_text(lm, "shakespeare", n_samples=args.eval_samples, max_windows=args.eval_windows)
        train_seconds = wall - clock.evals.seconds
        result["families"][fam] = {"n_params": count_params(trainer.model), "steps": max_steps,
                                   "train_seconds": train_seconds, "seconds_per_step": train_seconds / max_steps,
                                   "tokens": max_steps * args.batch_size * args.seq_len, "curve": curve,
                                   "heldout": heldout, "process": lm.config.process.to_dict(),
                                   "sampler": lm.sampling.sampler}
        saved.write_text(json.dumps({"settings": settings(args), "result": result["families"][fam]}, indent=2))
        print(json.dumps({"family": fam, "heldout_bits_per_char": heldout["bits_per_char"],
                          "stderr": heldout["stderr"]}), flush=True)
    if args.train_only:
        print(f"trained {', '.join(order)}; each run's scores are in {runs}/NAME/family_result.json")
        return
    prompts = prompts_from(data["val_docs"], data["tok"], args.samples, 64 if not args.quick else 16)
    judge = DiffusionLM.from_pretrained(str(runs / "ar"), device=args.device).model if "ar" in args.families else None
    for fam in order:
        if judge is None:
            break
        lm = DiffusionLM.from_pretrained(str(runs / fam), device=args.device)
        result["families"][fam]["samples"] = sample_rows(fam, lm, judge, prompts, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    if judge is not None:
        plot(result, out.with_suffix(".png"))
        print(table(result))
    print(f"wrote {out.with_suffix('.json')}" + (f" and {out.with_suffix('.png')}" if judge is not None else ""))


if __name__ == "__main__":
    main()
