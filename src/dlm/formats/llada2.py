"""LLaDA2.x (inclusionAI/LLaDA2.0-mini, LLaDA2.1-mini, ...: the hub's `modeling_llada2_moe.py`, model_type
"llada2_moe", architectures ["LLaDA2MoeModelLM"]) on our `Transformer`, as a block-diffusion checkpoint. No hub
code is run.

The upstream network (Ling 2.0's MoE transformer trained as a block diffusion model):

- attention: one fused `query_key_value` projection (rows: the H query heads, then the H_kv key heads, then the
  H_kv value heads; split here into q/k/v_proj), RMSNorm on each head's queries and keys before RoPE
  (`use_qk_norm`, ModelConfig.qk_norm), grouped-query attention, output projection `dense`;
- partial RoPE: transformers' default rope init rotates the first int(head_dim * `partial_rotary_factor`)
  channels of each head (rotate-half within them; ModelConfig.rotary_dim); `rotary_dim` in config.json is not read
  upstream and must agree;
- feed-forward: dense SwiGLU in the first `first_k_dense_replace` layers, then a mixture of experts (models/moe.py):
  sigmoid router `gate` with `expert_bias` (steers the choice only), group-limited top-k (`n_group`,
  `topk_group`, `num_experts_per_tok`), weights normalised and scaled by `routed_scaling_factor`, plus the shared
  expert `shared_experts` (width moe_intermediate_size * num_shared_experts). Upstream always routes by sigmoid
  and always normalises (k > 1), whatever `score_function` / `norm_topk_prob` say: configs naming anything else
  are refused rather than silently computed otherwise;
- no logits shift: the state at position i predicts token i (the hub's loss uses "same label position logits").

Weights: model.word_embeddings -> wte, model.layers.N.{input,post_attention}_layernorm -> blocks.N.{attn,ff}_norm,
attention.{query_key_value,dense,query_layernorm,key_layernorm} -> attn.{q,k,v}_proj / o_proj / q_norm / k_norm,
mlp.{gate,up,down}_proj -> ff.{gate,up,down} (dense layers), mlp.gate.{weight,expert_bias} -> ff.router.weight /
ff.expert_bias, mlp.experts.E.*_proj -> ff.experts.E.*, mlp.shared_experts.*_proj -> ff.shared.*, model.norm ->
ln_f, lm_head -> lm_head.

Generation (the hub's `LLaDA2MoeModelLM.generate`): block-causal attention with blocks of `block_length` (32),
the prompt's complete blocks as prefix; per block `steps` (32) steps, each committing every masked position whose
probability exceeds `threshold` (0.95) and at least the scheduled count (block_length / steps = 1); stop after the
block that holds `eos_id` (config's eos, <|endoftext|>), the answer cut after it. That is our block sampler with
blocks of 32, threshold 0.95, one token per step planned: the defaults set here. Greedy: the hub's LLaDA2.0
helper samples even at temperature 0 (torch.multinomial at temperature 1, inclusionAI/LLaDA2.X issue #6, fixed
to argmax in LLaDA2.1's modeling file); dlm decodes greedily, as the fix and the docstring ("0.0 corresponds to
greedy decoding") say. Upstream decodes every block whole, the last one past gen_length too (then drops those
tokens), in min(steps, gen_length) steps per block whose counts spread block_length (not the masks) over them:
BlockOptions.whole_blocks, on for these folders, so any prompt and max_new_tokens give upstream's tokens. Not
reproduced: LLaDA2.1's token editing (`editing_threshold`, re-writing committed tokens).

    lm = DiffusionLM.from_pretrained("/models/LLaDA2.0-mini", dtype="auto")   # bd3lm, blocks of 32
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from dlm.config import ConfigError, ModelConfig
from dlm.formats.base import FORMATS, CheckpointError, Format, load_weights
from dlm.formats.fast_dllm_v2 import TOKENIZER_FILES, block_checkpoint
from dlm.formats.hf_causal import causal_tokenizer, rope_theta

BLOCK_LENGTH = 32  # generate()'s block_length (config.json names none)
THRESHOLD = 0.95  # generate()'s threshold
MASK_TOKEN = "<|mask|>"
MASK_ID, EOS_ID = 156895, 156892  # generate()'s hard-coded mask_id / eos_id, for a folder without a tokenizer

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_RENAME = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ff_norm.weight",
    "attention.dense.weight": "attn.o_proj.weight", "attention.query_layernorm.weight": "attn.q_norm.weight",
    "attention.key_layernorm.weight": "attn.k_norm.weight",
    "mlp.gate_proj.weight": "ff.gate.weight", "mlp.up_proj.weight": "ff.up.weight",
    "mlp.down_proj.weight": "ff.down.weight",
    "mlp.gate.weight": "ff.router.weight", "mlp.gate.expert_bias": "ff.expert_bias",
}
_EXPERT = re.compile(r"^mlp\.(experts\.\d+|shared_experts)\.(gate|up|down)_proj\.weight$")
_TOP = {"model.word_embeddings.weight": "wte.weight", "model.norm.weight": "ln_f.weight",
        "lm_head.weight": "lm_head.weight"}


def _int(config: dict[str, Any], key: str, folder: Path, default: Any = None, low: int = 1) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise CheckpointError(f"{folder}/config.json: {key}={value!r} must be an integer >= {low}")
    return value


def model_config(config: dict[str, Any], folder: Path) -> ModelConfig:
    """config.json of a LLaDA2 MoE folder (missing keys take LLaDA2MoeConfig's defaults) -> our ModelConfig."""
    wrong = []
    if config.get("hidden_act", "silu") != "silu":
        wrong.append(f"hidden_act={config['hidden_act']!r}")
    if config.get("use_bias", True):  # the config class's default: a bias on the output projection
        wrong.append(f"use_bias={config.get('use_bias', True)!r} (a bias on the attention output)")
    if config.get("score_function", "sigmoid") != "sigmoid":
        wrong.append(f"score_function={config['score_function']!r} (upstream routes by sigmoid only)")
    if wrong:
        raise CheckpointError(f"{folder}/config.json: {', '.join(wrong)} is not supported by dlm's network")
    d_model, n_heads = _int(config, "hidden_size", folder), _int(config, "num_attention_heads", folder)
    head_dim = _int(config, "head_dim", folder, default=config.get("head_dim") or d_model // max(n_heads, 1))
    factor = config.get("partial_rotary_factor", 0.5)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise CheckpointError(f"{folder}/config.json: partial_rotary_factor={factor!r} must be in (0, 1]")
    rotary = int(head_dim * factor)
    if config.get("rotary_dim") not in (None, rotary):
        raise CheckpointError(f"{folder}/config.json: rotary_dim={config['rotary_dim']!r} disagrees with "
                              f"head_dim * partial_rotary_factor = {rotary}, which the upstream code rotates")
    experts = config.get("num_experts", 16)
    moe: dict[str, Any] = {}
    if experts is not None:
        top_k = _int(config, "num_experts_per_tok", folder, default=2)
        if top_k > 1 and config.get("norm_topk_prob", True) is False:
            raise CheckpointError(f"{folder}/config.json: norm_topk_prob=False is not supported (upstream normalises "
                                  "the top-k weights whatever this key says)")
        scale = config.get("routed_scaling_factor", 2.5)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise CheckpointError(f"{folder}/config.json: routed_scaling_factor={scale!r} must be a number")
        moe = {"moe_experts": _int(config, "num_experts", folder), "moe_top_k": top_k,
               "moe_d_ff": _int(config, "moe_intermediate_size", folder),
               "moe_shared": _int(config, "num_shared_experts", folder, default=0, low=0)
               if config.get("num_shared_experts") is not None else 0,
               "moe_groups": _int(config, "n_group", folder, default=8),
               "moe_topk_groups": _int(config, "topk_group", folder, default=4), "moe_scale": float(scale),
               "moe_dense_layers": _int(config, "first_k_dense_replace", folder, default=0, low=0)}
    n_layers = _int(config, "num_hidden_layers", folder, default=24)
    dense = experts is None or moe["moe_dense_layers"] > 0
    try:
        return ModelConfig(
            arch="llada", vocab_size=_int(config, "vocab_size", folder), d_model=d_model, n_layers=n_layers,
            n_heads=n_heads, n_kv_heads=_int(config, "num_key_value_heads", folder),
            d_ff=_int(config, "intermediate_size", folder) if dense else None,
            max_len=_int(config, "max_position_embeddings", folder, default=16384),
            rope_theta=rope_theta(config, folder), norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            qkv_bias=bool(config.get("use_qkv_bias", False)), qk_norm=bool(config.get("use_qk_norm", True)),
            d_head=None if head_dim * n_heads == d_model else head_dim,
            rotary_dim=None if rotary == head_dim else rotary, **moe)
    except ConfigError as e:
        raise CheckpointError(f"{folder}/config.json: {e}") from e


def converter(cfg: ModelConfig, tied: bool):
    """Hub names -> ours; the fused query_key_value is split row-wise into q (H heads), k and v (H_kv heads each)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim

    def convert(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if key.endswith("rotary_emb.inv_freq"):
            return []  # a cached RoPE table; recomputed
        if tied and key == "model.word_embeddings.weight":
            return [("wte.weight", tensor), ("lm_head.weight", tensor.clone())]
        m = _LAYER.match(key)
        if m is None:
            return [(_TOP.get(key, key), tensor)]
        layer, rest = m.groups()
        p = f"blocks.{layer}."
        if rest in ("attention.query_key_value.weight", "attention.query_key_value.bias"):
            kind = rest.rpartition(".")[2]
            if tensor.shape[0] != q + 2 * kv:
                return [(key, tensor)]  # reported as a shape mismatch below (no such parameter)
            qt, kt, vt = tensor.split([q, kv, kv], dim=0)
            return [(p + f"attn.{n}_proj.{kind}", t.clone()) for n, t in zip("qkv", (qt, kt, vt), strict=True)]
        e = _EXPERT.match(rest)
        if e is not None:
            who, proj = e.groups()
            if who == "shared_experts" and cfg.moe_shared == 0 and tensor.numel() == 0:
                return []  # num_shared_experts=0: upstream's zero-width shared expert adds nothing
            return [(p + f"ff.{'shared' if who == 'shared_experts' else who}.{proj}.weight", tensor)]
        return [(p + _RENAME[rest], tensor)] if rest in _RENAME else [(key, tensor)]
    return convert


@FORMATS.register("llada2")
class LLaDA2Format(Format):
    model_types = ("llada2_moe",)

    def load(self, folder, config, dtype, device, allow_pickle):
        from dlm.models import build_model

        model_cfg = model_config(config, folder)
        cfg = block_checkpoint(model_cfg, BLOCK_LENGTH, THRESHOLD, 0, folder, "llada2_moe", whole_blocks=True)
        mask_id = config.get("mask_token_id")
        if mask_id is not None and (isinstance(mask_id, bool) or not isinstance(mask_id, int)
                                    or not 0 <= mask_id < model_cfg.vocab_size):
            raise CheckpointError(f"{folder}/config.json: mask_token_id={mask_id!r} is not a token id below "
                                  f"vocab_size={model_cfg.vocab_size}")
        big = model_cfg.vocab_size > MASK_ID  # a real vocabulary: generate()'s hard-coded [MASK] row exists
        if mask_id is None and big:
            mask_id = MASK_ID  # what upstream's generate() uses whatever the tokenizer says
        if any((folder / f).exists() for f in TOKENIZER_FILES):
            tok = causal_tokenizer(folder, config, model_cfg.vocab_size, mask_id=mask_id,
                                   mask_token=None if mask_id is not None else MASK_TOKEN,
                                   generation_stops=False)  # upstream stops at eos_id only
        else:  # no tokenizer files: upstream generate()'s hard-coded ids, where the embedding has those rows
            tok = causal_tokenizer(folder, {"eos_token_id": EOS_ID if big else None, **config},
                                   model_cfg.vocab_size, mask_id=mask_id, generation_stops=False)
        convert = converter(model_cfg, bool(config.get("tie_word_embeddings", False)))
        model = load_weights(folder, model_cfg, build_model, convert, dtype, device, allow_pickle)
        for name, p in model.named_parameters():
            if name.endswith("expert_bias"):
                p.requires_grad_(False)  # a routing offset, never trained by gradient
        return model, cfg, tok
