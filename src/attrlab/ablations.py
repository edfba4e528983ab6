"""Ablations as data: what replaces a unit that is not kept.

Every attribution question fixes ``f(S)``, the target when only the units in
``S`` are kept; an *ablation* says what the others become. It is a plain
object, never a code path: one keyword, ``ablation=``, takes a string or one of
these objects on :func:`attrlab.attribute` and on every evaluation, and each
unit kind declares which ablations it supports (``Units.ablations``).

=================================  ==============================================
``Zero()``                          the unit's activation (or embedding) is zero
``Mean(reference)``                 its mean over ``reference`` prompts
``Resample(reference, seed)``       its value on a reference prompt drawn at random
``Counterfactual(inputs)``          its value on a counterfactual prompt
``Noise(std, seed, positions)``     the run on the prompt with Gaussian noise on the
                                    token embeddings (causal tracing)
``Token("pad" | "mask" | id)``      input units: the embedding of that token
``Remove()``                        sources / spans: dropped from the text
``Suppress()``                      trace sentences: later positions do not attend
                                    to their tokens (every head and layer)
=================================  ==============================================

Strings: ``"zero"``, ``"mean"``, ``"resample"``, ``"noise"``, ``"pad"``,
``"mask"``, ``"remove"``, ``"suppress"``. ``counterfactual=`` on :func:`attrlab.attribute` is
shorthand for ``ablation=Counterfactual(...)``; ``reference=`` fills in the
reference of ``"mean"`` / ``"resample"``.

Example:
    >>> import attrlab as al
    >>> al.ablations.resolve("mean", reference=["a b", "c d"])
    Mean(reference=['a b', 'c d'])
    >>> al.ablations.resolve(None, counterfactual="a c")
    Counterfactual(inputs='a c')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from .errors import InputError, UnsupportedAblationError

__all__ = [
    "Ablation",
    "Zero",
    "Mean",
    "Resample",
    "Counterfactual",
    "Noise",
    "Token",
    "Remove",
    "Suppress",
    "resolve",
    "to_json",
    "from_json",
    "check_supported",
]


class Ablation:
    """Base class of ablations (plain data).

    Example:
        >>> isinstance(Zero(), Ablation)
        True
    """

    #: the string name (``"zero"``, ``"mean"`` …)
    name: str = ""
    #: whether the ablated value comes from another run of the model
    #: (a corrupted run exists: its target value is ``f(none)``, and the
    #: denoising direction is possible)
    has_run: bool = False

    def params(self) -> dict[str, Any]:
        """JSON-able fields."""
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(repr=True)
class Zero(Ablation):
    """The ablated unit's activation (or input embedding) is zero.

    Example:
        >>> Zero()
        Zero()
    """

    name = "zero"


@dataclass
class Mean(Ablation):
    """The unit's mean activation over ``reference`` prompts: per position when
    they have the prompt's token length, else the mean over all real positions.

    Example:
        >>> Mean(["a b c", "d e f"]).reference[0]
        'a b c'
    """

    reference: Any = None
    name = "mean"


@dataclass
class Resample(Ablation):
    """The unit's value on a reference prompt drawn at random (seeded) for each
    prompt; references must tokenize to the prompt's length.

    Example:
        >>> Resample(["a b c", "d e f"], seed=1).seed
        1
    """

    reference: Any = None
    seed: int = 0
    name = "resample"
    has_run = True


@dataclass
class Counterfactual(Ablation):
    """The unit's value on a counterfactual prompt of the same token length
    (``counterfactual=`` is shorthand for this).

    Example:
        >>> Counterfactual("When Mary and John went").inputs
        'When Mary and John went'
    """

    inputs: Any = None
    name = "counterfactual"
    has_run = True


@dataclass
class Noise(Ablation):
    """Causal tracing: the run on the prompt with Gaussian noise added to the token
    embeddings at ``positions`` (None = every position). ``std=None`` uses 3 x
    the standard deviation of the embedding table (ROME's 3 sigma). Seeded.

    Example:
        >>> Noise(positions=[1, 2], seed=0).std is None
        True
    """

    std: float | None = None
    seed: int = 0
    positions: Sequence[int] | None = None
    name = "noise"
    has_run = True


@dataclass
class Token(Ablation):
    """Input units: replace the unit's tokens by the embedding of ``"pad"``,
    ``"mask"`` or a token id.

    Example:
        >>> Token("mask").token
        'mask'
    """

    token: Any = "pad"
    name = "token"


@dataclass
class Remove(Ablation):
    """Sources and spans: drop the ablated text from the prompt.

    Example:
        >>> Remove().name
        'remove'
    """

    name = "remove"


@dataclass
class Suppress(Ablation):
    """Trace sentences: the text stays, but no later position attends to the
    ablated sentence's tokens (an additive mask before the softmax, every head
    and layer), as attention suppression does.

    Example:
        >>> Suppress().name
        'suppress'
    """

    name = "suppress"


_CLASSES: dict[str, type[Ablation]] = {
    "zero": Zero,
    "mean": Mean,
    "resample": Resample,
    "counterfactual": Counterfactual,
    "noise": Noise,
    "token": Token,
    "remove": Remove,
    "suppress": Suppress,
}


def resolve(
    spec: Any = None,
    *,
    counterfactual: Any = None,
    reference: Any = None,
    default: Ablation | None = None,
) -> Ablation | None:
    """An :class:`Ablation` from a string, an object, or the ``counterfactual=`` shorthand.

    Args:
        spec: ``"zero"``, ``"mean"``, ``"resample"``, ``"noise"``, ``"pad"``,
            ``"mask"``, ``"remove"``, ``"suppress"``, ``"counterfactual"``, a token id, or an object.
        counterfactual: a prompt; alone it means ``Counterfactual(counterfactual)``.
        reference: prompts for ``"mean"`` / ``"resample"``.
        default: returned when nothing is given (the unit kind's default).

    Raises:
        InputError: an unknown name, both ``ablation=`` and ``counterfactual=``,
            or ``"mean"`` / ``"resample"`` without ``reference=``.

    Example:
        >>> resolve("pad")
        Token(token='pad')
        >>> resolve(Zero())
        Zero()
    """
    if spec is None:
        if counterfactual is not None:
            return Counterfactual(counterfactual)
        return default
    if counterfactual is not None and not (
        isinstance(spec, Counterfactual) or spec == "counterfactual"
    ):
        raise InputError(
            f"give either ablation={spec!r} or counterfactual=, not both "
            "(counterfactual= is shorthand for ablation=al.ablations.Counterfactual(...))"
        )
    if isinstance(spec, Ablation):
        out = spec
    elif isinstance(spec, bool):
        raise InputError(f"ablation must be a name or an al.ablations object, got {spec!r}")
    elif isinstance(spec, int):
        out = Token(spec)
    elif isinstance(spec, str):
        s = spec.lower()
        if s in ("pad", "mask"):
            out = Token(s)
        elif s == "counterfactual":
            if counterfactual is None:
                raise InputError("ablation='counterfactual' needs counterfactual=<prompt>")
            out = Counterfactual(counterfactual)
        elif s in _CLASSES:
            out = _CLASSES[s]()
        else:
            raise InputError(
                f"unknown ablation {spec!r}; choose from zero, mean, resample, noise, pad, "
                "mask, remove, suppress, counterfactual, or pass an al.ablations object"
            )
    else:
        raise InputError(f"ablation must be a name or an al.ablations object, got {spec!r}")
    if isinstance(out, (Mean, Resample)) and out.reference is None:
        if reference is None:
            raise InputError(f"ablation {out.name!r} needs reference= prompts")
        out = type(out)(**{**out.params(), "reference": reference})
    return out


def check_supported(ablation: Ablation | None, kind: str, supported: Sequence[type]) -> None:
    """Refuse an ablation a unit kind cannot apply.

    Raises:
        UnsupportedAblationError: naming the kind and what it supports.

    Example:
        >>> try:
        ...     check_supported(Remove(), "heads", (Zero, Mean))
        ... except UnsupportedAblationError as e:
        ...     print(str(e).split(";")[0])
        units='heads' cannot use ablation 'remove'
    """
    if ablation is None or isinstance(ablation, tuple(supported)):
        return
    names = ", ".join(getattr(c, "name", c.__name__) for c in supported) or "none"
    raise UnsupportedAblationError(
        f"units={kind!r} cannot use ablation {ablation.name!r}; it supports {names}"
    )


def to_json(ablation: Ablation | None) -> dict[str, Any] | None:
    """A JSON description (prompts kept as text / id lists; tensors as lists).

    Example:
        >>> to_json(Noise(std=0.5))
        {'name': 'noise', 'std': 0.5, 'seed': 0, 'positions': None}
    """
    if ablation is None:
        return None
    if not isinstance(ablation, Ablation):  # a raw baseline tensor (deprecated baseline=)
        shape = list(getattr(ablation, "shape", []))
        return {"name": "tensor", "shape": shape, "rebuildable": False}
    from .result import _jsonable

    return {"name": ablation.name, **_jsonable(ablation.params())}


def from_json(spec: Mapping[str, Any] | None) -> Ablation | None:
    """Rebuild an ablation from :func:`to_json`.

    Example:
        >>> from_json(to_json(Mean(["a b"])))
        Mean(reference=['a b'])
    """
    if spec is None:
        return None
    spec = dict(spec)
    cls = _CLASSES.get(str(spec.pop("name", "")))
    if cls is None:
        raise InputError(
            f"cannot rebuild the ablation {spec!r} from the result (a tensor baseline?); "
            "pass ablation= again"
        )
    return cls(**spec)
