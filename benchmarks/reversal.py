"""The reversal curse, DLM vs AR: synthetic facts learned in one direction, and previous-line ranking on Shakespeare.

    python benchmarks/reversal.py --threads 1                   # both parts (measured: ~20 min per model, ~1 h to
                                                                # score Shakespeare, one thread of a busy machine)
    python benchmarks/reversal.py --part facts --n-both 40 --n-test 20 --max-steps 5000 \
        --runs runs/reversal-long --out benchmarks/results/reversal_long.json   # the DLM learns what it saw
    python benchmarks/reversal.py --part facts --score-only     # score the trained runs again
    python benchmarks/reversal.py --part shakespeare --lines 50 # no training: the shipped models

Part `facts` (dlm.eval.reversal): 60 facts seen in both directions and 40 seen in one direction only, one line
each, in a shuffled text; a masked DLM (arch llada) and an AR model (arch ar) of the same preset (tiny: 2 layers,
d=128, byte vocabulary) are trained by the same trainer on the same windows for the same steps. Each test fact is
asked in its seen direction and reversed, after one line of a `both` fact as context (the same for both models):
- exact match of the greedy completion (DLM: one block, one token per step, LLaDA's low-confidence remasking; AR:
  argmax token by token), the name up to the first '.';
- rank-1 accuracy of the true name among 10 by the conditional log-likelihood of " Name." (dlm.eval.conditional:
  the DLM's Monte Carlo bound, the AR's exact value); the 9 others are names of other test facts that training
  showed in the same place (objects for a seen question, subjects for a reversed one).
Part `shakespeare`: consecutive verse lines of the held-out plays (within one speech). Given a line, rank the
true previous line against 9 lines of the same play of similar length (reversed), or the true next line
(forward, the control). AR: the exact joint log p("\\n" + c + "\\n" + line) for reversed (the order of
p(c | line)), log p(c + "\\n" | line + "\\n") for forward. DLM: the same joint bound, and its own infilling
conditional log p(c | "\\n", "\\n" + line) (the candidate masked, the line visible after it).
Writes benchmarks/results/reversal.json (or --out) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dlm.config import ModelConfig, ProcessConfig, TrainConfig  # noqa: E402
from dlm.data import Document, TokenStream, load_corpus, split_documents, tokenize_documents  # noqa: E402
from dlm.eval.complete import complete  # noqa: E402
from dlm.eval.conditional import conditional_loglik  # noqa: E402
from dlm.eval.reversal import Fact, Question, answer_of, make_facts, questions, training_text  # noqa: E402
from dlm.models import count_params  # noqa: E402
from dlm.pipeline import DiffusionLM  # noqa: E402
from dlm.precision import set_threads  # noqa: E402
from dlm.tokenizer import ByteTokenizer  # noqa: E402
from dlm.train import build_trainer, validate  # noqa: E402

ARCHS = {"dlm": "llada", "ar": "ar"}


# ----- part 1: synthetic facts --------------------------------------------------------------------------------------
def train_on_text(arch: str, text: str, args, out: Path) -> tuple[DiffusionLM, dict[str, Any]]:
    tok = ByteTokenizer()
    stream = TokenStream(tokenize_documents([Document("facts", text)], tok), args.seq_len)
    mcfg = ModelConfig.preset(args.preset, arch=arch, max_len=args.max_len, vocab_size=tok.vocab_size)
    pcfg = ProcessConfig(loss="ar") if arch == "ar" else ProcessConfig()
    tcfg = TrainConfig(data="reversal-facts", out=str(out), max_steps=args.max_steps, batch_size=args.batch_size,
                       seq_len=args.seq_len, lr=args.lr, warmup_steps=max(1, args.max_steps // 20), bf16=True,
                       eval_every=args.max_steps, eval_batches=2, ckpt_every=args.max_steps,
                       log_every=max(1, args.max_steps // 10), seed=0, threads=args.threads)
    validate(mcfg, pcfg, tcfg)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: the trainer would resume an old one
    trainer = build_trainer(tcfg, mcfg, pcfg, tok, stream, stream, show_progress=False)
    t0 = time.perf_counter()
    history = trainer.fit()
    info = {"n_params": count_params(trainer.raw), "steps": args.max_steps, "train_seconds": time.perf_counter() - t0,
            "final_train_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None)}
    return DiffusionLM.from_pretrained(str(out)), info


def context_for(q: Question, both: list[Fact], rng: random.Random, n_lines: int) -> str:
    """`n_lines` statements of `both` facts, then the question's stem: what a training window looks like."""
    lines = [rng.choice(both).statement(rng.choice(["forward", "inverse"])) for _ in range(n_lines)]
    return "\n".join(lines) + "\n" + q.prompt


