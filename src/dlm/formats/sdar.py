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

    lm = DiffusionLM.from_pretrained("/models/SDAR-1.7B-Chat")          # bd3lm, blocks of 4
"""

from __future__ import annotations

from dlm.formats.base import FORMATS, CheckpointError, Format, load_weights
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
