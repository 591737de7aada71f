"""The log-likelihood of an answer given a prompt: LLaDA's Monte Carlo bound for masked diffusion, exact for AR.

Masked diffusion (Nie et al. 2025, "Large Language Diffusion Models", eq. 6 and appendix B.5): only the answer's
La tokens are ever masked; a sample draws a mask count l in 1..La, masks l answer positions uniformly, and scores
(La / l) * sum of the masked positions' cross-entropies given the prompt and the visible answer tokens. Its mean
is an upper bound on -log p(answer | prompt) (equal to it for an exact denoiser: the bound is the average over
decoding orders of the chain rule). The mask counts of the n samples are stratified (one uniform offset, n evenly
spaced quantiles of U{1..La}, as upstream's `forward_process`), and everything is accumulated in float64.
Autoregressive models: the exact sum of log p(answer_i | [BOS], prompt, answer_<i).
Upstream: ML-GSAI/LLaDA `get_log_likelihood.py` (the estimator) and `eval_llada.py` (`suffix_greedy_prediction`,
the greedy check lm-eval-harness asks for). Only masked-process checkpoints (and AR) are supported: the SEDD and
D3PM families score with their own bound (dlm/eval/elbo.py), which has no conditional form here.

    ll = conditional_loglik(lm, tok.encode("ROMEO:"), tok.encode(" Good morrow."), n_samples=64, seed=0)
    ll.nats, ll.stderr            # log p(answer | prompt) (a lower bound for a DLM) and its standard error
    answer_is_greedy(lm, prompt_ids, answer_ids)   # would greedy decoding produce the answer?
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from dlm.eval.elbo import llada_nats, mask_counts, mask_exactly, stratified_u
from dlm.losses import token_ce
from dlm.sampling.processors import special_ids_to_suppress


class LogLik(NamedTuple):
    """Unpacks as (nats, stderr). nats: log p(answer | prompt) in nats (<= 0; a lower bound for a DLM)."""

    nats: float
    stderr: float  # standard error of the Monte Carlo mean (0 for AR: exact)


def _check(lm: Any) -> None:
    process = getattr(getattr(lm.config, "process", None), "process", "masked")
    if not lm.is_causal and process != "masked":
        raise ValueError(f"the conditional log-likelihood needs a masked-diffusion or AR model, not a {process!r} "
                         "model (its family scores whole windows with its own bound: dlm eval)")


def _fit(prompt: list[int], answer: list[int], room: int) -> list[int]:
    """The prompt cut from the left so that prompt + answer (+ suffix) fit in `room` tokens."""
    if len(answer) > room:
        raise ValueError(f"the answer (and suffix) have {len(answer)} tokens but the model's context holds {room}")
    return prompt[len(prompt) - min(len(prompt), room - len(answer)):]


def stratified_counts(n: int, La: int, generator: torch.Generator) -> torch.Tensor:
    """n mask counts in 1..La: one uniform offset and n evenly spaced quantiles of U{1..La} -> (n,) long."""
    return mask_counts(stratified_u(n, generator, torch.float64), La)


@torch.no_grad()
def _ar_loglik(lm: Any, prompt: list[int], answer: list[int]) -> LogLik:
    prompt = _fit(prompt, answer, lm.max_len)
    seq = torch.tensor([[lm.tokenizer.bos_id, *prompt, *answer]], device=lm.device)  # (1, 1 + P + La)
    logits = lm.model(seq[:, :-1], None)  # (1, P + La, V): position i predicts token i + 1
    ce = token_ce(logits, seq[:, 1:])[0, len(prompt):]  # (La,)
    return LogLik(-float(ce.double().sum()), 0.0)


def _model_time(lm: Any, xt: torch.Tensor) -> torch.Tensor | None:
    """The process's t for a time-conditioned network (`model_time`, as sampling uses); None for the others."""
    return lm.process.model_time(xt) if getattr(lm.model, "needs_time", False) else None


