"""MDLM and SEDD hub folders load natively on our DDiT: logits equal the upstream forwards' reference tensors.

tests/data/hf/{mdlm,sedd}-tiny are tiny random checkpoints in the upstream on-disk layouts (config keys and weight
names of kuleshov-group/mdlm-owt and louaaron/sedd-small; hidden 64, 2 blocks, 4 heads, cond_dim 32, a 299-token
byte-level BPE "GPT-2" + [MASK] = 299). Their reference.safetensors were computed once by the upstream modeling code
(flash-attn calls replaced by SDPA / rotate-half to run on CPU; see each reference_meta.json); that code is not here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tolerance import network_atol

from dlm.checkpoint import CheckpointError, load_pretrained, save_pretrained
from dlm.config import ModelConfig
from dlm.models import build_model
from dlm.models.ddit import DDiT, sedd_log_score, subs_log_probs
from dlm.pipeline import DiffusionLM

DATA = Path(__file__).parent / "data" / "hf"
MDLM, SEDD = DATA / "mdlm-tiny", DATA / "sedd-tiny"
MASK, V = 299, 300


@pytest.fixture(scope="module")
def lms() -> dict[str, DiffusionLM]:
    return {"mdlm": DiffusionLM.from_pretrained(MDLM), "sedd": DiffusionLM.from_pretrained(SEDD)}


def ref(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "reference.safetensors"))


def test_folders_load_as_ddit_with_their_defaults():
    for folder, kind in ((MDLM, "mdlm"), (SEDD, "sedd")):
        model, cfg, tok = load_pretrained(folder)
        assert isinstance(model, DDiT) and not model.training
        assert cfg.model.arch == "ddit" and cfg.extra["model_type"] == kind
        assert (cfg.model.vocab_size, cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads) == (V, 64, 2, 4)
        assert (cfg.model.cond_dim, cfg.model.time_dim, cfg.model.d_ff, cfg.model.max_len) == (32, 256, 256, 64)
        assert cfg.sampling.sampler == {"mdlm": "mdlm", "sedd": "sedd_analytic"}[kind]
        assert cfg.sampling.block_length == 0
        assert (tok.mask_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (MASK, 298, 298, V)
        assert tok.decode(tok.encode("the quick brown fox")) == "the quick brown fox"
        assert tok.decode([MASK], skip_special=False) == "[MASK]"
    assert load_pretrained(MDLM)[1].model.time_conditioning is False  # as the released OWT model
    assert load_pretrained(SEDD)[1].extra["scale_by_sigma"] is True



def _tol(reference: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """The tiny DDiT's logits: 2 blocks, widest reduction its MLP (d_ff = 256 terms); see tests/tolerance.py."""
    return network_atol(dtype, width=256, n_layers=2, scale=float(reference.abs().max()))


def test_mdlm_logits_and_subs_equal_the_reference(lms):
    r = ref(MDLM)
    with torch.no_grad():
        logits = lms["mdlm"].model(r["input_ids"], r["t"])  # time_conditioning false: t is ignored, sigma = 0
    torch.testing.assert_close(logits, r["logits"], atol=_tol(r["logits"]), rtol=0)
    # SUBS: upstream writes -1e6 where we write -inf; the probabilities and every finite entry agree.
    log_probs = subs_log_probs(logits, r["input_ids"], MASK)
    finite = torch.isfinite(log_probs)
    torch.testing.assert_close(log_probs[finite], r["log_probs"][finite], atol=2 * _tol(r["logits"]), rtol=0)
    assert (r["log_probs"][~finite] < -1e5).all()
    torch.testing.assert_close(log_probs.exp(), r["log_probs"].exp(), atol=1e-6, rtol=0)


def test_sedd_logits_and_log_score_equal_the_reference(lms):
    r = ref(SEDD)
    net = lms["sedd"].model
    with torch.no_grad():
        logits = net(r["input_ids"], r["t"])  # sigma = -log(1 - (1 - 1e-3) t), as the reference was fed
        torch.testing.assert_close(net(r["input_ids"], sigma=r["sigma"]), r["logits"], atol=_tol(r["logits"]), rtol=0)
    torch.testing.assert_close(net.sigma(r["t"]), r["sigma"], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, r["logits"], atol=_tol(r["logits"]), rtol=0)
    torch.testing.assert_close(sedd_log_score(logits, r["input_ids"], r["sigma"]), r["log_score"],
                               atol=2 * _tol(r["logits"]), rtol=0)


def test_sedd_runs_on_its_own_graph_and_samplers(lms):
    """The loaded SEDD is a sedd-absorbing model: its graph's log score is upstream's, its samplers run it."""
    r, lm = ref(SEDD), lms["sedd"]
    assert lm.config.process.process == "sedd-absorbing" and lm.config.process.eps == 1e-3
    graph = lm.process
    sigma = graph.schedule.sigma(r["t"].double())
    torch.testing.assert_close(sigma.float(), r["sigma"], atol=1e-4, rtol=0)
    with torch.no_grad():
        log_score = graph.log_score(lm.model(r["input_ids"], r["t"]).double(), r["input_ids"], sigma[:, None])
    torch.testing.assert_close(log_score.float(), r["log_score"], atol=1e-4, rtol=0)
    prompt = torch.tensor([[5, 6, 7, 8]])
    for sampler in ("sedd_analytic", "sedd_euler"):
        out = lm.generate(prompt, max_new_tokens=8, steps=8, seed=0, sampler=sampler)
        assert torch.equal(out[:, :4], prompt) and not (out == MASK).any()


