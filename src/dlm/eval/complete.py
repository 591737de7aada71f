"""One completion routine for both kinds of checkpoint: a diffusion model samples with its sampler
(`DiffusionLM.generate`), an AR baseline decodes token by token (DiffusionLM refuses to sample it).

Used by the reversal benchmark and the lm-eval-harness adapter, which ask every model the same way.

    ids = complete(lm, tok.encode("ROMEO:"), max_new_tokens=32)          # greedy, one step per token
    ids = complete(lm, prompt_ids, 64, steps=32, temperature=1.0, seed=0)  # any GenerationConfig option
"""

from __future__ import annotations

from typing import Any

import torch

from dlm.sampling.processors import special_ids_to_suppress


@torch.no_grad()
def ar_decode(lm: Any, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
              seed: int | None = None, stop_ids: set[int] | None = None) -> list[int]:
    """Token-by-token decoding of an AR model after [BOS] + prompt (cut from the left to fit its context): greedy
    at temperature 0, else sampling; [MASK], [PAD] and [BOS] are banned; stops after a token in `stop_ids`."""
    tok = lm.tokenizer
    g = torch.Generator().manual_seed(seed if seed is not None else 0)
    banned = special_ids_to_suppress(tok)  # as the samplers ban them
    seq = [tok.bos_id, *prompt_ids]
    new: list[int] = []
    for _ in range(max_new_tokens):
        window = seq[-lm.max_len:]  # the last max_len tokens (the [BOS] falls out of a long prompt)
        logits = lm.model(torch.tensor([window], device=lm.device), None)[0, -1].float().cpu()  # (V,)
        logits[banned] = -torch.inf
        if temperature > 0:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g))
        else:
            nxt = int(logits.argmax())
        seq.append(nxt)
        new.append(nxt)
        if stop_ids and nxt in stop_ids:
            break
    return new


def complete(lm: Any, prompt_ids: list[int], max_new_tokens: int, steps: int | None = None,
             temperature: float = 0.0, seed: int | None = 0, **options: Any) -> list[int]:
    """The new token ids after the prompt (not cut at a stop). A diffusion model denoises `max_new_tokens` masks
    in `steps` steps (default: one per token, one block: LLaDA's greedy setting); the prompt is cut from the left
    to leave room. Other GenerationConfig options (sampler, remasking, ...) pass through to `generate`."""
    prompt_ids = [int(i) for i in prompt_ids]
    if lm.is_causal:
        return ar_decode(lm, prompt_ids, max_new_tokens, temperature, seed, stop_ids=lm.tokenizer.stop_ids)
    room = lm.max_len - max_new_tokens
    if room < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the model's context ({lm.max_len})")
    prompt_ids = prompt_ids[len(prompt_ids) - min(len(prompt_ids), room):]
    options.setdefault("block_length", max_new_tokens)
    out = lm.generate(torch.tensor([prompt_ids], dtype=torch.long), max_new_tokens=max_new_tokens,
                      steps=steps or max_new_tokens, temperature=temperature, seed=seed, **options)
    return out[0, len(prompt_ids):].tolist()
