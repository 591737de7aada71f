"""Control features on a block model (issue 18, part 6): a canvas with known tokens after its first [MASK] is
decoded block by block as a template (dlm.sampling.block `template`). Each block sees its own known tokens and
every block before it, nothing later (block-causal attention), so: known tokens are kept, the cached loop equals
the uncached one, a known token in a later block cannot change an earlier block, one in the current block can,
positional constraints hold at their canvas positions, and infill / JSON run on block models."""

from __future__ import annotations

import json

import pytest
import torch
from test_block_sampling import _lm  # the tiny bd3lm pipeline (blocks of 4)

from dlm.config import GenerationConfig, ModelConfig
from dlm.models import build_model
from dlm.sampling import SAMPLERS, SamplingError
from dlm.sampling.block import block_steps
from dlm.sampling.processors import AllowedTokens, RepetitionPenalty
from dlm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
V, MASK, EOS = TOK.vocab_size, TOK.mask_id, TOK.eos_id
BS = 4


def _net(seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_model(ModelConfig.preset("tiny", vocab_size=V)).eval()


def _template(rows: int = 3, n: int = 22, seed: int = 0) -> torch.Tensor:
    """(rows, n) new tokens: masks, known letters scattered, and block 2 (positions 8-11) wholly known."""
    g = torch.Generator().manual_seed(seed)
    t = torch.full((rows, n), MASK)
    known = torch.rand(rows, n, generator=g) < 0.3
    t[known] = torch.randint(97, 123, (int(known.sum()),), generator=g)
    t[:, 8:12] = torch.randint(65, 91, (rows, 4), generator=g)
    return t


def _run(net, prompt, template, cache=True, processors=(), steps=None, threshold=None):
    sampler = SAMPLERS.build("block", mask_id=MASK, config=GenerationConfig(sampler="block", threshold=threshold),
                             eos_id=EOS, pad_id=TOK.pad_id)
    n = template.shape[1]
    events = list(block_steps(net, prompt, None, sampler, torch.Generator().manual_seed(0), processors,
                              block_size=BS, max_new_tokens=n, steps=steps or int((template == MASK).sum(1).max()),
                              eos_id=EOS, cache=cache, template=template))
    return events[-1].output.xt, events


PROMPT = torch.tensor([TOK.encode("ROMEO: ")] * 3)  # 7 tokens: the first open block holds 3 of them


def test_known_tokens_are_kept_and_cached_equals_uncached():
    net, t = _net(), _template()
    out, events = _run(net, PROMPT, t)
    ref, _ = _run(net, PROMPT, t, cache=False)
    assert torch.equal(out, ref)  # the cache is exact with a template too (a wholly known block included)
    new = out[:, PROMPT.shape[1]:]
    assert torch.equal(new[t != MASK], t[t != MASK]) and not bool((new == MASK).any())
    assert torch.equal(out[:, :PROMPT.shape[1]], PROMPT)
    commits = torch.stack([e.output.committed.sum(1) for e in events])  # (steps, B)
    assert int(commits.max()) == 1 and torch.equal(commits.sum(0), (t == MASK).sum(1))  # one commit per step


def test_a_later_known_token_cannot_change_an_earlier_block():
    net, t = _net(), _template()
    later = t.clone()
    later[:, 16:20] = torch.tensor([ord(c) for c in "wxyz"])  # known tokens in a later block only
    a, _ = _run(net, PROMPT, t)
    b, _ = _run(net, PROMPT, later)
    P = PROMPT.shape[1]
    first_changed = P + 16 - (P + 16) % BS  # the canvas block holding position 16 of the new tokens
    assert torch.equal(a[:, :first_changed], b[:, :first_changed])


class Recorder(torch.nn.Module):
    """The network, recording the tokens of every forward (the current block, and a finished one going in)."""

    supports_attention_modes = True

    def __init__(self, net) -> None:
        super().__init__()
        self.net, self.inputs, self.in_view = net, [], []

    def forward(self, x, t=None, **kw):
        self.inputs.append(x.clone())
        self.in_view.append(kw["cache"].length + x.shape[1])  # positions this forward attends over: cache + x
        return self.net(x, t, **kw)


def test_a_known_token_is_seen_from_its_own_block_on():
    t = _template(rows=1)
    t[0, 16], t[0, 13] = ord("Q"), MASK  # new positions 13-16 = canvas 20-23: canvas block 5, with a mask to decode
    t[0, 9:13] = torch.tensor([ord(c) for c in "AZBC"])  # canvas 16-19: block 4, wholly known (no forward of its own)
    assert int((t == ord("Q")).sum()) == 1 and int((t == ord("Z")).sum()) == 1
    rec = Recorder(_net())
    _, events = _run(rec, PROMPT[:1], t)
    seen = [bool((x == ord("Q")).any()) for x in rec.inputs]  # one forward per step (event)
    first = [e.block for e in events].index(5 - PROMPT.shape[1] // BS)  # event blocks count from the first open one
    assert not any(seen[:first])  # no forward of an earlier block saw it
    assert seen[first]  # the first forward of its own block did
    # Block 4 ran no forward of its own: its K/V go in with block 5's first forward, in front of it.
    assert bool((rec.inputs[first] == ord("Z")).any())
    assert not any(bool((x == ord("Z")).any()) for x in rec.inputs[:first])
    K = PROMPT.shape[1] // BS  # every forward attends over every position up to the end of its block
    assert rec.in_view == [(K + e.block + 1) * BS for e in events]


def test_positional_constraints_hold_at_their_canvas_positions():
    net, t = _net(), _template()
    P, n = PROMPT.shape[1], t.shape[1]
    where = torch.zeros(3, P + n, dtype=torch.bool)
    where[:, P + 1] = where[:, P + 20] = True
    digits = [ord(c) for c in "0123456789"]
    t[:, [1, 20]] = MASK
    out, _ = _run(net, PROMPT, t, processors=[AllowedTokens(digits, where=where)])
    assert all(int(x) in digits for x in out[:, [P + 1, P + 20]].flatten())
    with pytest.raises(SamplingError, match="RepetitionPenalty needs the whole canvas"):
        _run(net, PROMPT, t, processors=[RepetitionPenalty(1.2, MASK)])


def test_infill_and_json_on_a_block_model():
    lm = _lm()
    text = lm.infill("To be, [MASK:4] to be: that is [MASK:6]", seed=0)
    assert text.startswith("To be, ") and " to be: that is " in text and len(text) >= len("To be,  to be: that is ")
    first = lm.infill("[MASK:3] begins the line", seed=0)  # a gap at the very start: no prompt at all
    assert first.endswith(" begins the line")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "ok": {"type": "boolean"}}, "required": ["n", "ok"]}
    value = lm.generate_json(schema, seed=0)
    assert set(value) == {"n", "ok"} and 0 <= value["n"] <= 99 and isinstance(value["ok"], bool)
    json.dumps(value)
