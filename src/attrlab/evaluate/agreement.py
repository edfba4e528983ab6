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


def _exact(lm: Any, r: Any) -> Any:
    """Exact occlusion with the result's question and ablation."""
    from ..ablations import from_json
    from ..attribute import attribute
    from ..question import bind
    from .lds import units_of

    q = bind(lm, r, what="compute exact occlusion for this result")
    spec = r.meta.get("ablation")
    abl = q.ablation or (from_json(spec) if isinstance(spec, dict) else None)
    direction = r.meta.get("direction", r.params.get("direction", "noising"))
    if direction not in ("noising", "denoising"):
        direction = "noising"
    return attribute(
        lm,
        q.inputs,
        target=q.target,
        units=units_of(r),
        method="occlusion",
        counterfactual=q.counterfactual if abl is None else None,
        ablation=abl,
        direction=direction,
    )


def agreement(result: Any, reference: Any, lm: Any = None, k: int = 10) -> Agreement:
    """Agreement of ``result`` with ``reference`` (an Attribution, or ``"exact"``).

    Args:
        result: an :class:`attrlab.Attribution`.
        reference: another result over the same units (aligned by label), or
            ``"exact"``: exact occlusion with the same ablation (needs ``lm``).
        lm: the wrapped model, for ``"exact"``.
        k: the top-k size for recall and false negatives.

    Raises:
        InputError: no model for ``"exact"``, different unit kinds, no common units.
        NonFiniteError: NaN or infinite scores.

    Example:
        >>> import torch
        >>> from attrlab.result import Attribution
        >>> a = Attribution(torch.tensor([3.0, 1.0, -2.0]), {"layer": [0, 1, 2]}, "mlp", "x")
        >>> b = Attribution(torch.tensor([-2.1, 3.2, 0.9]), {"layer": [2, 0, 1]}, "mlp", "y")
        >>> agreement(a, b, k=2).recall
        1.0
    """
    check_scores(result, "cannot compare this result")
    if isinstance(reference, str):
        if reference != "exact":
            raise InputError(f"reference must be an Attribution or 'exact', got {reference!r}")
        if lm is None:
            raise InputError("agreement(r, 'exact') runs exact occlusion: pass lm=")
        reference = _exact(lm, result)
    check_scores(reference, "cannot compare with this reference")
    a, b = result.align(reference)
    x = a.scores.double().reshape(-1, len(a)).mean(0).numpy()
    y = b.scores.double().reshape(-1, len(b)).mean(0).numpy()
    n = len(x)
    if n < 2:
        raise InputError("agreement needs at least two common units")
    k = max(1, min(int(k), n))
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
