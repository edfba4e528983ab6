"""The façade: ``al.attribute(lm, inputs, target=..., units=..., method=...)``.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> try:
    ...     al.attribute(lm, "a b", target=" a", units="heads", method="nope")
    ... except al.errors.UnknownMethodError as e:
    ...     print("unknown method" in str(e))
    True
"""

from __future__ import annotations

from typing import Any

from .errors import EmptyPromptError, InputError
from .methods.base import Method, find_method
from .model.lock import holds_model_lock
from .model.wrapper import LM, Inputs
from .question import check_scores, record
from .result import Attribution
from .targets import resolve as resolve_target
from .units.base import resolve as resolve_units


@holds_model_lock
def attribute(
    lm: LM,
    inputs: Inputs,
    target: Any = None,
    units: Any = "tokens",
    method: str | Method = "ig",
    counterfactual: Inputs | None = None,
    **options: Any,
) -> Attribution:
    """Attribute ``target`` on ``inputs`` to ``units`` with ``method``.

    Args:
        lm: a wrapped model (:func:`attrlab.load` / :func:`attrlab.wrap`).
        inputs: a prompt, a list of prompts, or token ids.
        target: a token (``" Mary"``), a pair for a logit difference, an
            :class:`attrlab.targets.Target`, or None for the top prediction.
        units: a unit kind name (``"tokens"``, ``"heads"`` …) or an ``al.units`` object.
        method: a method name or an ``al.methods`` object (then ``options`` must be empty).
        counterfactual: a corrupted prompt of the same token length, for
            methods that compare runs.
        **options: the method's options (e.g. ``steps=32``).

    Returns:
        An :class:`attrlab.Attribution`; ``meta["question"]`` records the inputs,
        target, units and counterfactual, so that ``al.evaluate`` can read them.

    Thread-safe: the call holds the model's lock (``lm.lock``), so calls on one
    model from several threads take turns (calls on different models do not wait).

    Raises:
        UnknownMethodError: unknown method, or not for these units.
        NonFiniteError: a NaN or infinite target value, baseline or score.
        UnknownUnitsError, InputError and its subclasses for bad inputs.
    """
    if not isinstance(lm, LM) and not getattr(lm, "attrlab_wrapper", False):
        raise InputError(
            f"attribute() needs a wrapped model from al.load()/al.wrap(), got {type(lm).__name__}"
        )
    if isinstance(inputs, str) and inputs == "":
        raise EmptyPromptError("the prompt is empty: give at least one token")
    unit_obj = resolve_units(units)
    if isinstance(method, Method):
        if options:
            raise InputError("give options to the method object, not to attribute()")
        if unit_obj.kind not in method.unit_kinds:
            find_method(method.name, unit_obj.kind)  # raises with the list of kinds
        m = method
    elif isinstance(method, str):
        cls = find_method(method, unit_obj.kind)
        try:
            m = cls(**options)
        except TypeError as e:
            raise InputError(f"bad options for method {method!r}: {e}") from e
    else:
        raise InputError(f"method must be a name or an al.methods object, got {method!r}")
    # recorded before the method runs: it may prepare (mutate) the target object
    question = record(inputs, target, unit_obj, counterfactual, m.target_kind)
    tgt = resolve_target(target, lm) if m.target_kind == "lm" else target
    result = m.attribute(lm, inputs, tgt, unit_obj, counterfactual=counterfactual)
    check_scores(result, f"method {m.name!r} computed non-finite scores")
    if question is not None:
        result.meta["question"] = question
    return result
