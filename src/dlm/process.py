"""The old import path of `dlm.processes.masked` (kept for existing code): the same module object."""

import sys

from dlm.processes import masked as _module

sys.modules[__name__] = _module
