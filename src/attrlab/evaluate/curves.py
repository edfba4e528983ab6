"""Deletion and insertion curves, AOPC, and ERASER comprehensiveness/sufficiency.

Units are ranked by score (most positive first). The *deletion* curve ablates
the top-k units for k = 0..n and records the target; a faithful attribution
makes it fall fast (small area). The *insertion* curve keeps only the top-k
units; it should rise fast (large area). AOPC (Samek et al.) is the mean drop
``f(all) - f(top-k deleted)`` over k = 1..n. ERASER (DeYoung et al.):
comprehensiveness = ``f(x) - f(x without the top q%)`` and sufficiency =
``f(x) - f(top q% only)``, averaged over the bins ``q`` in (1, 5, 10, 20, 50)%.
ERASER measures the predicted class probability; here ``f`` is whatever target
the result explains (logit, log-prob, continuation log-prob …).

Every curve is measured with ``f`` of the question the result answers (its
inputs, target, units and ablation; :func:`attrlab.evaluate.lds._evaluate_masks`),
so it works for every unit kind that provides ``f``: tokens, words, sentences,
spans, heads, MLPs, neurons, layers, residual positions … ``ablation=``
(or ``counterfactual=``) evaluates with another ablation than the result's.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> p = "When Mary and John went"
    >>> r = al.attribute(lm, p, target=" to", method="occlusion")
    >>> c = al.evaluate.deletion_curve(lm, r, p, target=" to")
    >>> len(c.values) == len(r) + 1
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..model.lock import holds_model_lock
from .lds import _evaluate_masks, _question

__all__ = [
    "Curve",
    "comprehensiveness",
    "deletion_curve",
    "insertion_curve",
    "sufficiency",
]

ERASER_BINS = (0.01, 0.05, 0.1, 0.2, 0.5)


@dataclass
class Curve:
    """A deletion or insertion curve.

    Attributes:
        kind: ``"deletion"`` or ``"insertion"``.
        fractions: ``[k]`` fraction of units removed (deletion) or kept (insertion).
        values: ``[k]`` target values.
        order: unit indices, highest score first.
        full, empty: the target with every unit kept / ablated.

    Example:
        >>> c = Curve("deletion", [0.0, 0.5, 1.0], [2.0, 1.0, 0.0], [1, 0], 2.0, 0.0)
        >>> c.area, c.aopc
        (1.0, 1.5)
    """

    kind: str
    fractions: list[float]
    values: list[float]
    order: list[int]
    full: float
    empty: float

    @property
    def area(self) -> float:
        """Area under the curve over fractions in [0, 1] (trapezoid rule)."""
        x, y = np.asarray(self.fractions), np.asarray(self.values)
        return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))

    @property
    def normalized_area(self) -> float:
        """Area after mapping ``empty -> 0`` and ``full -> 1`` (NaN if they are equal)."""
        span = self.full - self.empty
        if span == 0:
            return float("nan")
        return (self.area - self.empty) / span

    @property
    def aopc(self) -> float:
        """Mean of ``f(all) - value`` over the points after the first (deletion), or
        of ``value - f(none)`` (insertion)."""
        v = np.asarray(self.values[1:])
        if len(v) == 0:
            return float("nan")
        return float(np.mean(self.full - v if self.kind == "deletion" else v - self.empty))


def _how(ablation: Any, counterfactual: Any, reference: Any, options: Any) -> dict[str, Any]:
    return {
        "ablation": ablation,
        "counterfactual": counterfactual,
        "reference": reference,
        "options": options,
    }


def _rank(result: Any, row: int | None) -> tuple[Tensor, int | None]:
    s = torch.as_tensor(result.scores).double()
    if s.dim() == 2:
        if row is None:
            return s.sum(0), None
        return s[row], row
    return s, None


def _points(n: int, steps: int | None) -> list[int]:
    if steps is None or steps >= n:
        return list(range(n + 1))
    ks = np.unique(np.round(np.linspace(0, n, steps + 1)).astype(int))
    return [int(k) for k in ks]


def _values(vals: Tensor, row: int | None) -> Tensor:
    """``[m, rows]`` -> ``[m]``: the chosen row, or the sum over rows."""
    if row is not None:
        if vals.shape[1] == 1:
            return vals[:, 0]
        return vals[:, row]
    return vals.sum(1)


def _curve(
    kind: str,
    lm: Any,
    result: Any,
    inputs: Any,
    target: Any,
    steps: int | None,
    row: int | None,
    units: Any,
    how: dict[str, Any],
) -> Curve:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise InputError(f"steps must be a positive integer or None, got {steps!r}")
    q, u, opts = _question(
        lm, result, inputs, target, units, f"draw a {kind} curve of this result", **how
    )
    score, row = _rank(result, row)
    n = score.shape[0]
    order = torch.argsort(score, descending=True, stable=True)
    ks = _points(n, steps)
    masks = torch.zeros(len(ks) + 2, n, dtype=torch.bool)
    for i, k in enumerate(ks):
        top = order[:k]
        if kind == "deletion":
            masks[i] = True
            masks[i, top] = False
        else:
            masks[i, top] = True
    masks[-2] = True  # full
    vals = _values(_evaluate_masks(lm, q, u, masks, **opts), row)
    return Curve(
        kind=kind,
        fractions=[k / n for k in ks],
        values=[float(v) for v in vals[:-2]],
        order=order.tolist(),
        full=float(vals[-2]),
        empty=float(vals[-1]),
    )


@holds_model_lock
def deletion_curve(
    lm: Any,
    result: Any,
    inputs: Any = None,
    target: Any = None,
    steps: int | None = None,
    row: int | None = None,
    units: Any = None,
    ablation: Any = None,
    counterfactual: Any = None,
    reference: Any = None,
    **options: Any,
) -> Curve:
    """Ablate units in order of decreasing score and record the target.

    Args:
        inputs, target: the prompt and target the result explains; read from the
            result when left out (given ones must match it, else
            :class:`~attrlab.errors.QuestionMismatchError`; NaN or infinite scores
            raise :class:`~attrlab.errors.NonFiniteError`).
        steps: number of points after the first (default: every unit).
        row: for multi-row results, which row (default: rank by the sum of rows
            and record the sum of the rows' targets).
        units: the unit object, when it cannot be rebuilt from the result.
        ablation, counterfactual, reference: the ablation to measure with
            (default: the one the result used; see :func:`attrlab.evaluate.lds`).
        **options: the units' bind options (``batch_size`` …; ``baseline=`` is a
            deprecated alias of ``ablation=``).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c d", target=" a", method="occlusion")
        >>> c = al.evaluate.deletion_curve(lm, r, "a b c d", " a", steps=2)
        >>> c.fractions
        [0.0, 0.5, 1.0]
    """
    return _curve(
        "deletion",
        lm,
        result,
        inputs,
        target,
        steps,
        row,
        units,
        _how(ablation, counterfactual, reference, options),
    )


@holds_model_lock
def insertion_curve(
    lm: Any,
    result: Any,
    inputs: Any = None,
    target: Any = None,
    steps: int | None = None,
    row: int | None = None,
    units: Any = None,
    ablation: Any = None,
    counterfactual: Any = None,
    reference: Any = None,
    **options: Any,
) -> Curve:
    """Keep only the top-k units (k = 0..n) and record the target.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c d", target=" a", method="occlusion")
        >>> c = al.evaluate.insertion_curve(lm, r)  # prompt and target from the result
        >>> abs(c.values[-1] - c.full) < 1e-6
        True
    """
    return _curve(
        "insertion",
        lm,
        result,
        inputs,
        target,
        steps,
        row,
        units,
        _how(ablation, counterfactual, reference, options),
    )


def _eraser(
    kind: str,
    lm: Any,
    result: Any,
    inputs: Any,
    target: Any,
    bins: Sequence[float],
    row: int | None,
    units: Any,
    how: dict[str, Any],
) -> float:
    if not bins or any(not 0 < q <= 1 for q in bins):
        raise InputError(f"bins must be fractions in (0, 1], got {bins!r}")
    qn, u, opts = _question(
        lm, result, inputs, target, units, f"compute the {kind} of this result", **how
    )
    score, row = _rank(result, row)
    n = score.shape[0]
    order = torch.argsort(score, descending=True, stable=True)
    masks = torch.zeros(len(bins) + 1, n, dtype=torch.bool)
    masks[-1] = True
    for i, q in enumerate(bins):
        top = order[: max(1, math.ceil(q * n))]
        if kind == "comprehensiveness":
            masks[i] = True
            masks[i, top] = False
        else:
            masks[i, top] = True
    vals = _values(_evaluate_masks(lm, qn, u, masks, **opts), row)
    return float((vals[-1] - vals[:-1]).mean())


@holds_model_lock
def comprehensiveness(
    lm: Any,
    result: Any,
    inputs: Any = None,
    target: Any = None,
    bins: Sequence[float] = ERASER_BINS,
    row: int | None = None,
    units: Any = None,
    ablation: Any = None,
    counterfactual: Any = None,
    reference: Any = None,
    **options: Any,
) -> float:
    """ERASER comprehensiveness: mean over bins of ``f(x) - f(x without the top q%)``
    (higher = the top units matter more).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c d", target=" a", method="occlusion")
        >>> isinstance(al.evaluate.comprehensiveness(lm, r, "a b c d", " a"), float)
        True
    """
    return _eraser(
        "comprehensiveness",
        lm,
        result,
        inputs,
        target,
        bins,
        row,
        units,
        _how(ablation, counterfactual, reference, options),
    )


@holds_model_lock
def sufficiency(
    lm: Any,
    result: Any,
    inputs: Any = None,
    target: Any = None,
    bins: Sequence[float] = ERASER_BINS,
    row: int | None = None,
    units: Any = None,
    ablation: Any = None,
    counterfactual: Any = None,
    reference: Any = None,
    **options: Any,
) -> float:
    """ERASER sufficiency: mean over bins of ``f(x) - f(top q% only)`` (lower = the
    top units alone suffice).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c d", target=" a", method="occlusion")
        >>> isinstance(al.evaluate.sufficiency(lm, r, "a b c d", " a"), float)
        True
    """
    return _eraser(
        "sufficiency",
        lm,
        result,
        inputs,
        target,
        bins,
        row,
        units,
        _how(ablation, counterfactual, reference, options),
    )
