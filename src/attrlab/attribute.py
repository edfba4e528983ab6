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

import inspect
from typing import Any

from .ablations import Ablation
from .ablations import resolve as resolve_ablation
from .errors import EmptyPromptError, InputError
from .methods.base import Estimator, Method, find_method, option_names
from .model.budget import announcing
from .model.lock import holds_model_lock
from .model.wrapper import LM, Inputs
from .question import check_scores, record
from .result import Attribution
from .units.base import resolve as resolve_units


@holds_model_lock
def attribute(
    lm: LM,
    inputs: Inputs,
    target: Any = None,
    units: Any = "tokens",
    method: str | Method = "ig",
    counterfactual: Inputs | None = None,
    ablation: str | Ablation | None = None,
    reference: Inputs | None = None,
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
        counterfactual: a corrupted prompt of the same token length; shorthand
            for ``ablation=al.ablations.Counterfactual(counterfactual)``.
        ablation: what replaces a unit that is not kept: ``"zero"``, ``"mean"``,
            ``"resample"``, ``"noise"``, ``"pad"``, ``"mask"``, ``"remove"`` or an
            :mod:`attrlab.ablations` object; None: the unit kind's default.
        reference: prompts for ``ablation="mean"`` / ``"resample"``.
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
    if reference is not None and ablation is None:  # a method's own reference= option
        options["reference"] = reference
        reference = None
    if isinstance(method, Method):
        if options:
            raise InputError("give options to the method object, not to attribute()")
        find_method(method.name, unit_obj.kind)  # raises with the kinds it works on
        m = method
    elif isinstance(method, str):
        cls = find_method(method, unit_obj.kind)
        options, unit_options = _split_options(cls, unit_obj, options)
        if unit_options:
            unit_obj = unit_obj.updated(**unit_options)  # type: ignore[attr-defined]
        try:
            m = cls(**options)
        except TypeError as e:
            raise InputError(f"bad options for method {method!r}: {e}") from e
    else:
        raise InputError(f"method must be a name or an al.methods object, got {method!r}")
    abl = resolve_ablation(ablation, counterfactual=counterfactual, reference=reference)
    if abl is not None:
        abl = unit_obj.check_ablation(abl)  # typed error before any forward pass
    # recorded before the method runs: it may prepare (mutate) the target object
    target_kind = unit_obj.target_kind if m.target_kind == "lm" else m.target_kind
    question = record(inputs, target, unit_obj, counterfactual, target_kind, abl)
    tgt = unit_obj.resolve_target(target, lm) if m.target_kind == "lm" else target
    # progress=True: runs that cache activations print their memory estimate first
    with announcing(bool(getattr(m, "progress", False))):
        if isinstance(m, Estimator) or "ablation" in inspect.signature(m.attribute).parameters:
            run: Any = m.attribute  # estimators and ablation-aware methods take ablation=
            result = run(lm, inputs, tgt, unit_obj, counterfactual=counterfactual, ablation=abl)
        elif ablation is not None and not (
            counterfactual is not None and abl is not None and abl.name == "counterfactual"
        ):
            raise InputError(
                f"method {m.name!r} does not take ablation=; it compares with counterfactual= only"
            )
        else:
            result = m.attribute(lm, inputs, tgt, unit_obj, counterfactual=counterfactual)
    check_scores(result, f"method {m.name!r} computed non-finite scores")
    if question is not None:
        used = result.meta.get("ablation")  # the ablation the method applied (defaults too)
        if isinstance(used, dict) and used.get("name") != "counterfactual":
            question["ablation"] = used
        result.meta["question"] = question
    return result


def _split_options(
    cls: type, units: Any, options: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(method options, unit options)``: an option that is a field of the unit
    object (kinds with ``updated``, e.g. ``query=`` for sources) goes to the
    units; one the method also names (``seed``) goes to both.

    Example:
        >>> import attrlab as al
        >>> _split_options(al.methods.find_method("occlusion", "sources"),
        ...                al.units.Sources(), {"query": "Why?", "batch_size": 4})
        ({'batch_size': 4}, {'query': 'Why?'})
    """
    if not hasattr(units, "updated"):
        return options, {}
    fields = set(units.params())
    names, _ = option_names(cls)
    unit_opts = {k: v for k, v in options.items() if k in fields}
    method_opts = {k: v for k, v in options.items() if k not in fields or k in names}
    return method_opts, unit_opts
