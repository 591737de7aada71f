"""The block sampler (dlm/sampling/block.py): block by block against an exact KV cache, ragged batches, EOS stops,
threshold and sub-block rules, streaming, the pipeline and `dlm generate` on a block model.

Tiny randomly initialised networks in float32 (a random network's confidences are far apart at the scale of the
cache's rounding, about 1e-7, so cached and uncached runs pick the same tokens), and a wrapper that steers chosen
rows to [EOS] at chosen positions, to make rows stop at different blocks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dlm.config import CheckpointConfig, GenerationConfig, ModelConfig, ProcessConfig
from dlm.models import build_model
from dlm.models.common import BlockCache
from dlm.pipeline import DiffusionLM
from dlm.sampling import SAMPLERS, SamplingError
from dlm.sampling.block import BlockSampler, block_steps, steps_per_block
from dlm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
V, MASK, EOS = TOK.vocab_size, TOK.mask_id, TOK.eos_id
BS = 4


def _net(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_model(ModelConfig.preset("tiny", vocab_size=V)).eval()


def _ragged(lengths=(3, 9, 8, 17), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts (B, P) of these lengths (8 is a whole number of blocks) and their mask."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.full((len(lengths), P), TOK.pad_id)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, P - n:] = torch.randint(32, 127, (n,), generator=g)
        mask[i, P - n:] = 1
    return ids, mask


def _run(net, ids, mask, cache=True, window=None, **opts):
    cfg = GenerationConfig(sampler="block", **{k: v for k, v in opts.items() if k in GenerationConfig.option_names()})
    sampler = SAMPLERS.build("block", mask_id=MASK, config=cfg, eos_id=EOS, pad_id=TOK.pad_id)
    events = list(block_steps(net, ids, mask, sampler, torch.Generator().manual_seed(0), block_size=BS,
                              max_new_tokens=opts.get("max_new_tokens", 14), steps=opts.get("steps", 14),
                              eos_id=opts.get("eos_id", EOS), sub_block=opts.get("sub_block", 0), cache=cache,
                              window=window, ar_first_token=opts.get("ar_first_token", False)))
    return events[-1].output.xt, events


class StopAt(nn.Module):
    """The network, with [EOS] made certain at canvas positions >= stop[row], the row told by its left padding."""

    supports_attention_modes = True

    def __init__(self, net: nn.Module, stop_by_pads: dict[int, int]) -> None:
        super().__init__()
        self.net, self.stop_by_pads = net, stop_by_pads

    def forward(self, x, t=None, attention_mask=None, cache=None, block_size=None):
        T = (cache.length if cache is not None else 0) + x.shape[1]  # before the forward appends to the cache
        out = self.net(x, t, attention_mask=attention_mask, cache=cache, block_size=block_size).clone()
        pos = torch.arange(T - x.shape[1], T)
        for r in range(x.shape[0]):  # no mask: no row is shifted
            stop = self.stop_by_pads[int((attention_mask[r] == 0).sum()) if attention_mask is not None else 0]
            out[r, pos >= stop, EOS] = 1e4
        return out


def test_cached_equals_uncached_token_for_token():
    net = _net()
    ids, mask = _ragged()
    for opts in ({}, {"threshold": 0.02}, {"sub_block": 2}, {"temperature": 1.0}):
        cached, ev_c = _run(net, ids, mask, cache=True, **opts)
        uncached, ev_u = _run(net, ids, mask, cache=False, **opts)
        assert torch.equal(cached, uncached), opts
        assert len(ev_c) == len(ev_u)
    assert not bool((cached[:, ids.shape[1]:] == MASK).any())


def test_one_forward_per_step():
    """The prompt's complete blocks and each finished block go into the cache within the next block's first step:
    the network runs exactly once per step, on at most two blocks."""
    net = _net()
    ids, mask = _ragged()
    calls: list[int] = []
    inner = net.forward

    def counting(x, *a, **k):
        calls.append(x.shape[1])
        return inner(x, *a, **k)

    net.forward = counting
    _, events = _run(net, ids, mask)
    assert len(calls) == len(events)
    assert calls[0] == ids.shape[1] // BS * BS + BS and max(calls[1:]) == 2 * BS


def test_shifted_network_cached_equals_uncached():
    """A network with shifted logits (Dream, Fast-dLLM v2's token shift) predicts a block's first position from the
    previous block: the cached loop keeps that prediction from the block's first forward and equals the uncached."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        net = build_model(ModelConfig.preset("tiny", vocab_size=V, logits_shift=True)).eval()
    ids, mask = _ragged((8, 5, 12))  # 8 and 12: the first open block starts with a mask
    for opts in ({}, {"threshold": 0.02}):
        cached, _ = _run(net, ids, mask, cache=True, **opts)
        uncached, _ = _run(net, ids, mask, cache=False, **opts)
        assert torch.equal(cached, uncached), opts


def test_sliding_window_past_the_context():
    """With a window of 16 positions the oldest whole blocks leave the cache (keeping their positions): any length
    can be generated, the network never attends over more than the window, and until the window first slides the
    tokens are those of the unbounded run."""
    net = _net()
    ids, mask = _ragged((3, 9))
    seen: list[int] = []
    inner = net.forward

    def counting(x, t=None, attention_mask=None, cache=None, block_size=None):
        seen.append(cache.length + x.shape[1])
        if attention_mask is not None:
            assert attention_mask.shape == (x.shape[0], cache.length + x.shape[1])
        return inner(x, t, attention_mask=attention_mask, cache=cache, block_size=block_size)

    net.forward = counting
    windowed, _ = _run(net, ids, mask, window=16, max_new_tokens=40, steps=40)
    assert max(seen) == 16 and not bool((windowed == MASK).any())
    full, _ = _run(_net(), ids, mask, max_new_tokens=40, steps=40)
    P = ids.shape[1]  # row 1 (9 tokens) fills 16 positions after 1 + 4 new tokens; the next forward slides
    assert torch.equal(full[:, :P + 3], windowed[:, :P + 3]) and not torch.equal(full, windowed)


def test_each_row_of_a_ragged_batch_as_alone():
    """Prompts of 3, 9, 8 and 17 tokens: each row's new tokens are those it gets alone."""
    net = _net()
    ids, mask = _ragged()
    batch, _ = _run(net, ids, mask)
    P = ids.shape[1]
    for r in range(ids.shape[0]):
        n = int(mask[r].sum())
        alone, _ = _run(net, ids[r:r + 1, P - n:], None)
        assert torch.equal(batch[r, P:], alone[0, n:]), r


@pytest.mark.parametrize("sub_block", [0, 3])
def test_ar_first_token_is_decided_per_row(sub_block):
    """With ar_first_token a row whose open block holds no prompt token (8 tokens: whole blocks) decodes its first
    position alone first, the others not: in one batch each row still gets the tokens it gets alone."""
    net = _net()
    ids, mask = _ragged((3, 8, 9, 16))
    opts = dict(sub_block=sub_block, steps=7)  # two tokens a step: the AR first token changes the order
    batch, _ = _run(net, ids, mask, ar_first_token=True, **opts)
    P = ids.shape[1]
    for r in range(ids.shape[0]):
        n = int(mask[r].sum())
        alone, _ = _run(net, ids[r:r + 1, P - n:], None, ar_first_token=True, **opts)
        assert torch.equal(batch[r, P:], alone[0, n:]), r
    plain, _ = _run(net, ids[1:2, P - 8:], None, **opts)
    assert not torch.equal(plain[0, 8:], batch[1, P:])  # the rule did change that row's tokens


def test_rows_stop_at_their_own_block():
    """Rows steered to [EOS] at different positions stop in different blocks; after its [EOS] a row is [EOS] only
    and leaves the batch (later forwards have fewer rows); cached still equals uncached."""
    ids, mask = _ragged((3, 9, 17))
    pads = [int((m == 0).sum()) for m in mask]
    # rows shifted by 16, 8, 0 canvas positions (whole blocks): stop at their 3rd, 9th and never
    net = StopAt(_net(), {16 + 0: 16 + 3 + 2, 8: 8 + 9 + 8, 0: 10**6})
    seen_rows: list[int] = []
    inner = net.forward

    def counting(*a, **k):
        seen_rows.append(a[0].shape[0])
        return inner(*a, **k)

    net.forward = counting
    out, events = _run(net, ids, mask, max_new_tokens=24, steps=24)
    uncached, _ = _run(net, ids, mask, cache=False, max_new_tokens=24, steps=24)
    assert torch.equal(out, uncached)
    P = ids.shape[1]
    new = out[:, P:]
    first_eos = [int((row == EOS).nonzero()[0]) if bool((row == EOS).any()) else None for row in new]
    assert first_eos[0] == 2 and first_eos[1] == 8 and first_eos[2] is None, (first_eos, pads)
    for r in (0, 1):
        assert bool((new[r, first_eos[r]:] == EOS).all())
    assert not bool((new == MASK).any())
    assert max(seen_rows) == 3 and min(seen_rows) == 1  # the stopped rows left the batch
    assert all(e.output.xt.shape == out.shape for e in events)


@pytest.mark.parametrize("cache", [True, False])
def test_the_last_rows_to_stop_end_in_eos_not_mask(cache):
    """When every row still generating stops, no later step runs: the last event must hold the [EOS] fill."""
    ids, mask = _ragged((3, 9))
    net = StopAt(_net(), {8: 8 + 3 + 3, 0: 9 + 5})  # both rows stop inside their second block
    out, events = _run(net, ids, mask, cache=cache, max_new_tokens=24, steps=24)
    new = out[:, ids.shape[1]:]
    assert not bool((new == MASK).any())
    for row in new:
        first = int((row == EOS).nonzero()[0])
        assert bool((row[first:] == EOS).all()) and first < 8


def test_a_stop_id_other_than_eos_stops_a_row():
    """A chat model's end of turn (a stop id that is not [EOS]) stops the row as [EOS] does (SDAR's <|im_end|>)."""
    ids, mask = _ragged((9,))
    net = StopAt(_net(), {0: 9 + 2})
    cfg = GenerationConfig(sampler="block")
    sampler = SAMPLERS.build("block", mask_id=MASK, config=cfg, eos_id=EOS, pad_id=TOK.pad_id)
    events = list(block_steps(net, ids, mask, sampler, torch.Generator().manual_seed(0), block_size=BS,
                              max_new_tokens=16, steps=16, eos_id=TOK.pad_id, stop_ids=[EOS]))
    new = events[-1].output.xt[0, ids.shape[1]:]
    first = int((new == EOS).nonzero()[0])
    assert bool((new[first + 1:] == TOK.pad_id).all()) and not bool((new == MASK).any())


def test_threshold_and_steps():
    """Without a threshold each step commits the planned k; a threshold no confidence exceeds changes nothing, and
    one every confidence exceeds commits a whole block per step."""
    net = _net()
    ids, mask = _ragged((8,))
    base, ev = _run(net, ids, mask, max_new_tokens=16, steps=8)  # 2 per step
    assert len(ev) == 8 and all(int(e.output.committed.sum()) == 2 for e in ev)
    same, _ = _run(net, ids, mask, max_new_tokens=16, steps=8, threshold=1.0)
    assert torch.equal(base, same)
    _, fast = _run(net, ids, mask, max_new_tokens=16, steps=16, threshold=1e-9)
    assert len(fast) == 4 and all(int(e.output.committed.sum()) == BS for e in fast)
    assert steps_per_block(64, 16, 128) == 8 and steps_per_block(1, 16, 128) == 1 and steps_per_block(999, 4, 8) == 4


def test_sub_blocks_commit_left_to_right():
    net = _net()
    ids, mask = _ragged((8,))
    _, events = _run(net, ids, mask, max_new_tokens=8, steps=8, sub_block=2)
    P = ids.shape[1]
    done_up_to = P
    for e in events:
        cols = e.output.committed[0].nonzero()[:, 0]
        assert len(cols) == 1
        sub_lo = P + (int(cols[0]) - P) // 2 * 2
        assert bool((e.output.xt[0, P:sub_lo] != MASK).all())  # every earlier sub-block is complete
        done_up_to = max(done_up_to, int(cols[0]))


def test_streamed_steps_only_commit():
    """Every step commits at least one masked position, never changes a committed one, and the view is
    (B, P + max_new_tokens) from the first step on; a cap that is not a whole number of blocks is honoured."""
    net = _net()
    ids, mask = _ragged()
    out, events = _run(net, ids, mask, max_new_tokens=13, steps=13)
    prev = torch.cat([ids, torch.full((ids.shape[0], 13), MASK)], 1)
    for e in events:
        x = e.output.xt
        assert x.shape == prev.shape and int(e.output.committed.sum()) >= 1
        was = prev != MASK
        assert torch.equal(x[was], prev[was])
        prev = x
    assert torch.equal(out[:, :ids.shape[1]], ids) and not bool((out == MASK).any())


def test_block_cache_select_and_errors():
    net = _net()
    empty = BlockCache()  # an empty cache reads as nothing cached
    x = torch.zeros(1, 4, dtype=torch.long)
    assert torch.equal(net(x, cache=empty, block_size=BS), net(x, block_size=BS)) and empty.length == 0
    sampler = SAMPLERS.build("block", mask_id=MASK)
    with pytest.raises(SamplingError, match="block-causal"):
        list(block_steps(build_model(ModelConfig.preset("tiny", vocab_size=V, arch="dit")),
                         torch.zeros(1, 3, dtype=torch.long), None, sampler, block_size=BS, max_new_tokens=4, steps=4))
    assert isinstance(sampler, BlockSampler)


# ----- the pipeline and the CLI ---------------------------------------------------------------------------------
def _lm(seed: int = 0) -> DiffusionLM:
    pcfg = ProcessConfig(process="bd3lm", loss="bd3lm", schedule="loglinear", eps=0.0, block_size=BS)
    cfg = CheckpointConfig(model=ModelConfig.preset("tiny", vocab_size=V), process=pcfg,
                           sampling=GenerationConfig(sampler="block", max_new_tokens=12, steps=12))
    return DiffusionLM(_net(seed), TOK, cfg)


def test_pipeline_generates_with_the_block_sampler():
    lm = _lm()
    ids = torch.tensor([TOK.encode("ROMEO:")])
    assert torch.allclose(lm.logits(ids), lm.model(ids, block_size=BS))
    assert torch.allclose(lm.logits(ids, block_size=1), lm.model(ids, attention="causal"))
    out = lm.generate(ids, max_new_tokens=10, steps=10, seed=0)
    assert out.shape == (1, ids.shape[1] + 10) and torch.equal(out[:, :ids.shape[1]], ids)
    long = lm.generate(ids, max_new_tokens=lm.max_len + 8, steps=lm.max_len + 8, seed=0, ban_eos=True)
    assert long.shape == (1, ids.shape[1] + lm.max_len + 8) and not bool((long == MASK).any())  # slides past
    alone = lm.generate("ROMEO:", max_new_tokens=10, steps=10, seed=0)
    both = lm.generate(["ROMEO:", "JULIET: O"], max_new_tokens=10, steps=10, seed=0)
    assert isinstance(alone, str) and both[0] == alone
    streamed = list(lm.stream("ROMEO:", max_new_tokens=10, steps=10, seed=0))
    assert len(streamed) == 10 and all(e.output.xt.shape == (1, 16) for e in streamed)
    with pytest.raises(SamplingError, match="sampler='block'"):
        lm.generate("ROMEO:", sampler="llada")
    filled = lm.infill("To be, [MASK:4] to be")  # a template, block by block (tests/test_block_template.py)
    assert filled.startswith("To be, ") and filled.endswith(" to be")
    with pytest.raises(SamplingError, match="guidance"):
        lm.generate("ROMEO:", cfg_scale=1.0)


def test_any_model_samples_block_by_block():
    """A full-attention checkpoint runs the block sampler with block_length as its block size."""
    cfg = CheckpointConfig(model=ModelConfig.preset("tiny", vocab_size=V))
    lm = DiffusionLM(_net(), TOK, cfg)
    out = lm.generate("ROMEO:", sampler="block", block_length=4, max_new_tokens=8, steps=8, seed=0)
    # The same tokens as block_steps run directly with blocks of 4 (the pipeline adds nothing but decoding).
    ids = torch.tensor([TOK.encode("ROMEO:")])
    sampler = SAMPLERS.build("block", mask_id=MASK, config=lm.options(sampler="block", block_length=4,
                             max_new_tokens=8, steps=8, seed=0), eos_id=EOS, pad_id=TOK.pad_id)
    g = torch.Generator().manual_seed(0)
    from dlm.sampling.processors import build_processors

    events = list(block_steps(lm.model, ids, None, sampler, g, build_processors(sampler.config, TOK), block_size=4,
                              max_new_tokens=8, steps=8, eos_id=EOS, stop_ids=sorted(TOK.stop_ids)))
    direct = events[-1].output.xt[0, ids.shape[1]:].tolist()
    assert out == lm.decode_new(direct) and MASK not in direct


def test_dlm_generate_uses_the_block_sampler(tmp_path, capsys):
    from dlm.checkpoint import save_pretrained
    from dlm.cli import main

    lm = _lm()
    save_pretrained(tmp_path / "bd", lm.model.state_dict(), lm.config, TOK)
    main(["generate", "ROMEO:", "--model", str(tmp_path / "bd"), "--max-new-tokens", "8", "--seed", "0"])
    printed = capsys.readouterr().out
    assert lm.generate("ROMEO:", max_new_tokens=8, seed=0) in printed


def test_server_streams_a_block_model():
    """The OpenAI completion stream of a block model sends the text as blocks complete, equal to the whole answer."""
    import json

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dlm.server import ServerSettings, create_app

    lm = _lm()
    body = {"prompt": ["ROMEO:", "JULIET: O"], "max_tokens": 12, "seed": 0, "temperature": 0.0}
    with TestClient(create_app(lm, "bd", ServerSettings())) as c:
        whole = c.post("/v1/completions", json=body).json()["choices"]
        text = c.post("/v1/completions", json={**body, "stream": True}).text
    chunks = [json.loads(b[len("data: "):]) for b in text.strip().split("\n\n") if b != "data: [DONE]"]
    got = ["", ""]
    for ch in chunks:
        for choice in ch["choices"]:
            got[choice["index"]] += choice["text"]
    assert got == [w["text"] for w in whole] and len(chunks) > 2
    assert whole[0]["text"] == lm.generate("ROMEO:", max_new_tokens=12, seed=0, temperature=0.0)
