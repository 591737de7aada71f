"""`dlm export --format sdar | fast_dllm_v2`: a dlm block model written in an upstream layout is the same network.

Train-free: a tiny block model with seeded random weights (`tiny_block_model`, weights rounded to bfloat16 so the
upstream bf16 convention loses nothing) is exported and loaded back with dlm's own SDAR / Fast-dLLM v2 loaders:
identical logits (float32, exactly) and identical block-sampler tokens. tests/data/export/sdar-tiny is that
model's SDAR export, committed with `reference.safetensors`: logits and greedy generations computed once by the
UPSTREAM SDAR code (JetAstra/SDAR modeling_sdar.py and its evaluation's block_diffusion_generate, CPU stand-ins
for the flash-attn kernels; reference_meta.json says exactly how); tests/data/export/fast-dllm-v2-tiny is the same for
the Qwen2.5-shaped variant and Fast-dLLM v2's hub modeling.py. The export of the same seeded model must be
byte-identical to each committed folder, and dlm must match upstream on it. No upstream code runs here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tolerance import model_atol

from dlm.config import CheckpointConfig, ConfigError, ModelConfig, ProcessConfig
from dlm.pipeline import DiffusionLM
from dlm.tokenizer import ByteTokenizer

DATA = Path(__file__).parent / "data" / "export"
SDAR_EXPORT = DATA / "sdar-tiny"
FAST_EXPORT = DATA / "fast-dllm-v2-tiny"
FAST_MODEL = {"block_size": 8, "qk_norm": False, "logits_shift": True, "qkv_bias": True}  # Qwen2.5-shaped
SEED = 20261202
BLOCK = 4


def tiny_block_model(seed: int = SEED, block_size: int = BLOCK, **model: object):
    """(network, CheckpointConfig, ByteTokenizer) of a tiny bd3lm model with blocks of 4, Qwen3-shaped by default
    (qk_norm on, grouped-query attention), weights drawn in sorted-name order from `seed`: norms 1 + 0.1 randn,
    the embedding std 0.5, q/k std 0.2, the head std 1.0 (sharp enough that the confidence threshold commits
    several tokens in a step), other matrices std 0.15; every weight rounded to bfloat16."""
    from dlm.models import build_model
    from dlm.processes.masked import PROCESSES

    m = ModelConfig(**{"vocab_size": 260, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                       "qk_norm": True, "max_len": 64, **model})
    net = build_model(m).eval()
    g = torch.Generator().manual_seed(seed)
    std = {"wte": 0.5, "q_proj": 0.2, "k_proj": 0.2, "lm_head": 1.0}
    with torch.no_grad():
        for name, p in sorted(net.named_parameters()):
            z = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                value = 0.1 * z
            elif p.dim() == 1:
                value = 1.0 + 0.1 * z
            else:
                value = z * next((s for k, s in std.items() if k in name), 0.15)
            p.copy_(value.to(torch.bfloat16).float())
    process = ProcessConfig(process="bd3lm", **{**PROCESSES.get("bd3lm").defaults, "block_size": block_size})
    cfg = CheckpointConfig(model=m, process=process)
    cfg.sampling = cfg.sampling.replace(sampler="block", block_length=block_size)
    return net, cfg, ByteTokenizer()


def native_lm(tmp_path: Path, name: str = "native", tok=None, **model: object) -> DiffusionLM:
    """The seeded model saved as a dlm folder and loaded as a user would hold it (with `tok`'s vocabulary)."""
    from dlm.checkpoint import save_pretrained

    net, cfg, byte = tiny_block_model(**({"vocab_size": tok.vocab_size} if tok else {}), **model)
    tok = tok or byte
    save_pretrained(tmp_path / name, net, cfg, tok, dtype=torch.float32)
    return DiffusionLM.from_pretrained(str(tmp_path / name))


def export(lm: DiffusionLM, folder: Path, fmt: str, dtype: torch.dtype = torch.bfloat16) -> DiffusionLM:
    from dlm.formats.export import export_model

    export_model(folder, lm.model, lm.config, lm.tokenizer, fmt, dtype=dtype)
    return DiffusionLM.from_pretrained(str(folder))


def inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (2, 24), generator=g)
    ids[:, 9:15] = 257  # [MASK] inside blocks 2 and 3
    return ids


