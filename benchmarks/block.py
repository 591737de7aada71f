"""Block diffusion measured: the held-out bound against the block size, and the block sampler's speed.

1. Bound. The same network trained for the same steps on the same batches of Shakespeare bytes as BD3LM
   (`--process bd3lm`) with block sizes 1, 4, 16 and L (= --seq-len; block size L is MDLM), next to the AR baseline
   of the same width and depth. Scored by `dlm eval`'s code on the validation plays: the unclipped bound (the
   exact NLL at block size 1 and for AR) in bits/char. Then BD3LM's data-driven clipping in two passes: the
   interval of least held-out variance found on each unclipped model (`search_clip`), and the block size trained
   again with it (`--clipped`; [1, 1] at block size 1). BD3LM (Arriola et al. 2025, Table 1-3) reports that the
   bound falls from MDLM's toward AR's as the block shrinks; the table says whether this run agrees. Equal steps
   means equal data; a BD3LM step runs 2L tokens (x_t + x_0), so it also spends about 2x the forward compute.
2. Speed. The block-16 model with the block sampler (exact block cache, one token per step, and threshold 0.9)
   against the L-block (MDLM) model with the full-attention LLaDA sampler and Fast-dLLM's dual cache (one token per
   step, and the fast_dllm threshold 0.9), both networks the same size: tokens/s and forwards per token for
   `--lengths` new tokens (128 and 512 by default; beyond the training length the text is poor, the cost is real),
   and the time per token of each block as the sequence grows (the block cache's cost grows only with attention
   over the cached keys; the full-attention canvas is recomputed in part at every step).

3. Speed at equal quality (`--matched`, added to the JSON of the last run as the key "matched"). The same two
   models; for each sampler its speed knob is swept: the block sampler at 1 token/step, thresholds
   `--block-thresholds` and 2 tokens/step; LLaDA + dual cache at 1 token/step, Fast-dLLM's threshold rule (dual
   cache) at `--dllm-thresholds` and 2 tokens/step; LLaDA without a cache as the exact reference (up to
   `--nocache-max` tokens). Greedy, `--samples` held-out 32-byte prompts per length. Quality of every setting:
   the SmolLM2-135M judge's perplexity of the continuations given their prompts (dlm.eval.judge, as `dlm judge`;
   standard error over the prompts) and agreement, the fraction of the new tokens equal to the same sampler's
   1-token-per-step greedy decode of the same prompt (benchmarks/sampling.py's definition). The matched setting
   of a sampler is the one with the fewest forwards per token (then the most tokens/s) among those whose
   agreement is >= `--agreement-min` and whose judge perplexity is at most (1 + `--ppl-tolerance`) x the
   sampler's own 1-token-per-step value; it and the 1-token-per-step row then run the first prompt `--repeats`
   times in a second fresh process (tokens/s: the fastest of these and the sweep's run, 4 by default). Every
   setting runs in a fresh subprocess: peak memory is the growth of the process's resident set (VmHWM after
   Linux's clear_refs peak reset, minus VmRSS before) over its sampling, after one 16-token warm-up; the time
   per token by position comes from the step events.
4. The cost at a real model's shape (`--device cuda --shape llada2-mini`, the key "shape"): a random network of
   LLaDA2.0-mini's shape (MoE, 16B parameters) in bf16, the block sampler (blocks of 32) against LLaDA + dual
   cache: tokens/s, forwards and positions per token, peak CUDA memory, time per token by position.

    python benchmarks/block.py --threads 1 --clipped 1 16         # ~75 min on one (shared) thread here
    python benchmarks/block.py --matched --threads 1              # part 3 only, 45 min on one thread (load 3-13)
    python benchmarks/block.py --quick --out /tmp/block           # smoke run (~1 min)
    python benchmarks/block.py --matched --quick --out /tmp/block # smoke run of part 3 (the trained runs)
    python benchmarks/block.py --device cuda --shape llada2-mini   # part 4, on a GPU (not run here: no GPU)
    python benchmarks/block.py --shape llada2-mini-tiny --shape-lengths 64 --repeats 1 --out /tmp/block  # its smoke run

Writes JSON and a PNG to `--out` (default benchmarks/results/block.{json,png}; part 3 also block_matched.png)
and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dlm.config import ModelConfig, TrainConfig  # noqa: E402
from dlm.data import load_corpus, split_documents  # noqa: E402
from dlm.eval.heldout import evaluate_text  # noqa: E402
from dlm.pipeline import DiffusionLM  # noqa: E402
from dlm.precision import cpu_name  # noqa: E402
from dlm.train import process_config, train  # noqa: E402


def train_one(name: str, args: argparse.Namespace, runs: Path, clip: tuple[float, float] | None = None) -> Path:
    out = runs / name
    if args.fresh and out.exists():
        shutil.rmtree(out)
    model_cfg = ModelConfig.preset(args.preset, arch="ar" if name == "ar" else "llada", max_len=args.max_len)
    if name == "ar":
        pcfg = process_config("masked", loss="ar")
    else:
        pcfg = process_config("bd3lm", block_size=int(name.split("-")[1]),
                              **({"clip_min": clip[0], "clip_max": clip[1]} if clip else {}))
    tcfg = TrainConfig(data="shakespeare", out=str(out), max_steps=args.steps, batch_size=args.batch_size,
                       seq_len=args.seq_len, lr=args.lr, warmup_steps=max(1, args.steps // 20),
                       eval_every=args.steps, eval_batches=2, ckpt_every=args.steps, log_every=max(1, args.steps // 10),
                       seed=0, threads=args.threads, precision="fp32")
    t0 = time.perf_counter()
    train(tcfg, model_cfg, pcfg, show_progress=False)
    print(f"trained {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def bound(run: Path, args: argparse.Namespace) -> dict[str, Any]:
    lm = DiffusionLM.from_pretrained(run)
    L = args.seq_len
    lm.config.model.max_len = L  # score windows of the training length
    r = evaluate_text(lm, "shakespeare", n_samples=args.eval_samples, max_windows=args.eval_windows, batch_size=16)
    return {k: r[k] for k in ("bits_per_char", "stderr", "n_windows", "n_samples", "exact")}


def clip_search(run: Path, args: argparse.Namespace) -> dict[str, Any]:
    """BD3LM's data-driven clipping on held-out windows: the interval of least per-block loss variance."""
    from dlm.data import TokenStream, tokenize_documents
    from dlm.losses import LOSSES
    from dlm.processes.block import search_clip

    lm = DiffusionLM.from_pretrained(run)
    _, val = split_documents(load_corpus("shakespeare"), TrainConfig.val_fraction)
    windows = TokenStream(tokenize_documents(val, lm.tokenizer), args.seq_len).windows(args.clip_windows)
    loss_fn = LOSSES.get("bd3lm").from_config(lm.config.process)
    best, variances = search_clip(lm.model, windows, lm.process, loss_fn, batch_size=16)
    return {"best": list(best), "variance_best": variances[best], "variance_unclipped": variances[(1e-3, 1.0)],
            "candidates": len(variances)}


