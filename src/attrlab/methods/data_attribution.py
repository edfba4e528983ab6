"""Training-data attribution methods for ``units="train"``: TRAK, TracIn-CP, gradient dot / cosine,
EK-FAC / K-FAC influence functions (on a store written by :func:`attrlab.data.fit_factors`).

The maths lives in :mod:`attrlab.data`; these classes connect it to
``al.attribute``. The target is the answer text whose log-probability after
the prompt is explained (one per prompt, or one for all).

Example:
    >>> import tempfile, attrlab as al, attrlab.data as ad
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> docs = ["Paris is a city in France.", "Rome is a city in Italy."]
    >>> store = ad.featurize(lm, ad.Examples.from_texts(lm, docs, ids=["d0", "d1"]),
    ...                      tempfile.mkdtemp(), proj_dim=32)
    >>> r = al.attribute(lm, "The capital of France is", target=" Paris",
    ...                  units=al.units.TrainingExamples(store), method="trak")
    >>> r.units["id"]
    ['d0', 'd1']
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..errors import InputError
from .base import Method, register


def _queries(lm: Any, inputs: Any, target: Any) -> Any:
    from ..data.featurize import Examples

    prompts = [inputs] if isinstance(inputs, str) else list(inputs)
    if target is None:
        raise InputError("training-data attribution needs target=<answer text> (e.g. ' Paris')")
    answers = [target] * len(prompts) if isinstance(target, str) else list(target)
    if not all(isinstance(a, str) for a in answers):
        raise InputError(f"target must be answer text (a string or one per prompt), got {target!r}")
    return Examples.from_texts(lm, prompts, answers)


def _check_units(units: Any) -> Any:
    from ..units.examples import TrainingExamples

    if not isinstance(units, TrainingExamples):
        raise InputError("use units=al.units.TrainingExamples(store)")
    return units


class _DataMethod(Method):
    target_kind = "raw"

    def _run(self, lm: Any, inputs: Any, target: Any, units: Any) -> Any:
        raise NotImplementedError

    def attribute(
        self, lm: Any, inputs: Any, target: Any, units: Any, counterfactual: Any = None
    ) -> Any:
        if counterfactual is not None:
            raise InputError(f"{self.name} does not use a counterfactual")
        u = _check_units(units)
        t0 = time.perf_counter()
        r = self._run(lm, _queries(lm, inputs, target), target, u)
        r.diagnostics["seconds"] = time.perf_counter() - t0
        if r.scores.dim() == 2 and r.scores.shape[0] == 1:
            r.scores = r.scores[0]
            r.rows = {}
        r.target = f"logprob({target!r})"
        r.params.update(self.params())
        return r


@register("trak", units=("train",))
class Trak(_DataMethod):
    """TRAK over the units' feature stores (an ensemble if several).

    Args:
        lambda_: ridge added to ``Phi^T Phi`` (None: ``reg`` times its mean diagonal).
        reg: relative ridge.

    Example:
        >>> Trak(reg=1e-3).reg
        0.001
    """

    def __init__(self, lambda_: float | None = None, reg: float = 0.1):
        self.lambda_ = lambda_
        self.reg = reg

    def _run(self, lm: Any, queries: Any, target: Any, u: Any) -> Any:
        from ..data.trak import TRAK

        stores = u.open()
        return TRAK(stores, lambda_=self.lambda_, reg=self.reg).attribute(
            u.models(lm, len(stores)), queries, texts=u.texts
        )


@register("tracin", ("train",))
class TracIn(_DataMethod):
    """TracIn-CP: loss-gradient dot products summed over checkpoints, weighted by learning rates.

    Example:
        >>> TracIn(lrs=[0.1, 0.1]).lrs
        [0.1, 0.1]
    """

    def __init__(self, lrs: float | Sequence[float] = 1.0):
        self.lrs = lrs

    def _run(self, lm: Any, queries: Any, target: Any, u: Any) -> Any:
        from ..data.tracin import tracin

        stores = u.open()
        return tracin(stores, u.models(lm, len(stores)), queries, self.lrs, texts=u.texts)


@register("grad-dot", ("train",))
class GradDot(_DataMethod):
    """Dot product of query and training loss gradients.

    Example:
        >>> GradDot().name
        'grad-dot'
    """

    def _run(self, lm: Any, queries: Any, target: Any, u: Any) -> Any:
        from ..data.tracin import grad_similarity

        stores = u.open()
        return grad_similarity(stores, u.models(lm, len(stores)), queries, "dot", texts=u.texts)


@register("grad-cos", ("train",))
class GradCos(_DataMethod):
    """Cosine similarity of query and training loss gradients.

    Example:
        >>> GradCos().name
        'grad-cos'
    """

    def _run(self, lm: Any, queries: Any, target: Any, u: Any) -> Any:
        from ..data.tracin import grad_similarity

        stores = u.open()
        return grad_similarity(stores, u.models(lm, len(stores)), queries, "cos", texts=u.texts)


class _InfluenceMethod(_DataMethod):
    strategy = "ekfac"

    def __init__(
        self,
        damping: float | None = None,
        fit: str | None = None,
        measurement: str = "logprob",
        query_rank: int | None = None,
    ):
        if measurement not in ("logprob", "margin"):
            raise InputError(f"measurement must be 'logprob' or 'margin', got {measurement!r}")
        if query_rank is not None and (
            isinstance(query_rank, bool) or not isinstance(query_rank, int) or query_rank < 1
        ):
            raise InputError(
                f"query_rank must be None (full query gradients) or an integer >= 1, got {query_rank!r}"
            )
        self.damping = damping
        self.fit = fit
        self.measurement = measurement
        self.query_rank = query_rank

    def _run(self, lm: Any, queries: Any, target: Any, u: Any) -> Any:
        from ..data.influence import Influence

        stores = u.open()
        if len(stores) != 1:
            raise InputError(
                f"{self.name} scores against one store written by attrlab.data.fit_factors, "
                f"got {len(stores)}"
            )
        from ..data.outputs import AnswerLogProb, AnswerMargin

        inf = Influence(
            stores[0],
            strategy=self.strategy,
            damping=self.damping,
            fit=self.fit,
            query_rank=self.query_rank,
        )
        out = AnswerLogProb() if self.measurement == "logprob" else AnswerMargin()
        return inf.attribute(u.models(lm, 1)[0], queries, output=out, texts=u.texts)


@register("ekfac", ("train",))
class Ekfac(_InfluenceMethod):
    """Influence functions with EK-FAC curvature (``attrlab.data.Influence``).

    Args:
        damping: added to the corrected eigenvalues; None: 0.1 x their mean per
            module (Kronfluence's heuristic).
        fit: which factor fit of the store (when it holds several).
        measurement: the query's ``"logprob"`` of the answer (default, as in
            Kronfluence's LM examples) or its per-token ``"margin"`` summed.
        query_rank: hold each preconditioned query gradient as its rank-r SVD per
            module (Kronfluence's ``query_gradient_low_rank``; None: full).

    Example:
        >>> Ekfac(damping=1e-3).damping
        0.001
    """

    strategy = "ekfac"


@register("kfac", ("train",))
class Kfac(_InfluenceMethod):
    """Influence functions with K-FAC curvature ``(S ⊗ A + λI)^-1`` (``attrlab.data.Influence``).

    Example:
        >>> Kfac().name
        'kfac'
    """

    strategy = "kfac"
