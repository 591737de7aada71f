"""Threshold decoding on a model that is sure of its answers: forward passes saved and exact-match kept.

    python benchmarks/sampling_task.py --threads 1      # -> benchmarks/results/sampling_task.json

Part (b) of `benchmarks/sampling.py` shows that confidence-threshold decoding (Fast-dLLM) saves almost no forward
passes on the shipped default model: a 3.35M-parameter byte-level model of Shakespeare is rarely sure of a
character. Fast-dLLM's gains come from models that are (LLaDA-8B on GSM8K: the answer's template text and the EOS
padding after it). This benchmark makes such a model the cheap way, to measure what the same samplers do then:

1. SFT (`dlm.sft`, LLaDA's recipe) of the shipped default model on a task with one right answer: "Capitals: " and
   the start of a line of the training plays (8 to 31 characters), filled with "_" to 31 characters -> the same
   characters in capitals, then EOS. The fill keeps the copy at a fixed relative offset, which the small RoPE model
   learns in a few hundred steps (with sources of varying width it had not learned to copy after 600). Responses
   are padded with EOS to the longest of their batch and the padding is trained as answer (LLaDA's
   `eos_padding="response"`), so the model learns to fill the rest of its canvas with EOS.
2. 32-token answers (about a third of the canvas is EOS padding, as in LLaDA's GSM8K runs) in blocks of 16, greedy,
   for held-out lines of the two validation plays, with the llada and fast_dllm settings of part (b): the
   1-token-per-step llada loop is the reference, then fewer fixed steps, and fast_dllm thresholds with no cache,
   the prefix and the dual cache, and the factor rule.
3. Reported per setting: forward passes (NFE) per token, tokens/s, exact match (the answer up to EOS equals the
   capitals), per-character accuracy, and agreement with the reference's tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sampling import Counter  # noqa: E402

from dlm.config import SFTConfig, TrainConfig  # noqa: E402
from dlm.data import load_corpus, split_documents  # noqa: E402
from dlm.pipeline import DiffusionLM  # noqa: E402
from dlm.sft import chat_prompt, finetune  # noqa: E402

MIN_CHARS, MAX_CHARS, FILL = 8, 31, "_"
INSTRUCTION = "Capitals: "


def sources(docs, n: int, seed: int) -> list[str]:
    """Distinct starts of lines, cut at a random length of 8 to 31 characters (ASCII, no all-capitals speaker lines)."""
    rng = random.Random(seed)
    seen, out = set(), []
    for d in docs:
        for line in d.text.split("\n"):
            line = line.strip()
            if len(line) < MIN_CHARS or not line.isascii() or line == line.upper() or FILL in line:
                continue
            s = line[:rng.randint(MIN_CHARS, MAX_CHARS)].strip()
            if len(s) >= MIN_CHARS and s not in seen:
                seen.add(s)
                out.append(s)
    rng.shuffle(out)
    return out[:n]


def question(src: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": INSTRUCTION + src.ljust(MAX_CHARS, FILL)}]


def settings_for(n: int) -> list[dict]:
    out = [{"sampler": "llada", "steps": n}, {"sampler": "llada", "steps": n // 2},
           {"sampler": "llada", "steps": n // 4}, {"sampler": "llada", "steps": n // 8}]
    for tau in (0.9, 0.7, 0.5, 0.3):
        for cache in ("none", "prefix", "dual"):
            out.append({"sampler": "fast_dllm", "steps": n, "threshold": tau, "cache": cache})
    out += [{"sampler": "fast_dllm", "steps": n, "factor": 1.0, "cache": "none"},
            {"sampler": "fast_dllm", "steps": n, "factor": 1.0, "cache": "dual"}]
    return out


def answer_of(tok, new: list[int]) -> str:
    end = new.index(tok.eos_id) if tok.eos_id in new else len(new)
    return tok.decode(new[:end])


@torch.no_grad()
def measure(lm: DiffusionLM, srcs: list[str], n: int, block: int) -> list[dict]:
    tok = lm.tokenizer
    prompts = [chat_prompt(tok, question(s)) for s in srcs]  # as dlm.sft rendered them for fine-tuning
    base = {"max_new_tokens": n, "block_length": block, "temperature": 0.0, "seed": 0}
    forwards = Counter(lm.model)
    reference: list[list[int]] = []
    rows = []
    for s in settings_for(n):
        nfe, secs, exact, chars = 0, 0.0, 0, 0.0
        outs = []
        for p, src in zip(prompts, srcs, strict=True):
            before, t0 = forwards.n, time.perf_counter()
            ids = lm.generate(torch.tensor([p]), **base, **s)
            secs += time.perf_counter() - t0
            nfe += forwards.n - before
            new = ids[0, len(p):].tolist()
            outs.append(new)
            got, want = answer_of(tok, new), src.upper()
            exact += int(got == want)
            chars += sum(a == b for a, b in zip(got, want, strict=False)) / len(want)
        if not reference:
            reference = outs
        agree = sum(a == b for o, r in zip(outs, reference, strict=True) for a, b in zip(o, r, strict=True))
        row = {"setting": s, "nfe_per_token": round(nfe / (len(srcs) * n), 4),
               "tokens_per_s": round(len(srcs) * n / secs, 1), "exact_match": round(exact / len(srcs), 4),
               "char_accuracy": round(chars / len(srcs), 4), "agreement": round(agree / (len(srcs) * n), 4),
               "example": answer_of(tok, outs[0])}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=6000, help="SFT examples (lines of the training plays)")
    ap.add_argument("--test", type=int, default=64, help="held-out lines (validation plays)")
    ap.add_argument("--steps", type=int, default=400, help="SFT optimizer steps")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--block-length", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--run", default=str(ROOT / "runs/sampling-task"))
    ap.add_argument("--reuse", action="store_true", help="measure the finished SFT run in --run, do not train")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/sampling_task.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train_docs, val_docs = split_documents(load_corpus("shakespeare"), TrainConfig.val_fraction)
    train = sources(train_docs, args.train, seed=0)
    seen = set(train)
    test = [s for s in sources(val_docs, 10 * args.test, seed=1) if s not in seen][:args.test]  # never an SFT line
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    if not args.reuse:
        chats = run / "chats.jsonl"
        chats.write_text("".join(json.dumps({"messages": question(s) + [{"role": "assistant", "content": s.upper()}]})
                                 + "\n" for s in train))
        tcfg = TrainConfig(data=str(chats), out=str(run / "sft"), max_steps=args.steps, batch_size=args.batch_size,
                           seq_len=128, lr=args.lr, warmup_steps=min(50, args.steps // 10), bf16=True, ema=0.0,
                           ckpt_every=args.steps, log_every=max(1, args.steps // 20), seed=0, threads=args.threads)
        t0 = time.perf_counter()
        summary = finetune(SFTConfig(data=str(chats)), tcfg, model="default", show_progress=False)
        summary = {"sft_seconds": round(time.perf_counter() - t0, 1), "final_loss": summary.get("final_loss")}
    lm = DiffusionLM.from_pretrained(str(run / "sft"))
    rows = measure(lm, test, args.gen_length, args.block_length)
    result = {"task": f"{INSTRUCTION!r} + {MIN_CHARS}-{MAX_CHARS} chars of a line, filled with {FILL!r} to {MAX_CHARS} "
                      "-> the same chars in capitals, then EOS",
              "sft_examples": len(train), "held_out": len(test), "sft_steps": args.steps,
              "batch_size": args.batch_size, "lr": args.lr, "gen_length": args.gen_length,
              "block_length": args.block_length, "threads": args.threads, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), **summary, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