def timed(lm: DiffusionLM, prompt: str, **opts: Any) -> dict[str, Any]:
    """Generate once (timed) counting the network's forwards and the time of each step event."""
    calls = {"n": 0, "tokens": 0}
    inner = lm.model.forward

    def counting(x, *a, **k):
        calls["n"] += 1
        calls["tokens"] += x.shape[1]
        return inner(x, *a, **k)

    lm.model.forward = counting
    stamps: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    try:
        def note(event):
            stamps.append((time.perf_counter() - t0, int((event.output.xt != lm.tokenizer.mask_id).sum())))
        ids = lm.generate(torch.tensor([lm.tokenizer.encode(prompt)]), callback=note, seed=0, **opts)
    finally:
        lm.model.forward = inner
    if ids.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    n = opts["max_new_tokens"]
    return {"seconds": seconds, "tokens_per_s": n / seconds, "forwards": calls["n"],
            "forwards_per_token": calls["n"] / n, "positions_per_token": calls["tokens"] / n, "stamps": stamps,
            "new_ids": ids[0, -n:].tolist()}


def per_token_curve(stamps: list[tuple[float, int]], n_prompt: int, chunk: int) -> list[tuple[int, float]]:
    """(tokens generated, ms per token over the last `chunk` tokens) from the step stamps."""
    out, last_t, last_n = [], 0.0, n_prompt
    for t, filled in stamps:
        if filled - last_n >= chunk:
            out.append((filled - n_prompt, 1000 * (t - last_t) / (filled - last_n)))
            last_t, last_n = t, filled
    return out


def load_full(runs: Path, seq_len: int) -> DiffusionLM:
    """The L-block model sampled as a full-attention (MDLM) model."""
    full = DiffusionLM.from_pretrained(runs / f"bd3lm-{seq_len}")
    full.config.process.process = "masked"  # the same network, sampled as a full-attention (MDLM) model
    full._process = None
    return full


def load_models(runs: Path, seq_len: int) -> tuple[DiffusionLM, DiffusionLM]:
    """The block-16 model and the L-block model sampled as a full-attention (MDLM) model."""
    return DiffusionLM.from_pretrained(runs / "bd3lm-16"), load_full(runs, seq_len)


