"""Fast-dLLM v2 (Wu et al. 2025, arXiv:2509.26328; NVlabs/Fast-dLLM `v2/`) folders, e.g.
Efficient-Large-Model/Fast_dLLM_v2_7B, on our `Transformer`, as a block-diffusion checkpoint. No hub code is run.

The upstream network (the hub's `modeling.py`, model_type "Fast_dLLM_Qwen", architectures
["Fast_dLLM_QwenForCausalLM"]) is Qwen2.5 unchanged: RMSNorm, rotate-half RoPE, grouped-query attention with
biases on q/k/v, SwiGLU, an untied head; the weights keep Qwen2's names, so they map with formats/hf_causal's
converter (Qwen2 layout: blocks.N.attn.{q,k,v,o}_proj, ff.{gate,up,down}, attn_norm / ff_norm, wte / ln_f /
lm_head). What makes it a block model:

- attention (`eval_mask`): block-causal with blocks of `bd_size` (32 in the released model): a query of block i
  sees every key of blocks <= i. Our network runs it as `block_size=bd_size` (the process's block size).
- the AR shift is kept: the state at position i predicts token i + 1. Upstream shifts the logits of each forward
  one place right inside the forward's window (`cat([logits[:, :1], logits[:, :-1]])`), which is
  `ModelConfig.logits_shift` here.
- [MASK] is the added token `|<MASK>|` (151665, hard-coded upstream as `mask_id`); config.json names none, so its id
  is read from the tokenizer. Generation stops at `stop_token` 151645 = `<|im_end|>` = config.json's eos_token_id.

Generation (`Fast_dLLM_QwenForCausalLM.generate`): block by block against a KV cache of the finished blocks; each
block in sub-blocks of `small_block_size` (8) left to right; per step, temperature 0: every masked position of
the sub-block whose top probability exceeds `threshold` (0.9 in the model card) and at least the most confident
one. That is our block sampler with `threshold=0.9, sub_block=8` and one token per step planned, the defaults set
here. Upstream decodes the first token of every block after the first by plain AR (the finished block's last
logits) before the block's diffusion steps: `ar_first_token`, set here (a block with no prompt token in it decodes
its first position alone, then the rest in sub-blocks).

Export (`FastDLLMv2Export`, the inverse of the loader; `dlm export --format fast_dllm_v2`): a dlm block model that is
this network (no qk_norm, the logit shift, bd3lm) is written with the hub folder's config.json keys (bd_size = the
process's block size), Qwen2 weight names (zero q/k/v biases for a model trained without them: the same function),
the tokenizer as Hugging Face files with [MASK] named |<MASK>|, generation_config.json. Upstream's generate() takes
mask_id (default 151665), block_size (default 32, not read from bd_size) and stop_token as arguments: pass this
folder's values.

    lm = DiffusionLM.from_pretrained("/models/Fast_dLLM_v2_7B", dtype="auto")   # bd3lm, blocks of 32
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dlm.config import CheckpointConfig, GenerationConfig, ProcessConfig
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
from dlm.formats.hf_causal import causal_tokenizer, converter, model_config

MASK_TOKEN = "|<MASK>|"  # upstream: mask_id=151665, the id of this added token
MASK_ID = 151665
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
THRESHOLD = 0.9  # the model card's and run_chatbot.py's threshold (generate's own default, 1, is one per step)
SUB_BLOCK = 8  # small_block_size of the model card


def positive_int(config: dict[str, Any], key: str, folder: Path, default: int | None = None) -> int:
    """config[key] as an integer >= 1, or a one-line CheckpointError."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{folder}/config.json: {key}={value!r} must be an integer >= 1 (the block size)")
    return value


def block_checkpoint(model_cfg, block_size: int, threshold: float, sub_block: int, folder: Path,
                     model_type: str, ar_first_token: bool = False, whole_blocks: bool = False) -> CheckpointConfig:
    """A block-diffusion CheckpointConfig: the bd3lm process with `block_size`, the block sampler's defaults."""
    from dlm.processes.masked import PROCESSES

    process = ProcessConfig(process="bd3lm", **{**PROCESSES.get("bd3lm").defaults, "block_size": block_size})
    sampling = GenerationConfig(
        sampler="block", max_new_tokens=128, block_length=block_size, threshold=threshold, sub_block=sub_block,
        # One token per step planned for any length up to the context (steps for max_new_tokens tokens, as
        # LLaDA counts them): with the threshold, each step commits every confident token and at least one, as
        # upstream does. suppress_special off: nothing is banned, as upstream.
        steps=model_cfg.max_len, temperature=0.0, suppress_special=False, ar_first_token=ar_first_token,
        whole_blocks=whole_blocks)
    return CheckpointConfig(model=model_cfg, process=process, sampling=sampling,
                            extra={"source": str(folder), "model_type": model_type})


