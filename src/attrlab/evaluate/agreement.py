"""Agreement of a result with a reference: another result over the same units,
or ``"exact"`` — exact occlusion with the same ablation (for components with a
counterfactual, exact activation patching).

Results are aligned by unit label first (:meth:`attrlab.Attribution.align`),
so two methods that list the same units in different orders compare unit by
unit. Reported: Pearson and Spearman correlation, top-k recall (the fraction
of the reference's k largest-magnitude units among the result's k largest)
and the false negatives (the reference's top units the result misses).

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> r = al.attribute(lm, "When Mary and John went", target=" to", units="heads",
    ...                  method="kernelshap", ablation="zero")
    >>> a = al.evaluate.agreement(r, "exact", lm=lm, k=3)
    >>> 0.0 <= a.recall <= 1.0 and a.n_units == len(r)
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from ..question import check_scores
from .lds import spearman

__all__ = ["Agreement", "agreement"]


@dataclass
class Agreement:
    """How well a result agrees with a reference.

    Example:
        >>> Agreement(1.0, 1.0, 1.0, 3, [], 8).recall
        1.0
    """

    pearson: float
    spearman: float
    recall: float
    k: int
    false_negatives: list[dict[str, Any]] = field(default_factory=list)
    n_units: int = 0

    def __repr__(self) -> str:
        return (
            f"Agreement(pearson={self.pearson:.3f}, spearman={self.spearman:.3f}, "
            f"recall@{self.k}={self.recall:.3f}, false_negatives={len(self.false_negatives)}, "
            f"n_units={self.n_units})"
        )


def _exact(lm: Any, r: Any, how: dict[str, Any]) -> Any:
    """Exact occlusion on the question ``r`` answers, with the same ablation and
    direction: the generic occlusion estimator on the same bound question."""
    from ..methods.perturbation import Occlusion
    from .lds import _bind, _question

    q, u, opts = _question(lm, r, None, None, None, "compute exact occlusion for", **how)
    direction = r.meta.get("direction", r.params.get("direction", "noising"))
    occ = Occlusion(direction if direction in ("noising", "denoising") else "noising")
    bound = _bind(lm, q, u, **opts)
    scores, diag = occ.estimate(bound)
    out = bound.result(scores, occ, diagnostics=diag)
    if "question" in r.meta:
        out.meta["question"] = r.meta["question"]
    return out


def agreement(
    result: Any,
    reference: Any,
    lm: Any = None,
    k: int = 10,
    *,
    ablation: Any = None,
    counterfactual: Any = None,
    **options: Any,
) -> Agreement:
    """Agreement of ``result`` with ``reference`` (an Attribution, or ``"exact"``).

    Args:
        result: an :class:`attrlab.Attribution`.
        reference: another result over the same units (aligned by label), or
            ``"exact"``: exact occlusion on the question ``result`` answers, with
            the same ablation and direction (needs ``lm``).
        lm: the wrapped model, for ``"exact"``.
        k: the top-k size for recall and false negatives.
        ablation, counterfactual, **options: for ``"exact"``, another ablation
            than the result's and the units' bind options (``batch_size`` …).

    Raises:
        InputError: no model for ``"exact"``, fewer than two common units.
        UnitMismatchError: the units cannot be matched by label (other kinds,
            other label columns, no unit in common).
        NonFiniteError: NaN or infinite scores.

    Example:
        >>> import torch
        >>> from attrlab.result import Attribution
        >>> a = Attribution(torch.tensor([3.0, 1.0, -2.0]), {"layer": [0, 1, 2]}, "mlp", "x")
        >>> b = Attribution(torch.tensor([-2.1, 3.2, 0.9]), {"layer": [2, 0, 1]}, "mlp", "y")
        >>> agreement(a, b, k=2).recall
        1.0
    """
    from ..result import Attribution

    if not isinstance(result, Attribution):
        raise InputError(f"agreement() needs an Attribution, got {type(result).__name__}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    check_scores(result, "cannot compare this result")
    if isinstance(reference, str):
        if reference != "exact":
            raise InputError(f"reference must be an Attribution or 'exact', got {reference!r}")
        if lm is None:
            raise InputError("agreement(r, 'exact') runs exact occlusion: pass lm=")
        how = {"ablation": ablation, "counterfactual": counterfactual, "options": options}
        reference = _exact(lm, result, how)
    elif not isinstance(reference, Attribution):
        raise InputError(
            f"reference must be an Attribution or 'exact', got {type(reference).__name__}"
        )
    elif ablation is not None or counterfactual is not None or options:
        raise InputError("ablation=, counterfactual= and bind options are for reference='exact'")
    check_scores(reference, "cannot compare with this reference")
    a, b = result.align(reference)
    x = a.scores.double().reshape(-1, len(a)).mean(0).numpy()
    y = b.scores.double().reshape(-1, len(b)).mean(0).numpy()
    n = len(x)
    if n < 2:
        raise InputError("agreement needs at least two common units")
    k = min(int(k), n)
    pear = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else float("nan")
    top_ref = list(np.argsort(-np.abs(y), kind="stable")[:k])
    top_mine = set(np.argsort(-np.abs(x), kind="stable")[:k].tolist())
    missed = [i for i in top_ref if i not in top_mine]
    fns = [
        {**{c: v[i] for c, v in b.units.items()}, "reference": float(y[i]), "score": float(x[i])}
        for i in missed
    ]
    return Agreement(
        pearson=pear,
        spearman=spearman(x, y),
        recall=1.0 - len(missed) / k,
        k=k,
        false_negatives=fns,
        n_units=n,
    )
