"""Stable names for the places inside a model that attrlab can read and write.

=============================  ==========================  =====================================
site                           shape                       meaning
=============================  ==========================  =====================================
``embed``                      ``[batch, pos, d_model]``   token embedding module output
``blocks.{l}.resid_pre``       ``[batch, pos, d_model]``   residual stream entering block l
``blocks.{l}.attn.q_in|k_in|v_in``  ``[batch, pos, head, d_model]``  the residual input each query
                                                           (key, value) head reads, before the
                                                           pre-attention norm; writing it gives
                                                           every head its own input (the head's
                                                           projection is then recomputed from it)
``blocks.{l}.attn.q|k|v``      ``[batch, pos, head, d_head]``  projections (q/k before rotary)
``blocks.{l}.attn.pattern``    ``[batch, head, q_pos, k_pos]`` attention weights (read only;
                                                           eager attention)
``blocks.{l}.attn.z``          ``[batch, pos, head, d_head]``  per-head input of the output
                                                           projection
``blocks.{l}.attn.head_out``   ``[batch, pos, head, d_model]`` each head's contribution to the
                                                           residual (sums to ``attn.out``
                                                           minus the projection bias)
``blocks.{l}.attn.out``        ``[batch, pos, d_model]``   attention's contribution to the
                                                           residual
``blocks.{l}.resid_mid``       ``[batch, pos, d_model]``   ``resid_pre + attn.out`` (sequential
                                                           blocks only)
``blocks.{l}.mlp.in``          ``[batch, pos, d_model]``   the residual input the MLP reads,
                                                           before its norm; writing it changes
                                                           what the MLP reads, not the residual
``blocks.{l}.mlp.normed``      ``[batch, pos, d_model]``   the MLP's own input, after its norm
                                                           (TransformerLens ``ln2.hook_normalized``)
``blocks.{l}.mlp.neurons``     ``[batch, pos, d_mlp]``     MLP post-activation (input of its
                                                           output projection)
``blocks.{l}.mlp.router``      ``[batch, pos, expert]``    router logits of a mixture-of-experts
                                                           MLP (writing them re-routes)
``blocks.{l}.mlp.experts``     ``[batch, pos, expert, d_model]``  each expert's routing-weighted
                                                           output (zero where not routed; a
                                                           shared expert is the last slot);
                                                           sums to ``mlp.out``
``blocks.{l}.mlp.out``         ``[batch, pos, d_model]``   MLP's contribution to the residual
``blocks.{l}.resid_post``      ``[batch, pos, d_model]``   residual stream leaving block l
``final_norm.input``           ``[batch, pos, d_model]``   input of the final norm
``final_norm.scale``           ``[batch, pos, 1]``         the ``1/std`` it applied (read only)
``final_norm.output``          ``[batch, pos, d_model]``   its output
``unembed``                    ``[batch, pos, d_vocab]``   unembedding output (before any
                                                           logit soft-capping)
=============================  ==========================  =====================================

Example:
    >>> from attrlab.model.sites import parse_site
    >>> parse_site("blocks.3.attn.z", n_layers=4)
    Site(name='blocks.3.attn.z', layer=3, kind='attn.z')
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import IndexRangeError, UnknownSiteError

BLOCK_KINDS = (
    "resid_pre",
    "attn.q_in",
    "attn.k_in",
    "attn.v_in",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.pattern",
    "attn.z",
    "attn.head_out",
    "attn.out",
    "resid_mid",
    "mlp.in",
    "mlp.normed",
    "mlp.neurons",
    "mlp.router",
    "mlp.experts",
    "mlp.out",
    "resid_post",
)
GLOBAL_SITES = ("embed", "final_norm.input", "final_norm.scale", "final_norm.output", "unembed")
READ_ONLY_KINDS = frozenset({"attn.pattern", "final_norm.scale"})
HEAD_KINDS = frozenset(
    {"attn.q_in", "attn.k_in", "attn.v_in", "attn.q", "attn.k", "attn.v", "attn.z", "attn.head_out"}
)

_BLOCK_RE = re.compile(r"^blocks\.(-?\d+)\.(.+)$")


@dataclass(frozen=True)
class Site:
    """A parsed site name: ``layer`` is None for global sites."""

    name: str
    layer: int | None
    kind: str

    @property
    def read_only(self) -> bool:
        return self.kind in READ_ONLY_KINDS

    @property
    def has_heads(self) -> bool:
        return self.kind in HEAD_KINDS


def site_name(layer: int, kind: str) -> str:
    """``site_name(3, "attn.z") == "blocks.3.attn.z"``."""
    return f"blocks.{layer}.{kind}"


def all_site_names(n_layers: int) -> list[str]:
    """Every site name of a model with ``n_layers`` blocks."""
    names = ["embed"]
    for layer in range(n_layers):
        names += [site_name(layer, k) for k in BLOCK_KINDS]
    return names + list(GLOBAL_SITES[1:])


def parse_site(name: str, n_layers: int) -> Site:
    """Parse and validate a site name; negative layers count from the end.

    Raises:
        UnknownSiteError: the name matches no site pattern.
        IndexRangeError: the layer is out of range.
    """
    if not isinstance(name, str):
        raise UnknownSiteError(f"site names are strings, got {name!r}")
    if name in GLOBAL_SITES:
        return Site(name, None, name)
    m = _BLOCK_RE.match(name)
    if m is None or m.group(2) not in BLOCK_KINDS:
        raise UnknownSiteError(
            f"unknown site {name!r}. Sites are {', '.join(GLOBAL_SITES)} and "
            f"blocks.{{layer}}.{{{'|'.join(BLOCK_KINDS)}}}"
        )
    layer = int(m.group(1))
    if not -n_layers <= layer < n_layers:
        raise IndexRangeError(
            f"site {name!r}: layer {layer} is out of range; the model has {n_layers} "
            f"layers (0..{n_layers - 1})"
        )
    layer %= n_layers
    kind = m.group(2)
    return Site(site_name(layer, kind), layer, kind)