@FORMATS.register("fast_dllm_v2")
class FastDLLMv2Format(Format):
    model_types = ("Fast_dLLM_Qwen",)

    def load(self, folder, config, dtype, device, allow_pickle):
        from dlm.models import build_model

        kinds = sorted({str(k) for k in config.get("layer_types") or []} - {"full_attention"})
        if kinds:
            raise CheckpointError(f"{folder}/config.json: layer_types {kinds} are not supported (dlm computes "
                                  "full_attention layers only)")
        bd_size = positive_int(config, "bd_size", folder, default=32)
        model_cfg = model_config(config, folder, family="qwen2").replace(arch="llada", logits_shift=True)
        cfg = block_checkpoint(model_cfg, bd_size, THRESHOLD, SUB_BLOCK, folder, "Fast_dLLM_Qwen",
                               ar_first_token=True)  # each later block's first token is AR, as upstream
        if any((folder / f).exists() for f in TOKENIZER_FILES):
            tok = causal_tokenizer(folder, config, model_cfg.vocab_size, mask_token=MASK_TOKEN,
                                   generation_stops=False)  # upstream stops at `stop_token` (config's eos) only
        else:  # no tokenizer files: upstream's hard-coded id, where the embedding has that row
            tok = causal_tokenizer(folder, config, model_cfg.vocab_size,
                                   mask_id=MASK_ID if model_cfg.vocab_size > MASK_ID else None, generation_stops=False)
        convert = converter(bool(config.get("tie_word_embeddings", False)))
        model = load_weights(folder, model_cfg, build_model, convert, dtype, device, allow_pickle)
        return model, cfg, tok


@EXPORTERS.register("fast_dllm_v2")
class FastDLLMv2Export(Exporter):
    def problems(self, cfg, tok):
        from dlm.tokenizer import HFTokenizer, IdsOnlyTokenizer

        want = {"qk_norm": (False, "Fast-dLLM v2 is Qwen2.5, without query/key norms"),
                "logits_shift": (True, "Fast-dLLM v2 keeps the AR shift: the state at i predicts token i + 1")}
        wrong = block_model_problems("fast_dllm_v2", cfg, want) + mask_problems("fast_dllm_v2", cfg, tok)
        if isinstance(tok, HFTokenizer) and tok.hf.convert_tokens_to_ids(MASK_TOKEN) != tok.mask_id:
            wrong.append(f"fast_dllm_v2 finds [MASK] as the token {MASK_TOKEN!r}, which this tokenizer does not "
                         f"have at the mask id {tok.mask_id}")
        if isinstance(tok, IdsOnlyTokenizer) and tok.mask_id != MASK_ID:
            wrong.append(f"a fast_dllm_v2 folder without tokenizer files has [MASK] {MASK_ID}; this model's is "
                         f"{tok.mask_id}: copy its tokenizer files into the model folder first")
        return wrong

    def write(self, folder, model, cfg, tok, dtype):
        m = cfg.model
        others = sorted(tok.stop_ids - {tok.eos_id})  # config.json's eos list is the loader's only stop source
        config = {"architectures": ["Fast_dLLM_QwenForCausalLM"], "attention_dropout": 0.0,
                  "auto_map": {"AutoConfig": "configuration.Fast_dLLM_QwenConfig",
                               "AutoModel": "modeling.Fast_dLLM_QwenModel",
                               "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"},
                  "bd_size": cfg.process.block_size, "bos_token_id": tok.bos_id,
                  "conplemenrary_mask": True,  # sic: the hub config's key (training only)
                  "eos_token_id": [tok.eos_id, *others] if others else tok.eos_id, "hidden_act": "silu",
                  "hidden_size": m.d_model, "initializer_range": 0.02, "intermediate_size": m.ff_width,
                  "layer_types": ["full_attention"] * m.n_layers, "max_position_embeddings": m.max_len,
                  "max_window_layers": m.n_layers, "model_type": "Fast_dLLM_Qwen", "num_attention_heads": m.n_heads,
                  "num_hidden_layers": m.n_layers, "num_key_value_heads": m.kv_heads, "pad_token_id": tok.pad_id,
                  "rms_norm_eps": m.norm_eps, "rope_scaling": None, "rope_theta": m.rope_theta,
                  "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": dtype_name(model, dtype),
                  "use_cache": True, "use_sliding_window": False, "vocab_size": m.vocab_size}
        if m.d_head is not None:  # Qwen2 derives head_dim = hidden_size / heads unless config.json names it
            config["head_dim"] = m.head_dim
        write_weights(folder, hf_state_dict(model, dtype, qkv_bias=True))
        write_tokenizer(folder, tok, MASK_TOKEN)
        write_json(folder / "generation_config.json", generation_config(tok, cfg))
        write_json(folder / "config.json", config)
