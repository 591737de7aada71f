"""Training throughput (tokens/s) of each model preset, fp32 vs bf16 autocast, on this machine.

    python benchmarks/train_throughput.py --threads 2 --presets tiny small base   # -> benchmarks/results/*.json

Times full optimizer steps of the masked-diffusion loss (batch 32 x 256, byte vocab) after warm-up steps.
Run it on an otherwise idle machine: concurrent work lowers every figure.
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

from dlm.config import ModelConfig, ProcessConfig  # noqa: E402
from dlm.losses import LOSSES  # noqa: E402
from dlm.models import build_model, count_params  # noqa: E402
from dlm.process import MaskedProcess  # noqa: E402
from dlm.schedules import Linear  # noqa: E402


def measure(preset: str, arch: str, bf16: bool, batch: int, seq: int, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset, arch=arch)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_name = "ar" if arch == "ar" else ProcessConfig().loss
    loss_fn = LOSSES.build(loss_name, bos_id=259)
    process = MaskedProcess(257, Linear())
    x0 = torch.randint(0, 256, (batch, seq))
    g = torch.Generator().manual_seed(0)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = loss_fn(model, x0, process, generator=g)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    return batch * seq * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    ap.add_argument("--archs", nargs="+", default=["llada", "ar"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/train_throughput.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for preset in args.presets:
        for arch in args.archs:
            n = count_params(build_model(ModelConfig.preset(preset, arch=arch)))
            row = {"preset": preset, "arch": arch, "params": n}
            for bf16 in (False, True):
                row["bf16_tok_s" if bf16 else "fp32_tok_s"] = round(
                    measure(preset, arch, bf16, args.batch, args.seq, args.steps, args.warmup))
            row["speedup"] = round(row["bf16_tok_s"] / row["fp32_tok_s"], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"threads": args.threads, "batch": args.batch, "seq": args.seq, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