def speed(runs: Path, args: argparse.Namespace) -> dict[str, Any]:
    block, full = load_models(runs, args.seq_len)
    prompt = "ROMEO:\n"
    P = len(block.tokenizer.encode(prompt))
    rows: dict[str, Any] = {}
    for n in args.lengths:
        setups = {
            "block, 1 token/step": (block, {"sampler": "block", "steps": n}),
            "block, threshold 0.9": (block, {"sampler": "block", "steps": n, "threshold": 0.9}),
            "llada + dual cache, 1 token/step": (full, {"sampler": "llada", "steps": n, "block_length": 16,
                                                       "cache": "dual"}),
            "fast_dllm 0.9 + dual cache": (full, {"sampler": "fast_dllm", "steps": n, "block_length": 16,
                                                 "cache": "dual", "threshold": 0.9}),
            "llada, no cache, 1 token/step": (full, {"sampler": "llada", "steps": n, "block_length": 16}),
        }
        if n > 1024:  # minutes on one thread: the uncached full canvas is timed up to 1024 tokens
            setups.pop("llada, no cache, 1 token/step")
        for name, (lm, opts) in setups.items():
            lm.config.model.max_len = P + n + 32
            tries = [timed(lm, prompt, max_new_tokens=n, temperature=0.0, **opts) for _ in range(args.repeats)]
            r = min(tries, key=lambda x: x["seconds"])  # the least disturbed of the tries (a shared machine)
            r.pop("new_ids")
            r["ms_per_token_curve"] = per_token_curve(r.pop("stamps"), P, max(16, n // 8))
            rows[f"{name} @ {n}"] = {"sampler": name, "new_tokens": n, **r}
            print(f"{name:34s} n={n:4d}: {r['tokens_per_s']:7.1f} tok/s, {r['forwards_per_token']:.3f} forwards/token",
                  flush=True)
    return rows


# ---- 3. speed at equal quality, memory and time per token against the length -------------------------------

REFERENCE = {"block": "block, 1 token/step", "dual": "llada + dual cache, 1 token/step",
             "nocache": "llada, no cache, 1 token/step"}


def sweep(n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every setting timed at n new tokens: (family, name, model, generate options)."""
    dual = {"block_length": 16, "cache": "dual"}
    out = [("block", REFERENCE["block"], "block", {"sampler": "block", "steps": n})]
    out += [("block", f"block, threshold {t:g}", "block", {"sampler": "block", "steps": n, "threshold": t})
            for t in args.block_thresholds]
    out.append(("block", "block, 2 tokens/step", "block", {"sampler": "block", "steps": n // 2}))
    out.append(("dual", REFERENCE["dual"], "full", {"sampler": "llada", "steps": n, **dual}))
    out += [("dual", f"fast_dllm {t:g} + dual cache", "full", {"sampler": "fast_dllm", "steps": n, "threshold": t,
                                                              **dual}) for t in args.dllm_thresholds]
    out.append(("dual", "llada + dual cache, 2 tokens/step", "full", {"sampler": "llada", "steps": n // 2, **dual}))
    if n <= args.nocache_max:  # the exact full-attention decode: every step recomputes the whole canvas
        out.append(("nocache", REFERENCE["nocache"], "full", {"sampler": "llada", "steps": n, "block_length": 16}))
    return [{"family": f, "name": name, "model": m, "opts": o} for f, name, m, o in out]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Linux: writing 5 to clear_refs sets the peak resident set (VmHWM) to the current one."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One setting in a fresh process: a warm-up, then every prompt once (peak memory over these), then
    `retimes` more runs of the first prompt. -> new ids, forwards, seconds, peak RSS growth, time by position."""
    torch.set_num_threads(spec["threads"])
    runs, n, opts = Path(spec["runs"]), spec["n"], spec["opts"]
    lm = DiffusionLM.from_pretrained(runs / "bd3lm-16") if spec["model"] == "block" else load_full(runs,
                                                                                                 spec["seq_len"])
    prompts = spec["prompts"]
    P = max(len(lm.tokenizer.encode(p)) for p in prompts)
    lm.config.model.max_len = P + n + 32  # nothing slides: the context holds the whole output
    timed(lm, prompts[0], **{**opts, "max_new_tokens": 16, "steps": max(1, opts["steps"] * 16 // n)},
          temperature=0.0)  # warm-up: the first forward's one-time allocations and lazy initialisation
    rss0, reset = _status_kb("VmRSS"), _reset_peak()
    first = [timed(lm, p, max_new_tokens=n, temperature=0.0, **opts) for p in prompts]
    peak_kb = _status_kb("VmHWM") - rss0 if reset else None
    tries = [first[0], *(timed(lm, prompts[0], max_new_tokens=n, temperature=0.0, **opts)
                         for _ in range(spec["retimes"]))]
    best = min(tries, key=lambda r: r["seconds"])
    return {"new_ids": [r["new_ids"] for r in first], "forwards_per_token": [r["forwards_per_token"] for r in first],
            "positions_per_token": [r["positions_per_token"] for r in first],
            "seconds": [r["seconds"] for r in first], "seconds_prompt0": [r["seconds"] for r in tries],
            "peak_rss_growth_mb": None if peak_kb is None else peak_kb / 1024,
            "ms_per_token_curve": per_token_curve(best["stamps"], len(lm.tokenizer.encode(prompts[0])),
                                                  max(16, n // 8))}


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {spec['opts']}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(ids: list[list[int]], ref: list[list[int]]) -> float:
    """The fraction of new tokens equal to the reference decode's at the same position."""
    return sum(int(a == b) for x, y in zip(ids, ref, strict=True) for a, b in zip(x, y, strict=True)) / sum(
        len(x) for x in ids)


def judged(lm: DiffusionLM, ids: list[list[int]], prompts: list[str], judge) -> dict[str, Any]:
    """The judge's perplexity of the continuations (cut at [EOS]) given their prompts, with its standard error
    over the prompts (delta method on the mean per-prompt log perplexity)."""
    from dlm.eval.judge import generative_perplexity

    texts = [lm.decode_new(x) for x in ids]
    r = generative_perplexity(texts, prompts, judge=judge).to_dict()
    logs = [math.log(x) for x in r["per_text_perplexity"]]
    m = len(logs)
    sd = math.sqrt(sum((x - sum(logs) / m) ** 2 for x in logs) / (m - 1)) if m > 1 else float("nan")
    return {"perplexity": r["perplexity"], "perplexity_se": r["perplexity"] * sd / math.sqrt(m),
            "per_prompt_perplexity": r["per_text_perplexity"], "judge_tokens": r["n_tokens"],
            "unigram_entropy": r["unigram_entropy"], "distinct_2": r["distinct_2"], "example": texts[0][:120]}


def pick(rows: dict[str, Any], family: str, args: argparse.Namespace) -> str:
    """The matched setting: fewest forwards per token, then most tokens/s, among the family's settings with
    agreement >= agreement_min and judge perplexity <= (1 + ppl_tolerance) x the 1-token-per-step value."""
    ref = rows[REFERENCE[family]]
    ok = [k for k, r in rows.items() if r["family"] == family and r["agreement"] >= args.agreement_min
          and r["perplexity"] <= (1 + args.ppl_tolerance) * ref["perplexity"]]
    return min(ok, key=lambda k: (rows[k]["forwards_per_token"], -rows[k]["sweep_tokens_per_s"]))


def matched(runs: Path, args: argparse.Namespace, save) -> dict[str, Any]:
    from families import prompts_from

    from dlm.eval.judge import load_judge

    lm = DiffusionLM.from_pretrained(runs / "bd3lm-16")  # its tokenizer and decode_new (both models: bytes)
    _, val = split_documents(load_corpus("shakespeare"), TrainConfig.val_fraction)
    prompts = [lm.tokenizer.decode(p) for p in prompts_from(val, lm.tokenizer, max(args.samples), 32)]
    judge = load_judge()
    out: dict[str, Any] = {
        "config": {"lengths": args.matched_lengths, "samples": args.samples, "prompts": prompts,
                   "block_thresholds": args.block_thresholds, "dllm_thresholds": args.dllm_thresholds,
                   "agreement_min": args.agreement_min, "ppl_tolerance": args.ppl_tolerance,
                   "nocache_max": args.nocache_max, "threads": args.threads, "runs": str(runs),
                   "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                   "torch": torch.__version__, "nice": os.nice(0), "load_average_start": os.getloadavg(),
                   "machine": platform.machine(),
                   "memory": "growth of the resident set (VmHWM after clear_refs minus VmRSS) over the sampling "
                             "of every prompt, in a fresh process per setting after a 16-token warm-up",
                   "judge": "SmolLM2-135M-Instruct (dlm.eval.judge.load_judge)"},
        "lengths": {}}
    t_start = time.perf_counter()
    for n, k in zip(args.matched_lengths, args.samples, strict=True):
        rows: dict[str, Any] = {}
        for st in sweep(n, args):
            spec = {"runs": str(runs), "seq_len": args.seq_len, "model": st["model"], "opts": st["opts"], "n": n,
                    "prompts": prompts[:k], "threads": args.threads, "retimes": 0}
            r = run_worker(spec)
            fw = r.pop("forwards_per_token")
            rows[st["name"]] = {"family": st["family"], "opts": st["opts"], "new_tokens": n, "samples": k,
                                "forwards_per_token": sum(fw) / k, "forwards_per_token_per_prompt": fw,
                                "positions_per_token": sum(r.pop("positions_per_token")) / k,
                                "sweep_tokens_per_s": n * k / sum(r["seconds"]), "load_average": os.getloadavg(),
                                **r}
            print(f"n={n:4d} {st['name']:36s} {rows[st['name']]['forwards_per_token']:.3f} forwards/token "
                  f"{rows[st['name']]['sweep_tokens_per_s']:7.1f} tok/s peak +{_mb(r['peak_rss_growth_mb'])} "
                  f"({time.perf_counter() - t_start:.0f} s)", flush=True)
        exact = rows.get(REFERENCE["nocache"])
        for r in rows.values():
            r["agreement"] = agreement(r["new_ids"], rows[REFERENCE[r["family"]]]["new_ids"])
            if exact is not None:  # with the exact full-attention decode (the dual cache is an approximation)
                r["agreement_with_exact_full"] = (agreement(r["new_ids"], exact["new_ids"])
                                                  if r["family"] != "block" else None)
            r.update(judged(lm, r["new_ids"], prompts[:k], judge))
        chosen = {f: pick(rows, f, args) for f in ("block", "dual")}
        for name in {*(REFERENCE[f] for f in chosen), *chosen.values()} | ({REFERENCE["nocache"]} if exact else set()):
            r = rows[name]  # the fastest run of the first prompt: the sweep's, and `repeats` in a second process
            more = run_worker({"runs": str(runs), "seq_len": args.seq_len, "model": "block" if r["family"] == "block"
                               else "full", "opts": r["opts"], "n": n, "prompts": prompts[:1],
                               "threads": args.threads, "retimes": args.repeats - 1})
            tries = [r["seconds_prompt0"][0], *more["seconds_prompt0"]]
            r["seconds_prompt0"] = tries
            r["tokens_per_s"] = n / min(tries)
            r["forwards_per_token_prompt0"] = r["forwards_per_token_per_prompt"][0]
            if min(more["seconds_prompt0"]) < tries[0]:
                r["ms_per_token_curve"] = more["ms_per_token_curve"]
        for r in rows.values():
            r.pop("new_ids")
        out["lengths"][str(n)] = {"rows": rows, "matched": chosen}
        out["config"]["seconds"] = time.perf_counter() - t_start
        out["config"]["load_average_end"] = os.getloadavg()
        save(out)
        print(matched_table(out, n), flush=True)
    return out


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} MB"


def matched_table(m: dict[str, Any], n: int) -> str:
    L = m["lengths"][str(n)]
    lines = [f"\n{n} new tokens, {L['rows'][REFERENCE['block']]['samples']} prompts:",
             "| sampler | setting | forwards/token | tokens/s | judge ppl | agreement | peak memory |",
             "|---|---|---|---|---|---|---|"]
    for name, r in L["rows"].items():
        mark = " (matched)" if name in L["matched"].values() else ""
        tps = (f"{r['tokens_per_s']:.0f} (best of {len(r['seconds_prompt0'])})" if "tokens_per_s" in r
               else f"{r['sweep_tokens_per_s']:.0f}")
        lines.append(f"| {r['family']} | {name}{mark} | {r['forwards_per_token']:.3f} | {tps} | "
                     f"{r['perplexity']:.1f} ± {r['perplexity_se']:.1f} | {r['agreement']:.3f} | "
                     f"+{_mb(r['peak_rss_growth_mb'])} |")
    return "\n".join(lines)


def matched_summary(m: dict[str, Any]) -> str:
    """The docs' tables: speed at the matched setting, growth with the length, and the sweeps."""
    lengths = list(m["lengths"])
    names = {"block": "block (exact cache)", "dual": "LLaDA + dual cache"}
    out = ["| new tokens | sampler | matched setting | forwards / token | tokens/s matched (1 token/step) | "
           "judge ppl matched (1 token/step) | agreement | unigram entropy |", "|---|---|---|---|---|---|---|---|"]
    for n in lengths:
        L = m["lengths"][n]
        for f, name in L["matched"].items():
            r, ref = L["rows"][name], L["rows"][REFERENCE[f]]
            out.append(f"| {n} | {names[f]} | {name.split(', ', 1)[-1] if f == 'block' else name} | "
                       f"{r['forwards_per_token']:.3f} | {r['tokens_per_s']:.0f} ({ref['tokens_per_s']:.0f}) | "
                       f"{r['perplexity']:.0f} ± {r['perplexity_se']:.0f} ({ref['perplexity']:.0f} ± "
                       f"{ref['perplexity_se']:.0f}) | {r['agreement']:.3f} | {r['unigram_entropy']:.2f} |")
    out += ["", "| sampler, 1 token/step | " + " | ".join(f"ms/token at {n}" for n in lengths) + " | positions/token | "
            + " | ".join(f"peak RSS growth at {n}" for n in lengths) + " |", "|---" * (2 + 2 * len(lengths)) + "|"]
    for f in ("block", "dual", "nocache"):
        rows = [m["lengths"][n]["rows"].get(REFERENCE[f]) for n in lengths]
        out.append(f"| {REFERENCE[f]} | " + " | ".join(f"{1000 / r['tokens_per_s']:.2f}" if r else "-" for r in rows)
                   + " | " + " / ".join(f"{r['positions_per_token']:.0f}" if r else "-" for r in rows) + " | "
                   + " | ".join(f"{r['peak_rss_growth_mb']:.1f} MB" if r and r['peak_rss_growth_mb'] is not None
                                else "-" for r in rows) + " |")
    out += ["", "| setting | " + " | ".join(f"{n}: forwards/token, agreement, judge ppl" for n in lengths) + " |",
            "|---" * (1 + len(lengths)) + "|"]
    for name in m["lengths"][lengths[0]]["rows"]:
        cells = []
        for n in lengths:
            r = m["lengths"][n]["rows"].get(name)
            cells.append("-" if r is None else f"{r['forwards_per_token']:.3f}, {r['agreement']:.3f}, "
                         f"{r['perplexity']:.0f} ± {r['perplexity_se']:.0f}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot_matched(m: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {"block": "C0", "dual": "C1", "nocache": "C2"}
    markers = ["o", "s", "^", "D"]
    lengths = list(m["lengths"])
    for i, n in enumerate(lengths):
        for name, r in m["lengths"][n]["rows"].items():
            chosen = name in m["lengths"][n]["matched"].values()
            a.scatter(r["forwards_per_token"], r["perplexity"], color=colors[r["family"]], marker=markers[i % 4],
                      s=60 if chosen else 20, edgecolors="k" if chosen else "none")
    for i, n in enumerate(lengths):
        a.scatter([], [], color="gray", marker=markers[i % 4], label=f"{n} new tokens")
    for f, col in colors.items():
        a.scatter([], [], color=col, label={"block": "block", "dual": "llada + dual cache",
                                            "nocache": "llada, no cache"}[f])
    a.set_xlabel("forwards per token (each sweep: 1 token/step, thresholds, 2 tokens/step)")
    a.set_ylabel("judge perplexity (SmolLM2-135M)")
    a.set_yscale("log")
    a.set_title("quality against the speed knob (large marker: matched)")
    a.legend(fontsize=7)
    n = lengths[-1]
    for name, r in m["lengths"][n]["rows"].items():
        if name in REFERENCE.values() or name in m["lengths"][n]["matched"].values():
            if r["ms_per_token_curve"]:
                xs, ys = zip(*r["ms_per_token_curve"], strict=True)
                b.plot(xs, ys, marker="o", label=name)
    b.set_xlabel("tokens generated")
    b.set_ylabel("ms per token (over the last chunk)")
    b.set_title(f"time per token by position ({n} new tokens)")
    b.legend(fontsize=7)
    for name in REFERENCE.values():
        pts = [(int(k), v["rows"][name]["peak_rss_growth_mb"]) for k, v in m["lengths"].items() if name in v["rows"]]
        if pts:
            xs, ys = zip(*pts, strict=True)
            c.plot(xs, ys, marker="o", label=name)
    c.set_xscale("log", base=2)
    c.set_xlabel("new tokens")
    c.set_ylabel("peak resident-set growth while sampling (MB)")
    c.set_title("memory against the length")
    c.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- 4. the sampling cost at a real model's shape (random weights; meant for a GPU) --------------------------

# inclusionAI/LLaDA2.0-mini's config.json (the shape only): 20 layers, d 2048, 16 heads / 4 KV heads of 128, the
# first layer dense (5120), then 256 experts of 512 (8 routed in 4 of 8 groups, one shared), vocabulary 157,184;
# about 16B parameters, 1.4B active per token.
LLADA2_MINI = {"hidden_size": 2048, "num_hidden_layers": 20, "num_attention_heads": 16, "num_key_value_heads": 4,
               "head_dim": 128, "intermediate_size": 5120, "moe_intermediate_size": 512, "num_experts": 256,
               "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "num_shared_experts": 1,
               "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
               "score_function": "sigmoid", "partial_rotary_factor": 0.5, "rope_theta": 600000,
               "rms_norm_eps": 1e-6, "use_qk_norm": True, "use_qkv_bias": False, "use_bias": False,
               "max_position_embeddings": 32768, "vocab_size": 157184, "tie_word_embeddings": False}
SHAPES = {"llada2-mini": LLADA2_MINI,  # the same structure scaled down, to run the mode's code on a CPU
          "llada2-mini-tiny": {**LLADA2_MINI, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
                               "moe_intermediate_size": 32, "num_experts": 16, "num_experts_per_tok": 4,
                               "n_group": 4, "topk_group": 2}}


def shape_models(shape: str, device: str, dtype: torch.dtype) -> tuple[DiffusionLM, DiffusionLM, int]:
    """A random network of `shape` on `device` -> (as a block-32 bd3lm model, as a full-attention masked model,
    parameters). The two share the weights."""
    from dlm.config import CheckpointConfig
    from dlm.formats.llada2 import BLOCK_LENGTH, EOS_ID, MASK_ID, model_config
    from dlm.models import build_model, count_params
    from dlm.tokenizer import ByteTokenizer

    cfg = model_config(SHAPES[shape], Path(f"<{shape}>"))

    class Vocab(ByteTokenizer):  # bytes below 256; LLaDA2's mask and EOS ids where the vocabulary holds them
        def __init__(self) -> None:
            super().__init__()
            self.vocab_size = cfg.vocab_size
            if cfg.vocab_size > MASK_ID:
                self.mask_id, self.eos_id, self.pad_id = MASK_ID, EOS_ID, EOS_ID

    torch.manual_seed(0)
    with torch.device(device):
        net = build_model(cfg).to(dtype).eval()
    block = DiffusionLM(net, Vocab(), CheckpointConfig(model=cfg, process=process_config(
        "bd3lm", block_size=BLOCK_LENGTH)), device=device)
    full = DiffusionLM(net, Vocab(), CheckpointConfig(model=cfg, process=process_config("masked")), device=device)
    return block, full, count_params(net)


def shape_speed(args: argparse.Namespace) -> dict[str, Any]:
    """The speed table on a random model of a real shape: tokens/s, forwards and positions per token, peak memory
    (CUDA: torch's peak allocated bytes over the generation; CPU: the resident set's peak growth) and the time per
    token by position, for the block sampler (blocks of 32, LLaDA2's) and LLaDA + dual cache (blocks of 32).
    Greedy after a random 32-token prompt; random weights are rarely confident, so the thresholds save nothing
    here: the rows give the cost per forward at that scale, not the parallel decoding's savings."""
    from dlm.formats.llada2 import THRESHOLD

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.shape_dtype]
    block, full, n_params = shape_models(args.shape, args.device, dtype)
    cuda = args.device.startswith("cuda")
    prompt = block.tokenizer.decode(torch.randint(32, 127, (32,), generator=torch.Generator().manual_seed(0)).tolist())
    out: dict[str, Any] = {"config": {"shape": args.shape, "device": args.device, "dtype": args.shape_dtype,
                                      "parameters": n_params, "lengths": args.shape_lengths, "repeats": args.repeats,
                                      "gpu": torch.cuda.get_device_name() if cuda else None,
                                      "cpu": cpu_name(), "torch": torch.__version__}, "rows": {}}
    for n in args.shape_lengths:
        dual = {"block_length": 32, "cache": "dual"}
        setups = {"block, 1 token/step": (block, {"sampler": "block", "steps": n}),
                  f"block, threshold {THRESHOLD:g}": (block, {"sampler": "block", "steps": n, "threshold": THRESHOLD}),
                  "llada + dual cache, 1 token/step": (full, {"sampler": "llada", "steps": n, **dual}),
                  "fast_dllm 0.9 + dual cache": (full, {"sampler": "fast_dllm", "steps": n, "threshold": 0.9, **dual})}
        for name, (lm, opts) in setups.items():
            lm.config.model.max_len = 32 + n + 32
            timed(lm, prompt, **{**opts, "max_new_tokens": 32, "steps": max(1, opts["steps"] * 32 // n)},
                  temperature=0.0)  # warm-up
            tries, peaks = [], []
            for _ in range(args.repeats):
                if cuda:
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                else:
                    base, _ = _status_kb("VmRSS") * 1024, _reset_peak()
                tries.append(timed(lm, prompt, max_new_tokens=n, temperature=0.0, **opts))
                peaks.append((torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024) - base)
            r = min(tries, key=lambda x: x["seconds"])
            r.pop("new_ids")
            r["ms_per_token_curve"] = per_token_curve(r.pop("stamps"), 32, max(16, n // 8))
            out["rows"][f"{name} @ {n}"] = {"sampler": name, "new_tokens": n, "peak_memory_mb": max(peaks) / 2**20,
                                           **r}
            print(f"{name:34s} n={n:4d}: {r['tokens_per_s']:8.1f} tok/s, {r['forwards_per_token']:.3f} forwards/token, "
                  f"{r['positions_per_token']:.0f} positions/token, peak +{max(peaks) / 2**20:.0f} MB", flush=True)
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(results["bound"])
    a.bar(names, [results["bound"][k]["bits_per_char"] for k in names],
          yerr=[results["bound"][k]["stderr"] for k in names])
    a.set_ylabel("held-out bits/char (bound; exact for AR, block 1)")
    a.set_title(f"bound vs block size ({results['config']['steps']} steps each)")
    a.tick_params(axis="x", rotation=30)
    n = max(results["config"]["lengths"])
    for r in results["speed"].values():
        if r["new_tokens"] == n and r["ms_per_token_curve"]:
            xs, ys = zip(*r["ms_per_token_curve"], strict=True)
            b.plot(xs, ys, marker="o", label=r["sampler"])
    b.set_xlabel("tokens generated")
    b.set_ylabel("ms per token (over the last chunk)")
    b.set_title(f"time per token as the sequence grows ({n} new tokens)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=640, help="model context (sampling 512 tokens needs > 512)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--eval-windows", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--clip-windows", type=int, default=64, help="held-out windows for BD3LM's clipping search")
    ap.add_argument("--clipped", type=int, nargs="*", default=None,
                    help="block sizes to train again with the searched interval (default: all of --blocks)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="time each sampler this many times, keep the fastest")
    ap.add_argument("--reuse-bound", action="store_true", help="keep the bound part of --out/block.json, time again")
    ap.add_argument("--runs", default="runs/block-bench")
    ap.add_argument("--fresh", action="store_true", help="retrain runs that exist (default: resume / reuse them)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 steps, short evaluation and lengths")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--matched", action="store_true",
                    help="part 3 only: speed at equal quality, memory and time per token (adds 'matched' to the JSON)")
    ap.add_argument("--matched-lengths", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--samples", type=int, nargs="+", default=[6, 4, 3], help="prompts per length of --matched")
    ap.add_argument("--block-thresholds", type=float, nargs="+", default=[0.9, 0.5, 0.3, 0.2])
    ap.add_argument("--dllm-thresholds", type=float, nargs="+", default=[0.9, 0.5, 0.3, 0.2])
    ap.add_argument("--agreement-min", type=float, default=0.9)
    ap.add_argument("--ppl-tolerance", type=float, default=0.10)
    ap.add_argument("--nocache-max", type=int, default=512, help="time LLaDA without a cache up to this length")
    ap.add_argument("--shape", choices=sorted(SHAPES),
                    help="part 4 only: the speed table on a random model of this real shape (adds 'shape' to the JSON)")
    ap.add_argument("--device", default="cpu", help="with --shape: cuda (the mode is meant for a GPU) or cpu")
    ap.add_argument("--shape-dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--shape-lengths", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--print-matched", action="store_true", help="with --matched: print the last run's tables")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.shape:
        torch.set_num_threads(args.threads)
        out = Path(args.out)
        previous = out / "block.json"
        results = json.loads(previous.read_text()) if previous.exists() else {}
        results.setdefault("shape", {})[f"{args.shape} on {args.device}"] = shape_speed(args)
        out.mkdir(parents=True, exist_ok=True)
        previous.write_text(json.dumps(results, indent=2) + "\n")
        return
    if args.quick:
        args.steps, args.eval_windows, args.eval_samples, args.lengths, args.clip_windows = 20, 16, 1, [32, 64], 16
        args.matched_lengths, args.samples, args.nocache_max = [32, 64], [2, 2], 64
    torch.set_num_threads(args.threads)
    if args.matched:
        out = Path(args.out)
        previous = out / "block.json"
        results = json.loads(previous.read_text()) if previous.exists() else {}

        def save(m: dict[str, Any]) -> None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "block.json").write_text(json.dumps({**results, "matched": m}, indent=2) + "\n")

        if args.print_matched:  # the tables of the last --matched run, and its plot again
            m = results["matched"]
        else:
            m = matched(Path(args.runs), args, save)
        plot_matched(m, out / "block_matched.png")
        for n in m["lengths"]:
            print(matched_table(m, int(n)))
        print("\n" + matched_summary(m))
        return
    args.clipped = args.blocks if args.clipped is None else args.clipped
    runs = Path(args.runs)
    names = ["ar", *(f"bd3lm-{b}" for b in [*args.blocks, args.seq_len])]
    previous = Path(args.out) / "block.json"
    if args.reuse_bound and previous.exists():  # the bound and clipping parts of the last run, re-measure speed
        old = json.loads(previous.read_text())
        results = {**old, "config": {**old["config"], "lengths": args.lengths, "repeats": args.repeats}}
        results["speed"] = speed(runs, args)
        finish(results, Path(args.out))
        return
    for name in names:
        train_one(name, args, runs)
    results: dict[str, Any] = {
        "config": {**{k: v for k, v in vars(args).items() if k not in ("out",)},
                   "cpu": cpu_name(), "torch": torch.__version__,
                   "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "bound": {}, "speed": {}}
    for name in names:
        results["bound"][name] = bound(runs / name, args)
        print(f"{name:12s} {results['bound'][name]['bits_per_char']:.4f} +- {results['bound'][name]['stderr']:.4f} "
              "bits/char", flush=True)
    # BD3LM's data-driven clipping, in two passes: the interval of least variance found on each unclipped model's
    # held-out loss, then the same block size trained again from scratch with it ([1, 1] at block size 1, where
    # it is the exact, variance-free NLL).
    for b in args.clipped:
        if b > 1:
            results.setdefault("clip_search", {})[f"bd3lm-{b}"] = c = clip_search(runs / f"bd3lm-{b}", args)
            print(f"clip search bd3lm-{b}: best {c['best']} (variance {c['variance_best']:.4g} vs "
                  f"{c['variance_unclipped']:.4g} unclipped)", flush=True)
        clip = (1.0, 1.0) if b == 1 else tuple(c["best"])
        name = f"bd3lm-{b}-clip"
        train_one(name, args, runs, clip)
        results["bound"][name] = {**bound(runs / name, args), "clip": list(clip)}
        print(f"{name:12s} {results['bound'][name]['bits_per_char']:.4f} bits/char (clip {clip})", flush=True)
    results["speed"] = speed(runs, args)
    finish(results, Path(args.out))


def finish(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "block.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "block.png")
    print("\n| model | held-out bits/char |\n|---|---|")
    for name, r in results["bound"].items():
        print(f"| {name} | {r['bits_per_char']:.3f} ± {r['stderr']:.3f}{' (exact)' if r['exact'] else ''} |")
    for name, c in results.get("clip_search", {}).items():
        print(f"\nclip search {name}: [{c['best'][0]:.3g}, {c['best'][1]:.3g}] of {c['candidates']} intervals, "
              f"per-block loss variance {c['variance_best']:.4g} vs {c['variance_unclipped']:.4g} for [1e-3, 1]")
    print("\n| sampler | new tokens | tokens/s | forwards/token |\n|---|---|---|---|")
    for r in results["speed"].values():
        print(f"| {r['sampler']} | {r['new_tokens']} | {r['tokens_per_s']:.1f} | {r['forwards_per_token']:.3f} |")


if __name__ == "__main__":
    main()
