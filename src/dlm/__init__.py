"""dlm: diffusion language models. Train from scratch, sample, infill, evaluate.

    import dlm
    lm = dlm.DiffusionLM.from_pretrained("default")
    print(lm.generate("ROMEO:", max_new_tokens=128, steps=64))
"""

from dlm.checkpoint import load_pretrained, save_pretrained
from dlm.config import CheckpointConfig, ModelConfig, ProcessConfig, SamplingConfig, TrainConfig
from dlm.pipeline import DiffusionLM

__version__ = "0.1.0"


def train(*args, **kwargs):
    """dlm.train.train (imported on first use: `python -m dlm.train` must not find the module already loaded)."""
    from dlm.train import train as _train

    return _train(*args, **kwargs)


__all__ = ["DiffusionLM", "train", "load_pretrained", "save_pretrained", "CheckpointConfig", "ModelConfig",
           "ProcessConfig", "SamplingConfig", "TrainConfig", "__version__"]
