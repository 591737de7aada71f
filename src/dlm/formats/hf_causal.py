"""Hugging Face causal-LM folders (Llama, Qwen2, Qwen3 families: config.json + safetensors) on our `Transformer`.

An autoregressive checkpoint such as SmolLM2, Llama-3.2, Qwen2.5 or Qwen3 loads as dlm's AR baseline (arch "ar":
the same blocks as the diffusion networks with causal attention, models/ar.py), so `DiffusionLM.from_pretrained`
decodes it left to right, `dlm eval` gives its exact held-out NLL, and `dlm adapt` (dlm/adapt.py) turns it into a
diffusion LM. The three families share one layout (transformers' `modeling_llama.py`, `modeling_qwen2.py`,
`modeling_qwen3.py`): RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU. Weights rename one to one as in
Dream's folders (formats/dream.py):

    model.embed_tokens                      -> wte           (also lm_head when tie_word_embeddings: SmolLM2)
    model.layers.N.self_attn.{q,k,v,o}_proj -> blocks.N.attn.{q,k,v,o}_proj   (Qwen2: q/k/v with bias)
    model.layers.N.self_attn.{q,k}_norm     -> blocks.N.attn.{q,k}_norm       (Qwen3: ModelConfig.qk_norm)
    model.layers.N.mlp.{gate,up,down}_proj  -> blocks.N.ff.{gate,up,down}
    model.layers.N.input_layernorm / post_attention_layernorm -> blocks.N.attn_norm / ff_norm
    model.norm / lm_head                    -> ln_f / lm_head

A tied head is loaded as an untied copy of the embedding (adaptation may then move them apart). What our network
does not compute is refused with a one-line error: RoPE scaling (Llama 3.1+ `rope_scaling`), sliding windows,
biases on the output or MLP projections, activations other than SiLU. No code from the hub is run.

    model, cfg, tok = load_folder(Path("~/.cache/dlm/judge/SmolLM2-135M-Instruct"))   # arch "ar", causal
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from dlm.config import CheckpointConfig, GenerationConfig, ModelConfig
from dlm.formats.base import FORMATS, CheckpointError, Format, load_weights
from dlm.formats.dream import _LAYER, _TOP
from dlm.formats.llada import generation_ids
from dlm.tokenizer import HFTokenizer, Tokenizer, missing_tokenizer

FAMILIES = ("llama", "qwen2", "qwen3")  # config.json model_type
_QK_NORM = {"self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm"}
_KEY = re.compile(r"^model\.layers\.(\d+)\.([\w.]+)\.(weight|bias)$")


def rope_theta(config: dict[str, Any], folder: Path) -> float:
    """RoPE base from `rope_theta` (transformers 4) or `rope_parameters` (5); any scaling is refused."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type")) or scaling.get("rope_type", scaling.get("type"))
    if kind not in (None, "default"):
        raise CheckpointError(f"{folder}/config.json: RoPE scaling {kind!r} is not supported (dlm computes plain "
                              "RoPE); a folder without rope_scaling (or rope_type 'default') loads")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def model_config(config: dict[str, Any], folder: Path, family: str | None = None) -> ModelConfig:
    """config.json of a Llama / Qwen2 / Qwen3 causal LM -> the ModelConfig of our AR network. `family` (llama,
    qwen2, qwen3) names the layout of a folder whose model_type is another (the block models built on them)."""
    family = (family or str(config.get("model_type", ""))).lower()
    bad = {"use_sliding_window": config.get("use_sliding_window"), "mlp_bias": config.get("mlp_bias"),
           "attention_bias": config.get("attention_bias") if family != "qwen2" else None}
    wrong = [f"{k}={v!r}" for k, v in bad.items() if v]
    if config.get("hidden_act", "silu") != "silu":
        wrong.append(f"hidden_act={config['hidden_act']!r}")
    if wrong:
        raise CheckpointError(f"{folder}/config.json: {', '.join(wrong)} is not supported by dlm's network")
    try:
        d_model, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        head_dim = config.get("head_dim") or d_model // n_heads
        return ModelConfig(
            arch="ar", vocab_size=int(config["vocab_size"]), d_model=d_model,
            n_layers=int(config["num_hidden_layers"]), n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or None, d_ff=int(config["intermediate_size"]),
            max_len=int(config.get("max_position_embeddings", 2048)), rope_theta=rope_theta(config, folder),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            qkv_bias=family == "qwen2",  # Qwen2 hard-codes biases on q, k, v (and none on o)
            qk_norm=family == "qwen3", d_head=None if head_dim * n_heads == d_model else int(head_dim),
        )
    except KeyError as e:
        raise CheckpointError(f"{folder}/config.json has no {e.args[0]!r}; is it a complete {family} config?") from e


