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
import math
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import InputError, NonFiniteError, UnknownMethodError

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


def check_int(method: str, name: str, value: Any, minimum: int = 1, optional: bool = False) -> Any:
    """Validate an integer option at construction: an ``int`` (not a bool, not a
    float) ``>= minimum``, or None when ``optional``. Returns it as a plain ``int``.

    Raises:
        InputError: naming the method and the option.

    Example:
        >>> check_int("lime", "samples", 64)
        64
        >>> try:
        ...     check_int("lime", "samples", -1)
        ... except InputError as e:
        ...     print(e)
        lime: samples must be an integer >= 1, got -1
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        extra = " or None" if optional else ""
        raise InputError(f"{method}: {name} must be an integer >= {minimum}{extra}, got {value!r}")
    return int(value)


def check_float(
    method: str,
    name: str,
    value: Any,
    minimum: float = 0.0,
    strict: bool = True,
    maximum: float | None = None,
    optional: bool = False,
) -> Any:
    """Validate a real-valued option at construction: finite, ``> minimum``
    (``>=`` when not ``strict``), ``<= maximum`` if given, or None when
    ``optional``. Returns it as a ``float``.

    Raises:
        NonFiniteError: NaN or infinite (naming the option).
        InputError: out of range or not a number.

    Example:
        >>> check_float("lime", "kernel_width", 0.25)
        0.25
        >>> try:
        ...     check_float("smoothgrad", "noise", float("nan"), strict=False)
        ... except NonFiniteError as e:
        ...     print(e)
        smoothgrad: noise must be a finite number >= 0.0, got nan
    """
    if value is None and optional:
        return None
    cmp = ">" if strict else ">="
    rng = f"{cmp} {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{method}: {name} must be a number {rng}, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise NonFiniteError(f"{method}: {name} must be a finite number {rng}, got {value!r}")
    if (v <= minimum if strict else v < minimum) or (maximum is not None and v > maximum):
        raise InputError(f"{method}: {name} must be a number {rng}, got {value!r}")
    return v


def check_baseline(method: str, baseline: Any, name: str = "baseline") -> Any:
    """Validate a baseline (or reference) option at construction: a float tensor
    must be finite everywhere. Names and token ids are checked when used.

    Raises:
        NonFiniteError: the tensor has NaN or infinite entries.

    Example:
        >>> import torch
        >>> try:
        ...     check_baseline("ig", torch.full((3, 4), float("nan")))
        ... except NonFiniteError as e:
        ...     print(str(e).split(";")[0])
        ig: baseline has 12 NaN/infinite entries of 12
    """
    import torch

    if isinstance(baseline, torch.Tensor) and baseline.is_floating_point():
        bad = int((~torch.isfinite(baseline.detach())).sum())
        if bad:
            raise NonFiniteError(
                f"{method}: {name} has {bad} NaN/infinite entries of {baseline.numel()}; "
                "give a finite tensor (or 'pad', 'zero', a token id)"
            )
    return baseline


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
