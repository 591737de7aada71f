"""Writing a model in another project's layout: `dlm export --format dlm|sdar|fast_dllm_v2`.

Each writer is the inverse of its loader in this package (formats/sdar.py, formats/fast_dllm_v2.py): config.json
with the upstream keys, the weights under the upstream (Qwen2 / Qwen3) names in safetensors, the tokenizer as
Hugging Face files, and generation_config.json, so the folder is served by the engines that read that layout
(the upstream modeling code with trust_remote_code, SGLang's native SDAR model) and loads back into dlm to the same
network. A model the layout cannot express exactly is refused with one line naming every difference (an SDAR folder
is Qwen3 with block-causal attention: qk_norm on, no biases, no logit shift, a bd3lm block size); nothing is ever
written silently different.

    export_model("out/sdar", lm.model, lm.config, lm.tokenizer, "sdar", dtype=torch.bfloat16)   # -> file names
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlm.config import CheckpointConfig, ConfigError
from dlm.io import atomic_save, atomic_write_text
from dlm.registry import Registry
from dlm.tokenizer import BPETokenizer, ByteTokenizer, HFTokenizer, IdsOnlyTokenizer, Tokenizer

# Our parameter names -> the Hugging Face Qwen2 / Qwen3 names (the inverse of formats/hf_causal's converter).
_LAYER = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
          "attn.o_proj": "self_attn.o_proj", "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm",
          "ff.gate": "mlp.gate_proj", "ff.up": "mlp.up_proj", "ff.down": "mlp.down_proj",
          "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm"}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.([\w.]+)\.(weight|bias)$")
_TOP = {"wte.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}


class Exporter:
    """One output layout: `problems(cfg, tok)` (what the layout cannot express), then `write(folder, ...)`."""

    def problems(self, cfg: CheckpointConfig, tok: Tokenizer) -> list[str]:
        return []

    def write(self, folder: Path, model: nn.Module, cfg: CheckpointConfig, tok: Tokenizer,
              dtype: torch.dtype | None) -> None:
        raise NotImplementedError


EXPORTERS: Registry[type[Exporter]] = Registry("export format", plugins=("dlm.formats.sdar",
                                                                         "dlm.formats.fast_dllm_v2"))


@EXPORTERS.register("dlm")
class NativeExport(Exporter):
    """dlm's own folder (checkpoint.save_pretrained): every model dlm loads."""

    def write(self, folder, model, cfg, tok, dtype):
        from dlm.checkpoint import save_pretrained

        save_pretrained(folder, model, cfg, tok, dtype=dtype)


