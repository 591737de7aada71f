"""The repetition penalty and LLaDA's windowed head: 64 tokens of `shakespeare-smollm2` at its defaults (penalty 1.2,
top-p 0.9 over a 49k vocabulary), with the penalty declaring `reads_canvas` (the window kept) and without it (the
full head and processors at every canvas position, as before), one thread. The two texts must be equal.

    python benchmarks/penalty_window.py     # -> benchmarks/results/penalty_window.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dlm.pipeline import DiffusionLM  # noqa: E402
from dlm.precision import cpu_name  # noqa: E402
from dlm.sampling.processors import RepetitionPenalty  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    lm = DiffusionLM.from_pretrained("shakespeare-smollm2")
    rows, texts = [], []
    for reads in (False, True):
        RepetitionPenalty.reads_canvas = reads
        t0 = time.perf_counter()
        texts.append(lm.generate("JULIET:\nO Romeo, Romeo!", seed=1))
        rows.append({"reads_canvas": reads, "seconds": time.perf_counter() - t0})
    result = {"cpu": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(), "threads": 1,
              "new_tokens": lm.sampling.max_new_tokens, "rows": rows, "same_text": texts[0] == texts[1]}
    (ROOT / "benchmarks/results/penalty_window.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
