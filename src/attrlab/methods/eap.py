"""Edge attribution patching: EAP and EAP-IG, computed over edge gates.

TRANSITIONAL: both are the gradient estimators over the gates of
:class:`attrlab.units.edges.EdgesBound` — EAP the gradient at ``g = 1``, EAP-IG
Integrated Gradients from ``g = 0`` (every edge ablated) to ``g = 1`` — and
become the ``eap`` / ``eap-ig`` presets of :mod:`attrlab.methods.gradient`;
this module then goes (nothing here is specific to edges beyond the bound kind).

EAP (Syed et al., "Attribution Patching Outperforms Automated Circuit
Discovery") scores an edge ``u -> v`` (see :mod:`attrlab.units.edges`) by

    EAP(u, v) = sum_pos (a_u(clean) - a_u(ablated)) . d metric / d x_v

where ``x_v`` is the input of ``v`` and the gradient flows through ``v``
only: the derivative of the target with respect to the edge's gate, one
clean forward and backward for every edge (``EdgesBound.gate_grad``). Scores
follow attrlab's one sign, the edge's contribution (the paper's "effect of
patching" is ``r.effect_of_patching()``).

EAP-IG (Hanna et al., "Have Faith in Faithfulness") integrates that gradient
along the gates from every edge ablated to every edge kept (Gauss-Legendre,
``steps`` points, several per forward): the scores sum to ``f(all) - f(none)``
up to ``completeness_error``.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> r = al.attribute(lm, "a b c", target=" a", units="edges", method="eap",
    ...                  counterfactual="a c c")
    >>> len(r) == al.units.Edges().graph(lm).n_edges
    True
"""

from __future__ import annotations

from typing import Any

import torch

from ..ablations import Ablation
from ..ablations import resolve as resolve_ablation
from ..errors import InputError
from ..model.wrapper import LM, Inputs
from ..result import Attribution
from ..targets import Target
from ..units.base import Units
from ..units.edges import Edges, EdgesBound
from .atp import warn_if_same
from .base import Method, check_int, register

__all__ = ["EAP", "EAPIG"]


def _bind(
    lm: LM, inputs: Inputs, target: Target, units: Units, counterfactual: Any, ablation: Any
) -> EdgesBound:
    if not isinstance(units, Edges):
        raise InputError(f"edge attribution needs units='edges', got {units.kind!r}")
    abl = ablation if isinstance(ablation, Ablation) else None
    abl = abl or resolve_ablation(ablation, counterfactual=counterfactual)
    return units.bind(lm, inputs, target, abl)


def _diagnostics(bound: EdgesBound, clean: float | None = None) -> dict[str, Any]:
    clean = float(bound.clean()[0]) if clean is None else clean
    ablated = bound.ablated_value
    if ablated is None:  # zero / mean: the all-ablated run through the patcher
        ablated = float(bound.empty()[0])
    same = bound.identical or warn_if_same(clean, ablated)
    return {  # "value": as the gate-gradient presets report it
        "value": clean,
        "metric_clean": clean,
        "metric_counterfactual": ablated,
        "counterfactual_changes_target": not same,
    }


@register("eap", ("edges",))
class EAP(Method):
    """EAP: every edge's gate gradient at the clean run (``g = 1``).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", units=al.units.Edges(qkv=False),
        ...                  method="eap", counterfactual="a c c")
        >>> r.unit_kind
        'edges'
    """

    def attribute(
        self,
        lm: LM,
        inputs: Inputs,
        target: Target,
        units: Units,
        counterfactual: Inputs | None = None,
        ablation: Any = None,
    ) -> Attribution:
        bound = _bind(lm, inputs, target, units, counterfactual, ablation)
        vals, grads = bound.gate_grad(torch.ones(1, bound.n, dtype=torch.float64))
        diag = _diagnostics(bound, float(vals[0, 0]))  # f at g = 1 is the clean value
        return bound.result(grads[0, 0], self, diag, meta={"direction": "noising"})


@register("eap-ig", ("edges",))
class EAPIG(Method):
    """EAP-IG: Integrated Gradients over edge gates, from every edge ablated
    (``g = 0``) to every edge kept (``g = 1``).

    Args:
        steps: Gauss-Legendre points (several per forward).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", units="edges", method="eap-ig",
        ...                  counterfactual="a c c", steps=4)
        >>> r.params["steps"]
        4
    """

    def __init__(self, steps: int = 8):
        self.steps = check_int("eap-ig", "steps", steps)

    def attribute(
        self,
        lm: LM,
        inputs: Inputs,
        target: Target,
        units: Units,
        counterfactual: Inputs | None = None,
        ablation: Any = None,
    ) -> Attribution:
        from .gradient import quadrature

        bound = _bind(lm, inputs, target, units, counterfactual, ablation)
        alphas, weights = quadrature("gausslegendre", self.steps)
        g = alphas[:, None].expand(len(alphas), bound.n)
        scores, _ = bound.gate_grad_sum(g, weights)
        diag = _diagnostics(bound)
        empty = float(bound.empty()[0])
        change = diag["metric_clean"] - empty
        err = float(scores.sum()) - change
        diag.update(  # as the IG estimator reports them
            {
                "delta": change,
                "baseline_value": empty,
                "completeness_error": err,
                "relative_completeness_error": abs(err) / max(abs(change), 1e-12),
            }
        )
        return bound.result(scores[0], self, diag, meta={"direction": "noising"})