def converter(tied: bool):
    """The tensor renaming of these families; with a tied head the embedding fills lm_head too."""
    def convert(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if key.endswith("rotary_emb.inv_freq"):
            return []  # a cached RoPE table some exports include; recomputed
        m = _KEY.match(key)
        if m is not None:
            layer, module, kind = m.groups()
            ours = _LAYER.get(module) or _QK_NORM.get(module)
            return [(f"blocks.{layer}.{ours}.{kind}" if ours else key, tensor)]
        module, _, kind = key.rpartition(".")
        if tied and key == "model.embed_tokens.weight":
            return [("wte.weight", tensor), ("lm_head.weight", tensor.clone())]
        return [(f"{_TOP[module]}.{kind}" if module in _TOP else key, tensor)]
    return convert


def special_ids(config: dict[str, Any], hf: Any | None, folder: Path) -> dict[str, Any]:
    """eos (the first of a list: Llama 3 lists several), the other stops, bos and pad from config.json."""
    eos = config.get("eos_token_id")
    eos_list = [int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
    if not eos_list and hf is not None and hf.eos_token_id is not None:
        eos_list = [int(hf.eos_token_id)]
    if not eos_list:
        raise CheckpointError(f"{folder}/config.json names no eos_token_id and no tokenizer gives one; add "
                              "eos_token_id to config.json")
    bos = config.get("bos_token_id")
    if bos is None and hf is not None:
        bos = hf.bos_token_id
    return {"eos_id": eos_list[0], "stop_ids": eos_list[1:], "pad_id": config.get("pad_token_id"), "bos_id": bos}


def mask_id_for(vocab_size: int, n_tokens: int) -> int:
    """Where a [MASK] goes: the first embedding row past the tokenizer (Qwen's folders pad their vocabulary, as
    Dream used), else one row past the end, which dlm.adapt appends; an AR model never reads it."""
    return n_tokens if n_tokens < vocab_size else vocab_size


def causal_tokenizer(folder: Path, config: dict[str, Any], vocab_size: int, mask_id: int | None = None,
                     mask_token: str | None = None, generation_stops: bool = True) -> Tokenizer:
    """The folder's tokenizer; [MASK] is `mask_id`, else the id of `mask_token`, else the first free row.
    `generation_stops`: generation_config.json's eos ids also end an answer (False: config.json's eos only, for a
    family whose reference generator stops at that one token)."""
    extra = generation_ids(folder) if generation_stops else []
    if not any((folder / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        ids = special_ids(config, None, folder)
        mask = mask_id if mask_id is not None else mask_id_for(vocab_size, vocab_size)
        return missing_tokenizer(folder, vocab_size=vocab_size, mask_id=mask,
                                 eos_id=ids["eos_id"], pad_id=ids["pad_id"], bos_id=ids["bos_id"],
                                 stop_ids=[*ids["stop_ids"], *extra])
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot load the tokenizer files of {folder}: {e}") from e
    ids = special_ids(config, hf, folder)
    if mask_id is None and mask_token is not None:
        found = hf.convert_tokens_to_ids(mask_token)
        if not isinstance(found, int) or found == hf.unk_token_id or found >= vocab_size:
            raise CheckpointError(f"the tokenizer of {folder} has no {mask_token!r} token (the [MASK] of this model); "
                                  "are the tokenizer files complete?")
        mask_id = found
    mask = mask_id if mask_id is not None else mask_id_for(vocab_size, len(hf))
    return HFTokenizer(hf, mask_id=mask, eos_id=ids["eos_id"], pad_id=ids["pad_id"],
                       bos_id=ids["bos_id"], stop_ids=[*ids["stop_ids"], *extra],
                       vocab_size=vocab_size)


@FORMATS.register("hf_causal")
class HFCausalFormat(Format):
    model_types = FAMILIES

    def matches(self, config: dict[str, Any]) -> bool:
        archs = config.get("architectures") or []
        return super().matches(config) and (not archs or any(str(a).endswith("ForCausalLM") for a in archs))

    def load(self, folder, config, dtype, device, allow_pickle):
        from dlm.models import build_model

        model_cfg = model_config(config, folder)
        cfg = CheckpointConfig(
            model=model_cfg,
            # An upstream folder: nothing banned, so greedy decoding equals transformers' greedy generate.
            sampling=GenerationConfig(max_new_tokens=128, suppress_special=False),
            extra={"source": str(folder), "model_type": str(config.get("model_type"))},
        )
        cfg.process.loss = "ar"
        tok = causal_tokenizer(folder, config, model_cfg.vocab_size)
        convert = converter(bool(config.get("tie_word_embeddings", False)))
        model = load_weights(folder, model_cfg, build_model, convert, dtype, device, allow_pickle)
        return model, cfg, tok
