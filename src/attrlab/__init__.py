"""attrlab: why did the model produce this output?

Attribute a target (a logit, a log-probability, a logit difference) to input
units, model components and training examples, with one model wrapper, one
result type and one evaluation.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> logits, cache = lm.run("When Mary and John went", cache=["blocks.0.attn.head_out"])
    >>> cache["blocks.0.attn.head_out"].shape[2] == lm.cfg.n_heads
    True
"""

# viz registers the HTML and plot views of results (result.py imports no view)
from . import (
    ablations,
    circuit,
    dictionaries,
    errors,
    evaluate,
    lenses,
    lrp,
    methods,
    neuronpedia,
    targets,
    testing,
    units,
    viz,
    zoo,
)
from .attribute import attribute
from .errors import AttrlabError
from .graph import GraphResult
from .methods.attribution_graph import attribution_graph
from .methods.lens import logit_lens
from .methods.routes import routes
from .model import LM, Batch, Cache, Intervention, load, wrap
from .result import Attribution

__version__ = "0.1.0"

__all__ = [
    "AttrlabError",
    "Attribution",
    "Batch",
    "Cache",
    "GraphResult",
    "Intervention",
    "LM",
    "ablations",
    "attribute",
    "attribution_graph",
    "circuit",
    "dictionaries",
    "errors",
    "evaluate",
    "lenses",
    "load",
    "logit_lens",
    "lrp",
    "methods",
    "neuronpedia",
    "routes",
    "targets",
    "testing",
    "units",
    "viz",
    "wrap",
    "zoo",
]
