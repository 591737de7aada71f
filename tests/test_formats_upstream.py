"""Upstream LLaDA and Dream folders load natively and match the upstream code.

tests/data/hf/{llada,dream}-tiny are tiny random checkpoints in the exact on-disk layout of LLaDA-8B-Instruct and
Dream-v0-Instruct-7B (config keys, weight names, shards, tokenizer files, chat templates). Their
`reference.safetensors` holds tensors computed once by the upstream modeling code (trust_remote_code) and by the
reference samplers (ML-GSAI/LLaDA generate.py, Dream's diffusion_generate); reference_meta.json says how. No
upstream code is in this repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_helpers import folder_and_reference
from safetensors.torch import load_file
from tolerance import model_atol

from dlm.checkpoint import CheckpointError
from dlm.pipeline import DiffusionLM

DATA = Path(__file__).parent / "data" / "hf"
LLADA, DREAM = DATA / "llada-tiny", DATA / "dream-tiny"


@pytest.fixture(scope="module")
def llada():
    return folder_and_reference(LLADA)


@pytest.fixture(scope="module")
def dream():
    return folder_and_reference(DREAM)


def _shift(logits: torch.Tensor) -> torch.Tensor:
    """Dream's raw logits -> aligned with the canvas, as its diffusion_generate does."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


# ----- the network ------------------------------------------------------------------------------------------------
def test_llada_logits_match_upstream(llada):
    lm, ref = llada
    tol = model_atol(lm, torch.float32, ref["logits"])
    torch.testing.assert_close(lm.logits(ref["input_ids"]), ref["logits"], rtol=0, atol=tol)


def test_llada_padding_mask_matches_upstream_at_real_positions(llada):
    lm, ref = llada
    out = lm.logits(ref["attn_input_ids"], attention_mask=ref["attn_mask"])
    real = ref["attn_mask"].bool()
    tol = model_atol(lm, torch.float32, ref["attn_logits"])
    torch.testing.assert_close(out[real], ref["attn_logits"][real], rtol=0, atol=tol)


def test_dream_logits_match_upstream_after_its_shift(dream):
    lm, ref = dream
    tol = model_atol(lm, torch.float32, ref["logits"])
    torch.testing.assert_close(lm.logits(ref["input_ids"]), _shift(ref["logits"]), rtol=0, atol=tol)


def test_dream_padding_mask_matches_upstream_at_real_positions(dream):
    # Upstream numbers positions from the first real token (cumsum of the mask); RoPE is relative, so the
    # absolute numbering we use gives the same attention between real tokens.
    lm, ref = dream
    out = lm.logits(ref["attn_input_ids"], attention_mask=ref["attn_mask"])
    real = ref["attn_mask"].bool()
    real[:, 1:] &= real[:, :-1].clone()  # after the shift, position i carries the prediction of i - 1
    tol = model_atol(lm, torch.float32, ref["attn_logits"])
    torch.testing.assert_close(out[real], _shift(ref["attn_logits"])[real], rtol=0, atol=tol)


@pytest.mark.parametrize("folder", [LLADA, DREAM], ids=["llada", "dream"])
def test_bfloat16_weights_stay_close_to_upstream_bfloat16(folder):
    lm = DiffusionLM.from_pretrained(str(folder), dtype="bfloat16")
    ref = load_file(folder / "reference.safetensors")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    expect = ref["bf16_logits"] if folder == LLADA else _shift(ref["bf16_logits"])
    out = lm.logits(ref["input_ids"])
    assert out.dtype == torch.float32
    # bf16 rounding differs op by op and CPU by CPU (AMX, AVX-512 and AVX2 associate the sums differently): the
    # bound is bf16's roundoff over the network's reductions, not one machine's observed gap.
    assert (out - expect).abs().max() <= model_atol(lm, torch.bfloat16, expect)
    assert (out.argmax(-1) == expect.argmax(-1)).float().mean() > 0.9


