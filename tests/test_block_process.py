"""Block diffusion (BD3LM): attention modes in the network, the per-block process, the x_t + x_0 training pass and
its loss, the clipped schedule and `dlm train --process bd3lm`.

Tiny randomly initialised networks in float32. Comparisons of two computations of the same logits run through
different attention layouts (SDPA over 2L keys with half masked, or over a prefix), so their results differ only
by float32 rounding: each logit is a sum of a few hundred rounded products per layer, and we allow
TOL = 64 * n_layers * (d_model + 2 L) * eps32 relative to the logits' scale (a bound on the accumulated rounding
of the attention and projection sums along one path; about 1e-3 here, far below any real difference).
"""

from __future__ import annotations

import json

import pytest
import torch

from dlm.config import ModelConfig, ProcessConfig
from dlm.losses import LOSSES, BlockDiffusionELBO, MaskedELBO, Rows, token_ce
from dlm.models import build_model
from dlm.models.common import BlockCache, attention_rule
from dlm.process import MaskedProcess
from dlm.processes.block import BlockProcess, block_diffusion_mask, block_logits, search_clip
from dlm.schedules import LogLinear

V, MASK = 40, 39
L = 12
EPS32 = torch.finfo(torch.float32).eps


def _model(seed: int = 0, **cfg):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_model(ModelConfig.preset("tiny", vocab_size=V, **cfg)).eval()


def _tol(net, logits: torch.Tensor, length: int = L) -> float:
    c = net.cfg
    return 64 * c.n_layers * (c.d_model + 2 * length) * EPS32 * float(logits.detach().abs().max())


def _x0(B: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, MASK, (B, L), generator=torch.Generator().manual_seed(seed))


def _process(bs: int) -> BlockProcess:
    return BlockProcess(MASK, LogLinear(eps=0.0), V, block_size=bs)


