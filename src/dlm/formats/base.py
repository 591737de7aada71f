"""The one loading path of every checkpoint folder: weights read shard by shard into a network built on `meta`.

A `Format` says how a folder's `config.json` becomes a `ModelConfig`, how each tensor of the file becomes
parameters of our network (`convert`: mostly a rename, sometimes a split), and which tokenizer and sampling
defaults go with it. `load_weights` does the rest for every format alike:

- the network is built on the `meta` device (no memory), then each tensor of each shard is read into memory of
  its own, converted to the target dtype and device and assigned to its parameter: no float32 copy of the whole
  model, no memory-mapped shard counted on top of the weights;
- before anything is read, the bytes the weights will take are compared with the free memory of the device;
- every expected parameter must be found, no file tensor may be left over, every shape must match.

Pickle weights (`pytorch_model.bin`) are read only when the caller allows it, and then with
`torch.load(weights_only=True)`.

    net = load_weights(folder, cfg, build_model, renamer({"model.norm.weight": "ln_f.weight"}), torch.bfloat16)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlm.config import CheckpointConfig, ModelConfig
from dlm.errors import CheckpointError
from dlm.io import METADATA_LIMIT, check_regular_file
from dlm.registry import Registry
from dlm.tokenizer import Tokenizer

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


class Format:
    """How one family of checkpoint folders loads: `matches(config)` and `load(...)`."""

    model_types: tuple[str, ...] = ()

    def matches(self, config: dict[str, Any]) -> bool:
        return str(config.get("model_type", "")).lower() in {m.lower() for m in self.model_types}

    def load(self, folder: Path, config: dict[str, Any], dtype: torch.dtype, device: str | torch.device,
             allow_pickle: bool) -> tuple[nn.Module, CheckpointConfig, Tokenizer]:
        raise NotImplementedError


# The formats register themselves in their own modules (their matches never overlap: ours has no model_type),
# imported on the first lookup: the registry lives with its base class, and no format imports the package.
FORMATS: Registry[type[Format]] = Registry("checkpoint format", plugins=tuple(
    f"dlm.formats.{m}" for m in ("native", "llada", "dream", "mdlm", "sedd", "hf_causal", "fast_dllm_v2", "sdar",
                                 "llada2")))


# The small files any format or tokenizer may read; each must be a regular file under io.METADATA_LIMIT.
METADATA_SUFFIXES = (".json", ".txt", ".model", ".jinja")
MAX_LAYERS = 4096  # no released checkpoint comes near (LLaDA-8B: 32); a config beyond is corrupt or hostile


def check_folder_files(folder: Path) -> None:
    """Refuse a folder where a file a loader reads is a device, a FIFO, a folder or too large (symlinks followed):
    /dev/zero behind config.json would be read until memory runs out, a FIFO would never return."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise CheckpointError(f"cannot list {folder}: {e.strerror or e}") from e
    for entry in entries:
        name = entry.name
        if name.endswith(METADATA_SUFFIXES):
            check_regular_file(Path(folder) / name, METADATA_LIMIT, CheckpointError)
        elif name.endswith((".safetensors", ".bin")):
            check_regular_file(Path(folder) / name, None, CheckpointError)


