"""Edge attribution patching: EAP and EAP-IG (scores for every edge).

EAP (Syed et al., "Attribution Patching Outperforms Automated Circuit
Discovery") scores an edge ``u -> v`` (see :mod:`attrlab.units.edges`) by

    EAP(u, v) = sum_pos (a_u(counterfactual) - a_u(clean)) . d metric / d x_v

where ``x_v`` is the input of ``v`` and the gradient flows through ``v``
only: the effect, linearized at the clean run, of patching that one edge. All
edges come from one clean forward+backward and one counterfactual forward:
one matrix product of the upstream differences ``[U, b*pos*d]`` with the
per-node input gradients ``[V, b*pos*d]`` (from
:func:`attrlab.units.edges.input_gradients`).

EAP-IG (Hanna et al., "Have Faith in Faithfulness", 2024) averages the input
gradient over ``steps`` points between the clean and the counterfactual run
(midpoint rule; all steps in one batched forward/backward):

* ``variant="inputs"``: the residual entering block 0 is interpolated;
* ``variant="activations"``: every upstream node's output is shifted by
  ``alpha * (a_u(counterfactual) - a_u(clean))`` at once.

Scores are means over prompts and follow attrlab's one sign: the edge's
contribution, ``-EAP(u, v)`` (the paper's quantity is
``r.effect_of_patching()``). The contribution is also the gradient of the
metric with respect to a keep-mask on the edge, which the tests use as a
second, independent implementation.

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
from torch import Tensor

from ..errors import InputError
from ..model.interventions import Intervention
from ..model.wrapper import LM, Inputs
from ..result import Attribution
from ..targets import Target
from ..units.base import Units
from ..units.edges import EdgeGraph, Edges, edge_activations, input_gradients
from .atp import prepare_pair, same_batch, uses_last_only, warn_if_same
from .base import Method, check_int, register

__all__ = ["EAP", "EAPIG", "edge_scores"]


def edge_scores(diff: Tensor, grads: Tensor, graph: EdgeGraph) -> Tensor:
    """``[n_edges]`` scores from upstream differences ``[U, b, p, d]`` and
    downstream input gradients ``[V, b, p, d]`` (mean over ``b``).

    Example:
        >>> g = EdgeGraph.build(1, 1, qkv=False)
        >>> edge_scores(torch.ones(3, 1, 2, 4), torch.ones(3, 1, 2, 4), g).tolist()
        [8.0, 8.0, 8.0, 8.0, 8.0, 8.0]
    """
    n_b = diff.shape[1]
    if graph.n_pos:
        full = torch.einsum("ubpd,vbpd->uvp", diff, grads.to(diff.dtype)) / n_b
        return graph.from_matrix(full).float()
    u = diff.reshape(diff.shape[0], -1)
    v = grads.reshape(grads.shape[0], -1).to(u.dtype)
    full = (u @ v.T) / n_b  # [U, V] (in the model's dtype)
    return graph.from_matrix(full).float()


def _result(
    lm: LM,
    graph: EdgeGraph,
    scores: Tensor,
    method: Method,
    target: Target,
    diagnostics: dict[str, Any],
) -> Attribution:
    # one sign: contributions, -(linearized effect of patching the edge);
    # r.effect_of_patching() gives the effect
    return Attribution(
        -scores,
        units=graph.labels(),
        unit_kind="edges",
        method=method.name,
        target=target.describe(),
        params={
            **method.params(),
            "units": {"kind": "edges", "qkv": graph.qkv, "n_pos": graph.n_pos},
        },
        model_id=lm.name,
        diagnostics=diagnostics,
        meta={
            "direction": "noising",
            "upstream": graph.upstream,
            "downstream": graph.downstream,
            "n_layers": graph.n_layers,
            "n_pos": graph.n_pos,
            "n_heads": graph.n_heads,
            "n_kv_heads": graph.n_kv_heads,
            "parallel": graph.parallel,
        },
    )


def _graph(lm: LM, units: Units, n_pos: int) -> EdgeGraph:
    if not isinstance(units, Edges):
        raise InputError(f"edge attribution needs units='edges', got {units.kind!r}")
    return units.graph(lm, n_pos=n_pos)


@register("eap", ("edges",))
class EAP(Method):
    """EAP: every edge's patching effect linearized at the clean run.

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
    ) -> Attribution:
        clean, cf = prepare_pair(lm, inputs, target, counterfactual)
        graph = _graph(lm, units, clean.shape[1])
        last = uses_last_only(target)
        with torch.no_grad():
            ref, logits_cf = edge_activations(lm, cf, graph, return_logits=True, last_only=last)
            m_cf = target(logits_cf, cf).float().mean()
        grads, m, act = input_gradients(
            lm, clean, graph, target, last_only=last, with_activations=True
        )
        if same_batch(clean, cf):  # exactly zero differences, not rounding noise
            ref = act
        same = warn_if_same(float(m.float().mean()), float(m_cf))
        diag = {
            "metric_clean": float(m.float().mean()),
            "metric_counterfactual": float(m_cf),
            "counterfactual_changes_target": not same,
        }
        return _result(lm, graph, edge_scores(ref - act, grads, graph), self, target, diag)


