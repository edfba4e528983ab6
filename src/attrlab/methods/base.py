"""The method interface and registry.

A method is a small strategy object: options go to its constructor,
:meth:`Method.attribute` does the work and returns an
:class:`~attrlab.result.Attribution`. Register a method for the unit kinds it
supports with :func:`register`; :func:`attrlab.attribute` finds it by
``(name, unit kind)``.

Example:
    >>> from attrlab.methods.base import Method, register
    >>> @register("my-method", units=("tokens",))
    ... class MyMethod(Method):
    ...     def attribute(self, lm, inputs, target, units, counterfactual=None):
    ...         raise NotImplementedError
    >>> from attrlab.methods.base import find_method
    >>> find_method("my-method", "tokens") is MyMethod
    True
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import UnknownMethodError

if TYPE_CHECKING:
    from ..model.wrapper import LM, Inputs
    from ..result import Attribution
    from ..targets import Target
    from ..units.base import Units


class Method:
    """Base class for attribution methods."""

    name: ClassVar[str] = ""
    unit_kinds: ClassVar[tuple[str, ...]] = ()
    #: "lm": the dispatcher resolves the target against the model first;
    #: "raw": the method receives the target spec as given.
    target_kind: ClassVar[str] = "lm"

    def params(self) -> dict[str, Any]:
        """JSON-able options, stored with results."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def attribute(
        self,
        lm: LM,
        inputs: Inputs,
        target: Target,
        units: Units,
        counterfactual: Inputs | None = None,
    ) -> Attribution:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


_REGISTRY: dict[tuple[str, str], type[Method]] = {}


def register(
    name: str, units: tuple[str, ...], *aliases: str
) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make ``method=name`` available for ``units``.

    Each method has one canonical name (lower case, words joined by ``-``);
    ``aliases`` exist only for plugins that must keep an old name.
    """

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = cls.name or name
        cls.unit_kinds = tuple(dict.fromkeys((*cls.unit_kinds, *units)))
        for n in (name, *aliases):
            for kind in units:
                key = (n.lower(), kind)
                if key in _REGISTRY and _REGISTRY[key] is not cls:
                    raise RuntimeError(f"method {n!r} for {kind!r} registered twice")
                _REGISTRY[key] = cls
        return cls

    return deco


def methods_for(kind: str) -> list[str]:
    """Names of the methods available for a unit kind."""
    return sorted({n for (n, k) in _REGISTRY if k == kind})


def all_methods() -> dict[str, list[str]]:
    """``{method name: [unit kinds]}`` for every registered method."""
    out: dict[str, list[str]] = {}
    for n, k in sorted(_REGISTRY):
        out.setdefault(n, []).append(k)
    return out


#: Spelled-out names users type, mapped to the one canonical name (error hints only).
_SPELLED_OUT = {
    "integrated-gradients": "ig",
    "leave-one-out": "occlusion",
    "loo": "occlusion",
    "activation-patching": "patch",
    "attribution-patching": "atp",
    "atp-star": "atp*",
    "direct-logit-attribution": "dla",
    "edge-attribution-patching": "eap",
    "context-cite": "contextcite",
    "input-x-grad": "input-x-gradient",
    "kernel-shap": "kernelshap",
}


def find_method(name: str, kind: str) -> type[Method]:
    """The method class registered as ``name`` for unit kind ``kind``.

    Raises:
        UnknownMethodError: no such method, or not for that unit kind.
    """
    key = (name.lower(), kind)
    if key in _REGISTRY:
        return _REGISTRY[key]
    kinds = all_methods().get(name.lower())
    if kinds:
        raise UnknownMethodError(
            f"method {name!r} does not work on units={kind!r}; it works on {', '.join(kinds)}. "
            f"Methods for {kind!r}: {', '.join(methods_for(kind)) or 'none yet'}"
        )
    norm = name.lower().replace("_", "-").replace(" ", "-")
    close = [_SPELLED_OUT[norm]] if norm in _SPELLED_OUT else []
    close = close or difflib.get_close_matches(norm, list(all_methods()), n=1, cutoff=0.75)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownMethodError(
        f"unknown method {name!r}.{hint} Methods for units={kind!r}: "
        f"{', '.join(methods_for(kind)) or 'none yet'}; all methods: "
        f"{', '.join(all_methods()) or 'none yet'}"
    )
