"""The old import path of `dlm.processes.sedd` (kept for existing code): the same module object."""

import sys

from dlm.processes import sedd as _module

sys.modules[__name__] = _module
