"""LoRA through peft on a loaded upstream checkpoint (the tiny LLaDA folder): adapters train, save, merge, and the
merged model computes what base + adapter compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="LoRA needs: pip install 'dlm[lora]'")
pytest.importorskip("transformers")

from dlm.checkpoint import load_pretrained  # noqa: E402
from dlm.config import ConfigError  # noqa: E402
from dlm.lora import LoRAConfig, apply_lora, load_adapter, merged_weights  # noqa: E402

LLADA = Path(__file__).parent / "data/hf/llada-tiny"


def _logits(net: torch.nn.Module) -> torch.Tensor:
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return net(x)


def test_dlm_lora_trains_adapters_and_merged_equals_base_plus_adapter(tmp_path, capsys):
    from dlm.cli import main

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{a}+{a}="},
                                                      {"role": "assistant", "content": str(2 * a)}]}) + "\n"
                             for a in range(10)))
    out = tmp_path / "run"
    main(["lora", "--model", str(LLADA), "--data", str(chats), "--out", str(out), "--r", "4", "--alpha", "8",
          "--max-steps", "3", "--batch-size", "4", "--seq-len", "64", "--lr", "1e-2", "--warmup", "1",
          "--ckpt-every", "3", "--threads", "1", "--quiet", "--merge"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(summary["adapter"], "adapter_config.json").exists()
    state = torch.load(out / "ckpt-000003" / "trainer_state.pt", weights_only=True)
    assert state["model"] and all(".lora_" in k for k in state["model"])  # the base is no trainer state
    assert any(v.abs().sum() > 0 for k, v in state["model"].items() if "lora_B" in k)  # B starts at 0

    base, _, _ = load_pretrained(LLADA)
    merged, cfg, tok = load_pretrained(out / "merged")  # dlm export's format, loadable like any model
    adapted = load_adapter(LLADA, out / "adapter")
    torch.testing.assert_close(_logits(merged), _logits(adapted), atol=1e-4, rtol=1e-4)
    assert (_logits(merged) - _logits(base)).abs().max() > 1e-3
    run_ckpt, _, _ = load_pretrained(out)  # the run's own checkpoints hold the merged weights too
    torch.testing.assert_close(_logits(run_ckpt), _logits(merged), atol=1e-5, rtol=1e-5)
    assert cfg.extra["lora"]["r"] == 4 and tok.has_chat_template


def test_merged_weights_are_peft_merge_and_unload():
    base, _, _ = load_pretrained(LLADA)
    cfg = LoRAConfig(r=2, alpha=6.0, target_modules=["q_proj", "down"])
    net = apply_lora(base, cfg)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    ours = merged_weights(net.state_dict(), cfg)
    theirs = net.merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-6)


def test_an_unknown_target_names_the_linear_layers():
    base, _, _ = load_pretrained(LLADA)
    with pytest.raises(ConfigError, match="q_proj"):
        apply_lora(base, LoRAConfig(target_modules=["attn_qkv"]))
