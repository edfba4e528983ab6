"""Linear datamodeling score (LDS) for any unit kind that can be ablated.

Draw ``n_masks`` random subsets ``S_j`` of the units, each keeping a fraction
``alpha`` of them; measure ``f(S_j)`` with the bound question's ``f``
(:class:`attrlab.units.base.Bound`)
(the target with only the units in ``S_j`` kept); predict it by
``sum_{i in S_j} a_i``; the LDS is the Spearman correlation between prediction
and measurement ("TRAK: Attributing Model Behavior at Scale"; ContextCite
uses the same score on prompt sources). For results with several rows (one per
generated token) it is computed per row and averaged.

One function serves tokens, words, sentences, spans, sources and components:
anything whose unit kind implements ``mask_values``. Training-data results
(``unit_kind == "train"``) are dispatched to :func:`attrlab.data.lds.lds`,
which measures ``f`` by retraining.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> r = al.attribute(lm, "When Mary and John went", target=" to", method="kernelshap")
    >>> s = al.evaluate.lds(lm, r, "When Mary and John went", target=" to", n_masks=32)
    >>> -1.0 <= s.lds <= 1.0
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..model.lock import holds_model_lock

__all__ = ["LDSScore", "lds", "random_subsets", "spearman", "units_of"]


@dataclass
class LDSScore:
    """The LDS of an attribution on ablation masks.

    Attributes:
        lds: mean Spearman correlation over rows (NaN rows skipped).
        per_row: one correlation per row of the attribution.
        n_masks, alpha, seed: the sampling setup.
        masks: ``[n_masks, n_units]`` the subsets used.
        values: ``[n_masks]`` or ``[n_masks, rows]`` the measured ``f(S)``.
        predicted: the same shape, ``sum_{i in S} a_i``.

    Example:
        >>> float(LDSScore(0.5, [0.5], 8, 0.5, 0))
        0.5
    """

    lds: float
    per_row: list[float]
    n_masks: int
    alpha: float
    seed: int
    masks: Tensor | None = field(default=None, repr=False)
    values: Tensor | None = field(default=None, repr=False)
    predicted: Tensor | None = field(default=None, repr=False)

    def __float__(self) -> float:
        return float(self.lds)


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation of two 1-D arrays (NaN when one is constant).

    Example:
        >>> round(spearman([1, 2, 3, 4], [10, 20, 30, 5]), 6)
        -0.2
    """
    from scipy.stats import spearmanr

    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise InputError(f"spearman needs arrays of equal length, got {x.shape} and {y.shape}")
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(spearmanr(x, y).statistic)


def random_subsets(n_units: int, n_masks: int, alpha: float = 0.5, seed: int = 0) -> Tensor:
    """``[n_masks, n_units]`` bool masks, each keeping ``round(alpha * n_units)``
    units (at least 1, at most ``n_units - 1`` when ``n_units > 1``), seeded.

    Example:
        >>> random_subsets(10, 4, 0.3, seed=1).sum(-1).tolist()
        [3, 3, 3, 3]
    """
    if not 0.0 < alpha < 1.0:
        raise InputError(f"alpha must be in (0, 1), got {alpha}")
    if n_units < 1 or n_masks < 1:
        raise InputError("need at least one unit and one mask")
    k = int(round(alpha * n_units))
    k = min(max(k, 1), max(n_units - 1, 1))
    gen = torch.Generator().manual_seed(int(seed))
    rank = torch.rand(n_masks, n_units, generator=gen).argsort(-1).argsort(-1)
    return rank < k


def units_of(result: Any, units: Any = None) -> Any:
    """The :class:`attrlab.units.Units` object a result's scores refer to:
    ``units`` if given, else rebuilt from ``result.unit_kind`` and
    ``result.meta["units_params"]`` (when the method stored them) or the units
    of the question recorded by :func:`attrlab.attribute`.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "When Mary", target=" and", units=[(0, 4)], method="occlusion")
        >>> units_of(r).spans_list
        [(0, 4)]
    """
    from ..units.base import Units, resolve

    if units is not None:
        return resolve(units)
    kind = getattr(result, "unit_kind", None)
    if kind is None:
        raise InputError("pass units=: the result does not say which units it scores")
    base = resolve(kind) if kind != "spans" else None
    meta = getattr(result, "meta", {}) or {}
    params = meta.get("units_params")
    recorded = (meta.get("question") or {}).get("units") or {}
    if params is None and recorded.get("kind") == kind:
        params = recorded.get("params")
    cls = type(base) if base is not None else _kind_class(kind)
    if params:
        try:
            obj = cls(**params)
            if isinstance(obj, Units):
                return obj
        except TypeError:
            pass
    if base is None:
        raise InputError(f"cannot rebuild units {kind!r} from the result; pass units=")
    return base


