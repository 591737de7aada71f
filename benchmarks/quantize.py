"""Int8 weight-only inference on the CPU: generation speed against float32 / bfloat16, and the drift it causes.

    python benchmarks/quantize.py                   # -> benchmarks/results/quantize.json

Speed: `DiffusionLM.generate` (LLaDA sampler, greedy) on (a) the shipped default model (3.35M params) and (b) a
random 1B-parameter LLaDA-format folder (written by benchmarks/load_memory.py / tests/hf_helpers.py), each
variant timed best-of-N, interleaved. Drift, on the default model (trained, so the numbers mean something):
max and mean |logit difference| relative to the float32 logits, top-1 agreement over masked positions, the held-out
bits/char bound (`dlm eval`'s estimator, same seed) and whether greedy generations stay the same.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from dlm.pipeline import DiffusionLM  # noqa: E402
from dlm.quantize import quantize_model  # noqa: E402

VARIANTS = {  # name -> (dtype the weights load in, quantise?)
    "float32": ("float32", False), "bfloat16": ("bfloat16", False),
    "int8 (float32 activations)": ("float32", True), "int8 (bfloat16 activations)": ("bfloat16", True),
}


def load(path: str, dtype: str, int8: bool) -> DiffusionLM:
    lm = DiffusionLM.from_pretrained(path, dtype=dtype)
    if int8:
        quantize_model(lm.model)
    return lm


def weight_bytes(lm: DiffusionLM) -> int:
    return sum(t.numel() * t.element_size() for t in [*lm.model.parameters(), *lm.model.buffers()])


def time_generation(lms: dict[str, DiffusionLM], prompt: torch.Tensor, opts: dict, repeats: int) -> dict[str, float]:
    best = {k: float("inf") for k in lms}
    for lm in lms.values():  # warm-up
        lm.generate(prompt, **opts)
    for _ in range(repeats):
        for name, lm in lms.items():
            t0 = time.perf_counter()
            lm.generate(prompt, **opts)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def drift(ref: DiffusionLM, other: DiffusionLM, n_windows: int) -> dict:
    from dlm.eval.heldout import evaluate_text

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 128), generator=g)
    masked = torch.rand(x.shape, generator=g) < 0.5
    x = torch.where(masked, torch.full_like(x, ref.tokenizer.mask_id), x)
    a, b = ref.logits(x), other.logits(x)
    prompt = "ROMEO:\n"
    gen = dict(max_new_tokens=64, steps=64, block_length=32, seed=0)
    return {
        "max_abs_logit_diff_over_max_abs_logit": float((a - b).abs().max() / a.abs().max()),
        "mean_abs_logit_diff_over_mean_abs_logit": float((a - b).abs().mean() / a.abs().mean()),
        "top1_agreement_masked": float((a.argmax(-1) == b.argmax(-1))[masked].float().mean()),
        "heldout_bits_per_char": evaluate_text(other, "shakespeare", n_samples=2, seed=0,
                                               max_windows=n_windows)["bits_per_char"],
        "same_greedy_generation": ref.generate(prompt, **gen) == other.generate(prompt, **gen),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big", default="/tmp/dlm-llada-1b", help="random 1B LLaDA folder (benchmarks/load_memory.py)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--windows", type=int, default=16, help="held-out windows for the bits/char drift")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quantize.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__, "kernel": "aten._weight_int8pack_mm"}

    default = {k: load("default", *v) for k, v in VARIANTS.items()}
    prompt = torch.tensor([list(b"ROMEO:\n")])
    opts = dict(max_new_tokens=128, steps=64, block_length=32, seed=0)
    result["default"] = {
        "seconds_per_generation": time_generation(default, prompt, opts, args.repeats), "options": opts,
        "weight_bytes": {k: weight_bytes(v) for k, v in default.items()},
        "drift_vs_float32": {k: drift(default["float32"], v, args.windows) for k, v in default.items()
                             if k != "float32"},
    }
    result["default"]["heldout_bits_per_char_float32"] = drift(default["float32"], default["float32"],
                                                               args.windows)["heldout_bits_per_char"]
    del default

    if Path(args.big, "config.json").exists():
        big = {k: load(args.big, *v) for k, v in VARIANTS.items() if "bfloat16" in k}
        prompt = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(0))
        opts = dict(max_new_tokens=32, steps=8, block_length=32, seed=0)
        result["llada_1b_random"] = {
            "seconds_per_generation": time_generation(big, prompt, opts, args.repeats), "options": opts,
            "weight_bytes": {k: weight_bytes(v) for k, v in big.items()},
        }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for model in ("default", "llada_1b_random"):
        if model not in result:
            continue
        r = result[model]
        print(f"\n{model}: {r['options']}")
        print("| variant | s / generation | weights (MiB) |\n|---|---|---|")
        for k, s in r["seconds_per_generation"].items():
            print(f"| {k} | {s:.3f} | {r['weight_bytes'][k] / 2**20:.1f} |")
    print("\ndrift vs float32 (default model):")
    print(json.dumps(result["default"]["drift_vs_float32"], indent=1))
    print("float32 held-out bits/char:", result["default"]["heldout_bits_per_char_float32"])


if __name__ == "__main__":
    main()