# ----- attention modes ------------------------------------------------------------------------------------------
def test_attention_rule_modes():
    """block_size 1 is causal, block_size L is full; block-causal sees exactly the blocks at or before its own."""
    causal = attention_rule("causal", torch.ones(1, L), L)[0][0, 0]
    full = attention_rule("full", torch.ones(1, L), L)[0][0, 0]
    assert torch.equal(attention_rule("block", torch.ones(1, L), L, block_size=1)[0][0, 0], causal)
    assert torch.equal(attention_rule("block", torch.ones(1, L), L, block_size=L)[0][0, 0], full)
    m = attention_rule(None, None, L, block_size=4)[0][0, 0]  # block_size alone selects block-causal
    for q in range(L):
        assert m[q].tolist() == [k // 4 <= q // 4 for k in range(L)]
    with pytest.raises(ValueError, match="block_size"):
        attention_rule("block", None, L)
    with pytest.raises(ValueError, match="attention must be"):
        attention_rule("sideways", None, L)


def test_network_attention_modes():
    """The network's mode is an argument: block_size 1 equals the causal forward, block_size L the full one, and a
    causal model run with attention='full' is the bidirectional network with the same weights."""
    net, x = _model(), _x0()
    full, causal = net(x), net(x, attention="causal")
    assert not torch.allclose(full, causal)
    assert torch.allclose(net(x, block_size=1), causal, atol=_tol(net, causal), rtol=0)
    assert torch.allclose(net(x, block_size=L), full, atol=_tol(net, full), rtol=0)
    ar = _model(arch="ar")
    ar.load_state_dict(net.state_dict())
    assert torch.allclose(ar(x, attention="full"), full, atol=_tol(net, full), rtol=0)
    assert torch.allclose(ar(x), causal, atol=_tol(net, causal), rtol=0)
    # block-causal: a block's logits do not depend on any later token
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % MASK
    a, b = net(x, block_size=4), net(y, block_size=4)
    assert torch.equal(a[:, :8], b[:, :8]) and not torch.allclose(a[:, 8:], b[:, 8:])


def test_block_cache_is_exact():
    """Prefill two blocks into a BlockCache, then run the third against it: the logits of the uncached forward."""
    net, x = _model(), _x0()
    ref = net(x, block_size=4)
    cache = BlockCache()
    net(x[:, :8], cache=cache.extend(), block_size=4)
    assert cache.length == 8
    out = net(x[:, 8:], cache=cache, block_size=4)
    assert cache.length == 8  # a read leaves the cache as it was
    assert torch.allclose(out, ref[:, 8:], atol=_tol(net, ref), rtol=0)
    net(x[:, 8:], cache=cache.extend(), block_size=4)
    assert cache.length == 12
    cache.select(torch.tensor([0, 2]))
    assert cache.keys[0].shape[0] == 2


def test_dit_and_ddit_take_the_mode():
    for arch, extra in (("dit", {}), ("ddit", {"cond_dim": 32})):
        net, x, t = _model(arch=arch, **extra), _x0(), torch.full((3,), 0.5)
        full = net(x, t)
        assert torch.allclose(net(x, t, block_size=L), full, atol=_tol(net, full), rtol=0)
        a = net(x, t, attention="causal")
        y = x.clone()
        y[:, -1] = (y[:, -1] + 1) % MASK
        assert torch.equal(a[:, :-1], net(y, t, attention="causal")[:, :-1])


# ----- the process and the vectorised pass ----------------------------------------------------------------------
def test_mask_structure():
    """Noisy block b sees noisy block b and clean blocks < b; clean block b sees clean blocks <= b."""
    bs = 4
    m = block_diffusion_mask(L, bs)
    for q in range(2 * L):
        for k in range(2 * L):
            qb, kb, q_clean, k_clean = (q % L) // bs, (k % L) // bs, q >= L, k >= L
            want = (k_clean and kb < qb) or (not q_clean and not k_clean and kb == qb) if not q_clean \
                else (k_clean and kb <= qb)
            assert bool(m[q, k]) == want, (q, k)


@pytest.mark.parametrize("bs", [1, 3, 4, 5, L])
def test_vectorised_pass_equals_block_loop(bs):
    """One forward over x_t + x_0 gives, for every block b, the logits of [x_0^{<b}, x_t^b] under block-causal
    attention (the block-by-block loop); 5 does not divide L, so the last block is shorter."""
    net, x0 = _model(), _x0()
    proc = _process(bs)
    t = torch.rand(3, -(-L // bs), generator=torch.Generator().manual_seed(1))
    xt, _ = proc.q_sample(x0, t, torch.Generator().manual_seed(2))
    fast = block_logits(net, xt, x0, bs)
    for lo in range(0, L, bs):
        hi = min(lo + bs, L)
        loop = net(torch.cat([x0[:, :lo], xt[:, lo:hi]], 1), block_size=bs)[:, lo:hi]
        assert torch.allclose(fast[:, lo:hi], loop, atol=_tol(net, loop), rtol=0), (lo, hi)


def test_q_sample_masks_per_block():
    """t = 1 masks a whole block, t = 0 none (move_chance = t with eps 0); a time (B,) serves every block."""
    proc, x0 = _process(4), _x0()
    xt, m = proc.q_sample(x0, torch.tensor([[1.0, 0.0, 1.0]] * 3))
    assert m[:, :4].all() and not m[:, 4:8].any() and m[:, 8:].all()
    assert torch.equal(xt, torch.where(m, MASK, x0))
    _, m = proc.q_sample(x0, torch.ones(3))
    assert m.all()


def test_block_size_one_is_the_ar_loss():
    """With every block masked at weight 1 (t clipped to [1, 1]) the loss is the exact autoregressive NLL of
    p(x_b | x_<b): here computed by L prefix forwards under plain causal attention. The held-out estimator
    (sequence_nll) gives the same number for every u."""
    net, x0 = _model(), _x0()
    out = BlockDiffusionELBO(clip=(1.0, 1.0))(net, x0, _process(1), generator=torch.Generator().manual_seed(0))
    assert out.mask.all()
    nll = torch.zeros(3, L)
    for b in range(L):
        ids = torch.cat([x0[:, :b], torch.full((3, 1), MASK)], 1)
        nll[:, b] = token_ce(net(ids, attention="causal")[:, -1:], x0[:, b:b + 1])[:, 0].detach()
    tol = _tol(net, net(x0)) * 4  # a cross-entropy moves by at most 2x its logits' error; 2x headroom
    assert abs(float(out.loss.detach()) - float(nll.mean())) < tol
    seq = BlockDiffusionELBO().sequence_nll(net, x0, _process(1), torch.rand(3))
    assert torch.allclose(seq, nll.double().sum(1), atol=tol * L, rtol=0)


def test_block_size_L_is_the_masked_loss():
    """One block of L tokens: the same times, the same masks and the same loss as MDLM's masked ELBO."""
    net, x0 = _model(), _x0(B=4)
    sched = LogLinear(eps=0.0)
    block = BlockDiffusionELBO(clip=(0.0, 1.0))(net, x0, _process(L), generator=torch.Generator().manual_seed(3))
    masked = MaskedELBO()(net, x0, MaskedProcess(MASK, sched, V), generator=torch.Generator().manual_seed(3))
    assert torch.equal(block.mask, masked.mask)
    tol = _tol(net, net(x0)) * 4 * float(1 / masked.mask.float().mean())  # the 1/t weights scale the error
    assert abs(float(block.loss.detach()) - float(masked.loss.detach())) < tol


def test_rows_split_equals_the_whole_batch():
    """Two calls on rows [0, 2) and [2, 4) of a batch draw the noise of one call on all four (DDP, grad-accum)."""
    net, x0, proc = _model(), _x0(B=4), _process(4)
    loss_fn = BlockDiffusionELBO(clip=(0.2, 0.9))
    whole = loss_fn(net, x0, proc, generator=torch.Generator().manual_seed(5))
    parts = [loss_fn(net, x0[a:a + 2], proc, generator=torch.Generator().manual_seed(5), rows=Rows(a, 4))
             for a in (0, 2)]
    assert torch.equal(torch.cat([p.mask for p in parts]), whole.mask)
    assert abs(float(sum(p.loss.detach() for p in parts) / 2) - float(whole.loss.detach())) < _tol(net, net(x0)) * 8


def test_clipped_times_stay_in_the_interval():
    loss_fn = BlockDiffusionELBO(clip=(0.3, 0.8))
    t = loss_fn.block_times(8, L, _process(4), torch.Generator().manual_seed(0))
    assert t.shape == (8, 3) and bool((t >= 0.3).all()) and bool((t <= 0.8).all())
    with pytest.raises(ValueError, match="clip"):
        BlockDiffusionELBO(clip=(0.9, 0.2))


def test_search_clip_prefers_the_exact_interval_at_block_size_one():
    """At block size 1, t in [1, 1] is the exact NLL (no noise) and has the least variance, as in BD3LM."""
    net, windows = _model(), _x0(B=8)
    best, variances = search_clip(net, windows, _process(1), BlockDiffusionELBO(), batch_size=4)
    assert best == (1.0, 1.0) and set(variances) == {(1e-3, 1.0), (1.0, 1.0)}
    best, variances = search_clip(net, windows, _process(4), BlockDiffusionELBO(), widths=(0.5,), delta=0.25,
                                  batch_size=4)
    assert (1e-3, 1.0) in variances and (0.25, 0.75) in variances and best == min(variances, key=variances.get)


def test_loss_is_registered_and_configured():
    pcfg = ProcessConfig(process="bd3lm", loss="bd3lm", schedule="loglinear", eps=0.0, block_size=4,
                         clip_min=0.1, clip_max=0.9)
    loss_fn = LOSSES.get("bd3lm").from_config(pcfg)
    assert loss_fn.clip == (0.1, 0.9)
    with pytest.raises(ValueError, match="arch 'llada'"):
        block_logits(_model(arch="dit"), _x0(), _x0(), 4)


# ----- training from the command line ---------------------------------------------------------------------------
def test_dlm_train_bd3lm_saves_and_reloads(tmp_path, text_file):
    """`dlm train --process bd3lm --block-size 4` trains, saves its process config beside the checkpoint and
    reloads it; the loss falls and the held-out bound is finite."""
    from dlm.cli import main
    from dlm.pipeline import DiffusionLM

    out = tmp_path / "bd"
    main(["train", "--data", str(text_file), "--model", "tiny", "--process", "bd3lm", "--block-size", "4",
          "--seq-len", "32", "--batch-size", "8", "--max-steps", "30", "--eval-every", "30", "--ckpt-every", "30",
          "--warmup", "5", "--out", str(out), "--quiet"])
    cfg = json.loads(next(out.glob("ckpt-*/config.json")).read_text())
    assert cfg["process"]["process"] == "bd3lm" and cfg["process"]["block_size"] == 4
    assert cfg["process"]["loss"] == "bd3lm" and cfg["sampling"]["sampler"] == "block"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(torch.tensor(r["val_bits_per_char"])) for r in log if "val_bits_per_char" in r)
    lm = DiffusionLM.from_pretrained(out)
    assert lm.config.process.block_size == 4 and lm.process.block_size == 4
    with pytest.raises(SystemExit):
        main(["train", "--data", str(text_file), "--model", "tiny", "--process", "bd3lm", "--block-size", "64",
              "--seq-len", "32", "--out", str(tmp_path / "bad"), "--quiet"])


def test_sft_and_eval_of_a_block_model(tmp_path, capsys):
    """`dlm sft` on a block checkpoint trains with the bd3lm_sft loss (only the response masked, per block; the
    loss falls) and keeps it a block model; `dlm eval` scores it with the block bound."""
    from dlm.checkpoint import load_pretrained, save_pretrained
    from dlm.cli import main
    from dlm.config import CheckpointConfig, GenerationConfig
    from dlm.losses import BlockSFTLoss
    from dlm.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    pcfg = ProcessConfig(process="bd3lm", loss="bd3lm", schedule="loglinear", eps=0.0, block_size=4)
    cfg = CheckpointConfig(model=ModelConfig(d_model=32, n_layers=2, n_heads=2, max_len=64), process=pcfg,
                           sampling=GenerationConfig(sampler="block"))
    save_pretrained(tmp_path / "base", build_model(cfg.model), cfg, ByteTokenizer())
    chats = [[{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi there"}],
             [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "one two three"}]]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats * 4))
    main(["sft", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "chats.jsonl"), "--out",
          str(tmp_path / "run"), "--max-steps", "30", "--batch-size", "4", "--seq-len", "64", "--lr", "1e-2",
          "--warmup", "2", "--log-every", "1", "--ckpt-every", "30", "--threads", "1", "--quiet"])
    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    _, saved, _ = load_pretrained(tmp_path / "run")
    assert saved.process.process == "bd3lm" and saved.process.block_size == 4
    with pytest.raises(ValueError, match="maskable"):
        BlockSFTLoss()(_model(), _x0(), _process(4))
    capsys.readouterr()
    (tmp_path / "text.txt").write_text("hi there, one two three. " * 20)
    main(["eval", "--model", str(tmp_path / "run"), "--data", str(tmp_path / "text.txt"), "--json"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < r["bits_per_char"] < 9
