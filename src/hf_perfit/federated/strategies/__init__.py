"""Server-side federated strategies, one file each, all with the [`Strategy`] interface.

Build one by name with [`get_strategy`]. A new strategy is one module in this package that defines a [`Strategy`]
subclass decorated with [`register_strategy`]; every module here is imported on package import, so it registers
itself without touching this file.
"""

import importlib
import pkgutil

from .base import STRATEGIES, Strategy, get_strategy, register_strategy
from .fedit import FedITStrategy
from .fedmut import FedMutStrategy
from .fedprox import FedProxStrategy
from .fedqp import FedQPStrategy
from .local import LocalStrategy
from .perfit import PerFITStrategy

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
del _module

__all__ = [
    "STRATEGIES",
    "FedITStrategy",
    "FedMutStrategy",
    "FedProxStrategy",
    "FedQPStrategy",
    "LocalStrategy",
    "PerFITStrategy",
    "Strategy",
    "get_strategy",
    "register_strategy",
]
