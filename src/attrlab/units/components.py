"""Component units: the places inside the model that methods score.

Each kind says which layers (and heads) it covers and whether it is per
position. Labels are built by the methods from these objects.

Example:
    >>> import attrlab as al
    >>> al.units.Heads(layers=[1], per_position=True).kind
    'heads'
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import IndexRangeError
from .base import Units, register_units


class _Component(Units):
    def __init__(self, layers: Sequence[int] | None = None, per_position: bool = False):
        self.layers = list(layers) if layers is not None else None
        self.per_position = per_position

    def layer_list(self, n_layers: int) -> list[int]:
        """The selected layers, validated against the model."""
        if self.layers is None:
            return list(range(n_layers))
        out = []
        for layer in self.layers:
            if not -n_layers <= layer < n_layers:
                raise IndexRangeError(
                    f"layer {layer} out of range; the model has {n_layers} layers"
                )
            out.append(layer % n_layers)
        return out


@register_units("heads")
class Heads(_Component):
    """Attention heads (``blocks.{l}.attn`` head ``h``), optionally per position."""

    def __init__(
        self,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        per_position: bool = False,
    ):
        super().__init__(layers, per_position)
        self.heads = list(heads) if heads is not None else None

    def head_list(self, n_heads: int) -> list[int]:
        if self.heads is None:
            return list(range(n_heads))
        for h in self.heads:
            if not 0 <= h < n_heads:
                raise IndexRangeError(f"head {h} out of range; the model has {n_heads} heads")
        return list(self.heads)


@register_units("layers")
class Layers(_Component):
    """Whole blocks: embeddings, then attention and MLP output of each layer."""


@register_units("attn")
class AttnOut(_Component):
    """Attention output (``blocks.{l}.attn.out``) per layer (and position)."""


@register_units("mlp")
class MlpOut(_Component):
    """MLP output (``blocks.{l}.mlp.out``) per layer (and position)."""


@register_units("resid")
class Resid(_Component):
    """Residual stream ``blocks.{l}.resid_pre`` per layer and position."""

    def __init__(self, layers: Sequence[int] | None = None, per_position: bool = True):
        super().__init__(layers, per_position)


@register_units("neurons")
class Neurons(_Component):
    """MLP neurons (``blocks.{l}.mlp.neurons``); ``neurons`` selects some (default all).

    Example:
        >>> Neurons(layers=[0], neurons=[3, 7]).neurons
        [3, 7]
    """

    def __init__(
        self,
        layers: Sequence[int] | None = None,
        neurons: Sequence[int] | None = None,
        per_position: bool = False,
    ):
        super().__init__(layers, per_position)
        self.neurons = list(neurons) if neurons is not None else None

    def neuron_list(self, d_mlp: int) -> list[int]:
        """The selected neurons, validated against the MLP width."""
        if self.neurons is None:
            return list(range(d_mlp))
        for n in self.neurons:
            if not 0 <= n < d_mlp:
                raise IndexRangeError(f"neuron {n} out of range; the MLPs have {d_mlp} neurons")
        return list(self.neurons)
