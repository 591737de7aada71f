"""Data augmentation by re-noising (seed §5): re-mask a random fraction of a text's tokens and let the model denoise
them, n times with different masks, for n variants that keep the rest of the text token for token. With metrics
of the result: diversity (distinct-n, Li et al. 2016; self-BLEU, Zhu et al. 2018) and faithfulness.

`noise` is the fraction of tokens re-masked: floor(noise * L) of a text's L tokens (at least 1), drawn anew for each
variant. The masks are filled with `fill_canvas` (the n variants of a text as one batch), sampling at temperature
DEFAULT_TEMPERATURE = 0.8 unless told otherwise, so two variants differ even where their masks coincide; only
tokens that are text on their own may be written (no [PAD], [EOS] or lone UTF-8 byte), so a variant keeps the
source's length in tokens. Everything is deterministic given `seed`.

    variants = augment(lm, ["To be, or not to be, that is the question."], noise=0.3, n=4, seed=0)  # [[4 str]]
    distinct_n(variants[0]), self_bleu(variants[0]), faithfulness(source, variants[0][0])
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from dlm.control.canvas import fill_canvas, token_texts
from dlm.sampling import SamplingError
from dlm.sampling.processors import AllowedTokens

if TYPE_CHECKING:
    from dlm.pipeline import DiffusionLM
    from dlm.tokenizer import Tokenizer

DEFAULT_TEMPERATURE = 0.8  # > 0: variants differ by their samples as well as by their masks


def n_remasked(length: int, noise: float) -> int:
    """How many of `length` tokens a variant re-masks: floor(noise * length), at least 1."""
    return max(1, math.floor(noise * length + 1e-9))  # 1e-9: 0.3 * 10 is 3, not 2.9999...


def remask(ids: torch.Tensor, noise: float, n: int, mask_id: int, generator: torch.Generator) -> torch.Tensor:
    """ids (L,) -> (n, L): each row re-masks its own n_remasked(L, noise) positions, drawn without replacement."""
    L = ids.shape[0]
    k = n_remasked(L, noise)
    rows = ids.repeat(n, 1)  # (n, L)
    for row in rows:
        row[torch.randperm(L, generator=generator)[:k]] = mask_id
    return rows


def augment(lm: DiffusionLM, texts: Sequence[str], noise: float = 0.3, n: int = 4, seed: int | None = None,
            **options: Any) -> list[list[str]]:
    """For each text, n variants with a fraction `noise` of its tokens re-masked and denoised (module docstring).

    Every GenerationConfig option is accepted (temperature, steps, top_p, ...); the texts are checked (non-empty,
    within the model's context) before any model call.
    """
    if not 0.0 < noise <= 1.0:
        raise SamplingError(f"noise must be in (0, 1] (the fraction of tokens re-masked), got {noise}")
    if n < 1:
        raise SamplingError(f"n must be >= 1 variants, got {n}")
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise SamplingError("texts must be a list of strings")
    tok = lm.tokenizer
    encoded = [tok.encode(t) for t in texts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise SamplingError(f"text {i} is empty: there is nothing to re-mask")
        if len(ids) > lm.max_len:
            raise SamplingError(f"text {i} has {len(ids)} tokens but the model's context is {lm.max_len}; "
                                "split it into shorter passages")
    options.setdefault("temperature", DEFAULT_TEMPERATURE)
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    textual = AllowedTokens([i for i, t in enumerate(token_texts(tok)) if t])  # no specials, no lone bytes
    out = []
    for ids in encoded:
        canvas = remask(torch.tensor(ids, dtype=torch.long), noise, n, tok.mask_id, generator)
        fill_seed = int(torch.randint(2**62, (1,), generator=generator))
        filled = fill_canvas(lm, canvas, processors=[textual], seed=fill_seed, **options)  # (n, L)
        out.append([tok.decode(row) for row in filled.tolist()])
    return out


# ----- metrics --------------------------------------------------------------------------------------------------

def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1))


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over the texts' whitespace words (Li et al. 2016); 0 if there are none."""
    counts: Counter = Counter()
    for t in texts:
        counts.update(_ngrams(t.split(), n))
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


def bleu(hypothesis: str, references: Sequence[str], max_n: int = 4) -> float:
    """Sentence BLEU-max_n on whitespace words: clipped n-gram precisions, add-one smoothing for n >= 2 (Lin and
    Och 2004), brevity penalty against the closest reference length (Papineni et al. 2002)."""
    hyp = hypothesis.split()
    refs = [r.split() for r in references]
    if not hyp or not refs:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        counts = _ngrams(hyp, n)
        most = Counter()
        for r in refs:
            most |= _ngrams(r, n)  # per n-gram, its largest count in any one reference
        matched = sum(min(c, most[g]) for g, c in counts.items())
        total = sum(counts.values())
        if n > 1:
            matched, total = matched + 1, total + 1
        if matched == 0:
            return 0.0
        log_p += math.log(matched / total) / max_n
    r = min((abs(len(x) - len(hyp)), len(x)) for x in refs)[1]
    bp = 1.0 if len(hyp) > r else math.exp(1 - r / len(hyp))
    return bp * math.exp(log_p)


def self_bleu(texts: Sequence[str], max_n: int = 4) -> float:
    """Mean BLEU of each text against all the others (Zhu et al. 2018): 1 for copies, low for diverse texts."""
    if len(texts) < 2:
        raise ValueError("self_bleu needs at least 2 texts")
    return sum(bleu(t, [*texts[:i], *texts[i + 1:]], max_n) for i, t in enumerate(texts)) / len(texts)


def faithfulness(source: str, variant: str, tokenizer: Tokenizer | None = None) -> float:
    """The fraction of tokens kept: positions where the variant's token equals the source's, over the longer
    length. Tokens from `tokenizer`, else UTF-8 bytes (the byte tokenizer's); 1 for identical texts."""
    encode = tokenizer.encode if tokenizer is not None else (lambda s: list(s.encode("utf-8")))
    a, b = encode(source), encode(variant)
    if not a and not b:
        return 1.0
    return sum(x == y for x, y in zip(a, b, strict=False)) / max(len(a), len(b))
