"""Instruction-following demo: SFT the shipped default model on "Who says: <line>?" -> "<SPEAKER>".

    python benchmarks/sft_demo.py --task closed --threads 1            # -> benchmarks/results/sft_demo_closed.json
    python benchmarks/sft_demo.py --task open --scene 2 --threads 1    # -> benchmarks/results/sft_demo_open2.json

The questions come from the training plays of the default model (dlm.data's split, so no held-out play).

- closed: the line alone. Lines of 25-80 characters spoken by the most frequent speakers, one speaker per play (so
  a line's words can tell its play, hence its speaker), the same number per speaker: guessing gets 1 / speakers.
  Questions on lines that are not in the SFT set are held out.
- open: consecutive speeches of a scene (`NAME: first line`, `--scene` speakers) come before the question, which
  asks who says one of their lines: the answer is in the prompt, and a guess among its names gets 1 / scene.
  Held-out questions come from plays (every sixth) no SFT question was drawn from.

The model answers greedily (the llada sampler, 16 tokens) before and after SFT through dlm.sft's fallback chat
format, and its answer is the first line it writes; `well_formed` counts answers that are a name it could mean,
and the accuracy on as many of the SFT questions tells what SFT taught apart from what generalises.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dlm.config import SFTConfig, TrainConfig  # noqa: E402
from dlm.data import Document, load_corpus, split_documents  # noqa: E402
from dlm.pipeline import DiffusionLM  # noqa: E402
from dlm.sft import fallback_prompt, finetune  # noqa: E402

SPEECH = re.compile(r"^([A-Z][A-Z .'-]+):\n((?:.+\n)+)", re.MULTILINE)


def training_plays() -> list[Document]:
    return split_documents(load_corpus("shakespeare"), TrainConfig.val_fraction)[0]


# ----- closed book: the line alone ----------------------------------------------------------------------------
def speaker_lines(plays: list[Document]) -> dict[str, dict[str, list[str]]]:
    """Play -> speaker -> distinct lines of 25-80 characters (first occurrence in the training plays)."""
    lines: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    seen: set[str] = set()
    for doc in plays:
        for m in SPEECH.finditer(doc.text):
            for line in m.group(2).splitlines():
                line = line.strip()
                if 25 <= len(line) <= 80 and line not in seen and not line.startswith("["):
                    seen.add(line)
                    lines[doc.name][m.group(1)].append(line)
    return lines


def closed_book(n_speakers: int, train_per: int, test_per: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """The n speakers with the most lines, one per play, skipping names used in several plays (GLOUCESTER)."""
    plays = speaker_lines(training_plays())
    count = Counter(s for speakers in plays.values() for s in speakers)
    best = sorted(((len(ls), s, play) for play, speakers in plays.items() for s, ls in speakers.items()
                   if count[s] == 1 and len(ls) >= train_per + test_per), reverse=True)
    train, test, used = [], [], set()
    for _, speaker, play in best:
        if play in used or len(used) == n_speakers:
            continue
        used.add(play)
        qa = [{"question": f'Who says: "{line}"?', "answer": speaker, "names": None}
              for line in rng.sample(plays[play][speaker], train_per + test_per)]
        train += qa[:train_per]
        test += qa[train_per:]
    names = sorted({q["answer"] for q in test})
    for q in train + test:
        q["names"] = names
    rng.shuffle(train)
    return train, test


# ----- open book: the scene in the prompt ---------------------------------------------------------------------
def open_book(n_train: int, n_test: int, n_speeches: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    train, test = [], []
    for i, doc in enumerate(training_plays()):
        speeches = [(m.group(1), m.group(2).splitlines()[0].strip()) for m in SPEECH.finditer(doc.text)]
        for k in range(len(speeches) - n_speeches + 1):
            window = speeches[k:k + n_speeches]
            if len({s for s, _ in window}) < n_speeches or not all(15 <= len(line) <= 45 for _, line in window):
                continue
            speaker, line = rng.choice(window)
            scene = "\n".join(f"{s}: {ln}" for s, ln in window)
            q = {"question": f'{scene}\nWho says: "{line}"?', "answer": speaker, "names": [s for s, _ in window]}
            if len(q["question"]) > 200:  # prompt and a 16-token answer within the model's 256
                continue
            (test if i % 6 == 3 else train).append(q)
    rng.shuffle(train)
    rng.shuffle(test)
    return train[:n_train], test[:n_test]


# ----- answering and scoring ----------------------------------------------------------------------------------
def answers(lm: DiffusionLM, questions: list[str], batch: int = 32) -> list[str]:
    prompts = [fallback_prompt([{"role": "user", "content": q}]) for q in questions]
    out = []
    for i in range(0, len(prompts), batch):
        texts = lm.generate(prompts[i:i + batch], max_new_tokens=16, steps=16, block_length=16, temperature=0.0)
        out += [t.strip().split("\n")[0].strip() for t in texts]
    return out


def score(lm: DiffusionLM, test: list[dict]) -> dict[str, object]:
    got = answers(lm, [q["question"] for q in test])
    return {"accuracy": sum(g == q["answer"] for g, q in zip(got, test, strict=True)) / len(test),
            "well_formed": sum(g in q["names"] for g, q in zip(got, test, strict=True)) / len(test), "answers": got}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=["closed", "open"], default="open")
    ap.add_argument("--speakers", type=int, default=8, help="closed: speakers (one per play)")
    ap.add_argument("--train-per", type=int, default=300, help="closed: SFT questions per speaker")
    ap.add_argument("--test-per", type=int, default=25, help="closed: held-out questions per speaker")
    ap.add_argument("--train", type=int, default=2400, help="open: SFT questions")
    ap.add_argument("--test", type=int, default=200, help="open: held-out questions")
    ap.add_argument("--scene", type=int, default=2, help="open: speeches (speakers) in the prompt")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    ap.add_argument("--run", default="/tmp/dlm-sft-demo", help="run folder (chats.jsonl and checkpoints)")
    ap.add_argument("--out", help="default: benchmarks/results/sft_demo_closed.json, sft_demo_open<scene>.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run) / args.task
    run.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    train, test = closed_book(args.speakers, args.train_per, args.test_per, rng) if args.task == "closed" else \
        open_book(args.train, args.test, args.scene, rng)
    chats = run / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q["question"]},
                                                      {"role": "assistant", "content": q["answer"]}]}) + "\n"
                             for q in train))
    before = score(DiffusionLM.from_pretrained("default"), test)
    print(f"before SFT: {before['accuracy']:.3f}", flush=True)
    t1 = time.perf_counter()
    tcfg = TrainConfig(data=str(chats), out=str(run / "sft"), max_steps=args.steps, batch_size=args.batch_size,
                       seq_len=256, lr=args.lr, warmup_steps=20, bf16=not args.fp32, ckpt_every=args.steps,
                       log_every=10, threads=args.threads)
    summary = finetune(SFTConfig(data=str(chats)), tcfg, model="default", show_progress=False)
    t2 = time.perf_counter()
    tuned = DiffusionLM.from_pretrained(run / "sft")
    after = score(tuned, test)
    seen = score(tuned, train[:len(test)])  # questions it was fine-tuned on: what SFT taught, not generalisation
    print(f"after SFT: {after['accuracy']:.3f} (on SFT questions: {seen['accuracy']:.3f})", flush=True)
    chance = 1 / len(test[0]["names"])
    result = {
        "task": args.task, **({"scene": args.scene} if args.task == "open" else {}), "sft_questions": len(train),
        "held_out_questions": len(test), "chance": chance,
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "well_formed_before": before["well_formed"], "well_formed_after": after["well_formed"],
        "accuracy_after_on_sft_questions": seen["accuracy"],
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "bf16": not args.fp32,
        "threads": args.threads, "sft_seconds": round(t2 - t1, 1), "final_loss": summary["final_loss"],
        "torch": torch.__version__,
        "examples": [{"question": q["question"], "answer": q["answer"], "before": b, "after": a} for q, b, a in
                     list(zip(test, before["answers"], after["answers"], strict=True))[::max(1, len(test) // 8)][:8]],
    }
    name = "closed" if args.task == "closed" else f"open{args.scene}"
    out = Path(args.out or ROOT / f"benchmarks/results/sft_demo_{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}))


if __name__ == "__main__":
    main()
