"""The old import path of `dlm.models.transformer` (kept for existing code): the same module object."""

import sys

from dlm.models import transformer as _module

sys.modules[__name__] = _module
