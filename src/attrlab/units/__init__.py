"""Unit kinds. Strings (``"heads"``) for convenience, objects for control.

Example:
    >>> import attrlab as al
    >>> al.units.resolve(al.units.Heads(layers=[0])).layers
    [0]
"""

from .base import Units, register_units, resolve, unit_kinds
from .components import AttnOut, Heads, Layers, MlpOut, Neurons, Resid

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
]
