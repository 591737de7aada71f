"""Load time and peak memory of a 1B-parameter LLaDA-format checkpoint (random, bf16, sharded safetensors).

    python benchmarks/load_memory.py                      # -> benchmarks/results/load_memory.json

Writes the folder once (tests/hf_helpers.py: the upstream config keys and weight names, 4 shards), then loads it
in a fresh process with `DiffusionLM.from_pretrained(folder, dtype="bfloat16")` and reads the process's peak
resident memory (VmHWM) and its resident memory before loading (after imports). The issue's bar: peak RSS at most
1.3x the weights' size.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

CHILD = r"""
import json, sys, time
from pathlib import Path

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

import torch
from dlm.pipeline import DiffusionLM
import transformers  # imported by the loader anyway: count it in the baseline
torch.set_num_threads(int(sys.argv[2]))
base = status("VmRSS")
t0 = time.perf_counter()
lm = DiffusionLM.from_pretrained(sys.argv[1], dtype="bfloat16")
t1 = time.perf_counter()
weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
after = status("VmRSS")
peak_load = status("VmHWM")
x = torch.randint(0, 300, (1, 32))
t2 = time.perf_counter()
logits = lm.logits(x)
t3 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "baseline_rss": base, "peak_rss": peak_load, "rss_after_load": after,
                  "peak_rss_after_a_forward": status("VmHWM"),
                  "weights_bytes": weights, "n_params": sum(p.numel() for p in lm.model.parameters()),
                  "forward_32_tokens_s": t3 - t2, "finite": bool(torch.isfinite(logits).all())}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/dlm-llada-1b", help="where the random checkpoint is written (2 GB)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load_memory.json"))
    args = ap.parse_args()

    from hf_helpers import write_llada_folder

    folder = Path(args.dir)
    size = dict(d_model=2048, n_layers=10, n_heads=16, mlp_hidden_size=5632, vocab_size=126464)
    if not (folder / "model.safetensors.index.json").exists():
        print(f"writing a random 1B LLaDA-format checkpoint to {folder} ...", file=sys.stderr)
        write_llada_folder(folder, **size, n_shards=4)
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(args.threads)], check=True,
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 2**30
    r.update(config=size, files_bytes=sum(f.stat().st_size for f in folder.glob("*.safetensors")),
             peak_over_weights=r["peak_rss"] / r["weights_bytes"],
             peak_minus_baseline_over_weights=(r["peak_rss"] - r["baseline_rss"]) / r["weights_bytes"],
             machine=platform.processor() or platform.machine(), threads=args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(r, indent=2) + "\n")
    print(f"{r['n_params'] / 1e9:.3f}B params, weights {r['weights_bytes'] / gib:.2f} GiB (bf16); load "
          f"{r['load_s']:.1f} s; RSS before {r['baseline_rss'] / gib:.2f} GiB, peak {r['peak_rss'] / gib:.2f} GiB "
          f"= {r['peak_over_weights']:.2f}x the weights ({r['peak_minus_baseline_over_weights']:.2f}x above the "
          f"baseline); one forward of 32 tokens {r['forward_32_tokens_s']:.2f} s")


if __name__ == "__main__":
    main()
