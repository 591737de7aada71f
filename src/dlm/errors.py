"""Every error class of dlm's library, in one leaf module: nothing here imports dlm, so any module can raise them
without importing upward (the modules that raise them also re-export them under their old names).

    from dlm.errors import CheckpointError, ConfigError, SamplingError
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message says which and what is allowed."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not match its config; the message says which file."""


class SamplingError(ValueError):
    """Sampling options that cannot work together; the message says how to fix them."""


class TokenizerMissingError(ValueError):
    """Text was given to a model loaded without a tokenizer; the message says how to supply one."""