def _kind_class(kind: str) -> Any:
    from ..units.base import _KINDS

    if kind not in _KINDS:
        raise InputError(f"unknown unit kind {kind!r}; pass units=")
    return _KINDS[kind]


def _as_2d(v: Any) -> Tensor:
    t = torch.as_tensor(v).detach().double().cpu()
    return t[:, None] if t.dim() == 1 else t


@holds_model_lock
def evaluate_masks(
    lm: Any, result: Any, inputs: Any, target: Any, masks: Tensor, units: Any = None, **context: Any
) -> Tensor:
    """``f(S)`` for each mask as a ``[n_masks, rows]`` float64 tensor, checked
    against the result's number of units.

    Example:
        >>> import torch, attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", method="occlusion")
        >>> tuple(evaluate_masks(lm, r, "a b c", " a", torch.ones(2, 3).bool()).shape)
        (2, 1)
    """
    u = units_of(result, units)
    n = int(result.scores.shape[-1])
    if masks.shape[-1] != n:
        raise InputError(f"masks have {masks.shape[-1]} units, the result {n}")
    recorded = context.pop("_recorded_ablation", None)
    if "f" in getattr(u, "provides", ()):
        bound = bind_result(lm, result, inputs, target, u, recorded, context)
        if bound.n != n:
            raise InputError(f"the units give {bound.n} units, the result has {n}; pass units=")
        return _as_2d(bound.f(masks))
    return _as_2d(u.mask_values(lm, inputs, target, masks, **context))


def bind_result(
    lm: Any,
    result: Any,
    inputs: Any,
    target: Any,
    units: Any,
    recorded: Any = None,
    context: dict[str, Any] | None = None,
) -> Any:
    """The bound question (:class:`attrlab.units.base.Bound`) a result answers:
    its units with the ablation given in ``context`` (``ablation=``,
    ``counterfactual=``, ``reference=``, or the deprecated ``baseline=``), else
    the one the result recorded. Other ``context`` entries are bind options
    (``batch_size`` …).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", units="heads", method="occlusion",
        ...                  ablation="zero")
        >>> bind_result(lm, r, "a b c", " a", units_of(r)).ablation
        Zero()
    """
    import inspect

    from ..ablations import from_json
    from ..ablations import resolve as resolve_ablation
    from ..methods.base import deprecated_baseline
    from ..targets import Target
    from ..targets import resolve as resolve_target

    ctx = dict(context or {})
    abl = ctx.pop("ablation", None)
    cf = ctx.pop("counterfactual", None)
    ref = ctx.pop("reference", None)
    baseline = ctx.pop("baseline", None)
    if abl is not None or cf is not None:
        ablation = resolve_ablation(abl, counterfactual=cf, reference=ref)
    elif baseline is not None:
        ablation = deprecated_baseline("evaluate", baseline)
    elif recorded is not None:
        ablation = recorded
    else:
        spec = (getattr(result, "meta", {}) or {}).get("ablation")
        ablation = from_json(spec) if isinstance(spec, dict) else None
    tgt = target if isinstance(target, Target) else resolve_target(target, lm)
    params = inspect.signature(units.bind).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        ctx = {k: v for k, v in ctx.items() if k in params}
    return units.bind(lm, inputs, tgt, units.check_ablation(ablation), **ctx)


def _score_rows(result: Any, n_rows: int) -> Tensor:
    """The result's scores as ``[n_rows, n_units]`` matching ``f``'s rows."""
    s = torch.as_tensor(result.scores).double()
    if s.dim() == 1:
        s = s[None]
    if s.shape[0] == n_rows:
        return s
    if n_rows == 1:  # several rows explained, one scalar measured: their sum
        return s.sum(0, keepdim=True)
    raise InputError(
        f"the result has {s.shape[0]} rows but the target gives {n_rows} values per mask"
    )