@pytest.mark.parametrize("kind", ["mdlm", "sedd"])
def test_generation_runs_end_to_end_with_the_family_sampler(lms, kind):
    lm = lms[kind]
    prompt = torch.tensor([[5, 6, 7, 8], [40, 41, 42, 43]])
    out = lm.generate(prompt, max_new_tokens=8, steps=8, seed=0)
    assert out.dtype == torch.long and out.shape == (2, 12)
    assert torch.equal(out[:, :4], prompt) and not (out == MASK).any()
    assert torch.equal(out, lm.generate(prompt, max_new_tokens=8, steps=8, seed=0))  # seeded
    logits = lm.logits(out)
    assert logits.dtype == torch.float32 and logits.shape == (2, 12, V)
    texts = lm.generate(["the quick brown", "a"], max_new_tokens=4, steps=4, seed=0)  # left-padded batch
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    # left padding is invisible: each row of the batch is what its prompt gives alone (row i's noise is seeded
    # row_seed(seed, i), dlm.sampling.noise)
    from dlm.sampling.noise import row_seed

    assert texts == [lm.generate(p, max_new_tokens=4, steps=4, seed=row_seed(0, i))
                     for i, p in enumerate(("the quick brown", "a"))]


def test_bfloat16_load_stays_close():
    r = ref(SEDD)
    lm = DiffusionLM.from_pretrained(SEDD, dtype="bfloat16")
    assert lm.model.output_layer.linear.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = lm.model(r["input_ids"], r["t"]).float()
    assert (logits - r["logits"]).abs().max() <= _tol(r["logits"], torch.bfloat16)  # bf16 roundoff over the network


def test_export_to_a_dlm_folder_round_trips(tmp_path):
    r = ref(SEDD)
    save_pretrained(tmp_path / "sedd", *load_pretrained(SEDD))
    model, cfg, tok = load_pretrained(tmp_path / "sedd")  # our own format now: same names, same network
    assert cfg.library == "dlm" and cfg.extra["scale_by_sigma"] is True and tok.mask_id == MASK
    with torch.no_grad():
        torch.testing.assert_close(model(r["input_ids"], r["t"]), r["logits"], atol=_tol(r["logits"]), rtol=0)


def test_fresh_ddit_trains_from_zero_init():
    net = build_model(ModelConfig(arch="ddit", vocab_size=50, d_model=32, n_layers=1, n_heads=2, cond_dim=16))
    xt = torch.randint(0, 50, (2, 6))
    assert torch.equal(net(xt, torch.tensor([0.2, 0.9])), torch.zeros(2, 6, 50))  # adaLN-Zero, zero output layer
    with pytest.raises(ValueError, match="diffusion time t"):
        net(xt)


# ----- errors ---------------------------------------------------------------------------------------------------
def damaged(tmp_path: Path, folder: Path, edit) -> Path:
    """A copy of the folder whose model.safetensors went through edit(dict) -> dict."""
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    save_file(edit(load_file(str(out / "model.safetensors"))), str(out / "model.safetensors"))
    return out


def test_missing_key(tmp_path):
    folder = damaged(tmp_path, MDLM, lambda sd: {k: v for k, v in sd.items() if "blocks.1.attn_out" not in k})
    with pytest.raises(CheckpointError, match=r"missing \['blocks.1.attn_out.weight'\]"):
        load_pretrained(folder)


def test_extra_key(tmp_path):
    folder = damaged(tmp_path, SEDD, lambda sd: {**sd, "blocks.2.norm1.weight": torch.ones(64)})
    with pytest.raises(CheckpointError, match=r"unexpected \['blocks.2.norm1.weight'\]"):
        load_pretrained(folder)


def test_wrong_shape(tmp_path):
    folder = damaged(tmp_path, MDLM, lambda sd: {**sd, "backbone.output_layer.linear.bias": torch.zeros(299)})
    with pytest.raises(CheckpointError, match=r"backbone.output_layer.linear.bias has shape \(299,\)"):
        load_pretrained(folder)


def test_missing_tokenizer_says_what_to_put_there(tmp_path):
    for folder, files in ((MDLM, ["tokenizer.json"]), (SEDD, ["vocab.json", "merges.txt"])):
        out = tmp_path / folder.name
        shutil.copytree(folder, out)
        for name in files:
            (out / name).unlink()
        with pytest.warns(UserWarning, match="no tokenizer files"):
            _, _, tok = load_pretrained(out)
        with pytest.raises(ValueError, match="GPT-2's tokenizer.json"):
            tok.encode("hello")


def test_unsupported_configs(tmp_path):
    sedd = tmp_path / "sedd"
    shutil.copytree(SEDD, sedd)
    config = json.loads((SEDD / "config.json").read_text())
    (sedd / "config.json").write_text(json.dumps({**config, "graph": {"type": "uniform"}}))
    with pytest.raises(CheckpointError, match="graph.type='uniform' is not supported"):
        load_pretrained(sedd)
    mdlm = tmp_path / "mdlm"
    shutil.copytree(MDLM, mdlm)
    config = json.loads((MDLM / "config.json").read_text())
    del config["hidden_dim"]
    (mdlm / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"lacks \['hidden_dim'\]"):
        load_pretrained(mdlm)
