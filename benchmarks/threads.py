"""How many torch threads `lm.generate` should use: 1 vs 2 (or more), on an idle and on a busy machine.

    python benchmarks/threads.py                       # -> benchmarks/results/threads.json
    python benchmarks/threads.py --threads 1 2 --busy 0 1 --repeats 3
    python benchmarks/threads.py --task train --out benchmarks/results/threads_train.json

Each (threads, busy) cell runs in a fresh process: the default model generates 128 tokens in 64 steps (the
README's command, greedy) once to warm up, then `--repeats` times; the median wall time is recorded. "busy" starts
that many CPU-bound processes (a pure-Python spin loop each, like a test run or a second job) for the duration of
the cell. torch's OpenMP threads wait for each other at every op, so a thread that loses its core to another
process stalls the rest: that is what the busy column shows. The CPU is named in the result.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _spin(stop) -> None:  # one CPU-bound process: pure Python, holds one core until told to stop
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def train_worker(threads: int, repeats: int) -> None:
    """In a fresh process: time optimizer steps of the small preset (batch 32 x 256, fp32) and print one line."""
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(threads)
    from dlm.config import ModelConfig
    from dlm.losses import LOSSES
    from dlm.models import build_model
    from dlm.process import MaskedProcess
    from dlm.schedules import Linear

    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("small"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn, process = LOSSES.build("masked_elbo", bos_id=259), MaskedProcess(257, Linear())
    x0 = torch.randint(0, 256, (32, 256))
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(1 + repeats):
        t = time.perf_counter()
        loss_fn(model, x0, process, generator=g).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t)
    print(json.dumps({"threads": threads, "seconds": times}))


def worker(threads: int, repeats: int, model: str, tokens: int, steps: int) -> None:
    """In a fresh process: time lm.generate with `threads` torch threads and print one JSON line."""
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(threads)
    from dlm import DiffusionLM

    lm = DiffusionLM.from_pretrained(model)
    lm.generate("ROMEO:\n", max_new_tokens=32, steps=16, block_length=32, seed=0)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        lm.generate("ROMEO:\n", max_new_tokens=tokens, steps=steps, seed=0)
        times.append(time.perf_counter() - t)
    print(json.dumps({"threads": threads, "seconds": times}))


def cell(threads: int, busy: int, args: argparse.Namespace) -> dict:
    load = os.getloadavg()[0]  # other work on the machine: a cell measured under load says so
    stop = mp.Event()
    spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(busy)]
    for p in spinners:
        p.start()
    try:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run([sys.executable, __file__, "--worker", str(threads), "--task", args.task,
                              "--repeats", str(args.repeats),
                              "--model", args.model, "--tokens", str(args.tokens), "--steps", str(args.steps)],
                             capture_output=True, text=True, env=env, check=True).stdout
    finally:
        stop.set()
        for p in spinners:
            p.join()
    seconds = json.loads(out.strip().splitlines()[-1])["seconds"]
    return {"threads": threads, "busy_processes": busy, "median_s": round(statistics.median(seconds), 3),
            "runs_s": [round(s, 3) for s in seconds], "load_average_1min_before": round(load, 2)}


def main() -> None:
    from dlm.precision import cpu_name  # one definition, beside the bf16 probe

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="CPU-bound processes running alongside")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="default")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--task", default="generate", choices=["generate", "train"],
                    help="generate: lm.generate as above; train: one optimizer step of the small preset")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/threads.json"))
    args = ap.parse_args()
    if args.worker is not None:
        if args.task == "train":
            train_worker(args.worker, args.repeats)
        else:
            worker(args.worker, args.repeats, args.model, args.tokens, args.steps)
        return
    import torch

    load_before = os.getloadavg()
    rows = []
    for busy in args.busy:
        for threads in args.threads:
            rows.append(cell(threads, busy, args))
            print(json.dumps(rows[-1]), flush=True)
    result = {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "cores": os.cpu_count(), "torch": torch.__version__,
              "load_average_before": [round(x, 2) for x in load_before],
              "task": f"lm.generate, {args.model} model, {args.tokens} tokens, {args.steps} steps, greedy"
              if args.task == "generate" else "one AdamW step, small preset, masked ELBO, batch 32 x 256, fp32",
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
