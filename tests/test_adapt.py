"""`dlm adapt` and the Hugging Face causal-LM reader on tiny random Llama / Qwen2 / Qwen3 folders written by
transformers at test time: parity of the causal logits, the shifted loss against a hand computation, the annealed
attention mask, full and LoRA adaptation that reloads and generates, and exact resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tolerance import network_atol  # noqa: E402

from dlm.adapt import (  # noqa: E402
    AdaptConfig,
    ShiftedMaskedLoss,
    adapt,
    anneal_ratio,
    annealed_mask,
    heldout_bound,
    to_diffusion,
)
from dlm.checkpoint import load_pretrained  # noqa: E402
from dlm.config import ConfigError, TrainConfig  # noqa: E402
from dlm.formats import CheckpointError, load_folder  # noqa: E402
from dlm.losses import token_ce  # noqa: E402
from dlm.models import build_model  # noqa: E402
from dlm.pipeline import DiffusionLM  # noqa: E402

TOKENIZER = Path(__file__).parent / "data/hf/llada-tiny"  # a 316-token BPE tokenizer: [BOS] 300, [EOS] 301
FAMILIES = {
    # Llama with a tied head (as SmolLM2) and 4 spare embedding rows: [MASK] takes the first spare row.
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"tie_word_embeddings": True}, 320),
    # Qwen2 (q/k/v biases) with exactly the tokenizer's rows: adaptation appends a [MASK] row.
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}, 316),
    # Qwen3 (per-head q/k norms) with heads wider than d_model / n_heads.
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 32}, 316),
}
TEXT = "".join(f"To be, or not to be, that is the question {i}. Whether tis nobler in the mind to suffer.\n\n"
               for i in range(40))


def write_causal(folder: Path, family: str, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """A random tiny causal LM of the family saved by transformers (safetensors + config + tokenizer files)."""
    config_cls, model_cls, extra, vocab = FAMILIES[family]
    cfg = config_cls(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=500.0,
                     bos_token_id=300, eos_token_id=301, pad_token_id=301, **extra)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # weights large enough that a wrong mapping cannot hide under the tolerance
        for p in model.parameters():
            p.normal_(0.0, scale) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TOKENIZER / name, folder / name)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def causal(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, write_causal(folder, request.param)


def test_causal_logits_equal_transformers(causal):
    family, folder, ref_model = causal
    net, cfg, tok = load_folder(folder)
    assert net.causal and cfg.model.arch == "ar"
    assert cfg.model.qk_norm == (family == "qwen3") and cfg.model.qkv_bias == (family == "qwen2")
    x = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ours = ref_model(x).logits, net(x)
    m = cfg.model
    atol = network_atol(torch.float32, max(m.d_model, m.ff_width, m.n_heads * m.head_dim), m.n_layers,
                        float(ref.abs().max()))
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0)
    assert tok.bos_id == 300 and tok.eos_id == 301 and tok.decode(tok.encode("To be")) == "To be"


def test_unsupported_configs_are_refused(tmp_path):
    write_causal(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="RoPE scaling 'llama3' is not supported"):
        load_folder(tmp_path)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    cfg["mlp_bias"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mlp_bias=True is not supported"):
        load_folder(tmp_path)


def test_annealed_mask_goes_from_causal_to_full():
    L, N = 12, 8
    g = torch.Generator().manual_seed(0)
    assert anneal_ratio(0, N) == 0.0 and anneal_ratio(N, N) == 1.0 and anneal_ratio(3 * N, N) == 1.0
    torch.testing.assert_close(annealed_mask(L, anneal_ratio(0, N), g), torch.ones(L, L, dtype=torch.bool).tril())
    assert annealed_mask(L, anneal_ratio(N, N), g) is None  # full attention: no mask at all
    density = [annealed_mask(L, anneal_ratio(s, N), torch.Generator().manual_seed(0)).float().mean()
               for s in range(N)]
    assert all(a <= b for a, b in zip(density, density[1:], strict=False))  # the same draw, a rising threshold
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for r in (0.25, 0.75):  # the causal part always kept, later keys added
        m = annealed_mask(L, r, g)
        assert bool(m[causal].all()) and 0 < int(m[~causal].sum()) < int((~causal).sum())
    assert anneal_ratio(0, 0) == 1.0  # anneal_steps 0: full attention from the start


def _adapted(folder: Path):
    net, cfg, tok = load_pretrained(folder)
    return net, *to_diffusion(net, cfg, tok)


def test_step0_network_is_the_ar_model_shifted(causal):
    """Under the causal mask of step 0, the adapted network's logits at i are the AR model's at i - 1."""
    _, folder, _ = causal
    ar, net, cfg, tok = _adapted(folder)
    x = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = ar(x), net(x, None, attention=annealed_mask(10, 0.0))
    m = cfg.model
    atol = network_atol(torch.float32, max(m.d_model, m.ff_width, m.n_heads * m.head_dim), m.n_layers,
                        float(want.abs().max()))
    keep = [i for i in range(ar.cfg.vocab_size) if i != tok.mask_id]  # the [MASK] row is new (a spare row here)
    torch.testing.assert_close(got[:, 1:, keep], want[:, :-1, keep], atol=atol, rtol=0)
    assert not net.causal and cfg.model.logits_shift and tok.mask_id < cfg.model.vocab_size == tok.vocab_size


def test_shift_loss_equals_hand_computed_cross_entropy(causal):
    _, folder, _ = causal
    _, net, cfg, tok = _adapted(folder)
    unshifted = build_model(cfg.model.replace(logits_shift=False))
    unshifted.load_state_dict(net.state_dict())
    B, L = 2, 7
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 300, (B, L), generator=g)
    x0[:, 0] = tok.bos_id
    is_masked = torch.tensor([[0, 1, 0, 1, 1, 0, 1], [0, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    p_mask = torch.tensor([0.6, 0.3])
    maskable = torch.ones(B, L, dtype=torch.bool)
    maskable[:, 0] = False
    xt = torch.where(is_masked, torch.full_like(x0, tok.mask_id), x0)
    for attn in (None, annealed_mask(L, 0.0)):
        out = ShiftedMaskedLoss.terms(net, x0, xt, is_masked, 1.0 / p_mask, maskable, attn)
        with torch.no_grad():  # by hand: the unshifted state at i - 1 predicts x0[i]
            h = unshifted(xt, None, attention="full" if attn is None else attn)  # (B, L, V)
        want = 0.0
        for b in range(B):
            for i in range(1, L):
                if is_masked[b, i]:
                    want += float(token_ce(h[b:b + 1, i - 1:i], x0[b:b + 1, i:i + 1])) / float(p_mask[b])
        want /= B * (L - 1)
        weights = float((is_masked.float() / p_mask[:, None]).sum()) / (B * (L - 1))
        assert float(out.loss.detach()) == pytest.approx(want, abs=_loss_atol(net, xt, weights))


def _run(folder: Path, data: Path, out: Path, lora=None, **train) -> dict:
    tcfg = TrainConfig(data=str(data), out=str(out), **{"max_steps": 6, "batch_size": 4, "seq_len": 24, "lr": 3e-3,
                                                         "warmup_steps": 0, "ckpt_every": 3, "log_every": 1,
                                                         "threads": 1, "keep_checkpoints": 5, **train})
    return adapt(folder, AdaptConfig(anneal_steps=3), tcfg, lora=lora, show_progress=False)


def test_adapt_trains_reloads_and_generates(causal, tmp_path):
    _, folder, _ = causal
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    summary = _run(folder, data, tmp_path / "run")
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run/log.jsonl").read_text().splitlines())]
    assert summary["steps"] == 6 and all(torch.isfinite(torch.tensor(losses)))
    lm = DiffusionLM.from_pretrained(tmp_path / "run")
    assert lm.config.model.logits_shift and not lm.is_causal and lm.config.extra["adapt"]["anneal_steps"] == 3
    text = lm.generate("To be", max_new_tokens=6, steps=6)
    # A text prompt starts with [BOS], as every training row did: the same as the ids with [BOS] in front.
    assert lm.bos_prefix and lm.config.extra["bos_prefix"]
    bos_ids = [lm.tokenizer.bos_id, *lm.tokenizer.encode("To be")]
    with_bos = lm.generate(bos_ids, max_new_tokens=6, steps=6)
    assert text == lm.decode_new(with_bos[len(bos_ids):])
    ids = lm.generate(tok_ids := lm.tokenizer.encode("To be"), max_new_tokens=6, steps=6)
    assert ids[:len(tok_ids)] == tok_ids and lm.tokenizer.mask_id not in ids  # every position committed
    windows = torch.tensor([lm.tokenizer.encode(TEXT)[:20]])
    assert torch.isfinite(heldout_bound(lm.model, windows, lm.tokenizer.bos_id, lm.tokenizer.mask_id)).all()


def test_adapt_lowers_the_loss_on_repeated_text(tmp_path):
    folder = tmp_path / "llama"
    write_causal(folder, "llama", scale=0.05)
    data = tmp_path / "text.txt"
    data.write_text("the cat sat on the mat. " * 200)
    _run(folder, data, tmp_path / "run", max_steps=30, ckpt_every=30, lr=1e-2)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run/log.jsonl").read_text().splitlines())]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_lora_adapt_trains_only_adapters(tmp_path):
    pytest.importorskip("peft")
    from dlm.lora import LoRAConfig

    folder = tmp_path / "qwen2"
    write_causal(folder, "qwen2")
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    summary = _run(folder, data, tmp_path / "run", lora=LoRAConfig(r=2, alpha=4.0), max_steps=3)
    state = torch.load(tmp_path / "run/ckpt-000003/trainer_state.pt", weights_only=True)
    assert state["model"] and all(".lora_" in k for k in state["model"])
    assert Path(summary["adapter"], "adapter_config.json").exists()
    lm = DiffusionLM.from_pretrained(tmp_path / "run")  # the merged weights, a plain dlm folder
    assert isinstance(lm.generate("To be", max_new_tokens=4, steps=4), str)
    # the adapters were merged into every LoRA target and nothing else moved (norms, biases); the embedding and
    # head only gain the [MASK] row dlm adapt adds
    from dlm.lora import TARGETS

    base, merged = DiffusionLM.from_pretrained(folder).model.state_dict(), lm.model.state_dict()
    assert sorted(base) == sorted(merged)
    changed = {k for k in base if base[k].shape != merged[k].shape or not torch.equal(base[k], merged[k])}
    targets = {k for k in base if k.endswith(".weight") and k.split(".")[-2] in TARGETS}
    assert targets and targets <= changed and changed - targets <= {"wte.weight", "lm_head.weight"}
    for k in changed - targets:
        assert merged[k].shape[0] == base[k].shape[0] + 1 and torch.equal(merged[k][:-1], base[k])


def test_adapt_resumes_exactly(tmp_path):
    folder = tmp_path / "llama"
    write_causal(folder, "llama")
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    _run(folder, data, tmp_path / "whole", max_steps=4, ckpt_every=2)
    _run(folder, data, tmp_path / "stopped", max_steps=4, ckpt_every=2)
    stopped = tmp_path / "stopped"
    shutil.rmtree(stopped / "ckpt-000004")  # as if killed after step 2 (mid-annealing: anneal_steps is 3)
    (stopped / "latest").write_text("ckpt-000002\n")
    _run(folder, data, stopped, max_steps=4, ckpt_every=2)
    a, _, _ = load_pretrained(tmp_path / "whole")
    b, _, _ = load_pretrained(stopped)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def _blockwise_ce(net, x0: torch.Tensor, xt: torch.Tensor, bs: int) -> torch.Tensor:
    """(B, L) cross-entropy of x0 at every position of xt, block by block: block b run after the clean blocks before
    it under block-causal attention (the loop the x_t + x_0 pass stands for)."""
    B, L = x0.shape
    out = torch.zeros(B, L)
    with torch.no_grad():
        for b in range(B):
            for lo in range(0, L, bs):
                hi = min(L, lo + bs)
                logits = net(torch.cat([x0[b, :lo], xt[b, lo:hi]])[None], None, block_size=bs)[:, lo:hi]
                out[b, lo:hi] = token_ce(logits, x0[b:b + 1, lo:hi])[0]
    return out


def _block_setup(tmp_path, bs: int = 3):
    from dlm.process import build_process

    write_causal(tmp_path / "llama", "llama")
    net0, cfg0, tok0 = load_pretrained(tmp_path / "llama")
    net, cfg, tok = to_diffusion(net0, cfg0, tok0, "block", block_size=bs)
    assert not cfg.model.logits_shift and cfg.process.process == "bd3lm" and cfg.process.block_size == bs
    B, L = 2, 8  # blocks [0, 3), [3, 6), [6, 8)
    x0 = torch.randint(0, 300, (B, L), generator=torch.Generator().manual_seed(4))
    x0[:, 0] = tok.bos_id
    maskable = torch.ones(B, L, dtype=torch.bool)
    maskable[:, 0] = False
    t = torch.tensor([[0.3, 0.7, 0.5], [0.9, 0.2, 0.6]])  # (B, n_blocks)
    t_pos = t.repeat_interleave(bs, dim=1)[:, :L]  # (B, L): each position's block time
    return net, cfg, build_process(cfg.process, tok, cfg.model.vocab_size), x0, maskable, t, t_pos


def _loss_atol(net, x: torch.Tensor, weight_sum: float) -> float:
    """A weighted sum of cross-entropies computed on two float32 paths: each token's CE moves by at most twice the
    logits' error (log-softmax is 2-Lipschitz in the max norm), the logits' error is network_atol (tests/
    tolerance.py), and the weights add up to weight_sum."""
    m = net.cfg
    with torch.no_grad():
        scale = float(net(x, None).abs().max())
    width = max(m.d_model, m.ff_width, m.n_heads * m.head_dim)
    return 2 * network_atol(torch.float32, width, m.n_layers, scale) * weight_sum


def test_block_loss_equals_hand_computed_blockwise_cross_entropy(tmp_path):
    """Mode block: at fixed block times and masks, the bd3lm loss of the adapted network equals the weighted
    cross-entropy computed block by block (loglinear schedule, eps 0: w = 1 / t_b)."""
    from dlm.losses import LOSSES

    net, cfg, process, x0, maskable, t, t_pos = _block_setup(tmp_path)
    loss_fn = LOSSES.get("bd3lm").from_config(cfg.process)
    per_token, is_masked = loss_fn.terms(net, x0, process, t, torch.Generator().manual_seed(5), maskable)
    xt, again = process.q_sample(x0, t, generator=torch.Generator().manual_seed(5), maskable=maskable)
    assert torch.equal(again, is_masked) and bool(is_masked.any())
    want = float((_blockwise_ce(net, x0, xt, 3) * is_masked / t_pos).sum())
    tol = _loss_atol(net, xt, float((is_masked / t_pos).sum()))
    assert float(per_token.sum().detach()) == pytest.approx(want, abs=tol)


def test_complementary_block_loss_scores_every_token_once(tmp_path):
    """Fast-dLLM v2's complementary masks: the second half masks exactly the maskable tokens the first left clean,
    at weight 1 / (1 - t_b); the loss is the mean of the two hand-computed blockwise estimates."""
    from dlm.adapt import ComplementaryBlockLoss

    net, cfg, process, x0, maskable, t, t_pos = _block_setup(tmp_path)
    loss_fn = ComplementaryBlockLoss()
    per_token, is_masked, comp = loss_fn.terms(net, x0, process, t, torch.Generator().manual_seed(5), maskable)
    xt, _ = process.q_sample(x0, t, generator=torch.Generator().manual_seed(5), maskable=maskable)
    assert torch.equal(is_masked ^ comp, maskable) and not bool((is_masked & comp).any())
    xc = torch.where(comp, torch.full_like(x0, process.mask_id), x0)
    want = float((_blockwise_ce(net, x0, xt, 3) * is_masked / t_pos).sum()
                 + (_blockwise_ce(net, x0, xc, 3) * comp / (1 - t_pos)).sum())
    tol = _loss_atol(net, xt, float((is_masked / t_pos).sum() + (comp / (1 - t_pos)).sum()))
    assert float(per_token.sum().detach()) == pytest.approx(want, abs=tol)
    out = loss_fn(net, x0, process, maskable=maskable, generator=torch.Generator().manual_seed(6))
    assert math.isfinite(float(out.loss.detach()))


def test_block_mode_adapts_reloads_and_generates(tmp_path):
    folder = tmp_path / "qwen2"
    write_causal(folder, "qwen2")
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    tcfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), max_steps=3, batch_size=4, seq_len=24, lr=3e-3,
                       warmup_steps=0, ckpt_every=3, log_every=1, threads=1)
    summary = adapt(folder, AdaptConfig(mode="block", block_size=4, complementary=True), tcfg, show_progress=False)
    assert summary["mode"] == "block" and summary["anneal_steps"] == 0 and math.isfinite(summary["final_loss"])
    lm = DiffusionLM.from_pretrained(tmp_path / "run")
    assert lm.block_size == 4 and lm.config.sampling.sampler == "block" and not lm.config.model.logits_shift
    ids = lm.generate(prompt := lm.tokenizer.encode("To be"), max_new_tokens=8, steps=8)
    assert ids[:len(prompt)] == prompt and len(ids) == len(prompt) + 8 and lm.tokenizer.mask_id not in ids


def test_bad_input_is_refused(tmp_path, capsys):
    from dlm.cli import main

    with pytest.raises(ConfigError, match="adapt mode must be one of"):
        AdaptConfig(mode="blocks").validate()
    with pytest.raises(ConfigError, match="block-mode option"):
        AdaptConfig(mode="shift", complementary=True).validate()
    folder = tmp_path / "llama"
    write_causal(folder, "llama")
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    with pytest.raises(SystemExit):
        main(["adapt", str(folder), "--out", str(tmp_path / "run"), "--data", str(data), "--seq-len", "4096"])
    assert "exceeds the model's max_len" in capsys.readouterr().err
    main(["adapt", str(folder), "--out", str(tmp_path / "run"), "--data", str(data), "--max-steps", "2",
          "--batch-size", "2", "--seq-len", "16", "--ckpt-every", "2", "--threads", "1", "--quiet"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2
    bare = tmp_path / "bare"
    write_causal(bare, "llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink()
    with pytest.warns(UserWarning, match="no tokenizer files"), pytest.raises(SystemExit):
        main(["adapt", str(bare), "--out", str(tmp_path / "bare-run"), "--data", str(data)])
    assert "has no tokenizer files, and adaptation reads text" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an adapted model is no longer autoregressive
        main(["adapt", str(tmp_path / "run"), "--out", str(tmp_path / "again"), "--data", str(data)])
    assert "already a diffusion model" in capsys.readouterr().err


def test_torchrun_workers_get_the_model_path():
    """dlm adapt MODEL --nproc 2 relaunches itself under torchrun: each worker's command keeps the positional."""
    from dlm.cli import _command_argv, build_parser

    args = build_parser().parse_args(["adapt", "/models/smol", "--out", "runs/a", "--data", "shakespeare",
                                      "--mode", "block", "--nproc", "2"])
    argv = _command_argv(args)
    assert argv[:2] == ["adapt", "/models/smol"] and "--nproc" not in argv
    again = build_parser().parse_args(argv)
    assert (again.model, again.out, again.mode, again.data) == ("/models/smol", "runs/a", "block", "shakespeare")


