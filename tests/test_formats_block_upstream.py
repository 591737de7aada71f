"""Block-diffusion checkpoints in their upstream layouts (Fast-dLLM v2, SDAR) load natively and match upstream.

tests/data/hf/{fast-dllm-v2-tiny,sdar-tiny} are tiny random checkpoints in the on-disk layouts of
Efficient-Large-Model/Fast_dLLM_v2_7B and JetLM/SDAR-*-Chat; `reference.safetensors` holds tensors computed once by
the upstream modeling code (Fast-dLLM v2's hub modeling.py, SDAR's modeling_sdar.py with CPU stand-ins for its
flash-attn kernels) and their generation loops; reference_meta.json says exactly how. No upstream code runs here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_helpers import edited_copy, folder_and_reference
from safetensors.torch import load_file
from tolerance import model_atol

from dlm.checkpoint import CheckpointError
from dlm.pipeline import DiffusionLM
from dlm.sampling.block import BlockSampler, block_steps
from dlm.sampling.sampler import SAMPLERS

DATA = Path(__file__).parent / "data" / "hf"
FAST, SDAR = DATA / "fast-dllm-v2-tiny", DATA / "sdar-tiny"


@pytest.fixture(scope="module")
def fast():
    return folder_and_reference(FAST)


@pytest.fixture(scope="module")
def sdar():
    return folder_and_reference(SDAR)


def shifted(raw: torch.Tensor) -> torch.Tensor:
    """Fast-dLLM v2's generate(): logits of a forward moved one place right, position 0 keeping its own."""
    return torch.cat([raw[:, :1], raw[:, :-1]], 1)


def close(ours: torch.Tensor, expect: torch.Tensor, lm) -> None:
    assert ours.shape == expect.shape
    assert (ours - expect).abs().max() <= model_atol(lm, torch.float32, expect)


# ----- what loads -------------------------------------------------------------------------------------------
def test_fast_dllm_v2_loads_as_a_block_model(fast):
    lm, _ = fast
    cfg = json.loads((FAST / "config.json").read_text())
    assert lm.block_size == cfg["bd_size"] and lm.config.process.process == "bd3lm"
    assert lm.config.model.logits_shift and lm.config.model.qkv_bias and not lm.config.model.qk_norm
    s = lm.config.sampling
    assert (s.sampler, s.options.threshold, s.options.sub_block, s.suppress_special) == ("block", 0.9, 8, False)
    tok = lm.tokenizer
    assert tok.decode([tok.mask_id], skip_special=False) == "|<MASK>|"
    assert tok.eos_id == cfg["eos_token_id"]  # <|im_end|>, upstream's stop_token


def test_sdar_loads_as_a_block_model(sdar):
    lm, _ = sdar
    cfg = json.loads((SDAR / "config.json").read_text())
    assert lm.block_size == cfg["block_size"] and lm.config.process.process == "bd3lm"
    m = lm.config.model
    assert m.qk_norm and not m.qkv_bias and not m.logits_shift and m.head_dim == cfg["head_dim"]
    s = lm.config.sampling
    assert (s.sampler, s.options.threshold, s.options.sub_block, s.suppress_special) == ("block", 0.85, 0, False)
    assert lm.tokenizer.mask_id == cfg["mask_token_id"] and lm.tokenizer.eos_id == cfg["eos_token_id"]


# ----- logits -----------------------------------------------------------------------------------------------
def test_fast_dllm_v2_logits_match_upstream_under_its_block_attention(fast):
    lm, ref = fast
    close(lm.logits(ref["input_ids"]), shifted(ref["logits"]), lm)  # blocks of bd_size = 32
    close(lm.logits(ref["input_ids"], block_size=8), shifted(ref["logits_block8"]), lm)


def test_fast_dllm_v2_cached_block_matches_upstream(fast):
    from dlm.models.common import BlockCache

    lm, ref = fast
    ids, cache = ref["input_ids"], BlockCache()
    with torch.no_grad():
        lm.model(ids[:, :32], cache=cache.extend(), block_size=32)
        ours = lm.model(ids[:, 32:], cache=cache, block_size=32)
    close(ours, shifted(ref["logits_cached_block2"]), lm)


