"""The old import path of `dlm.processes.d3pm` (kept for existing code): the same module object."""

import sys

from dlm.processes import d3pm as _module

sys.modules[__name__] = _module
