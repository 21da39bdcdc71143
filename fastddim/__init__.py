"""fastddim: a drop-in, faster replacement for diffusers' DDIMScheduler and DDIMInverseScheduler."""

__version__ = "0.1.0"

from fastddim.config import FrozenDict, SchedulerMixin, install_import_hook, register_with_diffusers
from fastddim.noise import PhiloxGenerator
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

install_import_hook()