def check_device(device: str | torch.device) -> torch.device:
    """The torch.device of a name, or a one-line CheckpointError for an unknown or unavailable one."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or mps") from e
    if d.type == "cpu" or d.type == "meta":
        return d
    if d.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, d.type, None)
        available = bool(backend is not None and getattr(backend, "is_available", lambda: False)())
        count = backend.device_count() if available and hasattr(backend, "device_count") else 1
    if not available:
        why = " (this torch is built without CUDA)" if d.type == "cuda" and torch.version.cuda is None else ""
        raise CheckpointError(f"device {str(device)!r} is not available here{why}; use --device cpu")
    if d.index is not None and d.index >= count:
        raise CheckpointError(f"device {str(device)!r} does not exist: {count} {d.type} device(s) here")
    return d


def min_params(cfg: ModelConfig) -> int:
    """A lower bound on the parameters of `cfg`'s network of any arch, from the config alone (nothing is built):
    the token embedding (V x D) and, in every layer, at least the query and output projections (2 D^2)."""
    return cfg.vocab_size * cfg.d_model + cfg.n_layers * 2 * cfg.d_model * cfg.d_model


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a folder, in shard order: one safetensors file, an index of shards, or pickles."""
    if (folder / SAFETENSORS).exists():
        return [folder / SAFETENSORS]
    for index_name in (SAFETENSORS_INDEX, PICKLE_INDEX):
        index = folder / index_name
        if index.exists():
            if index_name == PICKLE_INDEX and not allow_pickle:
                break
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid shard index ({e})") from e
            shards = [folder / name for name in dict.fromkeys(sorted(set(weight_map.values())))]
            absent = [s.name for s in shards if not s.exists()]
            if absent:
                raise CheckpointError(f"{index} lists shards that are not in {folder}: {absent}; is the download "
                                      "complete?")
            return shards
    pickles = sorted(folder.glob("pytorch_model*.bin"))
    if pickles and not allow_pickle:
        raise CheckpointError(f"{folder} holds only pickle weights ({pickles[0].name}); pickle can run code when "
                              "loaded. Convert them to safetensors, or pass allow_pickle=True (CLI: --allow-pickle) "
                              "to read them with torch.load(weights_only=True)")
    if pickles:
        return pickles
    raise CheckpointError(f"{folder} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {PICKLE}")


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a .safetensors file, each read from the file straight into its own fresh memory.

    The format is an 8-byte little-endian header size, a JSON header {name: {dtype, shape, data_offsets}} and the
    raw data. Reading each tensor with `readinto` (rather than memory-mapping the file as safe_open does) keeps
    the page cache out of the process: loading holds the weights once, not the weights plus a mapped shard.
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(0)
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise CheckpointError(f"{path} is corrupt or truncated (header of {n} bytes in a {size}-byte file)")
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            base = 8 + n
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                begin, end = info["data_offsets"]
                dtype = _ST_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise CheckpointError(f"{path}: {name} has dtype {info['dtype']}, which dlm does not read")
                if base + end > size:
                    raise CheckpointError(f"{path} is corrupt or truncated: {name} ends at byte {base + end} of "
                                          f"{size}; re-download or re-train it")
                buf = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(base + begin)
                if end > begin and f.readinto(memoryview(buf.numpy())) != end - begin:
                    raise CheckpointError(f"{path} is truncated inside {name}")
                yield name, buf.view(dtype).reshape(info["shape"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, RuntimeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path} is corrupt or truncated ({e}); re-download or re-train it") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(name, tensor on the CPU in memory of its own, file) for every tensor of every file, one file at a time."""
    for f in files:
        if f.suffix == ".bin":
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # pickle errors come in many types; the message says which file
                raise CheckpointError(f"{f} cannot be read with torch.load(weights_only=True): {e}") from e
            for k in list(sd):
                yield k, sd.pop(k).clone(), f  # off the memory map, one tensor at a time
            continue
        for k, v in read_safetensors(f):
            yield k, v, f


def weights_nbytes(net: nn.Module, dtype: torch.dtype) -> int:
    """Bytes the parameters of `net` (on meta) take once their floating-point ones are in `dtype`."""
    return sum(p.numel() * (dtype.itemsize if p.is_floating_point() else p.element_size())
               for p in net.parameters())


def free_memory(device: torch.device) -> int | None:
    """Bytes free on the device (MemAvailable for the CPU), or None when unknown."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_memory(need: int, device: torch.device, dtype: torch.dtype, at_least: bool = False) -> None:
    free = free_memory(device)
    if os.environ.get("DLM_SKIP_MEMORY_CHECK") or free is None or need <= free:
        return
    hint = " or dtype='bfloat16'" if dtype.itemsize > 2 else ""
    bound = " (a lower bound from the config's sizes)" if at_least else ""  # min_params, before building
    raise CheckpointError(f"the weights need {need / 2**30:.2f} GiB in {str(dtype).removeprefix('torch.')} on "
                          f"{device}, but only {free / 2**30:.2f} GiB is free{bound}; use a device with more memory"
                          f"{hint} (set DLM_SKIP_MEMORY_CHECK=1 to try anyway)")


Convert = Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]


def renamer(rename: Callable[[str], str | None]) -> Convert:
    """A `Convert` from a name map: our name, or None for a tensor the format knowingly drops."""
    def convert(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        name = rename(key)
        return [] if name is None else [(name, tensor)]
    return convert


def load_weights(folder: Path, cfg: ModelConfig, build: Callable[[ModelConfig], nn.Module], convert: Convert,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 allow_pickle: bool = False) -> nn.Module:
    """Build `cfg`'s network on meta and fill it from the folder's weights -> the network, in eval mode.

    `convert(file_name, tensor)` gives (our parameter name, tensor) pairs: one for a renamed tensor, several for
    a split one, none for a tensor the format knowingly drops (e.g. cached rotary tables). A name without a
    parameter is an error, as is a parameter never filled.
    """
    device = check_device(device)
    files = weight_files(folder, allow_pickle)
    if cfg.n_layers > MAX_LAYERS:
        raise CheckpointError(f"{folder}/config.json: n_layers={cfg.n_layers} is over the {MAX_LAYERS} layers dlm "
                              "builds; the config is corrupt")
    # Before building: a config whose sizes cannot fit is refused in milliseconds, not after minutes on meta.
    check_memory(min_params(cfg) * dtype.itemsize, device, dtype, at_least=True)
    with torch.device("meta"):
        net = build(cfg)
    check_memory(weights_nbytes(net, dtype), device, dtype)
    expected = dict(net.named_parameters())
    filled: set[str] = set()
    unexpected: list[str] = []
    for key, file_tensor, f in iter_tensors(files):
        for name, tensor in convert(key, file_tensor):
            if name not in expected:
                unexpected.append(key)
                continue
            want = tuple(expected[name].shape)
            if tuple(tensor.shape) != want:
                raise CheckpointError(f"{f.name}: {key} has shape {tuple(tensor.shape)}, the config says {want}; "
                                      "does config.json belong to these weights?")
            value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            _assign(net, name, value)
            filled.add(name)
        del file_tensor
    missing = sorted(set(expected) - filled)
    if missing or unexpected:
        raise CheckpointError(f"the weights in {folder} do not match the network of its config.json: "
                              f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
                              f"unexpected {sorted(unexpected)[:6]}{' ...' if len(unexpected) > 6 else ''}")
    materialise_buffers(net, cfg, device)
    return net.eval()


def _assign(net: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = net.get_submodule(module_name) if module_name else net
    setattr(module, attr, nn.Parameter(value, requires_grad=value.is_floating_point()))


def materialise_buffers(net: nn.Module, cfg: ModelConfig, device: torch.device | str) -> None:
    """Non-persistent buffers (RoPE frequencies) are not in any file: compute them on the target device."""
    from dlm.models.common import Rotary

    for m in net.modules():
        if isinstance(m, Rotary):
            m.inv_freq = Rotary(2 * m.inv_freq.shape[0], cfg.rope_theta).inv_freq.to(device)  # its own width
            m._cache = None
