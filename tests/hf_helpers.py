"""Write random checkpoints in the upstream LLaDA layout (config keys, weight names, shards), of any size.

Used by the loader tests and by benchmarks/load_memory.py (a 1B-parameter folder). Tensors are made and written
one shard at a time, so writing a big folder never holds the whole model in memory.

    write_llada_folder(tmp / "llada", d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=160, vocab_size=320)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_LLADA = Path(__file__).parent / "data" / "hf" / "llada-tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def llada_config(d_model: int, n_layers: int, n_heads: int, mlp_hidden_size: int, vocab_size: int,
                 mask_token_id: int, eos_token_id: int, max_sequence_length: int = 4096) -> dict:
    """config.json of an upstream LLaDA folder: the keys of LLaDA-8B-Instruct's, with the given sizes."""
    return {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                     "AutoModel": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": d_model,
        "embedding_dropout": 0.0, "embedding_size": vocab_size, "eos_token_id": eos_token_id,
        "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
        "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
        "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": mask_token_id,
        "max_sequence_length": max_sequence_length, "mlp_hidden_size": mlp_hidden_size, "mlp_ratio": 4,
        "model_type": "llada", "multi_query_attention": None, "n_heads": n_heads, "n_kv_heads": n_heads,
        "n_layers": n_layers, "pad_token_id": eos_token_id, "precision": "amp_bf16", "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
        "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False, "vocab_size": vocab_size,
        "weight_tying": False,
    }


def llada_weight_shapes(d_model: int, n_layers: int, mlp_hidden_size: int, vocab_size: int
                        ) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.transformer.wte.weight": (vocab_size, d_model)}
    for i in range(n_layers):
        p = f"model.transformer.blocks.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "attn_out"):
            shapes[p + name + ".weight"] = (d_model, d_model)
        shapes[p + "ff_proj.weight"] = (mlp_hidden_size, d_model)
        shapes[p + "up_proj.weight"] = (mlp_hidden_size, d_model)
        shapes[p + "ff_out.weight"] = (d_model, mlp_hidden_size)
        shapes[p + "attn_norm.weight"] = (d_model,)
        shapes[p + "ff_norm.weight"] = (d_model,)
    shapes["model.transformer.ln_f.weight"] = (d_model,)
    shapes["model.transformer.ff_out.weight"] = (vocab_size, d_model)
    return shapes


def write_llada_folder(folder: Path, d_model: int, n_layers: int, n_heads: int, mlp_hidden_size: int,
                       vocab_size: int, n_shards: int = 2, dtype: torch.dtype = torch.bfloat16,
                       seed: int = 0) -> int:
    """A random LLaDA-format folder (sharded safetensors + index, config, the tiny LLaDA tokenizer) -> n params."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny = json.loads((TINY_LLADA / "config.json").read_text())
    cfg = llada_config(d_model, n_layers, n_heads, mlp_hidden_size, vocab_size,
                       mask_token_id=tiny["mask_token_id"], eos_token_id=tiny["eos_token_id"])
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in TOKENIZER_FILES:
        if (TINY_LLADA / name).exists():
            shutil.copy(TINY_LLADA / name, folder / name)
    shapes = llada_weight_shapes(d_model, n_layers, mlp_hidden_size, vocab_size)
    names = list(shapes)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    g = torch.Generator().manual_seed(seed)
    weight_map, per_shard, start = {}, -(-total // n_shards), 0
    for k in range(n_shards):
        shard_name = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors, size = {}, 0
        while start < len(names) and (size < per_shard or k == n_shards - 1):
            name = names[start]
            shape = shapes[name]
            if len(shape) == 1:
                t = 1.0 + 0.1 * torch.randn(shape, generator=g)
            else:
                t = torch.randn(shape, generator=g) * shape[-1] ** -0.5
            tensors[name] = t.to(dtype)
            size += t.numel()
            start += 1
        save_file(tensors, folder / shard_name, metadata={"format": "pt"})
        weight_map.update({n: shard_name for n in tensors})
        del tensors
    index = {"metadata": {"total_size": total * dtype.itemsize}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def folder_and_reference(folder: Path):
    """A tiny upstream-layout folder loaded as a DiffusionLM, and the reference tensors the upstream code computed
    for it (reference.safetensors): what every upstream parity test starts from."""
    from safetensors.torch import load_file

    from dlm.pipeline import DiffusionLM

    return DiffusionLM.from_pretrained(str(folder)), load_file(folder / "reference.safetensors")


def edited_copy(tmp_path: Path, folder: Path, key: str, value) -> Path:
    """A copy of an upstream folder under tmp_path whose config.json has `key` set to `value` (for refusal tests)."""
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg[key] = value
    (copy / "config.json").write_text(json.dumps(cfg))
    return copy