def name_pools(facts: list[Fact]) -> dict[str, list[str]]:
    """The test facts' names by where training showed them: the answer of a seen question is the object of its
    fact's one statement, the answer of a reversed question its subject. Distractors come from the same pool, so
    no candidate is favoured for having (or lacking) the answer slot in training."""
    pools: dict[str, list[str]] = {"seen": [], "reversed": []}
    for f in facts:
        if f.split == "test":
            subject, obj = (f.a, f.b) if f.seen == "forward" else (f.b, f.a)
            pools["seen"].append(obj)
            pools["reversed"].append(subject)
    return pools


def score_facts(lm: DiffusionLM, qs: list[Question], contexts: list[str], pools: dict[str, list[str]],
                args) -> dict[str, Any]:
    enc = lm.tokenizer.encode
    rng = random.Random(1)
    per: dict[str, dict[str, list[bool]]] = {"seen": {"exact": [], "rank1": []}, "reversed": {"exact": [], "rank1": []}}
    examples = []
    for q, ctx in zip(qs, contexts, strict=True):
        new = complete(lm, enc(ctx), args.answer_tokens)
        got = answer_of(lm.tokenizer.decode(new))
        per[q.direction]["exact"].append(got == q.answer.strip())
        others = rng.sample([n for n in pools[q.direction] if n != q.answer.strip()], args.candidates - 1)
        scores = [conditional_loglik(lm, enc(ctx), enc(f" {n}."), n_samples=args.mc, seed=0).nats
                  for n in [q.answer.strip(), *others]]
        per[q.direction]["rank1"].append(scores[0] > max(scores[1:]))
        if len(examples) < 4:
            examples.append({"prompt": q.prompt, "answer": q.answer.strip(), "got": got, "direction": q.direction})
    return {d: {k: sum(v) / len(v) for k, v in m.items()} | {"n": len(m["exact"])} for d, m in per.items()} | \
        {"examples": examples}


def run_facts(args) -> dict[str, Any]:
    facts = make_facts(args.n_both, args.n_test, seed=args.seed)
    text = training_text(facts, repeats=args.repeats, seed=args.seed)
    both = [f for f in facts if f.split == "both"]
    qs = questions(facts)
    rng = random.Random(args.seed)
    contexts = [context_for(q, both, rng, args.context_lines) for q in qs]
    pools = name_pools(facts)
    out: dict[str, Any] = {"n_both": args.n_both, "n_test": args.n_test, "train_bytes": len(text.encode()),
                           "unique_statement_bytes": len(training_text(facts, 1, args.seed).encode()),
                           "preset": args.preset, "seq_len": args.seq_len, "batch_size": args.batch_size,
                           "lr": args.lr, "candidates": args.candidates, "mc_samples": args.mc, "models": {}}
    for name in args.models:
        run = Path(args.runs) / name
        if args.score_only:  # the trained run as it is
            lm = DiffusionLM.from_pretrained(str(run))
            info = {"n_params": lm.config.extra["n_params"], "steps": args.max_steps}
        else:
            lm, info = train_on_text(ARCHS[name], text, args, run)
        t0 = time.perf_counter()
        out["models"][name] = info | score_facts(lm, qs, contexts, pools, args)
        out["models"][name]["eval_seconds"] = time.perf_counter() - t0
        print(json.dumps({"facts": name, **{k: v for k, v in out["models"][name].items() if k != "examples"}}),
              flush=True)
    return out


# ----- part 2: Shakespeare previous line ---------------------------------------------------------------------------
def line_pairs(docs: list[Document], n: int, seed: int, min_chars: int = 20) -> list[dict[str, Any]]:
    """Consecutive verse lines (prev, line, next) inside one speech of the held-out plays, and each play's pool of
    lines (distractors come from the same play)."""
    rng = random.Random(seed)
    items = []
    for d in docs:
        lines = d.text.split("\n")
        pool = [s for s in lines if len(s) >= min_chars and not s.endswith(":") and not s.startswith(("#", "_"))]
        for i in range(1, len(lines) - 1):
            trio = lines[i - 1: i + 2]
            if all(len(s) >= min_chars and not s.endswith(":") and not s.startswith(("#", "_")) for s in trio):
                items.append({"play": d.name, "prev": trio[0], "line": trio[1], "next": trio[2], "pool": pool})
    rng.shuffle(items)
    return items[:n]


def distractors(target: str, pool: list[str], exclude: set[str], k: int, rng: random.Random) -> list[str]:
    """k lines of the same play, the closest in length to `target` among a random draw of 10 k of them."""
    cands = [s for s in pool if s not in exclude]
    rng.shuffle(cands)
    cands = cands[: 10 * k]
    return sorted(cands, key=lambda s: abs(len(s) - len(target)))[:k]


