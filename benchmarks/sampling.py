"""Sampling benchmark: speed, forward passes (NFE) per token and quality of every sampler setting.

    python benchmarks/sampling.py                     # -> benchmarks/results/sampling.json + sampling.png
    python benchmarks/sampling.py --quick             # fewer prompts, for a smoke run

(a) Our LLaDA sampler vs a straightforward re-implementation of the reference loop (full forward and a full-
    vocabulary float64 softmax at every position, every step), same weights, same run, identical tokens checked:
    on the default model and on a random LLaDA-format model with LLaDA's 126,464-token vocabulary.
(b) Every sampler / remasking / threshold / cache setting on the default model: tokens/s, NFE per token,
    agreement with the 1-token-per-step greedy output, and the perplexity of the samples under the AR baseline
    trained on the same data with the same budget (an independent judge arrives with the evaluation issue).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dlm.config import CheckpointConfig, GenerationConfig, ModelConfig  # noqa: E402
from dlm.models import build_model  # noqa: E402
from dlm.pipeline import DiffusionLM  # noqa: E402
from dlm.tokenizer import ByteTokenizer  # noqa: E402

LLADA_VOCAB, LLADA_MASK_ID = 126_464, 126_336
PROMPTS = ["ROMEO:\n", "HAMLET:\nTo be, or not to be,",
           "First Citizen:\nBefore we proceed any further, hear me speak.\n",
           "KING HENRY V:\nOnce more unto the breach, dear friends,", "LADY MACBETH:\n", "JULIET:\nO Romeo, Romeo!",
           "PROSPERO:\nOur revels now are ended.", "OTHELLO:\n"]


# ----- the reference loop, written plainly from LLaDA's generate() --------------------------------------------
@torch.no_grad()
def reference_llada(model_fn, prompt: torch.Tensor, steps: int, gen_length: int, block_length: int, mask_id: int,
                    banned: list[int]) -> tuple[torch.Tensor, int]:
    """Full forward, full-vocabulary float64 softmax at every position, top-k per row, every step."""
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long)
    x[:, :P] = prompt
    n_blocks = gen_length // block_length
    steps_per_block = steps // n_blocks
    nfe = 0
    for b in range(n_blocks):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        n_mask = (x[:, lo:hi] == mask_id).sum(1)
        plan = (n_mask // steps_per_block)[:, None].repeat(1, steps_per_block)
        plan += torch.arange(steps_per_block)[None] < (n_mask % steps_per_block)[:, None]
        for i in range(steps_per_block):
            is_masked = x == mask_id
            logits = model_fn(x)
            nfe += 1
            logits[..., banned] = -torch.inf
            x0 = logits.argmax(-1)
            p = torch.softmax(logits.double(), dim=-1)
            conf = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            conf[:, hi:] = -torch.inf
            x0 = torch.where(is_masked, x0, x)
            conf = torch.where(is_masked, conf, torch.tensor(-torch.inf, dtype=conf.dtype))
            commit = torch.zeros_like(is_masked)
            for j in range(B):
                k = int(plan[j, i])
                if k:
                    commit[j, torch.topk(conf[j], k).indices] = True
            x[commit] = x0[commit]
    return x, nfe


class Counter:
    """Counts the network's forward passes (a forward hook): a cached or reused step costs what it really costs."""

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        self.n = 0
        if model is not None:
            model.register_forward_hook(lambda *args: self.bump())

    def bump(self) -> None:
        self.n += 1

    def __call__(self, event) -> None:  # as a denoising callback: one StepEvent per step
        self.bump()


