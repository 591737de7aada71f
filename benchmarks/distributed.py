"""Data-parallel scaling on this machine: training tokens/s with 1 process vs 2 DDP processes (1 thread each).

    python benchmarks/distributed.py                  # -> benchmarks/results/distributed.json (about a minute)

Both runs are `dlm train` on Shakespeare with the same global batch (B x L), so they take the same optimizer steps;
1 process runs in place, 2 go through `dlm train --nproc 2` (torchrun, gloo). tokens/s is the global batch's tokens
over the wall time of a step, from the run's log.jsonl, averaged after `--warmup` steps. Each process has one
thread, so 2 processes use 2 cores; on a machine whose cores are shared with other work the speed-up is lower
than on idle cores (the figure records the load average when it ran).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, args: argparse.Namespace, out: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "dlm.cli", "train", "--data", args.data, "--model", args.preset, "--out", str(out),
           "--batch-size", str(args.batch), "--seq-len", str(args.seq), "--max-steps", str(args.steps + args.warmup),
           "--eval-every", "100000", "--ckpt-every", "100000", "--log-every", "1", "--threads", "1", "--quiet",
           "--nproc", str(nproc), *(["--bf16"] if args.bf16 else [])]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    wall = time.perf_counter() - t0
    logs = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in logs if "tokens_per_s" in r][args.warmup:]
    return {"nproc": nproc, "tokens_per_s": round(sum(tps) / len(tps)), "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--batch", type=int, default=16, help="global batch (both runs)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/distributed.json"))
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(n, args, Path(tmp) / f"n{n}") for n in (1, 2)]
    speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    result = {"preset": args.preset, "batch": args.batch, "seq": args.seq, "bf16": args.bf16, "threads_per_process": 1,
              "rows": rows, "speedup": round(speedup, 2), "efficiency": round(speedup / 2, 2),
              "load_average_before": round(load_before, 2), "cpus": os.cpu_count(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
