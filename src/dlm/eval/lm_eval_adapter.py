"""lm-evaluation-harness model `dlm`: any model DiffusionLM loads (ours, LLaDA, Dream, AR baselines) on any task.

- `loglikelihood`: log p(continuation | context) with LLaDA's Monte Carlo bound for a diffusion model (`mc_num`
  samples) and the exact value for an AR model (dlm.eval.conditional); `is_greedy` is exact for AR and, for a
  DLM, LLaDA's one-token-per-step greedy check only with `greedy_check=True` (it costs one forward per token).
- `loglikelihood_rolling`: the whole text in chunks of half the context, each scored given the tokens before it
  (the ELBO for a DLM, exact for AR), as the harness's rolling windows.
- `generate_until`: `DiffusionLM.generate` (`steps`, `block_length`, `temperature`, ... as model_args; AR:
  token by token), the answer cut at the first stop sequence.
Upstream: ML-GSAI/LLaDA `eval_llada.py` (its `llada_dist` model). lm-eval 0.4.13 finds models only in its own
registry (no entry-point discovery), so this module registers `dlm` on import and `python -m` runs the harness:

    python -m dlm.eval.lm_eval_adapter --model dlm --model_args pretrained=default,mc_num=32 --tasks hellaswag
    lm_eval.simple_evaluate(model=DLMEvalLM(pretrained="default"), tasks=[...])   # from Python
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

try:
    import lm_eval.models  # noqa: F401  (the built-in models first: get_model imports them only into an empty registry)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the lm-eval adapter needs lm-eval-harness: pip install 'dlm[lmeval]' (lm-eval==0.4.13)") from e

from dlm.eval.complete import complete
from dlm.eval.conditional import answer_is_greedy, conditional_loglik


@register_model("dlm")
class DLMEvalLM(LM):
    def __init__(self, pretrained: str = "default", device: str = "cpu", dtype: str = "float32", mc_num: int = 32,
                 batch_size: int | str | None = None, mc_batch_size: int = 32, seed: int = 0,
                 greedy_check: bool = False, steps: int | None = None, block_length: int | None = None,
                 temperature: float = 0.0, max_gen_toks: int = 128, threads: int | None = None,
                 **sampling: Any) -> None:
        """model_args: pretrained (a shipped name, folder or hub id), mc_num (Monte Carlo samples per
        likelihood), mc_batch_size (rows per forward pass), greedy_check, and generation options: steps (default:
        one per token), block_length (default: one block), temperature, max_gen_toks, any other GenerationConfig
        field (remasking, ...)."""
        super().__init__()
        from dlm.pipeline import DiffusionLM

        if threads:
            from dlm.precision import set_threads

            set_threads(int(threads))
        device = device or "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            # the harness's command line passes --device cuda by default, even on a machine without one
            warnings.warn(f"device {device!r} is not available here; using the CPU", stacklevel=2)
            device = "cpu"
        self.lm = DiffusionLM.from_pretrained(pretrained, device=device, dtype=dtype)
        self.mc_num, self.seed, self.greedy_check = int(mc_num), int(seed), bool(greedy_check)
        # the harness's batch_size (requests at once) does not apply: requests are scored one by one, each with
        # its Monte Carlo samples batched mc_batch_size rows at a time
        self.mc_batch_size = int(mc_batch_size)
        self.steps, self.block_length, self.temperature = steps, block_length, float(temperature)
        self.max_gen_toks = int(max_gen_toks)
        sampling.pop("max_batch_size", None)  # the harness passes these; one request is scored at a time
        self.sampling = sampling

    # ----- tokenisation ------------------------------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Trailing spaces of the context move to the continuation, and the pair is tokenised as one text
        (so a BPE boundary falls as in running text), as the harness's HF model and LLaDA's adapter do."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        enc = self.lm.tokenizer.encode
        whole, ctx = enc(context + continuation), enc(context)
        return ctx, whole[len(ctx):]

    # ----- the three request types -------------------------------------------------------------------------------
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            ctx, cont = self._encode_pair(*req.args)
            ll = conditional_loglik(self.lm, ctx, cont, n_samples=self.mc_num, seed=self.seed,
                                    batch_size=self.mc_batch_size).nats
            greedy = answer_is_greedy(self.lm, ctx, cont) if self.lm.is_causal or self.greedy_check else False
            out.append((ll, greedy))
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        out = []
        chunk = max(1, self.lm.max_len // 2)
        for req in requests:
            ids = self.lm.tokenizer.encode(req.args[0])
            total = 0.0
            for start in range(0, len(ids), chunk):
                before = ids[max(0, start - (self.lm.max_len - chunk)): start]
                total += conditional_loglik(self.lm, before, ids[start: start + chunk], n_samples=self.mc_num,
                                            seed=self.seed + start, batch_size=self.mc_batch_size).nats
            out.append(total)
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", self.temperature))
            if kwargs.pop("do_sample", None) is False:
                temperature = 0.0
            options = dict(self.sampling)
            if not self.lm.is_causal and self.block_length is not None:
                options["block_length"] = int(self.block_length)
            prompt = self.lm.tokenizer.encode(context)
            new = complete(self.lm, prompt, min(n, self.lm.max_len - 1), steps=self.steps, temperature=temperature,
                           seed=self.seed, **options)
            text = self.lm.decode_new(new)  # cut at the first stop id, [PAD] removed
            for stop in until:
                text = text.split(stop)[0] if stop else text
            out.append(text)
        return out


def main() -> None:
    """`python -m dlm.eval.lm_eval_adapter ARGS`: lm-eval's own command line, with the `dlm` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
