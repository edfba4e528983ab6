"""Unit kinds. Strings (``"heads"``) for convenience, objects for control.
Every module in this folder is imported and registers its kinds.

Example:
    >>> import attrlab as al
    >>> al.units.resolve(al.units.Heads(layers=[0])).layers
    [0]
"""

import importlib
import pkgutil

from .base import Units, register_units, resolve, unit_kinds
from .components import AttnOut, Experts, Heads, Layers, MlpOut, Neurons, Resid

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base", "components"):
        _mod = importlib.import_module(f"{__name__}.{_m.name}")
        for _name in getattr(_mod, "__all__", []):
            globals()[_name] = getattr(_mod, _name)

__all__ = [
    "Units",
    "register_units",
    "resolve",
    "unit_kinds",
    "Heads",
    "Layers",
    "AttnOut",
    "MlpOut",
    "Resid",
    "Neurons",
    "Experts",
]
