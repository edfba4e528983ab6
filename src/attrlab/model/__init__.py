"""Model access: wrap a Hugging Face model, name its sites, run with hooks.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> "blocks.0.attn.head_out" in lm.sites()
    True
"""

from .adapters.base import linear_layout
from .interventions import Intervention
from .loading import load, wrap
from .sites import Site, parse_site
from .wrapper import LM, Batch, Cache

__all__ = [
    "LM",
    "Batch",
    "Cache",
    "Intervention",
    "Site",
    "linear_layout",
    "load",
    "parse_site",
    "wrap",
]
