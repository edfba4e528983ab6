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
    >>> from attrlab.methods.base import _REGISTRY
    >>> del _REGISTRY["my-method", "tokens"]  # (keep the registry as it was)
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from ..errors import InputError, NonFiniteError, UnknownMethodError

if TYPE_CHECKING:
    from ..model.wrapper import LM, Inputs
    from ..result import Attribution
    from ..targets import Target
    from ..units.base import Units


class Method:
    """Base class for attribution methods.

    A *kind-specific* method lists the ``unit_kinds`` it supports. An
    *estimator* (:class:`Estimator`) instead declares what it ``needs`` from a
    bound unit kind (``"f"``, ``"gates"``) and runs on every kind that
    provides it.
    """

    name: ClassVar[str] = ""
    unit_kinds: ClassVar[tuple[str, ...]] = ()
    needs: ClassVar[frozenset[str]] = frozenset()
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


class Estimator(Method):
    """An estimator written once against the unit contract
    (:class:`attrlab.units.base.Bound`): subclasses implement :meth:`estimate`.

    ``attribute`` binds the question (``units.bind``) and builds the result
    through ``bound.result`` — the one place results are made. Scores follow
    one sign convention: the unit's contribution to the target (for occlusion,
    ``f(all) - f(all without u)``).

    Example:
        >>> import attrlab as al, torch
        >>> class Constant(Estimator):
        ...     name = "constant"
        ...     needs = frozenset({"f"})
        ...     def estimate(self, bound):
        ...         return torch.ones(bound.n_rows, bound.n), {}
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = Constant().attribute(lm, "a b", al.targets.resolve(" a", lm), al.units.Tokens())
        >>> r.scores.tolist()
        [1.0, 1.0]
    """

    def estimate(self, bound: Any) -> tuple[Any, dict[str, Any]]:
        """``(scores [n_rows, n], diagnostics)`` for a bound question; tensors
        among the diagnostics (a surrogate's design ``masks``) are stored with
        the result as ``extra``."""
        raise NotImplementedError

    def bind_options(self) -> dict[str, Any]:
        """Options for ``units.bind`` (``batch_size``, ``progress`` …); those a
        unit kind does not take are left out. ``ablation_default``: the ablation
        when none is given (a deprecated ``baseline=``)."""
        return {}

    def bind(
        self,
        lm: Any,
        inputs: Any,
        target: Any,
        units: Units,
        counterfactual: Any = None,
        ablation: Any = None,
    ) -> Any:
        """The bound question this estimator runs on (see :class:`attrlab.units.base.Bound`)."""
        import inspect

        from ..ablations import resolve as resolve_ablation

        opts = {k: v for k, v in self.bind_options().items() if v is not None}
        default = opts.pop("ablation_default", None)
        abl = resolve_ablation(ablation, counterfactual=counterfactual) or default
        params = inspect.signature(units.bind).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            opts = {k: v for k, v in opts.items() if k in params}
        return units.bind(lm, inputs, target, units.check_ablation(abl), **opts)

    def attribute(  # type: ignore[override]
        self,
        lm: LM,
        inputs: Inputs,
        target: Target,
        units: Units,
        counterfactual: Inputs | None = None,
        ablation: Any = None,
    ) -> Attribution:
        return self.run(self.bind(lm, inputs, target, units, counterfactual, ablation))

    def run(self, bound: Any) -> Attribution:
        """The result on an already bound question (``units.bind(...)``): for
        questions :func:`attrlab.attribute` does not pose, such as training
        examples removed by retraining.

        Example:
            >>> import numpy as np, attrlab as al
            >>> w = np.array([[1.0, -2.0, 3.0]])
            >>> u = al.units.TrainingExamples(retrain=lambda idx, j: w[:, idx].sum(1), n_train=3)
            >>> al.methods.find_method("occlusion", "train")().run(u.bind()).scores.tolist()
            [1.0, -2.0, 3.0]
        """
        scores, diag = self.estimate(bound)
        extra = {k: v for k, v in diag.items() if isinstance(v, Tensor)}
        diag = {k: v for k, v in diag.items() if k not in extra}
        return bound.result(scores, self, diagnostics=diag, extra=extra)


def deprecated_baseline(method: str, baseline: Any) -> Any:
    """The ablation a deprecated ``baseline=`` option means (None if not given),
    with a :class:`DeprecationWarning`.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     deprecated_baseline("occlusion", "zero")
        Zero()
    """
    if baseline is None:
        return None
    import warnings

    from .. import ablations as A

    warnings.warn(
        f"{method}: baseline= is deprecated; pass ablation= to al.attribute "
        "('pad', 'zero', 'mask', a token id, or an al.ablations object)",
        DeprecationWarning,
        stacklevel=3,
    )
    check_baseline(method, baseline)
    if isinstance(baseline, str) and baseline == "zero":
        return A.Zero()
    if isinstance(baseline, A.Ablation):
        return baseline
    return A.Token(baseline)  # a name, a token id, ids [pos] or embeddings [pos, d]


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
#: estimators (and estimator presets): name -> class; their kinds are derived
_ESTIMATORS: dict[str, type[Method]] = {}