def export_model(folder: str | Path, model: nn.Module, cfg: CheckpointConfig, tok: Tokenizer, fmt: str = "dlm",
                 dtype: torch.dtype | None = None) -> list[str]:
    """Write `model` into `folder` in layout `fmt` -> the names of the files there. A model the layout cannot
    express exactly raises one ConfigError naming every difference, before anything is written."""
    exporter = EXPORTERS.build(fmt)
    wrong = exporter.problems(cfg, tok)
    if wrong:
        raise ConfigError(f"{fmt} cannot hold this model exactly: {'; '.join(wrong)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    exporter.write(folder, model, cfg, tok, dtype)
    return sorted(p.name for p in folder.iterdir())


# ----- pieces the upstream writers share -------------------------------------------------------------------------
def block_model_problems(fmt: str, cfg: CheckpointConfig, want: dict[str, tuple[Any, str]]) -> list[str]:
    """What keeps `cfg` from being the block transformer of `fmt`: the network class, the bd3lm process, and each
    ModelConfig field of `want` ({field: (value, why)})."""
    m, p = cfg.model, cfg.process
    wrong = []
    if m.arch != "llada":
        kind = {"ar": "an autoregressive model (causal attention): turn it into a block model first with `dlm adapt "
                      "--mode block`"}.get(m.arch, f"arch {m.arch!r}, not the RMSNorm / RoPE / SwiGLU transformer "
                                                   f"{fmt} is")
        wrong.append(f"{fmt} is a block-diffusion transformer and this model is {kind}")
    elif p.process != "bd3lm" or p.block_size < 1:
        wrong.append(f"{fmt} runs block-causal attention and this model was trained with process {p.process!r} "
                     "(full attention): train it with --process bd3lm --block-size N")
    if m.rotary_dim not in (None, m.head_dim):
        wrong.append(f"{fmt} rotates every channel of a head (RoPE over head_dim={m.head_dim}); this model has "
                     f"partial RoPE, rotary_dim={m.rotary_dim}")
    if m.moe_experts:
        wrong.append(f"{fmt} is a dense SwiGLU transformer; this model has mixture-of-experts layers "
                     f"(moe_experts={m.moe_experts})")
    for name, (value, why) in want.items():
        have = getattr(m, name)
        if have != value:
            wrong.append(f"{fmt} needs {name}={value} ({why}); this model has {name}={have}")
    return wrong


def mask_problems(fmt: str, cfg: CheckpointConfig, tok: Tokenizer) -> list[str]:
    if not 0 <= tok.mask_id < cfg.model.vocab_size:
        return [f"{fmt} reads [MASK] from an embedding row, and this model's mask id {tok.mask_id} is outside its "
                f"{cfg.model.vocab_size} rows (is it an AR model without a mask token?)"]
    return []


def hf_state_dict(model: nn.Module, dtype: torch.dtype | None, qkv_bias: bool = False) -> dict[str, torch.Tensor]:
    """The network's tensors under the Hugging Face Qwen names, on the CPU, contiguous, floats in `dtype`.
    `qkv_bias`: a model without biases gets zero q/k/v biases (a layout that always has them: Qwen2)."""
    from dlm.checkpoint import state_dict_for_saving

    sd = state_dict_for_saving(model, dtype)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if key in _TOP:
            out[_TOP[key]] = tensor
            continue
        m = _BLOCK_KEY.match(key)  # blocks.N.<module>.<weight|bias>
        if m is None or m.group(2) not in _LAYER:
            raise ConfigError(f"the network has a tensor {key!r} that the Qwen layout has no name for (a quantized "
                              "or LoRA-wrapped model? export its float weights, merged)")
        layer, module, kind = m.groups()
        out[f"model.layers.{layer}.{_LAYER[module]}.{kind}"] = tensor
        if qkv_bias and module in ("attn.q_proj", "attn.k_proj", "attn.v_proj") and kind == "weight" \
                and f"blocks.{layer}.{module}.bias" not in sd:
            out[f"model.layers.{layer}.{_LAYER[module]}.bias"] = tensor.new_zeros(tensor.shape[0])
    return out


def write_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    atomic_save(lambda p: save_file(tensors, p, metadata={"format": "pt"}), folder / "model.safetensors")


def write_json(path: Path, d: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(d, indent=2) + "\n")


def dtype_name(model: nn.Module, dtype: torch.dtype | None) -> str:
    """config.json's torch_dtype: the dtype the weights are written in."""
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")


def generation_config(tok: Tokenizer, cfg: CheckpointConfig) -> dict[str, Any]:
    """generation_config.json: the special ids (every stop id, which dlm's loaders read back as stops) and the
    model's sampling temperature (greedy when 0)."""
    t = cfg.sampling.temperature
    return {"bos_token_id": tok.bos_id, "eos_token_id": sorted(tok.stop_ids), "pad_token_id": tok.pad_id,
            "do_sample": t > 0, **({"temperature": t} if t > 0 else {})}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte b -> the printable character that stands for it (ByteLevel's table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_tokenizer_json(tok: ByteTokenizer) -> str:
    """ByteTokenizer as a `tokenizers` BPE with the 256 byte tokens and no merges: the same ids for every text."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    table = _bytes_to_unicode()
    rust = RustTokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    rust.decoder = decoders.ByteLevel()
    d = json.loads(rust.to_str())
    d["added_tokens"] = [_added(i, name) for i, name in
                         sorted({tok.pad_id: "[PAD]", tok.mask_id: "[MASK]", tok.eos_id: "[EOS]",
                                 tok.bos_id: "[BOS]"}.items())]
    return json.dumps(d)


def _added(i: int, content: str) -> dict[str, Any]:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def write_tokenizer(folder: Path, tok: Tokenizer, mask_token: str) -> None:
    """The tokenizer as Hugging Face files (tokenizer.json, tokenizer_config.json, special_tokens_map.json).

    dlm's byte and BPE tokenizers become a `PreTrainedTokenizerFast` with the same ids, the [MASK] token renamed
    to the layout's `mask_token` (the name its loaders and generators look for); a Hugging Face tokenizer writes
    its own files; a folder that had no tokenizer gets none (config.json holds the special ids)."""
    if isinstance(tok, IdsOnlyTokenizer):
        return
    if isinstance(tok, HFTokenizer):
        tok.hf.save_pretrained(str(folder))
        return
    if isinstance(tok, ByteTokenizer):
        text = _byte_tokenizer_json(tok)
    elif isinstance(tok, BPETokenizer):
        text = json.dumps(tok.to_json()["hf"])
    else:
        raise ConfigError(f"cannot write a {type(tok).__name__} as Hugging Face tokenizer files")
    d = json.loads(text)
    for entry in d.get("added_tokens", []):
        if entry["id"] == tok.mask_id:
            old, entry["content"] = entry["content"], mask_token
            vocab = d.get("model", {}).get("vocab")
            if isinstance(vocab, dict) and vocab.get(old) == tok.mask_id:
                vocab[mask_token] = vocab.pop(old)
    from tokenizers import Tokenizer as RustTokenizer

    RustTokenizer.from_str(json.dumps(d))  # the file must load (a malformed BPE tokenizer fails here, not later)
    names = {e["id"]: e["content"] for e in d.get("added_tokens", [])}
    special = {"bos_token": names[tok.bos_id], "eos_token": names[tok.eos_id], "pad_token": names[tok.pad_id],
               "mask_token": names[tok.mask_id]}
    # Written here rather than by transformers' save_pretrained, whose tokenizer_class differs between versions:
    # PreTrainedTokenizerFast over tokenizer.json loads in transformers 4 (the upstream modeling code's) and 5.
    atomic_write_text(folder / "tokenizer.json", json.dumps(d, ensure_ascii=False) + "\n")
    write_json(folder / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                                                  "clean_up_tokenization_spaces": False})
    write_json(folder / "special_tokens_map.json", special)
