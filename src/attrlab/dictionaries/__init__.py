"""Sparse dictionaries: sparse autoencoders, transcoders and cross-layer
transcoders (load, save, train, evaluate; bundled per-layer sets for the zoo).
Their features are a unit kind (:class:`attrlab.units.Features`).

Example:
    >>> import attrlab as al
    >>> d = al.dictionaries.Dictionary.random(8, 32, "blocks.0.resid_pre")
    >>> d.kind, d.width
    ('sae', 32)
"""

from .base import ACTIVATIONS, Dictionary
from .bundled import heldout_texts, write_transcoder_set, zoo_transcoders, zoo_transcoders_summary
from .clt import CrossLayerTranscoder, evaluate_clt, train_clt
from .intervene import intervene
from .io import (
    load,
    load_circuit_tracer,
    load_saelens,
    save_saelens,
    save_saelens_set,
    site_of_hook,
)
from .train import evaluate, jumprelu_ste, train, train_transcoders

__all__ = [
    "ACTIVATIONS",
    "CrossLayerTranscoder",
    "Dictionary",
    "evaluate",
    "evaluate_clt",
    "heldout_texts",
    "intervene",
    "jumprelu_ste",
    "load",
    "load_circuit_tracer",
    "load_saelens",
    "save_saelens",
    "save_saelens_set",
    "site_of_hook",
    "train",
    "train_clt",
    "train_transcoders",
    "write_transcoder_set",
    "zoo_transcoders",
    "zoo_transcoders_summary",
]