# The same explicit options on both sides: the two folders carry different sampling defaults (each loader sets its
# upstream's), the network is what must agree.
OPTIONS = [{"threshold": 0.85}, {"threshold": 1.0}, {"threshold": 0.5, "stop_at_eos": True}]  # (None: the default)


def same_generations(a: DiffusionLM, b: DiffusionLM, prompt, **extra) -> None:
    for opts in OPTIONS:
        kw = {"sampler": "block", "block_length": BLOCK, "steps": 64, "temperature": 0.0, "suppress_special": False,
              "ar_first_token": False, "sub_block": 0, **opts, **extra}
        x, y = a.generate(prompt, max_new_tokens=16, **kw), b.generate(prompt, max_new_tokens=16, **kw)
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


# ----- sdar: the export loads back to the same network ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_sdar_export_loads_back_to_identical_logits_and_tokens(tmp_path, dtype):
    lm = native_lm(tmp_path)
    back = export(lm, tmp_path / "sdar", "sdar", dtype)
    cfg = json.loads((tmp_path / "sdar" / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"], cfg["block_size"], cfg["mask_token_id"]) == \
        ("sdar", ["SDARForCausalLM"], BLOCK, 257)
    assert cfg["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert back.block_size == BLOCK and back.config.model.qk_norm and back.config.extra["model_type"] == "sdar"
    ids = inputs()
    # bf16-representable weights: the bf16 export loses nothing, so float32 logits are equal, not close
    assert torch.equal(back.logits(ids), lm.logits(ids))
    with torch.no_grad():
        assert torch.equal(back.model(ids, attention="full"), lm.model(ids, attention="full"))
    tok, tok2 = lm.tokenizer, back.tokenizer
    assert (tok2.mask_id, tok2.eos_id, tok2.pad_id, tok2.bos_id, tok2.stop_ids) == \
        (tok.mask_id, tok.eos_id, tok.pad_id, tok.bos_id, tok.stop_ids)
    text = "ROMEO: héllo, wörld!\n\tend"
    assert tok2.encode(text) == tok.encode(text) and tok2.decode(tok.encode(text)) == text
    same_generations(lm, back, ids[:1, :6])
    same_generations(lm, back, ["ROMEO:", "To be, or not"])  # a ragged batch of text prompts


def test_a_bpe_tokenizer_becomes_hugging_face_files_with_the_same_ids(tmp_path):
    from dlm.tokenizer import BPETokenizer

    texts = ["First Citizen: Before we proceed any further, hear me speak.", "All: Speak, speak. Ünïcödé 日本"]
    bpe = BPETokenizer.train(texts * 20, vocab_size=300)
    lm = native_lm(tmp_path, tok=bpe)
    back = export(lm, tmp_path / "sdar", "sdar")
    for text in [*texts, "Before we speak, hear me.\n\tproceed 日本 [MASK]"]:
        assert back.tokenizer.encode(text) == bpe.encode(text)
        assert back.tokenizer.decode(bpe.encode(text)) == bpe.decode(bpe.encode(text))
    assert back.tokenizer.decode([bpe.mask_id], skip_special=False) == "<|MASK|>"  # SDAR's name for it
    ids = torch.tensor([bpe.encode(texts[0])[:20]])
    assert torch.equal(back.logits(ids), lm.logits(ids))


def test_weights_carry_the_qwen3_names(tmp_path):
    lm = native_lm(tmp_path)
    export(lm, tmp_path / "sdar", "sdar")
    names = set(load_file(tmp_path / "sdar" / "model.safetensors"))
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.1.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight",
            "model.layers.0.mlp.gate_proj.weight", "model.layers.0.post_attention_layernorm.weight"} <= names
    assert not any(n.endswith("bias") for n in names)
    assert len(names) == 3 + 2 * 11  # 11 tensors a layer: q/k/v/o, q/k norms, gate/up/down, two norms


# ----- the committed export and the upstream SDAR code's outputs on it ---------------------------------------------
@pytest.fixture(scope="module")
def committed():
    return DiffusionLM.from_pretrained(str(SDAR_EXPORT)), load_file(SDAR_EXPORT / "reference.safetensors")


def test_export_of_the_seeded_model_is_byte_identical_to_the_committed_folder(tmp_path):
    from dlm.formats.export import export_model

    net, cfg, tok = tiny_block_model()
    same_folder(export_model(tmp_path / "x", net, cfg, tok, "sdar", dtype=torch.bfloat16), tmp_path / "x",
                SDAR_EXPORT)


def same_folder(files: list[str], ours: Path, committed: Path) -> None:
    """Every file byte for byte, except tokenizer.json (serialised by the tokenizers library, whose layout may
    change between versions): the same ids for the same text there."""
    from dlm.tokenizer import HFTokenizer

    assert set(files) == {f.name for f in committed.iterdir()} - {"reference.safetensors", "reference_meta.json"}
    for name in files:
        if name != "tokenizer.json":
            assert (ours / name).read_bytes() == (committed / name).read_bytes(), name
    tok = DiffusionLM.from_pretrained(str(committed)).tokenizer
    assert isinstance(tok, HFTokenizer)
    text = "ROMEO: héllo, wörld!\n\tend"
    assert tok.encode(text) == ByteTokenizer().encode(text) and tok.decode(tok.encode(text)) == text


def close(ours: torch.Tensor, expect: torch.Tensor, lm: DiffusionLM) -> None:
    assert ours.shape == expect.shape
    assert (ours - expect).abs().max() <= model_atol(lm, torch.float32, expect)


def test_dlm_matches_the_upstream_sdar_code_on_the_export(committed):
    from dlm.models.common import BlockCache

    lm, ref = committed
    ids = ref["input_ids"]
    close(lm.logits(ids), ref["logits_block4"], lm)
    with torch.no_grad():
        close(lm.model(ids, attention="full"), ref["logits_full"], lm)
        cache = BlockCache()
        lm.model(ids[:, :8], cache=cache.extend(), block_size=BLOCK)
        close(lm.model(ids[:, 8:12], cache=cache, block_size=BLOCK), ref["logits_cached_block3"], lm)


@pytest.mark.parametrize("name", ["tail", "aligned"])
@pytest.mark.parametrize("threshold", [None, 1.0], ids=["default", "static"])
def test_generation_on_the_export_equals_upstream(committed, name, threshold):
    """SDAR's evaluation generator (greedy; threshold 0.85 = the loader's default, 1.0 = one token per step) on
    the exported folder, token for token up to the first [EOS]. After it, upstream decodes the rest of that block
    and stops, leaving later positions [MASK]; dlm's block sampler ends the row there, filling it with [EOS]
    (the text after [EOS] is dropped by both)."""
    lm, ref = committed
    p = ref[f"gen_prompt_{name}"]
    expect = ref[f"gen_output_{name}_thr{85 if threshold is None else 100}"][0]
    ours = lm.generate(p, max_new_tokens=expect.shape[0] - p.shape[1], threshold=threshold)[0]
    eos = (expect[p.shape[1]:] == lm.tokenizer.eos_id).nonzero()
    end = p.shape[1] + int(eos[0]) + 1 if len(eos) else expect.shape[0]
    assert end > p.shape[1] + 1 and torch.equal(ours[:end], expect[:end])
    assert (ours[end:] == lm.tokenizer.eos_id).all()


# ----- fast_dllm_v2 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "qkv-bias"])
def test_fast_dllm_v2_export_loads_back_to_identical_logits_and_tokens(tmp_path, bias):
    """Qwen2.5's layout always has q/k/v biases: a model without them is written with zero biases (the same
    function, exactly)."""
    lm = native_lm(tmp_path, qk_norm=False, logits_shift=True, qkv_bias=bias)
    back = export(lm, tmp_path / "fast", "fast_dllm_v2")
    cfg = json.loads((tmp_path / "fast" / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"], cfg["bd_size"]) == \
        ("Fast_dLLM_Qwen", ["Fast_dLLM_QwenForCausalLM"], BLOCK)
    biases = {k: v for k, v in load_file(tmp_path / "fast" / "model.safetensors").items() if k.endswith("bias")}
    assert len(biases) == 2 * 3  # q, k, v in each layer
    assert any((v != 0).any() for v in biases.values()) == bias  # the model's own, or zeros
    assert back.config.model.logits_shift and back.block_size == BLOCK
    assert back.tokenizer.decode([back.tokenizer.mask_id], skip_special=False) == "|<MASK>|"
    ids = inputs()
    assert torch.equal(back.logits(ids), lm.logits(ids))
    same_generations(lm, back, ids[:1, :6])
    same_generations(lm, back, ids[:1, :6], ar_first_token=True, sub_block=2)  # Fast-dLLM v2's own decoding


# ----- what a layout cannot hold: one line naming every difference, nothing written ------------------------------
@pytest.mark.parametrize("fmt, model, process, match", [
    ("sdar", {"qk_norm": False}, {}, r"sdar needs qk_norm=True \(SDAR is Qwen3.*this model has qk_norm=False"),
    ("sdar", {"qkv_bias": True}, {}, "sdar needs qkv_bias=False"),
    ("sdar", {"logits_shift": True}, {}, "sdar needs logits_shift=False"),
    ("sdar", {"qk_norm": False, "qkv_bias": True}, {}, "qk_norm=True.*; sdar needs qkv_bias=False"),
    ("sdar", {}, {"process": "masked", "block_size": 0}, "process 'masked' .*--process bd3lm --block-size N"),
    ("sdar", {"arch": "ar"}, {}, "autoregressive model .*dlm adapt --mode block"),
    ("sdar", {"arch": "dit"}, {}, "arch 'dit', not the RMSNorm / RoPE / SwiGLU transformer"),
    ("sdar", {"rotary_dim": 8}, {}, "RoPE over head_dim=16.*partial RoPE, rotary_dim=8"),
    ("fast_dllm_v2", {"moe_experts": 4, "moe_d_ff": 32, "logits_shift": True, "qk_norm": False}, {},
     "dense SwiGLU transformer; this model has mixture-of-experts layers"),
    ("fast_dllm_v2", {}, {}, "fast_dllm_v2 needs qk_norm=False .*; fast_dllm_v2 needs logits_shift=True"),
], ids=["qk_norm", "qkv_bias", "logits_shift", "two", "not-block", "ar", "dit", "partial-rope", "moe", "fast-qwen3"])
def test_a_model_the_layout_cannot_hold_is_refused_in_one_line(tmp_path, fmt, model, process, match):
    from dlm.formats.export import export_model

    net, cfg, tok = tiny_block_model()
    cfg = CheckpointConfig(model=cfg.model.replace(**model), process=cfg.process.replace(**process),
                           sampling=cfg.sampling)
    with pytest.raises(ConfigError, match=match) as info:
        export_model(tmp_path / "out", net, cfg, tok, fmt)
    assert "\n" not in str(info.value) and str(info.value).startswith(f"{fmt} cannot hold this model exactly: ")
    assert not (tmp_path / "out").exists()


def test_a_mask_id_outside_the_embedding_is_refused(tmp_path):
    from dlm.formats.export import export_model
    from dlm.tokenizer import IdsOnlyTokenizer

    net, cfg, _ = tiny_block_model()
    tok = IdsOnlyTokenizer("x", vocab_size=260, mask_id=260, eos_id=258)  # an AR model's: no [MASK] row
    with pytest.raises(ConfigError, match="mask id 260 is outside its 260 rows"):
        export_model(tmp_path / "out", net, cfg, tok, "sdar")


def test_an_unknown_format_lists_the_known_ones():
    from dlm.formats.export import EXPORTERS

    known = r"\['dlm', 'fast_dllm_v2', 'sdar'\]"
    with pytest.raises(ValueError, match=rf"unknown export format 'gguf'; choose one of {known}"):
        EXPORTERS.get("gguf")


# ----- the CLI ------------------------------------------------------------------------------------------------------
def test_cli_exports_sdar_and_the_folder_loads_back(tmp_path, capsys):
    from dlm.cli import main

    lm = native_lm(tmp_path)
    main(["export", "--model", str(tmp_path / "native"), "--format", "sdar", "--out", str(tmp_path / "sdar")])
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "sdar" and {"config.json", "model.safetensors", "tokenizer.json",
                                        "generation_config.json"} <= set(out["files"])
    back = DiffusionLM.from_pretrained(str(tmp_path / "sdar"))
    assert torch.equal(back.logits(inputs()), lm.logits(inputs()))  # the default --save-dtype bfloat16 is lossless
    main(["generate", "ROMEO:", "--model", str(tmp_path / "sdar"), "--max-new-tokens", "8", "--json"])
    assert isinstance(json.loads(capsys.readouterr().out)["completion"], str)


def test_cli_refuses_a_model_sdar_cannot_hold(tmp_path, capsys):
    from dlm.cli import main

    native_lm(tmp_path, qk_norm=False)
    with pytest.raises(SystemExit) as info:
        main(["export", "--model", str(tmp_path / "native"), "--format", "sdar", "--out", str(tmp_path / "sdar")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dlm: error: sdar cannot hold this model exactly: sdar needs qk_norm=True")
    assert "\n" not in err
    assert not (tmp_path / "sdar").exists()


# ----- the writers invert the loaders: an upstream folder, loaded and exported, is that folder again -------------
@pytest.mark.parametrize("name, fmt", [("sdar-tiny", "sdar"), ("fast-dllm-v2-tiny", "fast_dllm_v2")])
def test_an_upstream_folder_loaded_and_exported_is_that_folder_again(tmp_path, name, fmt):
    from dlm.formats.export import export_model

    src = Path(__file__).parent / "data" / "hf" / name
    lm = DiffusionLM.from_pretrained(str(src))
    export_model(tmp_path / "x", lm.model, lm.config, lm.tokenizer, fmt, dtype=torch.bfloat16)
    want, got = (json.loads((f / "config.json").read_text()) for f in (src, tmp_path / "x"))
    want.pop("transformers_version")
    assert {k: got[k] for k in want} == want  # every upstream key, with the upstream value
    assert set(got) - set(want) <= {"pad_token_id"}
    w0, w1 = load_file(src / "model.safetensors"), load_file(tmp_path / "x" / "model.safetensors")
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) and w0[k].dtype == w1[k].dtype for k in w0)
    back = DiffusionLM.from_pretrained(str(tmp_path / "x"))
    assert back.config.sampling == lm.config.sampling and back.tokenizer.stop_ids == lm.tokenizer.stop_ids
    ids = load_file(src / "reference.safetensors")["input_ids"]
    assert torch.equal(back.logits(ids), lm.logits(ids))


# ----- the committed Fast-dLLM v2 export and the upstream hub code's outputs on it ------------------------------
def shifted(raw: torch.Tensor) -> torch.Tensor:
    """Fast-dLLM v2's generate(): a forward's logits moved one place right, position 0 keeping its own."""
    return torch.cat([raw[:, :1], raw[:, :-1]], 1)


@pytest.fixture(scope="module")
def committed_fast():
    return DiffusionLM.from_pretrained(str(FAST_EXPORT)), load_file(FAST_EXPORT / "reference.safetensors")


def test_fast_dllm_v2_export_of_the_seeded_model_is_byte_identical(tmp_path):
    from dlm.formats.export import export_model

    net, cfg, tok = tiny_block_model(**FAST_MODEL)
    same_folder(export_model(tmp_path / "x", net, cfg, tok, "fast_dllm_v2", dtype=torch.bfloat16), tmp_path / "x",
                FAST_EXPORT)


def test_dlm_matches_the_upstream_fast_dllm_v2_code_on_the_export(committed_fast):
    from dlm.models.common import BlockCache

    lm, ref = committed_fast
    ids = ref["input_ids"]
    close(lm.logits(ids), shifted(ref["logits"]), lm)
    with torch.no_grad():
        cache = BlockCache()
        lm.model(ids[:, :16], cache=cache.extend(), block_size=8)
        close(lm.model(ids[:, 16:], cache=cache, block_size=8), shifted(ref["logits_cached_block3"]), lm)


@pytest.mark.parametrize("key, sub_block", [("gen_output_short_24_sub8", None), ("gen_output_short_24_sub4", 4),
                                            ("gen_output_long_32_sub8", None)])
def test_generation_on_the_fast_dllm_v2_export_equals_upstream(committed_fast, key, sub_block):
    """Upstream generate(threshold=0.9, block_size=8, small_block_size=8 or 4, temperature 0): the loader's
    defaults (sub-blocks of 8, each later block's first token AR), token for token."""
    lm, ref = committed_fast
    p, expect = ref[f"gen_prompt_{key.split('_')[2]}"], ref[key]
    ours = lm.generate(p, max_new_tokens=expect.shape[1] - p.shape[1], sub_block=sub_block)
    assert torch.equal(ours, expect)


def test_a_qwen3_model_adapted_to_blocks_fits_sdar(tmp_path):
    """The route docs/block.md gives: `dlm adapt --mode block` on a Qwen3 folder (qk_norm, no biases, no shift)
    is an SDAR network; it exports, and loads back to the same logits. [MASK] goes to the tokenizer's first free
    row (here 314; Qwen3's at full size is 151669, SDAR's mask id)."""
    import shutil

    from dlm.adapt import to_diffusion

    qwen3 = tmp_path / "qwen3"
    shutil.copytree(Path(__file__).parent / "data" / "hf" / "sdar-tiny", qwen3)
    cfg = json.loads((qwen3 / "config.json").read_text())
    for key in ("block_size", "mask_token_id", "auto_map"):
        cfg.pop(key)
    (qwen3 / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3",
                                                   "architectures": ["Qwen3ForCausalLM"]}))
    ar = DiffusionLM.from_pretrained(str(qwen3))
    net, acfg, tok = to_diffusion(ar.model, ar.config, ar.tokenizer, mode="block", block_size=BLOCK)
    from dlm.formats.export import export_model

    export_model(tmp_path / "sdar", net.eval(), acfg, tok, "sdar", dtype=torch.float32)
    back = DiffusionLM.from_pretrained(str(tmp_path / "sdar"))
    assert back.tokenizer.mask_id == tok.mask_id == len(ar.tokenizer.hf)
    ids = torch.randint(0, 290, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back.logits(ids), net(ids, block_size=BLOCK))


def test_a_tensor_without_a_qwen_name_is_refused(tmp_path):
    from dlm.formats.export import export_model

    net, cfg, tok = tiny_block_model()
    net.blocks[0].attn.register_buffer("scale", torch.ones(1))  # e.g. a quantized layer's scale
    with pytest.raises(ConfigError, match=r"'blocks.0.attn.scale' that the Qwen layout has no name for"):
        export_model(tmp_path / "out", net, cfg, tok, "sdar")
