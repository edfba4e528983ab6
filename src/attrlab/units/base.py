"""Unit kinds: what an attribution assigns scores to.

A unit kind is a small object (``al.units.Heads(layers=[9, 10])``) or its
string name (``"heads"``). Each kind registers its name here; methods declare
which kinds they support.

Example:
    >>> import attrlab as al
    >>> al.units.resolve("heads").kind
    'heads'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from ..errors import UnknownUnitsError

_KINDS: dict[str, Callable[[], Units]] = {}


class Units:
    """Base class of unit kinds. ``kind`` is the canonical string name."""

    kind: ClassVar[str] = ""

    def params(self) -> dict[str, Any]:
        """JSON-able description, stored with results."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def mask_values(self, lm: Any, inputs: Any, target: Any, masks: Any, **context: Any) -> Any:
        """Evaluate ``f(S)``: the target with only the units in each mask kept.

        ``masks`` is a bool tensor ``[n_masks, n_units]`` (True = keep, False =
        ablate); returns a float tensor ``[n_masks]``. This is what LDS,
        deletion/insertion curves and surrogate methods evaluate, for every
        unit kind that can be ablated. Kinds override it; ``context`` carries
        kind-specific needs (baseline, counterfactual, sources …).
        """
        raise NotImplementedError(f"units {self.kind!r} cannot be ablated by mask yet")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def register_units(name: str, *aliases: str) -> Callable[[type[Units]], type[Units]]:
    """Class decorator: make ``units=name`` build this kind with default arguments."""

    def deco(cls: type[Units]) -> type[Units]:
        cls.kind = name
        for n in (name, *aliases):
            _KINDS[n] = cls
        return cls

    return deco


def unit_kinds() -> list[str]:
    """Every registered unit kind name (including aliases)."""
    return sorted(_KINDS)


def resolve(spec: Any) -> Units:
    """A :class:`Units` object from a name or an object.

    Raises:
        UnknownUnitsError: no kind of that name.
    """
    if isinstance(spec, Units):
        return spec
    if isinstance(spec, str):
        if spec not in _KINDS:
            raise UnknownUnitsError(
                f"unknown units {spec!r}; choose from {', '.join(unit_kinds())} "
                "or pass an al.units object"
            )
        return _KINDS[spec]()
    if (
        isinstance(spec, (list, tuple))
        and spec
        and all(isinstance(s, (list, tuple)) and len(s) == 2 for s in spec)
        and "spans" in _KINDS
    ):
        return _KINDS["spans"](spec)  # type: ignore[call-arg]
    raise UnknownUnitsError(f"cannot read units {spec!r}: give a name like 'tokens' or an object")
