"""dlm: diffusion language models. Train from scratch, sample, infill, evaluate.

    import dlm
    lm = dlm.DiffusionLM.from_pretrained("default")
    print(lm.generate("ROMEO:", max_new_tokens=128, steps=64))
"""

from dlm.checkpoint import load_pretrained, save_pretrained
from dlm.config import CheckpointConfig, ModelConfig, ProcessConfig, SamplingConfig, TrainConfig
from dlm.pipeline import DiffusionLM
from dlm.train import train

__version__ = "0.1.0"

__all__ = ["DiffusionLM", "train", "load_pretrained", "save_pretrained", "CheckpointConfig", "ModelConfig",
           "ProcessConfig", "SamplingConfig", "TrainConfig", "__version__"]