@torch.no_grad()
def _masked_loglik(lm: Any, prompt: list[int], answer: list[int], suffix: list[int], n_samples: int, seed: int,
                   batch_size: int) -> LogLik:
    prompt = _fit(prompt, answer + suffix, lm.max_len)
    P, La, N = len(prompt), len(answer), len(prompt) + len(answer) + len(suffix)
    mask_id = lm.tokenizer.mask_id
    g = torch.Generator().manual_seed(seed)
    counts = stratified_counts(n_samples, La, g)  # (n,)
    x0 = torch.tensor([prompt + answer + suffix], device=lm.device)  # (1, N)
    estimates = torch.zeros(n_samples, dtype=torch.float64)
    for start in range(0, n_samples, batch_size):
        l = counts[start: start + batch_size]  # (B,)
        B = l.numel()
        is_masked = torch.zeros(B, N, dtype=torch.bool)
        is_masked[:, P: P + La] = mask_exactly(l, La, g)  # exactly l[b] masked answer positions, the rest never
        is_masked = is_masked.to(lm.device)
        xt = torch.where(is_masked, mask_id, x0.expand(B, -1))  # (B, N)
        t = _model_time(lm, xt)  # (B,) the time a time-conditioned network sees for this canvas
        logits = lm.model(xt, t).float()  # (B, N, V)
        estimates[start: start + B] = llada_nats(logits, x0.expand(B, -1), is_masked, l, La, mask_id).cpu()
    stderr = float(estimates.std() / math.sqrt(n_samples)) if n_samples > 1 else float("nan")
    return LogLik(-float(estimates.mean()), stderr)


def conditional_loglik(lm: Any, prompt_ids: list[int], answer_ids: list[int], n_samples: int = 32,
                       seed: int = 0, batch_size: int = 32, suffix_ids: list[int] | None = None) -> LogLik:
    """log p(answer | prompt) in nats and its standard error for a loaded DiffusionLM (or anything with its
    `model`, `tokenizer`, `config`, `max_len`, `is_causal` and `device`). A prompt too long for the context is cut
    from the left. AR: exact (stderr 0). Masked diffusion: the mean of `n_samples` stratified LLaDA estimates, a
    lower bound in expectation; the stderr treats the samples as independent (stratification only lowers it).

    `suffix_ids` (masked diffusion only): known text after the answer, so the answer is scored in its gap:
    log p(answer | prompt, suffix). An AR model cannot condition on the future; rank answers by the joint
    `conditional_loglik(lm, prompt, answer + suffix)` instead (the same order, since p(suffix | prompt) is fixed).
    """
    _check(lm)
    prompt, answer = [int(i) for i in prompt_ids], [int(i) for i in answer_ids]
    suffix = [int(i) for i in suffix_ids or []]
    if not answer:
        return LogLik(0.0, 0.0)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if lm.is_causal:
        if suffix:
            raise ValueError("an AR model cannot condition on text after the answer: score the joint "
                             "conditional_loglik(lm, prompt, answer + suffix) instead")
        return _ar_loglik(lm, prompt, answer)
    return _masked_loglik(lm, prompt, answer, suffix, n_samples, seed, batch_size)


@torch.no_grad()
def answer_is_greedy(lm: Any, prompt_ids: list[int], answer_ids: list[int]) -> bool:
    """Would greedy decoding write exactly the answer after the prompt? AR: the argmax at every answer position.
    Masked diffusion: LLaDA's `suffix_greedy_prediction`, the answer span fully masked and filled one token per
    step, the most confident first (La forward passes), with the tokens the sampler bans banned."""
    _check(lm)
    prompt, answer = [int(i) for i in prompt_ids], [int(i) for i in answer_ids]
    if not answer:
        return True
    prompt = _fit(prompt, answer, lm.max_len)
    P, La = len(prompt), len(answer)
    target = torch.tensor(answer, device=lm.device)
    if lm.is_causal:
        seq = torch.tensor([[lm.tokenizer.bos_id, *prompt, *answer[:-1]]], device=lm.device)
        return bool((lm.model(seq, None)[0, P:].argmax(-1) == target).all())
    tok = lm.tokenizer
    # Banned as the sampler bans them (dlm.sampling.processors): [MASK], and [BOS] / [PAD] unless they are [EOS].
    banned = special_ids_to_suppress(tok)
    canvas = torch.tensor([prompt + [tok.mask_id] * La], device=lm.device)  # (1, P + La)
    for _ in range(La):
        is_masked = canvas[0] == tok.mask_id  # (P + La,)
        t = _model_time(lm, canvas)  # (1,)
        logits = lm.model(canvas, t)[0].float()  # (P + La, V)
        logits[:, banned] = -torch.inf
        conf, x0 = torch.softmax(logits.double(), -1).max(-1)  # (P + La,) float64, as the sampler scores
        conf = torch.where(is_masked, conf, -torch.inf)
        best = int(conf.argmax())
        canvas[0, best] = x0[best]
    return bool((canvas[0, P:] == target).all())