def test_sdar_logits_match_upstream(sdar):
    from dlm.models.common import BlockCache

    lm, ref = sdar
    ids = ref["input_ids"]
    close(lm.logits(ids), ref["logits_block4"], lm)  # its own block-causal attention, blocks of 4
    with torch.no_grad():
        close(lm.model(ids, attention="full"), ref["logits_full"], lm)
        cache = BlockCache()
        lm.model(ids[:, :8], cache=cache.extend(), block_size=4)
        close(lm.model(ids[:, 8:12], cache=cache, block_size=4), ref["logits_cached_block3"], lm)


@pytest.mark.parametrize("folder, key, shift", [(FAST, "bf16_logits", True), (SDAR, "bf16_logits_block4", False)],
                         ids=["fast-dllm-v2", "sdar"])
def test_bfloat16_stays_close_to_upstream_bfloat16(folder, key, shift):
    """bf16 rounds every intermediate (and the two libraries round in different places): the bound is bf16's."""
    lm = DiffusionLM.from_pretrained(str(folder), dtype="bfloat16")
    ref = load_file(folder / "reference.safetensors")
    expect = shifted(ref[key]) if shift else ref[key]
    out = lm.logits(ref["input_ids"])
    assert (out - expect).abs().max() <= model_atol(lm, torch.bfloat16, expect)


# ----- greedy generation with the checkpoint's defaults ------------------------------------------------------
def test_fast_dllm_v2_one_block_equals_upstream_generate(fast):
    """A prompt inside the first block: upstream decodes the block (threshold 0.9, sub-blocks of 8), then one AR
    token from the finished block; our block sampler gives that token as the next block's first position."""
    lm, ref = fast
    prompt, expect = ref["gen_prompt_short"], ref["gen_output_short_32"]
    assert torch.equal(lm.generate(prompt, max_new_tokens=expect.shape[1] - prompt.shape[1]), expect)


@pytest.mark.parametrize("key, prompt", [("gen_output_short_96", "gen_prompt_short"),
                                         ("gen_output_long_64", "gen_prompt_long")])
def test_fast_dllm_v2_several_blocks_equal_upstream_generate(fast, key, prompt):
    lm, ref = fast
    p, expect = ref[prompt], ref[key]
    assert torch.equal(lm.generate(p, max_new_tokens=expect.shape[1] - p.shape[1]), expect)


@pytest.mark.parametrize("name", ["tail", "aligned"])
@pytest.mark.parametrize("threshold", [None, 1.0], ids=["default", "static"])
def test_sdar_greedy_generation_equals_upstream(sdar, name, threshold):
    """Default options = threshold 0.85 (generate.py); threshold 1.0 = one per step (SDAR's eval config)."""
    lm, ref = sdar
    p = ref[f"gen_prompt_{name}"]
    expect = ref[f"gen_output_{name}_thr{85 if threshold is None else 100}"]
    assert torch.equal(lm.generate(p, max_new_tokens=expect.shape[1] - p.shape[1], threshold=threshold), expect)


