"""Re-train the byte-level Shakespeare model `shakespeare-byte` (masked diffusion + span infilling; the default
until the BPE model of scripts/train_recipes.py replaced it) and its AR baseline `shakespeare-ar`.

    python scripts/train_default.py --which both          # both runs, one after the other (2 threads each)
    python scripts/train_default.py --which dlm --threads 1 &  python scripts/train_default.py --which ar --threads 1
    python scripts/train_default.py --export              # final eval of both + export (bf16) to src/dlm/pretrained/
                                                          #  (shakespeare-byte and shakespeare-ar)

Both runs use the same corpus, size (preset `small`), batch, steps and learning-rate schedule; they differ only
in the attention mask and the loss. Runs resume when re-run (checkpoints every 250 steps under runs/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dlm.config import ModelConfig, ProcessConfig, TrainConfig  # noqa: E402

COMMON = dict(data="shakespeare", batch_size=32, seq_len=256, lr=1.5e-3, warmup_steps=200, weight_decay=0.1,
              bf16=True, ema=0.998, eval_every=500, eval_batches=4, ckpt_every=250, seed=0)


def configs(which: str, max_steps: int, threads: int):
    tcfg = TrainConfig(out=f"runs/default-{which}", max_steps=max_steps, threads=threads, **COMMON)
    if which == "dlm":
        return tcfg, ModelConfig.preset("small"), ProcessConfig(loss="masked_elbo", infill_prob=0.2, max_span=64)
    return tcfg, ModelConfig.preset("small", arch="ar"), ProcessConfig(loss="ar")


def export(n_samples: int) -> None:
    """Score both runs on the held-out plays (`dlm eval`'s code) and export them in bf16 to the package."""
    import torch

    from dlm.checkpoint import save_pretrained
    from dlm.data import load_corpus, split_documents, tokenize_documents, unigram_entropy_bits
    from dlm.eval.heldout import evaluate_text
    from dlm.pipeline import DiffusionLM

    torch.set_num_threads(2)
    results = {}
    for which, name in (("dlm", "shakespeare-byte"), ("ar", "shakespeare-ar")):
        lm = DiffusionLM.from_pretrained(str(ROOT / f"runs/default-{which}"))
        results[which] = evaluate_text(lm, "shakespeare", n_samples=n_samples, seed=0)
        lm.config.extra["heldout_bits_per_char"] = results[which]["bits_per_char"]
        save_pretrained(ROOT / "src/dlm/pretrained" / name, lm.model, lm.config, lm.tokenizer, dtype=torch.bfloat16)
    train_docs, val_docs = split_documents(load_corpus("shakespeare"), TrainConfig.val_fraction)
    tok = lm.tokenizer
    train, val = tokenize_documents(train_docs, tok), tokenize_documents(val_docs, tok)
    n_chars = sum(len(d.text) + 1 for d in val_docs)  # the [EOS] after each play counts as a char
    results["unigram"] = {"bits_per_char": unigram_entropy_bits(train, val, tok.vocab_size) * len(val) / n_chars}
    (ROOT / "benchmarks/results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks/results/default_model.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--which", choices=["dlm", "ar", "both"], default="both")
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--export", action="store_true", help="evaluate both runs and export the DLM to the package")
    ap.add_argument("--eval-samples", type=int, default=8)
    args = ap.parse_args()
    if args.export:
        export(args.eval_samples)
        return
    from dlm.train import train

    for which in (["dlm", "ar"] if args.which == "both" else [args.which]):
        print(json.dumps(train(*configs(which, args.max_steps, args.threads), show_progress=sys.stdout.isatty())))


if __name__ == "__main__":
    main()