# ----- the samplers on the loaded networks ----------------------------------------------------------------------
def test_llada_greedy_generation_equals_the_reference_algorithm(llada):
    lm, ref = llada
    opts = dict(max_new_tokens=16, steps=8, block_length=8, temperature=0.0, remasking="low_confidence",
                sampler="llada")
    assert torch.equal(lm.generate(ref["gen_prompt"], **opts), ref["gen_output_low_conf"])
    assert torch.equal(lm.generate(ref["gen_prompt"], cfg_scale=1.0, **opts), ref["gen_output_cfg"])
    out = lm.generate(ref["gen_prompt_padded"], attention_mask=ref["gen_attn_mask_padded"], **opts)
    assert torch.equal(out, ref["gen_output_padded_low_conf"])


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_greedy_generation_equals_diffusion_generate(dream, alg):
    lm, ref = dream
    out = lm.generate(ref["gen_prompt"], max_new_tokens=16, steps=16, block_length=0, temperature=0.0,
                      sampler="dream", remasking=alg)
    assert torch.equal(out, ref[f"gen_output_{alg}"])


def test_dream_padded_batch_generation_equals_diffusion_generate(dream):
    lm, ref = dream
    out = lm.generate(ref["gen_prompt_padded"], attention_mask=ref["gen_attn_mask_padded"], max_new_tokens=16,
                      steps=16, block_length=0, temperature=0.0, sampler="dream", remasking="maskgit_plus")
    real = torch.cat([ref["gen_attn_mask_padded"], torch.ones(2, 16, dtype=torch.long)], 1).bool()
    assert torch.equal(out[real], ref["gen_output_padded_maskgit_plus"][real])


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_dream_runs_with_kv_caches(dream, cache):
    import warnings

    lm, ref = dream
    opts = {"max_new_tokens": 16, "temperature": 0.0, "sampler": "fast_dllm", "threshold": 0.9}
    widths = []  # the canvas width of every forward: a cached step runs on a slice
    hook = lm.model.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # cached for real: no fall-back warning
            cached = lm.generate(ref["gen_prompt"], steps=16, block_length=8, cache=cache, **opts)
    finally:
        hook.remove()
    full = ref["gen_prompt"].shape[1] + 16
    assert full in widths and min(widths) < full, "some steps ran on a cached slice"
    # One step per block (llada's fixed schedule): every step is a block's full forward, the cache changes nothing.
    one = {"max_new_tokens": 16, "temperature": 0.0, "sampler": "llada", "steps": 2, "block_length": 8}
    assert torch.equal(lm.generate(ref["gen_prompt"], cache=cache, **one),
                       lm.generate(ref["gen_prompt"], cache="none", **one))
    assert cached.shape == (ref["gen_prompt"].shape[0], ref["gen_prompt"].shape[1] + 16)
    assert torch.equal(cached[:, :ref["gen_prompt"].shape[1]], ref["gen_prompt"])


# ----- tokenizers, chat templates, configuration ----------------------------------------------------------------
@pytest.mark.parametrize("folder", [LLADA, DREAM], ids=["llada", "dream"])
def test_special_ids_come_from_config_json(folder):
    lm = DiffusionLM.from_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    tok = lm.tokenizer
    assert tok.mask_id == cfg["mask_token_id"] and tok.eos_id == cfg["eos_token_id"]
    assert tok.decode([tok.mask_id], skip_special=False) in ("<|mdm_mask|>", "<|mask|>")
    assert lm.config.model.vocab_size == cfg.get("embedding_size", cfg["vocab_size"])


def test_chat_templates_render_as_upstream():
    llada = DiffusionLM.from_pretrained(str(LLADA)).tokenizer
    text = llada.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>" \
                   "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ids = llada.encode(text)
    assert ids[0] == llada.bos_id and llada.decode(ids, skip_special=False) == text
    assert 315 in llada.stop_ids  # <|eot_id|> ends an answer
    dream = DiffusionLM.from_pretrained(str(DREAM)).tokenizer
    text = dream.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert dream.encode("<|im_end|>") == [292] and 292 in dream.stop_ids