@register("eap-ig", ("edges",))
class EAPIG(Method):
    """EAP-IG: EAP with the input gradient integrated from clean to counterfactual.

    Args:
        steps: interpolation points (midpoint rule), run as one batch.
        variant: ``"inputs"`` (interpolate the residual entering block 0) or
            ``"activations"`` (shift every upstream node's output).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", units="edges", method="eap-ig",
        ...                  counterfactual="a c c", steps=4)
        >>> r.params["steps"]
        4
    """

    def __init__(self, steps: int = 8, variant: str = "inputs"):
        steps = check_int("eap-ig", "steps", steps)
        if variant not in ("inputs", "activations"):
            raise InputError(f"variant must be 'inputs' or 'activations', got {variant!r}")
        self.steps = steps
        self.variant = variant

    def attribute(
        self,
        lm: LM,
        inputs: Inputs,
        target: Target,
        units: Units,
        counterfactual: Inputs | None = None,
    ) -> Attribution:
        clean, cf = prepare_pair(lm, inputs, target, counterfactual)
        graph = _graph(lm, units, clean.shape[1])
        last = uses_last_only(target)
        with torch.no_grad():
            ref, logits_cf = edge_activations(lm, cf, graph, return_logits=True, last_only=last)
            act, logits = edge_activations(lm, clean, graph, return_logits=True, last_only=last)
            if same_batch(clean, cf):
                ref = act
            m_cf = target(logits_cf, cf).float().mean()
            m_clean = target(logits, clean).float().mean()
        same = warn_if_same(float(m_clean), float(m_cf))
        diff = ref - act  # [U, b, p, d]
        n_b, k = clean.shape[0], self.steps
        alphas = (torch.arange(k, dtype=diff.dtype) + 0.5) / k
        rows = clean.repeat(k)  # prompt-major: row b * k + step
        a_rows = alphas.repeat(n_b)[:, None, None]  # [rows, 1, 1]
        ivs: list[Intervention] = []
        if self.variant == "inputs":
            start = act[0].repeat_interleave(k, 0) + a_rows * diff[0].repeat_interleave(k, 0)
            ivs.append(Intervention("blocks.0.resid_pre", start))
        else:
            ivs.append(
                Intervention(
                    "blocks.0.resid_pre", a_rows * diff[0].repeat_interleave(k, 0), op="add"
                )
            )
            H = graph.n_heads
            for layer in range(graph.n_layers):
                first, mlp = graph.up_index(layer)
                dh = diff[first : first + H].permute(1, 2, 0, 3).repeat_interleave(k, 0)
                ivs.append(
                    Intervention(f"blocks.{layer}.attn.head_out", a_rows[..., None] * dh, op="add")
                )
                ivs.append(
                    Intervention(
                        f"blocks.{layer}.mlp.out",
                        a_rows * diff[mlp].repeat_interleave(k, 0),
                        op="add",
                    )
                )
        grads, _ = input_gradients(lm, rows, graph, target, interventions=ivs, last_only=last)
        g = grads.reshape(grads.shape[0], n_b, k, *grads.shape[2:]).mean(2)
        scores = edge_scores(diff, g, graph)
        diag = {
            "metric_clean": float(m_clean),
            "metric_counterfactual": float(m_cf),
            "counterfactual_changes_target": not same,
            "sum_of_scores": float(scores.sum()),
            "metric_change": float(m_cf - m_clean),
        }
        return _result(lm, graph, scores, self, target, diag)
