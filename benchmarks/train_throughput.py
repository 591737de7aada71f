"""Training throughput (tokens/s) of each model preset: fp32, bf16 autocast, and --precision auto, on this CPU.

    python benchmarks/train_throughput.py --threads 2 --presets tiny small base   # -> benchmarks/results/*.json
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/train_throughput.py --presets small --out /tmp/avx2.json

Times full optimizer steps of the masked-diffusion loss (batch 32 x 256, byte vocab) after warm-up steps. The
three precisions take turns step by step (fp32, bf16, auto, fp32, ...) and each figure is the tokens of one step
over its median step time, so load that comes and goes on a shared machine hits them alike. `auto` is what
`dlm train` does by default: dlm.precision.resolve_precision decides, and the JSON says what it chose and why
(the CPU's bf16 flags, the probe's bf16/fp32 matmul ratio). With oneDNN capped at AVX2 (second line) an AMX CPU
computes bf16 the emulated way, as an AVX2-only CPU does. The CPU is named in the result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dlm import precision  # noqa: E402
from dlm.config import ModelConfig, ProcessConfig  # noqa: E402
from dlm.losses import LOSSES  # noqa: E402
from dlm.models import build_model, count_params  # noqa: E402
from dlm.process import MaskedProcess  # noqa: E402
from dlm.schedules import Linear  # noqa: E402

MODES = ("fp32", "bf16", "auto")


class Run:
    """One model, optimizer and batch per precision, stepped in turn."""

    def __init__(self, preset: str, arch: str, mode: str, batch: int, seq: int) -> None:
        torch.manual_seed(0)
        self.model = build_model(ModelConfig.preset(preset, arch=arch))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.loss_fn = LOSSES.build("ar" if arch == "ar" else ProcessConfig().loss, bos_id=259)
        self.process = MaskedProcess(257, Linear())
        self.x0 = torch.randint(0, 256, (batch, seq))
        self.g = torch.Generator().manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # forced bf16 where it is emulated: the point of the measurement
            self.precision = precision.resolve_precision(mode, "cpu")  # auto -> what dlm train would use
        self.times: list[float] = []

    def step(self, timed: bool) -> None:
        t = time.perf_counter()
        with precision.autocast("cpu", self.precision):
            out = self.loss_fn(self.model, self.x0, self.process, generator=self.g)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()
        if timed:
            self.times.append(time.perf_counter() - t)


def measure(preset: str, arch: str, batch: int, seq: int, steps: int, warmup: int) -> dict:
    runs = {mode: Run(preset, arch, mode, batch, seq) for mode in MODES}
    for i in range(warmup + steps):
        for run in runs.values():
            run.step(timed=i >= warmup)
    row = {f"{m}_tok_s": round(batch * seq / statistics.median(r.times)) for m, r in runs.items()}
    row["auto_is"] = runs["auto"].precision
    return row


def main() -> None:
    from dlm.precision import cpu_name  # one definition, beside the bf16 probe

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
    load = os.getloadavg()
    rows = []
    for preset in args.presets:
        for arch in args.archs:
            n = count_params(build_model(ModelConfig.preset(preset, arch=arch)))
            row = {"preset": preset, "arch": arch, "params": n,
                   **measure(preset, arch, args.batch, args.seq, args.steps, args.warmup)}
            row["bf16_speedup"] = round(row["bf16_tok_s"] / row["fp32_tok_s"], 2)
            row["auto_vs_fp32"] = round(row["auto_tok_s"] / row["fp32_tok_s"], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "bf16_flags": precision.cpu_bf16_flags(),
              "bf16_over_fp32_matmul_time": round(precision.bf16_matmul_ratio(), 3),
              "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "threads": args.threads,
              "batch": args.batch, "seq": args.seq, "steps": args.steps, "torch": torch.__version__,
              "load_average_before": [round(x, 2) for x in load], "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