def _time(fn, repeats: int) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def part_a(lm: DiffusionLM, name: str, prompt_ids: torch.Tensor, gen_lengths: list[int], repeats: int,
           max_steps: int | None = None) -> list[dict]:
    rows = []
    tok = lm.tokenizer
    banned = [tok.mask_id, tok.bos_id, tok.pad_id]
    model_fn = lm.model_fn()
    for n in gen_lengths:
        if prompt_ids.shape[1] + n > lm.max_len:
            continue
        steps, block = min(n, max_steps or n), min(32, n)
        counter = Counter()
        run_ref = functools.partial(reference_llada, model_fn, prompt_ids, steps, n, block, tok.mask_id, banned)
        run_ours = functools.partial(lm.generate, prompt_ids, max_new_tokens=n, steps=steps, block_length=block,
                                     callback=counter)
        t_ref = t_ours = math.inf
        for _ in range(repeats):  # interleaved, best of each: both see the same machine state
            t, (ref, nfe_ref) = _time(run_ref, 1)
            t_ref = min(t_ref, t)
            t, ours = _time(run_ours, 1)
            t_ours = min(t_ours, t)
        rows.append({"model": name, "gen_length": n, "steps": steps, "block_length": block,
                     "batch": int(prompt_ids.shape[0]), "reference_s": round(t_ref, 4), "ours_s": round(t_ours, 4),
                     "speedup": round(t_ref / t_ours, 3), "identical_tokens": bool(torch.equal(ref, ours)),
                     "nfe_reference": nfe_ref, "nfe_ours": counter.n // repeats})
        print(json.dumps(rows[-1]), flush=True)
    return rows


@torch.no_grad()
def ar_bits_per_token(ar_model, tok, prompt_ids: list[int], new_ids: list[int]) -> float:
    """Exact bits/token of the generated tokens under the AR baseline, conditioned on the prompt."""
    seq = torch.tensor([[tok.bos_id] + prompt_ids + new_ids])
    logits = ar_model(seq[:, :-1], None).float()
    logp = torch.log_softmax(logits, -1).gather(-1, seq[:, 1:, None]).squeeze(-1)[0]
    return float(-logp[len(prompt_ids):].mean()) / math.log(2)


def part_b(lm: DiffusionLM, ar_model, prompts: list[str], n: int, settings: list[dict]) -> list[dict]:
    tok = lm.tokenizer
    base = {"max_new_tokens": n, "block_length": 32, "temperature": 0.0, "seed": 0}
    reference = {p: lm.generate(p, **base, steps=n) for p in prompts}  # 1 token per step
    forwards = Counter(lm.model)
    rows = []
    for s in settings:
        opts = {**base, **s}
        nfe, agree, total, bits, secs = 0, 0, 0, [], 0.0
        for p in prompts:
            before = forwards.n
            t0 = time.perf_counter()
            ids = lm.generate(torch.tensor([tok.encode(p)]), **opts)
            secs += time.perf_counter() - t0
            nfe += forwards.n - before
            new = ids[0, len(tok.encode(p)):].tolist()
            ref = tok.encode(reference[p])
            ref = ref + [tok.eos_id] * (n - len(ref))
            agree += sum(int(a == b) for a, b in zip(new, ref, strict=False))
            total += n
            if ar_model is not None:
                bits.append(ar_bits_per_token(ar_model, tok, tok.encode(p), new))
        row = {"setting": s, "nfe_per_token": round(nfe / (len(prompts) * n), 4),
               "tokens_per_s": round(len(prompts) * n / secs, 1), "agreement": round(agree / total, 4),
               "ar_ppl": round(2 ** (sum(bits) / len(bits)), 3) if bits else None}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def settings_for(n: int) -> list[dict]:
    from dlm.sampling import SAMPLERS

    out = [{"sampler": "llada", "steps": n}, {"sampler": "llada", "steps": n // 2},
           {"sampler": "llada", "steps": n // 4}, {"sampler": "llada", "steps": n, "remasking": "random"}]
    if "dream" in SAMPLERS:
        for rule in ("maskgit_plus", "topk_margin", "entropy"):
            out.append({"sampler": "dream", "steps": n, "remasking": rule})
        out.append({"sampler": "dream", "steps": n // 2, "remasking": "entropy"})
    if "mdlm" in SAMPLERS:
        out += [{"sampler": "mdlm", "steps": n}, {"sampler": "mdlm_cache", "steps": n}]
    if "fast_dllm" in SAMPLERS:
        for tau in (0.9, 0.7, 0.5, 0.3, 0.1):
            for cache in ("none", "prefix", "dual"):
                out.append({"sampler": "fast_dllm", "steps": n, "threshold": tau, "cache": cache})
        out.append({"sampler": "fast_dllm", "steps": n, "factor": 1.0, "cache": "dual"})
    return out


def random_llada_format_model(max_len: int = 512) -> DiffusionLM:
    """Our LLaDA-style network with LLaDA's real vocabulary size and mask id, random weights."""

    class BigVocab(ByteTokenizer):
        def __init__(self) -> None:
            super().__init__()
            self.vocab_size = LLADA_VOCAB
            self.mask_id = LLADA_MASK_ID
            self.eos_id, self.pad_id, self.bos_id = 126_081, 126_081, 126_080

    torch.manual_seed(0)
    cfg = CheckpointConfig(model=ModelConfig.preset("tiny", vocab_size=LLADA_VOCAB, max_len=max_len))
    return DiffusionLM(build_model(cfg.model).eval(), BigVocab(), cfg)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        s = r["setting"]
        label = s["sampler"] + (f" τ={s['threshold']}" if s.get("threshold") else "") + \
            (f" {s['cache']}" if s.get("cache", "none") != "none" else "") + \
            (f" {s['remasking']}" if s.get("remasking") else "") + f" {s['steps']}st"
        ax.scatter(r["nfe_per_token"], r["agreement"], s=20)
        ax.annotate(label, (r["nfe_per_token"], r["agreement"]), fontsize=6)
    ax.set_xlabel("forward passes per generated token (NFE/token)")
    ax.set_ylabel("agreement with 1-token-per-step greedy output")
    ax.set_title("Sampling settings on the default model")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--part-b-lengths", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each part (a) timing")
    ap.add_argument("--only-a", action="store_true", help="re-measure part (a); keep part (b) of the existing JSON")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/sampling.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    prompts = PROMPTS[:2] if args.quick else PROMPTS

    lm = DiffusionLM.from_pretrained("default")
    tok = lm.tokenizer
    ids = torch.tensor([tok.encode("ROMEO:\n")] * 4)
    a_rows = part_a(lm, "default", ids, [64, 128], repeats)
    big = random_llada_format_model()
    big_ids = torch.randint(0, 126_000, (2, 16), generator=torch.Generator().manual_seed(0))
    a_rows += part_a(big, "random-llada-vocab", big_ids, [64, 256], 1, max_steps=64)

    if args.only_a:
        previous = json.loads(Path(args.out).read_text())
        previous["part_a"] = a_rows
        Path(args.out).write_text(json.dumps(previous, indent=2) + "\n")
        print(f"updated part (a) of {args.out}")
        return
    ar = None
    try:
        ar = DiffusionLM.from_pretrained("shakespeare-ar").model
    except Exception as e:  # the AR judge is optional: without it the quality column is agreement only
        print(f"no AR baseline judge: {e}", file=sys.stderr)
    b_rows = []
    for n in ([64] if args.quick else args.part_b_lengths):
        b_rows += [dict(r, gen_length=n) for r in part_b(lm, ar, prompts, n, settings_for(n))]
    result = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "part_a": a_rows, "part_b": b_rows,
              "defaults": GenerationConfig().to_dict()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot([r for r in b_rows if r["gen_length"] == 64], out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
