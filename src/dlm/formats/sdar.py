"""SDAR (JetLM/SDAR-*-Chat; code JetAstra/SDAR, `training/model/SDAR-*-Chat/modeling_sdar.py`) folders on our
`Transformer`, as a block-diffusion checkpoint. No hub code is run.

The upstream network (model_type "sdar", architectures ["SDARForCausalLM"]) is Qwen3: RMSNorm on each head's
queries and keys before RoPE, `head_dim` independent of hidden_size / heads, grouped-query attention without biases,
SwiGLU; the weights keep Qwen3's names and map with formats/hf_causal's converter (q_norm / k_norm ->
blocks.N.attn.{q,k}_norm, ModelConfig.qk_norm). What makes it a block model:

- attention: block-causal with blocks of config.json's `block_size` (4 in the released models), the mask its
  `generate.py` builds (`tril(ones(n_blocks, n_blocks))` repeated over each block) and passes to every forward.
- no logits shift: unlike Fast-dLLM v2, the state at position i predicts token i itself (trained from scratch as
  a block model on Qwen3's weights, the head reads the masked position).
- [MASK] is config.json's `mask_token_id` (151669, `<|MASK|>`); eos is config.json's eos_token_id (151643).

Generation (`generate.py: block_diffusion_generate`, and the greedy `huggingface_bd3.py` of its OpenCompass
evaluation): prefill the prompt's complete blocks into the cache, then per block `denoising_steps` (= block_size)
steps; `low_confidence_dynamic`: every masked position whose probability exceeds `confidence_threshold` (0.85)
and at least the planned count (one per step). That is our block sampler with `threshold=0.85` and one token per
step planned, the defaults set here; greedy (upstream's evaluation: top_k=1) rather than generate.py's
temperature-1 sampling.

Export (`SDARExport`, the inverse of the loader; `dlm export --format sdar`): a dlm block model that is this network
(qk_norm on, no biases, no logit shift, bd3lm) is written as an SDAR folder: config.json with SDAR-4B-Chat's key
set (block_size = the process's block size, mask_token_id = the tokenizer's [MASK]), Qwen3 weight names, the
tokenizer as Hugging Face files with [MASK] named <|MASK|>, generation_config.json. The modeling code is not
written (it is upstream's: `auto_map` names configuration_sdar.py / modeling_sdar.py, to be copied from a
JetLM/SDAR-* hub folder for trust_remote_code).

    lm = DiffusionLM.from_pretrained("/models/SDAR-1.7B-Chat")          # bd3lm, blocks of 4
    export_model("out/sdar", lm.model, lm.config, lm.tokenizer, "sdar")  # dlm.formats.export
"""

from __future__ import annotations

from dlm.formats.base import FORMATS, CheckpointError, Format, load_weights
from dlm.formats.export import (
    EXPORTERS,
    Exporter,
    block_model_problems,
    dtype_name,
    generation_config,
    hf_state_dict,
    mask_problems,
    write_json,
    write_tokenizer,
    write_weights,
)
from dlm.formats.fast_dllm_v2 import TOKENIZER_FILES, block_checkpoint, positive_int
from dlm.formats.hf_causal import causal_tokenizer, converter, model_config

MASK_TOKEN = "<|MASK|>"
THRESHOLD = 0.85  # generate.py's --confidence_threshold


@FORMATS.register("sdar")
class SDARFormat(Format):
    model_types = ("sdar",)

    def load(self, folder, config, dtype, device, allow_pickle):
        from dlm.models import build_model

        block_size = positive_int(config, "block_size", folder)
        model_cfg = model_config(config, folder, family="qwen3").replace(arch="llada")
        cfg = block_checkpoint(model_cfg, block_size, THRESHOLD, 0, folder, "sdar")
        mask_id = config.get("mask_token_id")
        if mask_id is not None and (isinstance(mask_id, bool) or not isinstance(mask_id, int)
                                    or not 0 <= mask_id < model_cfg.vocab_size):
            raise CheckpointError(f"{folder}/config.json: mask_token_id={mask_id!r} is not a token id below "
                                  f"vocab_size={model_cfg.vocab_size}")
        if mask_id is None and not any((folder / f).exists() for f in TOKENIZER_FILES):
            raise CheckpointError(f"{folder}/config.json names no mask_token_id and the folder has no tokenizer "
                                  "to find <|MASK|> in; add mask_token_id to config.json")
        tok = causal_tokenizer(folder, config, model_cfg.vocab_size, mask_id=mask_id,
                               mask_token=None if mask_id is not None else MASK_TOKEN)
        convert = converter(bool(config.get("tie_word_embeddings", False)))
        model = load_weights(folder, model_cfg, build_model, convert, dtype, device, allow_pickle)
        return model, cfg, tok


# SDAR-4B-Chat's config.json keys that hold no size (JetAstra/SDAR training/model/SDAR-4B-Chat/config.json); the
# modeling reads some (fuse_cross_entropy, attn_implementation) in training only.
_FIXED = {"architectures": ["SDARForCausalLM"],
          "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                       "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
          "attention_bias": False, "attention_dropout": 0.0, "attn_implementation": "flex_attention", "debug": False,
          "ep_size": 1, "fuse_cross_entropy": True, "hidden_act": "silu", "initializer_range": 0.02,
          "micro_forward": False, "model_type": "sdar", "rope_scaling": None, "skip_checkpoint": False,
          "sliding_window": None, "tie_word_embeddings": False, "use_cache": False, "use_deepep": False,
          "use_sliding_window": False}


@EXPORTERS.register("sdar")
class SDARExport(Exporter):
    def problems(self, cfg, tok):
        want = {"qk_norm": (True, "SDAR is Qwen3: RMSNorm on each head's queries and keys; train with "
                                  "qk_norm=True or adapt a Qwen3 model with `dlm adapt --mode block`"),
                "qkv_bias": (False, "SDAR's attention has no biases"),
                "logits_shift": (False, "SDAR's position i predicts token i itself")}
        return block_model_problems("sdar", cfg, want) + mask_problems("sdar", cfg, tok)

    def write(self, folder, model, cfg, tok, dtype):
        m = cfg.model
        config = {**_FIXED, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                  "block_size": cfg.process.block_size, "mask_token_id": tok.mask_id,
                  "pad_token_id": tok.pad_id, "head_dim": m.head_dim,
                  "hidden_size": m.d_model, "intermediate_size": m.ff_width, "max_position_embeddings": m.max_len,
                  "max_window_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_hidden_layers": m.n_layers,
                  "num_key_value_heads": m.kv_heads, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
                  "torch_dtype": dtype_name(model, dtype), "vocab_size": m.vocab_size}
        write_weights(folder, hf_state_dict(model, dtype))
        write_tokenizer(folder, tok, MASK_TOKEN)
        write_json(folder / "generation_config.json", generation_config(tok, cfg))
        write_json(folder / "config.json", dict(sorted(config.items())))