def register(
    name: str, units: tuple[str, ...] | None = None, *aliases: str
) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make ``method=name`` available.

    With ``units`` (kind-specific methods) for those kinds; with ``units=None``
    (estimators) for every kind whose bound form provides what the class
    ``needs`` — derived, not listed. Each method has one canonical name (lower
    case, words joined by ``-``); ``aliases`` exist only for plugins that must
    keep an old name. A class registered under several names (presets) reads
    its name from ``type(obj).name`` — give each preset its own subclass.
    """

    def deco(cls: type[Method]) -> type[Method]:
        if not cls.__dict__.get("name"):  # a preset subclass gets its own name
            cls.name = name
        if units is None:
            for n in (name, *aliases):
                if n.lower() in _ESTIMATORS and _ESTIMATORS[n.lower()] is not cls:
                    raise RuntimeError(f"estimator {n!r} registered twice")
                _ESTIMATORS[n.lower()] = cls
            return cls
        cls.unit_kinds = tuple(dict.fromkeys((*cls.unit_kinds, *units)))
        for n in (name, *aliases):
            for kind in units:
                key = (n.lower(), kind)
                if key in _REGISTRY and _REGISTRY[key] is not cls:
                    raise RuntimeError(f"method {n!r} for {kind!r} registered twice")
                _REGISTRY[key] = cls
        return cls

    return deco


def _kind_provides(kind: str) -> frozenset[str]:
    from ..units.base import _KINDS

    cls = _KINDS.get(kind)
    return frozenset(getattr(cls, "provides", frozenset()))


def _estimator_kinds(cls: type[Method]) -> list[str]:
    from ..units.base import kinds_providing

    kinds = kinds_providing(cls.needs)
    only = getattr(cls, "only_kinds", None)  # a preset may narrow (atp: components)
    return [k for k in kinds if only is None or k in only]


def _lookup(name: str, kind: str) -> type[Method] | None:
    cls = _REGISTRY.get((name, kind))
    if cls is not None:
        return cls
    est = _ESTIMATORS.get(name)
    if est is not None:
        from ..units.base import _KINDS

        canonical = getattr(_KINDS.get(kind), "kind", kind)
        if canonical in _estimator_kinds(est):
            return est
    return None


def methods_for(kind: str) -> list[str]:
    """Names of the methods available for a unit kind.

    Example:
        >>> "occlusion" in methods_for("heads")
        True
    """
    return sorted(n for n in all_methods() if _lookup(n, kind) is not None)


def all_methods() -> dict[str, list[str]]:
    """``{method name: [unit kinds]}`` for every registered method (estimators'
    kinds derived from what they need and what each kind provides).

    Example:
        >>> "heads" in all_methods()["kernelshap"]
        True
    """
    out: dict[str, list[str]] = {}
    for n, k in sorted(_REGISTRY):
        out.setdefault(n, []).append(k)
    for n, cls in _ESTIMATORS.items():
        out[n] = sorted({*out.get(n, []), *_estimator_kinds(cls)})
    return dict(sorted(out.items()))


def method_table() -> str:
    """The unit x method table as Markdown (what the README shows): a mark
    where ``al.attribute(units=kind, method=name)`` runs.

    Example:
        >>> method_table().splitlines()[0].startswith("| method |")
        True
    """
    from ..units.base import _KINDS

    kinds = sorted({c.kind for c in _KINDS.values()})  # type: ignore[attr-defined]
    rows = ["| method | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for n, ks in all_methods().items():
        rows.append(f"| {n} | " + " | ".join("x" if k in ks else "" for k in kinds) + " |")
    return "\n".join(rows)


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


#: methods whose result is a graph: their own functions, not ``al.attribute``
_GRAPH_FUNCTIONS = {
    "graph": "al.attribution_graph(lm, prompt, transcoders, target)",
    "attribution-graph": "al.attribution_graph(lm, prompt, transcoders, target)",
    "routes": "al.routes(lm, prompt, target)",
}


def find_method(name: str, kind: str) -> type[Method]:
    """The method class registered as ``name`` for unit kind ``kind``.

    Raises:
        UnknownMethodError: no such method, or not for that unit kind.
    """
    found = _lookup(name.lower(), kind)
    if found is not None:
        return found
    kinds = all_methods().get(name.lower())
    if kinds:
        raise UnknownMethodError(
            f"method {name!r} does not work on units={kind!r}; it works on {', '.join(kinds)}. "
            f"Methods for {kind!r}: {', '.join(methods_for(kind)) or 'none yet'}"
        )
    norm = name.lower().replace("_", "-").replace(" ", "-")
    if norm in _GRAPH_FUNCTIONS:
        raise UnknownMethodError(
            f"method {name!r} returns a graph, not scores over units: call "
            f"{_GRAPH_FUNCTIONS[norm]} (a GraphResult)"
        )
    close = [_SPELLED_OUT[norm]] if norm in _SPELLED_OUT else []
    close = close or difflib.get_close_matches(norm, list(all_methods()), n=1, cutoff=0.75)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownMethodError(
        f"unknown method {name!r}.{hint} Methods for units={kind!r}: "
        f"{', '.join(methods_for(kind)) or 'none yet'}; all methods: "
        f"{', '.join(all_methods()) or 'none yet'}"
    )


def option_names(cls: type) -> tuple[set[str], bool]:
    """The keyword options a method class's constructors name (along the
    classes it passes ``**options`` on to), and whether the last one still takes
    ``**options`` (then any name is accepted).

    Example:
        >>> names, open_ended = option_names(find_method("kernelshap", "tokens"))
        >>> "samples" in names and "batch_size" in names, open_ended
        (True, False)
    """
    names: set[str] = set()
    for c in cls.__mro__:
        init = c.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return names - {"self"}, False
    return names - {"self"}, True
