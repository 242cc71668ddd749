"""TimeStep Master core: timestep LoRA experts (fostering) and their asymmetric mixture (assembling).

Public API::

    from tsm_core import TSMConfig, TimestepIntervals, attach, load_adapter
"""

from .adapter import TSMAdapter, attach, load_adapter
from .config import TSMConfig
from .context import TimestepContext, TimestepContextError
from .intervals import TimestepIntervals
from .layers import TSMLayer

__all__ = [
    "TSMAdapter",
    "TSMConfig",
    "TSMLayer",
    "TimestepContext",
    "TimestepContextError",
    "TimestepIntervals",
    "attach",
    "load_adapter",
]
__version__ = "0.1.0"
