"""The one loading path (dlm.formats): older folders, pickle refusal, key and shape checks, memory checks,
hub ids, grouped-query attention, Dream's logit shift, int8 weight-only layers and `dlm export`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlm.checkpoint import CheckpointError, load_pretrained, save_pretrained
from dlm.cli import main
from dlm.config import CheckpointConfig, ModelConfig
from dlm.models import build_model
from dlm.models.common import KVCache
from dlm.pipeline import DiffusionLM
from dlm.tokenizer import ByteTokenizer


def _cfg(**kw) -> CheckpointConfig:
    return CheckpointConfig(model=ModelConfig(vocab_size=260, d_model=64, n_layers=2, n_heads=4, max_len=64, **kw))


@pytest.fixture
def saved(tmp_path):
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    save_pretrained(tmp_path / "m", model, cfg, ByteTokenizer())
    return tmp_path / "m", model


def _x(B=2, L=20):
    return torch.randint(0, 258, (B, L), generator=torch.Generator().manual_seed(1))


def test_format_version_1_folders_are_split_on_load(tmp_path, saved):
    folder, model = saved
    sd = load_file(folder / "model.safetensors")
    fused = {}
    for k, v in sd.items():  # write the folder as dlm 0.1 did: fused q/k/v and gate/up
        if k.endswith("attn.q_proj.weight"):
            base = k.removesuffix("q_proj.weight")
            fused[base + "qkv.weight"] = torch.cat([v, sd[base + "k_proj.weight"], sd[base + "v_proj.weight"]])
        elif k.endswith("attn.o_proj.weight"):
            fused[k.removesuffix("o_proj.weight") + "proj.weight"] = v
        elif k.endswith("ff.gate.weight"):
            base = k.removesuffix("gate.weight")
            fused[base + "gate_up.weight"] = torch.cat([v, sd[base + "up.weight"]])
        elif not k.endswith(("k_proj.weight", "v_proj.weight", "ff.up.weight")):
            fused[k] = v
    old = tmp_path / "v1"
    old.mkdir()
    save_file(fused, old / "model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["format_version"] = 1
    (old / "config.json").write_text(json.dumps(cfg))
    shutil.copy(folder / "tokenizer.json", old / "tokenizer.json")
    loaded, cfg1, _ = load_pretrained(old)
    x = _x()
    assert cfg1.format_version == 1
    assert torch.equal(loaded(x), model(x))


def test_pickle_weights_are_refused_unless_allowed(tmp_path, saved):
    folder, model = saved
    pk = tmp_path / "pk"
    pk.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(folder / name, pk / name)
    torch.save(load_file(folder / "model.safetensors"), pk / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_pretrained(pk)
    loaded, _, _ = load_pretrained(pk, allow_pickle=True)
    x = _x()
    assert torch.equal(loaded(x), model(x))


def test_a_pickle_with_code_is_refused_even_when_allowed(tmp_path, saved):
    folder, _ = saved
    pk = tmp_path / "evil"
    pk.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(folder / name, pk / name)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, pk / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_pretrained(pk, allow_pickle=True)


def test_missing_and_unexpected_keys_are_named(tmp_path, saved):
    folder, _ = saved
    sd = load_file(folder / "model.safetensors")
    sd.pop("ln_f.weight")
    sd["blocks.9.attn.q_proj.weight"] = torch.zeros(2, 2)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \['ln_f.weight'\].*unexpected \['blocks.9"):
        load_pretrained(folder)


def test_sharded_safetensors_with_an_index(tmp_path, saved):
    folder, model = saved
    sd = load_file(folder / "model.safetensors")
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    (folder / "model.safetensors").unlink()
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, folder / name)
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded, _, _ = load_pretrained(folder)
    x = _x()
    assert torch.equal(loaded(x), model(x))
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shards that are not in"):
        load_pretrained(folder)


def test_weights_load_straight_to_the_target_dtype(saved):
    folder, _ = saved
    loaded, _, _ = load_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in loaded.parameters())


def test_too_little_memory_says_how_much_is_needed(monkeypatch, saved):
    folder, _ = saved
    monkeypatch.setattr("dlm.formats.base.free_memory", lambda device: 1000)
    with pytest.raises(CheckpointError, match=r"need \d+\.\d+ GiB in float32 on cpu, but only 0\.00 GiB is free"):
        load_pretrained(folder)


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"model_type 'gpt2' is not supported.*'llada'"):
        load_pretrained(tmp_path)


def test_a_hub_id_downloads_and_a_local_folder_does_not(monkeypatch, saved):
    folder, _ = saved
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(folder)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    lm = DiffusionLM.from_pretrained("someone/some-dlm")
    assert calls and calls[0][0] == "someone/some-dlm"
    assert "*.safetensors" in calls[0][1] and not any(p.endswith(".py") or p == "*.bin" for p in calls[0][1])
    assert lm.config.model.d_model == 64
    calls.clear()
    DiffusionLM.from_pretrained(str(folder))
    assert not calls


def test_grouped_query_attention_equals_repeated_heads():
    torch.manual_seed(0)
    gqa = build_model(ModelConfig(vocab_size=50, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                  qkv_bias=True)).eval()
    mha = build_model(ModelConfig(vocab_size=50, d_model=64, n_layers=2, n_heads=4, qkv_bias=True)).eval()
    sd = gqa.state_dict()
    for k, v in list(sd.items()):
        if k.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            heads = v.view(2, 16, *v.shape[1:])  # (H_kv, hd, ...)
            sd[k] = heads.repeat_interleave(2, dim=0).reshape(64, *v.shape[1:])
    mha.load_state_dict(sd)
    x = torch.randint(0, 50, (2, 12))
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)
    cache = KVCache()
    full = gqa(x, cache=cache)
    assert cache.keys[0].shape[1] == 2  # the cache stores the H_kv heads only
    torch.testing.assert_close(gqa(x[:, 4:8], cache=cache.window(4)), full[:, 4:8], rtol=1e-5, atol=1e-5)


def test_logits_shift_moves_predictions_one_place_right():
    torch.manual_seed(0)
    plain = build_model(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2)).eval()
    shifted = build_model(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, logits_shift=True)).eval()
    shifted.load_state_dict(plain.state_dict())
    x = torch.randint(0, 50, (2, 10))
    a, b = plain(x), shifted(x)
    assert torch.equal(b[:, 1:], a[:, :-1]) and torch.equal(b[:, 0], a[:, 0])
    assert torch.equal(shifted(x, logits_window=(3, 7)), b[:, 3:7])
    # With a KV cache the slice starts one position early (cache_lookback): rows 1: predict the positions asked for.
    assert shifted.cache_lookback == 1 and plain.cache_lookback == 0
    cache = KVCache()
    shifted(x, cache=cache)
    torch.testing.assert_close(shifted(x[:, 3:8], cache=cache.window(3))[:, 1:], b[:, 4:8], rtol=1e-5, atol=1e-5)


def test_int8_weight_only_stays_close_and_generates(saved):
    folder, _ = saved
    ref = DiffusionLM.from_pretrained(str(folder))
    q = DiffusionLM.from_pretrained(str(folder), quantize="int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in q.model.modules())
    x = _x()
    a, b = ref.logits(x), q.logits(x)
    assert (a - b).abs().max() / a.abs().max() < 0.02
    out = q.generate(x[:, :8], max_new_tokens=8, steps=4, block_length=8)
    assert out.shape == (2, 16) and not (out == ByteTokenizer().mask_id).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_kernel_and_dense_paths_agree(dtype):
    from dlm.quantize import Int8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear(lin)
    dequant = q.weight_int8.float() * q.scale.float()[:, None]
    assert (dequant - lin.weight).abs().max() <= q.scale.max() / 2 + 1e-6  # round to nearest: half a step
    for rows in (1, 40):  # one row goes through the int8 kernel, many through the converted dense matmul
        x = torch.randn(rows, 64).to(dtype)
        expect = x.float() @ dequant.T + lin.bias
        torch.testing.assert_close(q(x).float(), expect.detach(), rtol=0.02, atol=0.02)


def test_chat_without_a_template_uses_the_sft_format(saved, capsys):
    # One chat format for a model without a template: what dlm sft trains on is what chat and the server send.
    from dlm.sft import chat_prompt

    folder, _ = saved
    lm = DiffusionLM.from_pretrained(str(folder))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert lm.tokenizer.apply_chat_template(messages) == "System: Be brief.\nUser: hi\nAssistant: "
    assert lm.tokenizer.encode(lm.tokenizer.apply_chat_template(messages)) == chat_prompt(lm.tokenizer, messages)
    opts = dict(max_new_tokens=8, steps=8, block_length=8, seed=0)
    answer = lm.chat(messages, **opts)
    ids = torch.tensor([chat_prompt(lm.tokenizer, messages)])
    assert answer == lm.decode_new(lm.generate(ids, **opts)[0, ids.shape[1]:].tolist())
    main(["chat", "hi", "--model", str(folder), "--max-new-tokens", "8", "--steps", "8", "--block-length", "8"])
    printed = capsys.readouterr().out
    assert isinstance(printed, str)
    # the CLI prints the library's answer to the same one-message conversation
    assert printed == lm.chat([{"role": "user", "content": "hi"}], max_new_tokens=8, steps=8, block_length=8) + "\n"


def test_export_writes_a_folder_that_loads_the_same(tmp_path, saved, capsys):
    folder, _ = saved
    out = tmp_path / "exported"
    main(["export", "--model", str(folder), "--out", str(out), "--save-dtype", "float32"])
    files = json.loads(capsys.readouterr().out)["files"]
    assert files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    a, b = DiffusionLM.from_pretrained(str(folder)), DiffusionLM.from_pretrained(str(out))
    x = _x()
    assert torch.equal(a.logits(x), b.logits(x))
    with pytest.raises(SystemExit):
        main(["export", "--model", str(folder), "--out", str(out)])  # not empty, no --force