def bind_context(
    lm: Any,
    result: Any,
    inputs: Any,
    target: Any,
    units: Any,
    context: dict[str, Any],
    what: str,
) -> Any:
    """:func:`attrlab.question.bind` for an evaluation: checks the prompt, target,
    units and scores, and adds the result's counterfactual to ``context`` for edge
    units (their masks patch it in). Returns the :class:`~attrlab.question.Question`.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", method="occlusion")
        >>> bind_context(lm, r, None, None, None, {}, "evaluate").inputs
        'a b c'
    """
    from ..question import bind

    q = bind(lm, result, inputs, target, context.get("counterfactual"), units, what)
    given = any(context.get(k) is not None for k in ("ablation", "baseline"))
    if q.counterfactual is not None and not given:
        context["counterfactual"] = q.counterfactual
    if q.ablation is not None and not given:
        context["_recorded_ablation"] = q.ablation
    return q


_UNSET: Any = object()


@holds_model_lock
def lds(
    lm: Any,
    result: Any = None,
    inputs: Any = None,
    target: Any = None,
    n_masks: int = _UNSET,
    alpha: float = _UNSET,
    seed: int = _UNSET,
    units: Any = None,
    **context: Any,
) -> Any:
    """LDS of ``result`` on ``n_masks`` random ``alpha``-subsets of its units.

    Args:
        lm: the wrapped model the result explains.
        result: an :class:`attrlab.Attribution`.
        inputs, target: the prompt and target the result explains; read from the
            result when left out (given ones must match it, else
            :class:`~attrlab.errors.QuestionMismatchError`).
        n_masks, alpha, seed: the subsets (defaults 64, 0.5, 0).
        units: the unit object, when it cannot be rebuilt from the result.
        **context: ``ablation=`` (default: the one the result used),
            ``counterfactual=``, ``reference=``, bind options (``batch_size`` …), or
            for sources ``response=`` …; for training-data results, passed to
            :func:`attrlab.data.lds.lds`.

    Returns:
        :class:`LDSScore` (for training data, the data module's result).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "When Mary and John went", target=" to", method="kernelshap")
        >>> round(float(al.evaluate.lds(lm, r, "When Mary and John went", " to", seed=1)), 2) > 0
        True
    """
    from ..result import Attribution

    if result is None and isinstance(lm, Attribution):
        lm, result = None, lm
    if not isinstance(result, Attribution):
        raise InputError("lds() needs an attrlab Attribution as result=")
    if result.unit_kind == "train":
        from ..data.lds import lds as data_lds

        given: dict[str, Any] = {
            k: v
            for k, v in (("n_masks", n_masks), ("alpha", alpha), ("seed", seed))
            if v is not _UNSET
        }
        return data_lds(result, **given, **context)
    n_masks = 64 if n_masks is _UNSET else int(n_masks)
    alpha = 0.5 if alpha is _UNSET else float(alpha)
    seed = 0 if seed is _UNSET else int(seed)
    if lm is None:
        raise InputError("lds() on input or component units needs the model: lds(lm, result, ...)")
    q = bind_context(lm, result, inputs, target, units, context, "compute the LDS of this result")
    n = int(result.scores.shape[-1])
    masks = random_subsets(n, n_masks, alpha, seed)
    values = evaluate_masks(lm, result, q.inputs, q.target, masks, units, **context)  # [m, rows]
    s = _score_rows(result, values.shape[1])  # [rows, n]
    pred = masks.double() @ s.T  # [m, rows]
    per_row = [spearman(pred[:, r], values[:, r]) for r in range(values.shape[1])]
    finite = [c for c in per_row if not math.isnan(c)]
    score = float(np.mean(finite)) if finite else float("nan")
    squeeze = values.shape[1] == 1
    return LDSScore(
        lds=score,
        per_row=per_row,
        n_masks=n_masks,
        alpha=alpha,
        seed=seed,
        masks=masks,
        values=values[:, 0] if squeeze else values,
        predicted=pred[:, 0] if squeeze else pred,
    )
