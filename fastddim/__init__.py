"""fastddim: a drop-in, faster replacement for diffusers' DDIMScheduler and DDIMInverseScheduler."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

from fastddim.noise import PhiloxGenerator

# The schedulers derive from diffusers' classes where diffusers is installed, and importing diffusers takes about
# a second: they are imported on first use, so `import fastddim` (fastddim.ops, fastddim.kernels) stays fast.
_LAZY = {
    "DDIMScheduler": "fastddim.scheduler",
    "DDIMInverseScheduler": "fastddim.scheduler",
    "DDIMSchedulerOutput": "fastddim.scheduler",
    "DDIMParallelScheduler": "fastddim.parallel",
    "SchedulerMixin": "fastddim.config",
    "FrozenDict": "fastddim.config",
}

if TYPE_CHECKING:
    from fastddim.config import FrozenDict, SchedulerMixin
    from fastddim.parallel import DDIMParallelScheduler
    from fastddim.scheduler import DDIMInverseScheduler, DDIMScheduler, DDIMSchedulerOutput

__all__ = [
    "DDIMScheduler",
    "DDIMInverseScheduler",
    "DDIMParallelScheduler",
    "DDIMSchedulerOutput",
    "PhiloxGenerator",
    "SchedulerMixin",
    "FrozenDict",
    "__version__",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastddim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