def score_lines(lm: DiffusionLM, items: list[dict[str, Any]], args) -> dict[str, float]:
    enc = lm.tokenizer.encode
    rng = random.Random(args.seed)
    hits: dict[str, list[bool]] = {"reversed": [], "forward": []} | ({} if lm.is_causal else {"reversed_infill": []})
    for it in items:
        exclude = {it["prev"], it["line"], it["next"]}
        for direction in ("reversed", "forward"):
            true = it["prev"] if direction == "reversed" else it["next"]
            cands = [true, *distractors(true, it["pool"], exclude, args.candidates - 1, rng)]
            if direction == "forward":
                s = [conditional_loglik(lm, enc(it["line"] + "\n"), enc(c + "\n"), args.mc, seed=0).nats
                     for c in cands]
            else:
                s = [conditional_loglik(lm, enc("\n"), enc(c + "\n" + it["line"] + "\n"), args.mc, seed=0).nats
                     for c in cands]
            hits[direction].append(s[0] > max(s[1:]))
            if direction == "reversed" and not lm.is_causal:
                s = [conditional_loglik(lm, enc("\n"), enc(c), args.mc, seed=0,
                                        suffix_ids=enc("\n" + it["line"] + "\n")).nats for c in cands]
                hits["reversed_infill"].append(s[0] > max(s[1:]))
    return {k: sum(v) / len(v) for k, v in hits.items()} | {"n": len(items)}


def run_shakespeare(args) -> dict[str, Any]:
    _, val = split_documents(load_corpus("shakespeare"), TrainConfig.val_fraction)
    items = line_pairs(val, args.lines, args.seed)
    out: dict[str, Any] = {"plays": sorted({it["play"] for it in items}), "n_items": len(items),
                           "candidates": args.candidates, "mc_samples": args.mc, "models": {}}
    for name, path in (("dlm", "default"), ("ar", "shakespeare-ar")):
        t0 = time.perf_counter()
        out["models"][name] = score_lines(DiffusionLM.from_pretrained(path), items, args)
        out["models"][name]["seconds"] = time.perf_counter() - t0
        print(json.dumps({"shakespeare": name, **out["models"][name]}), flush=True)
    return out


def tables(result: dict[str, Any]) -> str:
    out = []
    if "facts" in result:
        f = result["facts"]
        out += ["| model | params | steps | seen: exact | reversed: exact | seen: rank-1 of 10 | "
                "reversed: rank-1 of 10 |", "|---|---|---|---|---|---|---|"]
        for name, m in f["models"].items():
            out.append(f"| {name} | {m['n_params'] / 1e6:.2f}M | {m['steps']} | {m['seen']['exact']:.2f} | "
                       f"{m['reversed']['exact']:.2f} | {m['seen']['rank1']:.2f} | {m['reversed']['rank1']:.2f} |")
    if "shakespeare" in result:
        s = result["shakespeare"]
        out += ["", "| model | next line (forward) | previous line (reversed) | previous line, infilling |",
                "|---|---|---|---|"]
        for name, m in s["models"].items():
            infill = f"{m['reversed_infill']:.3f}" if "reversed_infill" in m else "n/a"
            out.append(f"| {name} | {m['forward']:.3f} | {m['reversed']:.3f} | {infill} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["facts", "shakespeare", "both"], default="both")
    ap.add_argument("--score-only", action="store_true", help="score the runs already in --runs (no training)")
    ap.add_argument("--models", nargs="+", default=["dlm", "ar"], choices=list(ARCHS))
    ap.add_argument("--n-both", type=int, default=60)
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=20, help="shuffled copies of the statements in the text")
    ap.add_argument("--context-lines", type=int, default=1, help="lines of `both` facts before each question")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--answer-tokens", type=int, default=12, help="tokens generated for a name")
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--mc", type=int, default=16, help="Monte Carlo samples of the DLM's conditional bound")
    ap.add_argument("--lines", type=int, default=200, help="Shakespeare items")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", default=str(ROOT / "runs/reversal"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/reversal.json"))
    args = ap.parse_args()
    set_threads(args.threads)
    result: dict[str, Any] = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                              "threads": args.threads}
    if args.part in ("facts", "both"):
        result["facts"] = run_facts(args)
    if args.part in ("shakespeare", "both"):
        result["shakespeare"] = run_shakespeare(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # a partial run keeps the other part's (and the other model's) last result
        old = json.loads(out.read_text())
        if "facts" in result and "facts" in old and result["facts"]["n_both"] == old["facts"]["n_both"]:
            olds, news = old["facts"]["models"], result["facts"]["models"]  # a rescored model keeps its training info
            result["facts"]["models"] = olds | {k: olds.get(k, {}) | v for k, v in news.items()}
        result = old | result
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(tables(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
