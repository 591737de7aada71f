"""Dream (Ye et al. 2025) Hugging Face folders, e.g. Dream-org/Dream-v0-Instruct-7B, on our `Transformer`.

The upstream network (`modeling_dream.py`, model_type "Dream") is Qwen2 without causal masking: RMSNorm, RoPE
(rotate-half, theta 1e6), grouped-query attention with biases on q/k/v, SwiGLU, an untied head. Dream was adapted
from an autoregressive model, so the state at position i predicts token i + 1: its logits are shifted one place
right (position 0 keeps its own), which `ModelConfig.logits_shift` does inside our network, so samplers see
logits aligned with the canvas. Weights rename one to one:

    model.embed_tokens                      -> wte
    model.layers.N.self_attn.{q,k,v,o}_proj -> blocks.N.attn.{q,k,v,o}_proj   (q/k/v with bias)
    model.layers.N.mlp.{gate,up,down}_proj  -> blocks.N.ff.{gate,up,down}
    model.layers.N.input_layernorm / post_attention_layernorm -> blocks.N.attn_norm / ff_norm
    model.norm / lm_head                    -> ln_f / lm_head

The tokenizer is Qwen2's byte-level BPE (vocab.json + merges.txt); the folder names a custom `DreamTokenizer`
class, which we do not run: `transformers`' own Qwen2 tokenizer reads the same files and chat template.
"""

from __future__ import annotations

import re
from typing import Any

from dlm.config import CheckpointConfig, GenerationConfig, ModelConfig
from dlm.formats.base import FORMATS, CheckpointError, Format, load_weights, renamer
from dlm.formats.llada import generation_ids
from dlm.tokenizer import HFTokenizer, Tokenizer, missing_tokenizer

_LAYER = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
          "self_attn.o_proj": "attn.o_proj", "mlp.gate_proj": "ff.gate", "mlp.up_proj": "ff.up",
          "mlp.down_proj": "ff.down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm"}
_TOP = {"model.embed_tokens": "wte", "model.norm": "ln_f", "lm_head": "lm_head"}
_KEY = re.compile(r"^model\.layers\.(\d+)\.([\w.]+)\.(weight|bias)$")


def rename(key: str) -> str | None:
    if key.endswith("rotary_emb.inv_freq"):
        return None  # a cached RoPE table some exports include; recomputed
    m = _KEY.match(key)
    if m is not None:
        layer, module, kind = m.groups()
        return f"blocks.{layer}.{_LAYER[module]}.{kind}" if module in _LAYER else key
    module, _, kind = key.rpartition(".")
    return f"{_TOP[module]}.{kind}" if module in _TOP else key


def model_config(config: dict[str, Any], folder) -> ModelConfig:
    if config.get("use_sliding_window"):
        raise CheckpointError(f"{folder}/config.json: use_sliding_window=true is not supported")
    if config.get("rope_scaling"):
        raise CheckpointError(f"{folder}/config.json: rope_scaling={config['rope_scaling']!r} is not supported")
    if config.get("tie_word_embeddings"):
        raise CheckpointError(f"{folder}/config.json: tie_word_embeddings=true is not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{folder}/config.json: hidden_act={config['hidden_act']!r} is not supported")
    return ModelConfig(
        arch="llada", vocab_size=config["vocab_size"], d_model=config["hidden_size"],
        n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads") or None, d_ff=config["intermediate_size"],
        max_len=config.get("max_position_embeddings", 32768), rope_theta=float(config.get("rope_theta", 10000.0)),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)), qkv_bias=True, logits_shift=True,
    )


def dream_tokenizer(folder, vocab_size: int, mask_id: int, eos_id: int, pad_id, bos_id) -> Tokenizer:
    import transformers

    if not any((folder / f).exists() for f in ("tokenizer.json", "vocab.json")):
        return missing_tokenizer(folder, vocab_size=vocab_size, mask_id=mask_id, eos_id=eos_id, pad_id=pad_id,
                                 bos_id=bos_id, stop_ids=generation_ids(folder))
    cls = getattr(transformers, "Qwen2TokenizerFast", None) or transformers.Qwen2Tokenizer
    try:
        hf = cls.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot load the Qwen2 tokenizer files of {folder}: {e}") from e
    stops = [i for i in (hf.convert_tokens_to_ids("<|im_end|>"),) if isinstance(i, int) and i != hf.unk_token_id]
    return HFTokenizer(hf, mask_id=mask_id, eos_id=eos_id, pad_id=pad_id, bos_id=bos_id,
                       stop_ids=[*stops, *generation_ids(folder)], vocab_size=vocab_size)


@FORMATS.register("dream")
class DreamFormat(Format):
    model_types = ("Dream",)

    def load(self, folder, config, dtype, device, allow_pickle):
        from dlm.models import build_model

        cfg = CheckpointConfig(
            model=model_config(config, folder),
            # Dream's published settings: one block, steps = new tokens, the entropy rule.
            sampling=GenerationConfig(max_new_tokens=128, steps=128, block_length=0, sampler="dream",
                                      remasking="entropy", suppress_special=False),
            extra={"source": str(folder), "model_type": "Dream"},
        )
        tok = dream_tokenizer(folder, cfg.model.vocab_size, mask_id=int(config.get("mask_token_id", 151666)),
                              eos_id=int(config.get("eos_token_id", 151643)), pad_id=config.get("pad_token_id"),
                              bos_id=config.get("bos_token_id"))
        model = load_weights(folder, cfg.model, build_model, renamer(rename), dtype, device, allow_pickle)
        return model, cfg, tok