def test_sdar_stops_at_eos_with_upstream_tokens_before_it(sdar):
    """Upstream ends after the block that holds a stop id; the tokens up to the first one are the same as without
    the stop, and ours runs no block after that one."""
    lm, ref = sdar
    p, expect = ref["gen_prompt_tail"], ref["gen_output_tail_thr85"][0, 6:]
    stop = int(expect[9])
    first = int((expect == stop).nonzero()[0])
    sampler = SAMPLERS.build("block", mask_id=lm.tokenizer.mask_id, config=lm.config.sampling)
    events = list(block_steps(lm.model, p, None, sampler, block_size=4, max_new_tokens=18, steps=18, eos_id=stop))
    out = events[-1].output.xt[0, 6:]
    assert torch.equal(out[:first + 1], expect[:first + 1])
    n_blocks = -(-(6 + first + 1) // 4) - 1  # the open blocks up to the one holding the stop
    assert max(e.block for e in events) == n_blocks - 1  # it stopped: the blocks after the stop were never run


# ----- the block sampler and its cache on the loaded folders -------------------------------------------------
@pytest.mark.parametrize("folder", [FAST, SDAR], ids=["fast-dllm-v2", "sdar"])
def test_cached_block_sampling_equals_uncached(folder):
    lm = DiffusionLM.from_pretrained(str(folder))
    prompt = torch.tensor([[5, 17, 33, 101, 7, 9], [60, 61, 62, 63, 64, 65]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # a ragged batch
    outs = []
    for cache in (True, False):
        sampler = SAMPLERS.build("block", mask_id=lm.tokenizer.mask_id, config=lm.config.sampling)
        assert isinstance(sampler, BlockSampler)
        *_, last = block_steps(lm.model, prompt, mask, sampler, block_size=lm.block_size, max_new_tokens=12,
                               steps=12, eos_id=lm.tokenizer.eos_id, sub_block=lm.config.sampling.options.sub_block,
                               cache=cache)
        outs.append(last.output.xt)
    assert torch.equal(outs[0], outs[1])
    text = lm.generate("hello", max_new_tokens=8)
    assert isinstance(text, str)
    # the text is the decoded tail of the same call on ids: the prompt kept, 8 new tokens, no [MASK] left
    prompt = lm.tokenizer.encode("hello")
    ids = lm.generate(torch.tensor([prompt]), max_new_tokens=8)
    assert ids.shape == (1, len(prompt) + 8) and ids[0, : len(prompt)].tolist() == prompt
    assert not (ids == lm.tokenizer.mask_id).any() and text == lm.decode_new(ids[0, len(prompt):].tolist())


# ----- config errors: one line each ---------------------------------------------------------------------------
@pytest.mark.parametrize("folder, key, value, match", [
    (FAST, "bd_size", 0, "bd_size=0 must be an integer >= 1"),
    (FAST, "layer_types", ["sliding_attention", "full_attention"], "layer_types"),
    (FAST, "hidden_act", "gelu", "hidden_act='gelu' is not supported"),
    (SDAR, "block_size", None, "block_size=None must be an integer >= 1"),
    (SDAR, "mask_token_id", 999, "mask_token_id=999 is not a token id"),
    (SDAR, "attention_bias", True, "attention_bias=True is not supported"),
    (SDAR, "hidden_size", 128, "shape"),
], ids=["bd_size", "layer_types", "hidden_act", "block_size", "mask_token_id", "attention_bias", "sizes"])
def test_config_errors_are_one_line(tmp_path, folder, key, value, match):
    copy = edited_copy(tmp_path, folder, key, value)
    with pytest.raises(CheckpointError, match=match) as info:
        DiffusionLM.from_pretrained(str(copy))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("folder", [FAST, SDAR], ids=["fast-dllm-v2", "sdar"])
def test_cli_generates_from_a_block_folder(folder, capsys):
    from dlm.cli import main

    main(["generate", "hello", "--model", str(folder), "--max-new-tokens", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == "hello" and isinstance(out["completion"], str)
    assert out["completion"] == DiffusionLM.from_pretrained(str(folder)).generate("hello", max_new_tokens=8)


@pytest.mark.parametrize("folder", [FAST, SDAR], ids=["fast-dllm-v2", "sdar"])
def test_export_then_load_keeps_the_block_model(tmp_path, folder):
    from dlm.checkpoint import save_pretrained

    lm = DiffusionLM.from_pretrained(str(folder))
    ids = load_file(folder / "reference.safetensors")["input_ids"]
    save_pretrained(tmp_path / "x", lm.model, lm.config, lm.tokenizer, dtype=torch.float32)
    again = DiffusionLM.from_pretrained(str(tmp_path / "x"))
    assert again.block_size == lm.block_size and again.config.sampling == lm.config.sampling
    assert again.tokenizer.mask_id == lm.tokenizer.mask_id and again.tokenizer.eos_id == lm.tokenizer.eos_id
    assert torch.equal(again.logits(ids), lm.logits(ids))
