"""Sparse dictionaries: sparse autoencoders and transcoders (load, save, train,
evaluate). Their features are a unit kind (:class:`attrlab.units.Features`).

Example:
    >>> import attrlab as al
    >>> d = al.dictionaries.Dictionary.random(8, 32, "blocks.0.resid_pre")
    >>> d.kind, d.width
    ('sae', 32)
"""

from .base import ACTIVATIONS, Dictionary
from .intervene import intervene
from .io import load, load_circuit_tracer, load_saelens, save_saelens, site_of_hook
from .train import evaluate, train

__all__ = [
    "ACTIVATIONS",
    "Dictionary",
    "evaluate",
    "intervene",
    "load",
    "load_circuit_tracer",
    "load_saelens",
    "save_saelens",
    "site_of_hook",
    "train",
]
