"""Augmentation by re-noising: diversity and faithfulness of the variants at a few noise levels.

    python benchmarks/augment.py                  # -> benchmarks/results/augment.json and a markdown table

The shipped default model (Shakespeare, byte tokenizer) re-noises ~50 held-out passages (speeches of 80-120 bytes
from the plays `split_documents(load_corpus("shakespeare"), 0.05)` holds out, as training did) with n = 4
variants each, at noise 0.1, 0.3 and 0.5, sampling at augment's default temperature (0.8), seed 0, two tokens
committed per step (steps = ceil(masks / 2), to stay within a few minutes on one thread). Per passage: distinct-2
and self-BLEU among its 4 variants, BLEU of each variant against the passage, and faithfulness (the fraction of
bytes kept); averaged over passages. References: 4 copies of each passage (no change), and 4 different passages.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from statistics import mean

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dlm.control.augment import (  # noqa: E402
    DEFAULT_TEMPERATURE,
    augment,
    bleu,
    distinct_n,
    faithfulness,
    n_remasked,
    self_bleu,
)
from dlm.data import load_corpus, split_documents  # noqa: E402
from dlm.pipeline import DiffusionLM  # noqa: E402


def passages(count: int, lo: int = 80, hi: int = 120) -> list[str]:
    """Held-out speeches (blank-line separated blocks) of lo..hi ASCII bytes, evenly spaced through the plays."""
    _, val = split_documents(load_corpus("shakespeare"), 0.05)
    blocks = [b.strip("\n") + "\n" for d in val for b in d.text.split("\n\n")]
    fit = [b for b in blocks if b.isascii() and lo <= len(b) <= hi and ":\n" in b]
    step = max(1, len(fit) // count)
    return fit[::step][:count]


def group_metrics(groups: list[list[str]], sources: list[str] | None) -> dict[str, float | None]:
    out: dict[str, float | None] = {
        "distinct_2": mean(distinct_n(g, 2) for g in groups),
        "self_bleu": mean(self_bleu(g) for g in groups),
        "bleu_to_source": None, "faithfulness": None,
    }
    if sources is not None:
        out["bleu_to_source"] = mean(bleu(v, [s]) for s, g in zip(sources, groups, strict=True) for v in g)
        out["faithfulness"] = mean(faithfulness(s, v) for s, g in zip(sources, groups, strict=True) for v in g)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=50)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "augment.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = DiffusionLM.from_pretrained("default")
    texts = passages(args.passages)
    rows = [{"variants": f"source x{args.n} (no change)", "noise": 0.0, "seconds": 0.0,
             **group_metrics([[t] * args.n for t in texts], texts)},
            {"variants": f"{args.n} different passages", "noise": None, "seconds": 0.0,
             **group_metrics([texts[i: i + args.n] for i in range(0, len(texts) - args.n + 1, args.n)], None)}]
    examples = {}
    for noise in args.noise:
        t0 = time.perf_counter()
        groups = []
        for i, text in enumerate(texts):  # per text: its steps depend on its length
            steps = math.ceil(n_remasked(len(text.encode()), noise) / 2)
            groups += augment(lm, [text], noise=noise, n=args.n, seed=i, steps=steps)
        rows.append({"variants": f"augment noise {noise}", "noise": noise, "seconds": time.perf_counter() - t0,
                     **group_metrics(groups, texts)})
        examples[str(noise)] = groups[0]
        print(f"noise {noise}: {rows[-1]['seconds']:.0f} s; e.g. {groups[0][0]!r}", file=sys.stderr)
    result = {"model": "default", "passages": len(texts), "n": args.n, "temperature": DEFAULT_TEMPERATURE,
              "steps": "ceil(masks / 2)", "seed": "passage index", "threads": args.threads,
              "mean_bytes": mean(len(t.encode()) for t in texts), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "rows": rows, "example": {"source": texts[0], "variants": examples}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    def show(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    print(f"| variants ({len(texts)} passages, n = {args.n}) | distinct-2 | self-BLEU | BLEU to source | "
          "faithfulness | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variants']} | {show(r['distinct_2'])} | {show(r['self_bleu'])} | {show(r['bleu_to_source'])} "
              f"| {show(r['faithfulness'])} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