def test_heldout_bound_scores_the_window_after_a_clean_bos():
    """Uniform logits: each masked token costs log(V - 1) ([MASK] leaves the softmax), so (n / l) x l of them is
    exactly n log(V - 1) per window for any draw; the network sees [BOS] then the window, [BOS] never masked."""
    V, bos, mask, n = 11, 9, 10, 7
    seen = []

    class Uniform(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, xt, t=None):
            seen.append(xt.clone())
            return torch.zeros(*xt.shape, V) + self.w

    windows = torch.randint(0, 9, (5, n), generator=torch.Generator().manual_seed(0))
    nats = heldout_bound(Uniform(), windows, bos, mask, n_samples=3, batch_size=2)
    assert nats.dtype == torch.float64
    assert torch.allclose(nats, torch.full((5,), n * math.log(V - 1), dtype=torch.float64))
    assert len(seen) == 3 * 3  # 3 batches of <= 2 windows, 3 draws each
    for k, xt in enumerate(seen):
        x0 = windows[2 * (k // 3): 2 * (k // 3) + 2]
        assert xt.shape == (x0.shape[0], 1 + n) and (xt[:, 0] == bos).all()
        is_masked = xt[:, 1:] == mask
        assert torch.equal(torch.where(is_masked, mask, x0), xt[:, 1:])  # the rest is the window, clean
        assert ((is_masked.sum(1) >= 1) & (is_masked.sum(1) <= n)).all()


def test_dlm_eval_scores_an_adapted_model_after_bos(tmp_path):
    """evaluate_text (dlm eval) scores an adapted model's windows after a clean [BOS], as it was trained: the same
    windows and draws as heldout_bound; `window` sets their length ([BOS] + window - 1 tokens)."""
    from dlm.data import TokenStream, load_corpus, tokenize_documents
    from dlm.eval.heldout import evaluate_text

    folder = tmp_path / "llama"
    write_causal(folder, "llama")
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    _run(folder, data, tmp_path / "run", max_steps=2, ckpt_every=2)
    lm = DiffusionLM.from_pretrained(tmp_path / "run")
    r = evaluate_text(lm, str(data), max_windows=3, precision="fp32", window=16)
    windows = TokenStream(tokenize_documents(load_corpus(str(data)), lm.tokenizer), 15).windows(3)
    nats = heldout_bound(lm.model, windows, lm.tokenizer.bos_id, lm.tokenizer.mask_id, n_samples=1)
    assert r["n_tokens"] == windows.numel() == 45
    assert r["bits_per_token"] == pytest.approx(float(nats.sum()) / math.log(2) / 45, rel=1e-9)


def test_dlm_eval_refuses_a_window_outside_the_context(tmp_path):
    from dlm.eval.heldout import evaluate_text

    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    lm = DiffusionLM.from_pretrained(Path(__file__).parent / "data/hf/llada-tiny")
    for bad in (0, 1, lm.max_len + 1):
        with pytest.raises(ConfigError, match="window must be in"):
            evaluate_text(lm, str(data), max_windows=1, window=bad)
