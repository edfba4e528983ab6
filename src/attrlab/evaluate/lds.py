"""Linear datamodeling score (LDS) for any unit kind that can be ablated.

Draw ``n_masks`` random subsets ``S_j`` of the units, each keeping a fraction
``alpha`` of them; measure ``f(S_j)`` with the bound question's ``f``
(:class:`attrlab.units.base.Bound`)
(the target with only the units in ``S_j`` kept); predict it by
``sum_{i in S_j} a_i``; the LDS is the Spearman correlation between prediction
and measurement ("TRAK: Attributing Model Behavior at Scale"; ContextCite
uses the same score on prompt sources). For results with several rows (one per
generated token) it is computed per row and averaged.

One function serves every unit kind that provides ``f``: it binds the
question the result answers (inputs, target, units, ablation, read from
``result.meta["question"]``) and measures ``units.bind(...).f(masks)``
(:func:`_evaluate_masks`). Training-data results
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

import inspect
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..model.lock import holds_model_lock
from ..question import Question

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


#: options of ``units.bind`` that define the question (not just its speed): read
#: from the result's parameters when the method stored them
_QUESTION_OPTIONS = ("site", "max_new_tokens")


def _accepts(fn: Any, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _deprecated_baseline(baseline: Any, what: str) -> Any:
    """The ablation a deprecated ``baseline=`` means, with a DeprecationWarning."""
    from ..ablations import Ablation, Token, Zero

    warnings.warn(
        f"{what}: baseline= is deprecated; pass ablation= ('pad', 'zero', 'mask', a token "
        "id, or an al.ablations object), the keyword every evaluation and al.attribute take",
        DeprecationWarning,
        stacklevel=4,
    )
    if isinstance(baseline, Ablation):
        return baseline
    if isinstance(baseline, str) and baseline == "zero":
        return Zero()
    return Token(baseline)


def _question(
    lm: Any,
    result: Any,
    inputs: Any,
    target: Any,
    units: Any,
    what: str,
    ablation: Any = None,
    counterfactual: Any = None,
    reference: Any = None,
    options: dict[str, Any] | None = None,
) -> tuple[Question, Any, dict[str, Any]]:
    """The question an evaluation measures: ``(question, units, bind options)``.

    Reads the inputs, target, counterfactual and ablation the result answers
    (:func:`attrlab.question.bind`: given ones must match; non-finite scores are
    refused), resolves the ablation (``ablation=`` / ``counterfactual=`` override
    the recorded one; the deprecated ``baseline=`` maps to ``ablation=``) and
    checks that the unit kind supports it — all before any forward pass. The
    returned question's ``ablation`` is the one to apply (None: the kind's default).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", units="heads", method="occlusion",
        ...                  ablation="zero")
        >>> q, u, _ = _question(lm, r, None, None, None, "evaluate")
        >>> q.inputs, q.ablation, u.kind
        ('a b c', Zero(), 'heads')
    """
    from ..question import bind

    opts = dict(options or {})
    baseline = opts.pop("baseline", None)
    if baseline is not None:
        if ablation is not None or counterfactual is not None:
            raise InputError("give ablation= only (baseline= is its deprecated alias)")
        ablation = _deprecated_baseline(baseline, what)
    q = bind(lm, result, inputs, target, counterfactual, units, what)
    u = units_of(result, units)
    abl = u.check_ablation(
        q.resolved_ablation(ablation, reference=reference, counterfactual=counterfactual)
    )
    params = getattr(result, "params", {}) or {}
    for k in _QUESTION_OPTIONS:
        if params.get(k) is not None and k not in opts and _accepts(u.bind, k):
            opts[k] = params[k]
    return replace(q, ablation=abl), u, opts


def _bind(lm: Any, q: Question, units: Any, **options: Any) -> Any:
    """``units.bind(lm, inputs, target, ablation, **options)`` for the question
    (the :class:`~attrlab.units.base.Bound` every evaluation measures ``f`` on).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", units="mlp", method="occlusion",
        ...                  ablation="zero")
        >>> q, u, opts = _question(lm, r, None, None, None, "evaluate")
        >>> _bind(lm, q, u, **opts).n
        2
    """
    from ..targets import Target
    from ..targets import resolve as resolve_target

    unknown = [k for k in options if not _accepts(units.bind, k)]
    if unknown:
        raise InputError(
            f"units {units.kind!r} take no option {unknown[0]!r}; evaluations take "
            "ablation=, counterfactual=, reference= and the units' bind options "
            f"(see help(al.units.{type(units).__name__}.bind))"
        )
    tgt = q.target
    if q.target_kind == "lm" and not isinstance(tgt, Target):
        tgt = resolve_target(tgt, lm)
    return units.bind(lm, q.inputs, tgt, q.ablation, **options)


@holds_model_lock
def _evaluate_masks(lm: Any, q: Question, units: Any, masks: Tensor, **options: Any) -> Tensor:
    """``f(S)`` for each mask, ``[n_masks, rows]`` float64, from the bound question.

    The question is bound (:func:`_bind`) and its ``f`` evaluated.

    Example:
        >>> import torch, attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", method="occlusion")
        >>> q, u, opts = _question(lm, r, None, None, None, "evaluate")
        >>> tuple(_evaluate_masks(lm, q, u, torch.ones(2, 3).bool(), **opts).shape)
        (2, 1)
    """
    if "f" not in getattr(units, "provides", ()):
        raise InputError(f"units {units.kind!r} cannot be evaluated on masks")
    bound = _bind(lm, q, units, **options)
    if bound.n != masks.shape[-1]:
        raise InputError(
            f"the units give {bound.n} units, the result has {masks.shape[-1]}; pass units="
        )
    return _as_2d(bound.f(masks))


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
    ablation: Any = None,
    counterfactual: Any = None,
    reference: Any = None,
    **options: Any,
) -> Any:
    """LDS of ``result`` on ``n_masks`` random ``alpha``-subsets of its units.

    ``f(S)`` is measured on the question the result answers (its inputs,
    target, units and ablation, read from ``result.meta["question"]``), for
    every unit kind that provides ``f``.

    Args:
        lm: the wrapped model the result explains.
        result: an :class:`attrlab.Attribution`.
        inputs, target: the prompt and target the result explains; read from the
            result when left out (given ones must match it, else
            :class:`~attrlab.errors.QuestionMismatchError`).
        n_masks, alpha, seed: the subsets (defaults 64, 0.5, 0).
        units: the unit object, when it cannot be rebuilt from the result.
        ablation: what replaces the dropped units (a name or an
            :mod:`attrlab.ablations` object); default: the one the result used.
        counterfactual: shorthand for ``ablation=Counterfactual(counterfactual)``
            (must match the result's counterfactual, if it has one).
        reference: prompts for ``ablation="mean"`` / ``"resample"``.
        **options: the units' bind options (``batch_size``, ``memory_budget`` …;
            ``baseline=`` is a deprecated alias of ``ablation=``); for
            training-data results, passed to :func:`attrlab.data.lds.lds`.

    Returns:
        :class:`LDSScore` (for training data, the data module's result).

    Raises:
        QuestionMismatchError: another prompt, target, counterfactual or unit kind.
        NonFiniteError: NaN or infinite scores.
        UnsupportedAblationError: an ablation the unit kind cannot apply.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "When Mary and John went", target=" to", method="kernelshap")
        >>> round(float(al.evaluate.lds(lm, r, "When Mary and John went", " to", seed=1)), 2) > 0
        True
        >>> h = al.attribute(lm, "When Mary and John went", target=" to", units="heads",
        ...                  method="kernelshap", ablation="zero")
        >>> s = al.evaluate.lds(lm, h, n_masks=16)  # question and ablation read from h
        >>> s.masks.shape == (16, len(h))
        True
    """
    from ..result import Attribution

    if result is None and isinstance(lm, Attribution):
        lm, result = None, lm
    if not isinstance(result, Attribution):
        raise InputError("lds() needs an attrlab Attribution as result=")
    if result.unit_kind == "train":
        from ..data.lds import lds as data_lds

        if ablation is not None or counterfactual is not None or reference is not None:
            raise InputError(
                "training examples are removed by retraining: lds() of a training-data "
                "result takes no ablation=, counterfactual= or reference="
            )
        given: dict[str, Any] = {
            k: v
            for k, v in (("n_masks", n_masks), ("alpha", alpha), ("seed", seed))
            if v is not _UNSET
        }
        return data_lds(result, **given, **options)
    n_masks = 64 if n_masks is _UNSET else int(n_masks)
    alpha = 0.5 if alpha is _UNSET else float(alpha)
    seed = 0 if seed is _UNSET else int(seed)
    if lm is None:
        raise InputError("lds() on input or component units needs the model: lds(lm, result, ...)")
    q, u, opts = _question(
        lm, result, inputs, target, units, "compute the LDS of this result",
        ablation, counterfactual, reference, options,
    )  # fmt: skip
    n = int(result.scores.shape[-1])
    masks = random_subsets(n, n_masks, alpha, seed)
    values = _evaluate_masks(lm, q, u, masks, **opts)  # [m, rows]
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
