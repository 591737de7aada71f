"""dlm: diffusion language models. Train from scratch, sample, infill, evaluate.

    import dlm
    lm = dlm.DiffusionLM.from_pretrained("default")
    print(lm.generate("ROMEO:", max_new_tokens=128, steps=64))

The public names below are imported on first use (PEP 562), so `import dlm` itself loads no torch and no
submodule: a CLI start or a `dlm.__version__` costs nothing.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "DiffusionLM": "dlm.pipeline",
    "train": "dlm.train",
    "load_pretrained": "dlm.checkpoint",
    "save_pretrained": "dlm.checkpoint",
    "CheckpointConfig": "dlm.config",
    "GenerationConfig": "dlm.config",
    "ModelConfig": "dlm.config",
    "ProcessConfig": "dlm.config",
    "TrainConfig": "dlm.config",
    "SamplingConfig": "dlm.config",  # the old name of GenerationConfig, kept for existing code
    "CheckpointError": "dlm.errors",
    "ConfigError": "dlm.errors",
    "SamplingError": "dlm.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dlm' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
