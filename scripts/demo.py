"""`make demo`: generation and infilling with the small default model that ships in the repo.

Runs offline on a CPU in seconds. Everything shown here is one library call; see README.md for the CLI.
"""

from __future__ import annotations

import time

import dlm
from dlm.precision import set_threads
from dlm.progress import Bar

# The sections done so far, on the terminal's stderr (transient; nothing in a pipe or a log).
BAR = Bar("demo", total=None)


def show(title: str, text: str, seconds: float) -> None:
    print(f"\n=== {title} ({seconds:.1f} s) " + "=" * max(0, 60 - len(title)))
    print(text)
    BAR.advance()


def main() -> None:
    t0 = time.perf_counter()
    lm = dlm.DiffusionLM.from_pretrained("default")
    n_params = sum(p.numel() for p in lm.model.parameters())
    tok = lm.tokenizer
    units = "byte-level" if tok.vocab_size == 260 else f"BPE ({tok.vocab_size} tokens)"
    print(f"loaded the default model: {n_params / 1e6:.1f}M parameters, {lm.config.model.n_layers} layers, "
          f"{units}, trained on {lm.config.extra.get('data')} ({time.perf_counter() - t0:.1f} s)")
    s = lm.sampling
    defaults = (f"{s.max_new_tokens} tokens, {s.steps} steps, blocks of {s.block_length}, temperature "
                f"{s.temperature:g}" + (f", top-p {s.top_p:g}" if s.top_p else "") +
                (f", repetition penalty {s.repetition_penalty:g}" if s.repetition_penalty != 1.0 else ""))

    for i, prompt in enumerate(("ROMEO:\n", "JULIET:\nO Romeo, Romeo!")):
        t = time.perf_counter()
        out = lm.generate(prompt, seed=i)  # the model's own sampling defaults (generation_config.json)
        show(f"generate at the defaults: {defaults}", prompt + out, time.perf_counter() - t)

    t = time.perf_counter()
    out = lm.generate("ROMEO:\n", max_new_tokens=64, steps=64, block_length=32, temperature=0.0, seed=0)
    show("generate: greedy, 64 tokens, 64 steps", "ROMEO:\n" + out,
         time.perf_counter() - t)

    # [MASK:n] is a gap of exactly n tokens (BPE tokens are about 3 characters); a bare [MASK] is up to max_span.
    for text in ("To be, or not to be,[MASK:4] is the question.",
                 "KING HENRY:\nOnce more unto the breach, dear friends,[MASK:8]\nOr close the wall up with our dead.",
                 "HAMLET:\nWhat a piece of work is[MASK:4]!\n\nOPHELIA:\n[MASK:12]\n"):
        t = time.perf_counter()
        show("infill", f"{text}\n  ->\n{lm.infill(text, seed=0)}", time.perf_counter() - t)

    print("\nstep by step: the canvas after each of 8 denoising steps, 4 tokens each ([MASK] shown as ░)")
    canvas_steps: list[str] = []

    def record(event) -> None:
        ids = event.output.xt[0].tolist()
        canvas_steps.append("".join("░" if i == tok.mask_id else tok.decode([i]) for i in ids))

    lm.generate("ROMEO:\nBut soft,", max_new_tokens=32, steps=8, block_length=32, seed=0, callback=record)
    for i, c in enumerate(canvas_steps, 1):
        print(f"{i:2d} | " + c.replace("\n", "⏎"))


if __name__ == "__main__":
    set_threads()  # one fewer than the CPUs: another busy process cannot stall torch's threads (dlm.precision)
    with BAR:
        main()
