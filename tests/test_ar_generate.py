"""The AR baseline samples left to right through `DiffusionLM.generate` (dlm generate --model shakespeare-ar):
with the block cache (blocks of 1 = causal), equal to recomputing the whole sequence at every step."""

from __future__ import annotations

import pytest
import torch

from dlm.pipeline import DiffusionLM
from dlm.sampling import SamplingError


@pytest.fixture(scope="module")
def ar():
    return DiffusionLM.from_pretrained("shakespeare-ar")


def _recomputed(lm, prompt: str, n: int) -> str:
    """Greedy decoding the plain way: [BOS] + prompt, the full forward at every step, [MASK] / [PAD] banned."""
    tok = lm.tokenizer
    seq = [tok.bos_id, *tok.encode(prompt)]
    start = len(seq)
    with torch.no_grad():
        for _ in range(n):
            logits = lm.model(torch.tensor([seq]), None)[0, -1].float()
            logits[[tok.mask_id, tok.pad_id]] = -torch.inf
            seq.append(int(logits.argmax()))
            if seq[-1] in tok.stop_ids:
                break
    return lm.decode_new(seq[start:])


def test_cached_decoding_equals_recomputing_every_step(ar):
    for prompt in ("ROMEO:", "JULIET: O Romeo"):
        assert ar.generate(prompt, max_new_tokens=40) == _recomputed(ar, prompt, 40)


def test_ragged_batch_equals_each_alone_and_rows_end_in_eos(ar):
    prompts = ["ROMEO:", "JULIET: O Romeo, Romeo"]
    assert ar.generate(prompts, max_new_tokens=24) == [ar.generate(p, max_new_tokens=24) for p in prompts]


def test_no_denoising_steps_to_show(ar):
    with pytest.raises(SamplingError, match="left to right"):
        ar.generate("ROMEO:", max_new_tokens=4, callback=print)


class EOSFrom(torch.nn.Module):
    """The AR network with [EOS] made certain from sequence position `at` on (cached positions counted)."""

    causal = True

    def __init__(self, net, eos_id: int, at: int) -> None:
        super().__init__()
        self.net, self.eos_id, self.at = net, eos_id, at

    def forward(self, x, t=None, cache=None, **kw):
        T0 = cache.length if cache is not None else 0  # positions before this input
        out = self.net(x, t, cache=cache, **kw).clone()
        out[:, (torch.arange(T0, T0 + x.shape[1]) >= self.at), self.eos_id] = 1e4
        return out


def test_a_row_that_emits_eos_holds_eos_only_after_it(ar):
    tok = ar.tokenizer
    lm = DiffusionLM(EOSFrom(ar.model, tok.eos_id, at=9), tok, ar.config)
    ids = torch.tensor([tok.encode("ROMEO:")])  # [BOS] + 6 at 0..6: position 9 predicts new token 3
    new = lm.generate(ids, max_new_tokens=12)[0, ids.shape[1]:]
    assert new[:3].tolist() == ar.generate(ids, max_new_tokens=3)[0, ids.shape[1]:].tolist()
    assert bool((new[3:] == tok.eos_id).all())
