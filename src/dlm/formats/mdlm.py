"""MDLM (Sahoo et al. 2024) Hugging Face folders, e.g. kuleshov-group/mdlm-owt, on our `DDiT`.

The hub folder (model_type "mdlm"; `configuration_mdlm.py` / `modeling_mdlm.py`, which need flash-attn and
`trust_remote_code`, neither of which we use) holds `config.json` with hidden_dim, cond_dim, n_blocks, n_heads,
vocab_size (GPT-2's 50257 + [MASK] = 50258), model_length and time_conditioning, and `model.safetensors` whose
names are the DIT backbone of kuleshov-group/mdlm `models/dit.py` under `backbone.`. Ours are the same names:

    backbone.vocab_embed.embedding                     -> vocab_embed.embedding
    backbone.sigma_map.mlp.{0,2}.{weight,bias}         -> sigma_map.mlp.{0,2}.{weight,bias}
    backbone.blocks.N.{norm1,attn_qkv,attn_out,norm2,mlp.0,mlp.2,adaLN_modulation}.* -> blocks.N.*
    backbone.output_layer.{norm_final,linear,adaLN_modulation}.* -> output_layer.*
    backbone.rotary_emb.inv_freq                       -> dropped (a cached RoPE table, recomputed)

The released OWT model has time_conditioning false: upstream feeds sigma = 0 and so do we. The network returns
the backbone's logits; SUBS (mask logit -inf, carry-over of unmasked tokens) is what our `mdlm` sampler does.
The tokenizer is GPT-2's, which the hub folder does not ship: put its tokenizer.json (or vocab.json and
merges.txt) into the folder; [MASK] is the id after it (50257).

    lm = DiffusionLM.from_pretrained("/models/mdlm-owt")       # + GPT-2's tokenizer.json in the folder
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dlm.config import CheckpointConfig, GenerationConfig, ModelConfig
from dlm.formats.base import FORMATS, CheckpointError, Format, load_weights, renamer
from dlm.tokenizer import HFTokenizer, Tokenizer, missing_tokenizer

GPT2_FILES = "tokenizer.json (or vocab.json and merges.txt)"


def rename(key: str) -> str | None:
    if key.endswith("rotary_emb.inv_freq"):
        return None  # upstream's persistent RoPE buffer (base 10000); recomputed
    return key.removeprefix("backbone.")  # our names are the backbone's; anything else is reported unexpected


def model_config(config: dict[str, Any], folder: Path) -> ModelConfig:
    wanted = ("vocab_size", "hidden_dim", "cond_dim", "n_blocks", "n_heads")
    absent = [k for k in wanted if k not in config]
    if absent:
        raise CheckpointError(f"{folder}/config.json (model_type 'mdlm') lacks {absent}: dlm reads the layout of "
                              "kuleshov-group/mdlm-owt (vocab_size, hidden_dim, cond_dim, n_blocks, n_heads, "
                              "model_length, time_conditioning)")
    d = config["hidden_dim"]
    return ModelConfig(
        arch="ddit", vocab_size=config["vocab_size"], d_model=d, n_layers=config["n_blocks"],
        n_heads=config["n_heads"], d_ff=4 * d, max_len=config.get("model_length", 1024),
        dropout=float(config.get("dropout", 0.1)), time_dim=256, cond_dim=config["cond_dim"],
        time_conditioning=bool(config.get("time_conditioning", False)),
    )


def gpt2_tokenizer(folder: Path, mask_id: int, vocab_size: int) -> Tokenizer:
    """GPT-2's tokenizer from the folder, plus [MASK] = mask_id (the id after its last token, as MDLM / SEDD)."""
    if not ((folder / "tokenizer.json").exists() or
            ((folder / "vocab.json").exists() and (folder / "merges.txt").exists())):
        # MDLM and SEDD use GPT-2's tokenizer, which their hub folders do not ship: ids only until one is given
        # (GPT-2's files in the folder, or tokenizer=). [MASK] is the id after GPT-2's last token, <|endoftext|>.
        return missing_tokenizer(folder, vocab_size=vocab_size, mask_id=mask_id, eos_id=mask_id - 1,
                                 hint=f" (MDLM and SEDD use GPT-2's {GPT2_FILES}: `huggingface-cli download "
                                      f"openai-community/gpt2 tokenizer.json --local-dir {folder}`)")
    import transformers

    cls = getattr(transformers, "GPT2TokenizerFast", None) or transformers.GPT2Tokenizer
    try:
        hf = cls.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot load the GPT-2 tokenizer files of {folder}: {e}") from e
    if len(hf) != mask_id:
        raise CheckpointError(f"the tokenizer in {folder} has {len(hf)} tokens, but the model's [MASK] is id "
                              f"{mask_id}, the id after the last token: is it GPT-2's {GPT2_FILES}?")
    hf.add_special_tokens({"mask_token": "[MASK]"})  # takes id mask_id; decodes as [MASK] when specials are kept
    eos = hf.eos_token_id  # <|endoftext|>, GPT-2's only special token: also pad and bos
    return HFTokenizer(hf, mask_id=mask_id, eos_id=eos, pad_id=eos, bos_id=eos, vocab_size=vocab_size)


def absorbing_sampling() -> GenerationConfig:
    """MDLM's ancestral sampler (one block, temperature 1: it samples, argmax at every step is not MDLM)."""
    return GenerationConfig(max_new_tokens=128, steps=128, block_length=0, sampler="mdlm", temperature=1.0,
                            suppress_special=False)


@FORMATS.register("mdlm")
class MDLMFormat(Format):
    model_types = ("mdlm",)

    def load(self, folder, config, dtype, device, allow_pickle):
        from dlm.models import build_model

        cfg = CheckpointConfig(model=model_config(config, folder), sampling=absorbing_sampling(),
                               extra={"source": str(folder), "model_type": "mdlm"})
        tok = gpt2_tokenizer(folder, mask_id=cfg.model.vocab_size - 1, vocab_size=cfg.model.vocab_size)
        model = load_weights(folder, cfg.model, build_model, renamer(rename), dtype, device, allow_pickle)
        return model, cfg, tok