@pytest.mark.parametrize("folder", [LLADA, DREAM], ids=["llada", "dream"])
def test_chat_runs_end_to_end(folder):
    lm = DiffusionLM.from_pretrained(str(folder))
    messages = [{"role": "user", "content": "Write a function."}]
    opts = dict(max_new_tokens=16, steps=8, block_length=8 if folder == LLADA else 0)
    seen = []  # every canvas the network sees
    hook = lm.model.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    try:
        answer = lm.chat(messages, **opts)
    finally:
        hook.remove()
    assert isinstance(answer, str)
    tok = lm.tokenizer
    # the network sees the model's own template (with the assistant's turn opened) and 16 masks after it
    template = tok.apply_chat_template(messages, add_generation_prompt=True)
    if folder == LLADA:
        assert template == "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWrite a function." \
                           "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    else:
        assert template.endswith("<|im_start|>user\nWrite a function.<|im_end|>\n<|im_start|>assistant\n")
    prompt = tok.encode(template)
    assert seen and seen[0].shape == (1, len(prompt) + 16) and seen[0][0, : len(prompt)].tolist() == prompt
    assert (seen[0][0, len(prompt):] == tok.mask_id).all()
    # the answer is the generation after the template, cut at the first stop id, specials left out
    new = lm.generate(torch.tensor([prompt]), **opts)[0, len(prompt):].tolist()
    end = next((i for i, t in enumerate(new) if t in tok.stop_ids), len(new))
    assert answer == tok.decode([t for t in new[:end] if t != tok.pad_id])


def test_cli_generates_from_an_upstream_folder(capsys):
    from dlm.cli import main

    main(["generate", "hello", "--model", str(DREAM), "--max-new-tokens", "8", "--steps", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == "hello" and isinstance(out["completion"], str)
    # the CLI's completion is the library's for the same options (the folder's saved defaults for the rest)
    assert out["completion"] == DiffusionLM.from_pretrained(str(DREAM)).generate("hello", max_new_tokens=8, steps=8)


def test_export_then_load_gives_the_same_logits(tmp_path, llada):
    lm, ref = llada
    from dlm.checkpoint import save_pretrained

    save_pretrained(tmp_path / "x", lm.model, lm.config, lm.tokenizer, dtype=torch.float32)
    again = DiffusionLM.from_pretrained(str(tmp_path / "x"))
    assert torch.equal(again.logits(ref["input_ids"]), lm.logits(ref["input_ids"]))
    assert again.tokenizer.mask_id == lm.tokenizer.mask_id and again.tokenizer.stop_ids == lm.tokenizer.stop_ids
    assert again.tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == \
        lm.tokenizer.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("key, value, match", [
    ("block_type", "sequential", "block_type='sequential' is not supported"),
    ("weight_tying", True, "weight_tying=True is not supported"),
    ("d_model", 128, "shape"),
])
def test_llada_config_errors(tmp_path, key, value, match):
    import shutil

    folder = tmp_path / "llada"
    shutil.copytree(LLADA, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        DiffusionLM.from_pretrained(str(folder))


def test_dream_missing_tensor_is_named(tmp_path):
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "dream"
    shutil.copytree(DREAM, folder)
    sd = load_file(folder / "model.safetensors")
    sd.pop("model.layers.1.self_attn.k_proj.bias")
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \['blocks.1.attn.k_proj.bias'\]"):
        DiffusionLM.from_pretrained(str(folder))


def test_server_chat_uses_the_models_template(llada):
    from fastapi.testclient import TestClient

    from dlm.server import ServerSettings, create_app

    lm, _ = llada
    messages = [{"role": "user", "content": "hi"}]
    with TestClient(create_app(lm, "llada-tiny", ServerSettings())) as client:
        r = client.post("/v1/chat/completions", json={"model": "llada-tiny", "messages": messages,
                                                      "max_tokens": 16, "steps": 8})
        assert r.status_code == 200, r.text
        content = r.json()["choices"][0]["message"]["content"]
    assert content == lm.chat(messages, max_new_tokens=16, steps=8)
