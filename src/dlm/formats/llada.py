"""LLaDA (Nie et al. 2025) Hugging Face folders, e.g. GSAI-ML/LLaDA-8B-Instruct, on our `Transformer`.

The upstream network (`modeling_llada.py`, model_type "llada", `block_type` "llama") is a LLaMA block without
causal masking: RMSNorm (statistics in float32), RoPE on the rotate-half layout in float32, q/k/v/out projections
without bias, SwiGLU as `ff_out(silu(ff_proj(x)) * up_proj(x))`, a final `ln_f` and an untied `ff_out` head.
That is our `models/transformer.py` exactly, so loading is a renaming of the weights:

    model.transformer.wte.weight                  -> wte.weight
    model.transformer.blocks.N.q_proj/k_proj/v_proj -> blocks.N.attn.q_proj/k_proj/v_proj
    model.transformer.blocks.N.attn_out           -> blocks.N.attn.o_proj
    model.transformer.blocks.N.ff_proj / up_proj / ff_out -> blocks.N.ff.gate / up / down
    model.transformer.blocks.N.attn_norm / ff_norm -> blocks.N.attn_norm / ff_norm
    model.transformer.ln_f / ff_out               -> ln_f / lm_head

The tokenizer (tokenizer.json + the Llama-3 style chat template) loads through `transformers.AutoTokenizer`;
the mask id is config.json's `mask_token_id` (126336 for LLaDA-8B).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from dlm.config import CheckpointConfig, GenerationConfig, ModelConfig
from dlm.formats.base import FORMATS, CheckpointError, Format, load_weights, renamer
from dlm.tokenizer import HFTokenizer, Tokenizer, missing_tokenizer

_BLOCK = {"q_proj": "attn.q_proj", "k_proj": "attn.k_proj", "v_proj": "attn.v_proj", "attn_out": "attn.o_proj",
          "ff_proj": "ff.gate", "up_proj": "ff.up", "ff_out": "ff.down", "attn_norm": "attn_norm",
          "ff_norm": "ff_norm"}
_TOP = {"wte": "wte", "ln_f": "ln_f", "ff_out": "lm_head"}
_KEY = re.compile(r"^model\.transformer\.(?:blocks\.(\d+)\.)?(\w+)\.weight$")


def rename(key: str) -> str | None:
    m = _KEY.match(key)
    if m is None:
        return key  # not a LLaDA name: reported as unexpected
    layer, module = m.groups()
    if layer is None:
        return f"{_TOP[module]}.weight" if module in _TOP else key
    return f"blocks.{layer}.{_BLOCK[module]}.weight" if module in _BLOCK else key


def _require(config: dict[str, Any], wanted: dict[str, Any], folder: Path) -> None:
    for key, value in wanted.items():
        if config.get(key, value) != value:
            raise CheckpointError(f"{folder}/config.json: {key}={config[key]!r} is not supported (dlm loads LLaDA "
                                  f"with {key}={value!r})")


def model_config(config: dict[str, Any], folder: Path) -> ModelConfig:
    _require(config, {"block_type": "llama", "rope": True, "alibi": False, "include_bias": False,
                      "layer_norm_type": "rms", "activation_type": "silu", "attention_layer_norm": False,
                      "weight_tying": False, "scale_logits": False}, folder)
    d = config["d_model"]
    return ModelConfig(
        arch="llada", vocab_size=config.get("embedding_size") or config["vocab_size"], d_model=d,
        n_layers=config["n_layers"], n_heads=config["n_heads"],
        n_kv_heads=config.get("n_kv_heads") or None,
        d_ff=config.get("mlp_hidden_size") or config.get("mlp_ratio", 4) * d,
        max_len=config.get("max_sequence_length", 4096), rope_theta=float(config.get("rope_theta", 10000.0)),
        norm_eps=float(config.get("rms_norm_eps", 1e-5)), qkv_bias=bool(config.get("include_qkv_bias", False)),
    )


def hf_tokenizer(folder: Path, vocab_size: int, mask_id: int, eos_id: int, pad_id: int | None,
                 bos_id: int | None, stop_tokens: list[str]) -> Tokenizer:
    from transformers import PreTrainedTokenizerFast

    # Not AutoTokenizer: it reads config.json's auto_map and would ask for trust_remote_code. The folder's
    # tokenizer.json (+ tokenizer_config.json with the chat template) is all a fast tokenizer needs.
    if not (folder / "tokenizer.json").exists():
        return missing_tokenizer(folder, vocab_size=vocab_size, mask_id=mask_id, eos_id=eos_id, pad_id=pad_id,
                                 bos_id=bos_id, stop_ids=generation_ids(folder))
    try:
        hf = PreTrainedTokenizerFast.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer of {folder}: {e}") from e
    stops = [i for i in (hf.convert_tokens_to_ids(t) for t in stop_tokens)
             if isinstance(i, int) and i != hf.unk_token_id]
    return HFTokenizer(hf, mask_id=mask_id, eos_id=eos_id, pad_id=pad_id, bos_id=bos_id,
                       stop_ids=[*stops, *generation_ids(folder)], vocab_size=vocab_size)


def generation_ids(folder: Path) -> list[int]:
    """The eos_token_id(s) of generation_config.json (chat models list their end-of-turn token there)."""
    path = folder / "generation_config.json"
    if not path.exists():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id", [])
    return [int(i) for i in (eos if isinstance(eos, list) else [eos])]


@FORMATS.register("llada")
class LLaDAFormat(Format):
    model_types = ("llada",)

    def load(self, folder, config, dtype, device, allow_pickle):
        from dlm.models import build_model

        cfg = CheckpointConfig(
            model=model_config(config, folder),
            sampling=GenerationConfig(max_new_tokens=128, steps=128, block_length=32, sampler="llada",
                                      remasking="low_confidence", suppress_special=False),
            extra={"source": str(folder), "model_type": "llada"},
        )
        eos = int(config.get("eos_token_id", 126081))
        tok = hf_tokenizer(folder, cfg.model.vocab_size, mask_id=int(config.get("mask_token_id", 126336)),
                           eos_id=eos, pad_id=config.get("pad_token_id"), bos_id=config.get("bos_token_id"),
                           stop_tokens=["<|eot_id|>"])
        model = load_weights(folder, cfg.model, build_model, renamer(rename), dtype, device, allow_pickle)
        return model, cfg, tok
