"""Finding circuits: extraction from edge scores, and ACDC.

A circuit (:class:`attrlab.circuit.Circuit`) is a keep-mask over the edges of
a model's graph. Running one — the target with every edge outside it ablated —
is ``f(keep)`` of the bound edge kind (:class:`attrlab.units.edges.EdgesBound`);
its evaluation (faithfulness, completeness, minimality) is in
:mod:`attrlab.evaluate.circuits`.

Extraction (:func:`extract_circuit`): the ``top_n`` edges by ``|score|``, the
edges with ``|score| >= threshold``, or ``greedy`` growth from the logits
(add the best-scoring edge into a node already in the circuit). Dangling
edges (from a node nothing feeds, or into a node that feeds nothing) are pruned:
with counterfactual patching this does not change what the circuit computes.

ACDC (:func:`acdc`; Conmy et al., "Towards Automated Circuit Discovery for
Mechanistic Interpretability"): visit downstream nodes from the logits back,
try removing each incoming edge, keep it removed if the KL divergence to the
full model's next-token distribution (or ``|f(circuit) - f(model)|`` for a
target) grows by less than ``tau``. The decisions are sequential, but the
runs are batched speculatively: one forward evaluates the next several
removals assuming the recent decisions continue (all accepted, or all
rejected), and every value up to the first decision that breaks the
assumption is exact, so the result is ACDC's own with far fewer forwards.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> r = al.attribute(lm, "a b c", target=" a", units="edges", method="eap",
    ...                  counterfactual="a c c")
    >>> c = extract_circuit(r, top_n=10)
    >>> 0 < c.n_edges <= 10
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..ablations import Ablation
from ..ablations import resolve as resolve_ablation
from ..circuit import Circuit, node_rank, prune_dangling
from ..errors import InputError
from ..model.wrapper import LM, Inputs
from ..result import Attribution
from ..targets import KL, Target
from ..targets import resolve as resolve_target
from ..units.base import Units
from ..units.edges import EdgeGraph, Edges, EdgesBound
from .base import Method, check_float, register

__all__ = ["ACDC", "Circuit", "acdc", "extract_circuit", "prune_dangling"]


def _graph_from(attr: Attribution) -> EdgeGraph:
    """The :class:`EdgeGraph` an edge result scores (from its ``meta``)."""
    m = attr.meta
    if attr.unit_kind != "edges":
        raise InputError("extract_circuit needs an edge attribution (units='edges')")
    if isinstance(m.get("graph"), dict):
        return EdgeGraph.from_meta(m["graph"])
    if "n_layers" not in m:
        raise InputError("this edge attribution does not record its graph (meta['graph'])")
    units = attr.params.get("units") or m.get("units_params") or {}
    return EdgeGraph.from_meta({**m, "qkv": m.get("qkv", units.get("qkv", True))})


def extract_circuit(
    attr: Attribution,
    top_n: int | None = None,
    threshold: float | None = None,
    fraction: float | None = None,
    greedy: bool = False,
    prune: bool = True,
) -> Circuit:
    """A :class:`Circuit` from edge scores (EAP, EAP-IG ...).

    Give exactly one of ``top_n`` (edges by ``|score|``), ``fraction`` (of all
    edges) or ``threshold`` (``|score| >= threshold``). With ``greedy=True``
    the circuit grows from the logits: repeatedly add the highest-``|score|``
    edge into a node already in the circuit (``top_n``/``fraction`` edges).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", units="edges", method="eap",
        ...                  counterfactual="a c c")
        >>> extract_circuit(r, fraction=0.1, greedy=True).fraction <= 0.1
        True
    """
    graph = _graph_from(attr)
    scores = attr.scores if attr.scores.dim() == 1 else attr.scores.mean(0)
    n = graph.n_edges
    given = [x is not None for x in (top_n, threshold, fraction)]
    if sum(given) != 1:
        raise InputError("give exactly one of top_n=, threshold=, fraction=")
    if fraction is not None:
        if not 0 <= fraction <= 1:
            raise InputError("fraction must be in [0, 1]")
        top_n = int(math.floor(fraction * n))
    if top_n is not None and top_n < 0:
        raise InputError("top_n must be >= 0")
    mag = scores.abs().double()
    if threshold is not None:
        mask = mag >= threshold
    elif not greedy:
        order = torch.argsort(mag, descending=True, stable=True)[: int(top_n or 0)]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order] = True
    else:
        idx = graph.edge_index()
        rep = max(1, graph.n_pos)
        ups = [graph.upstream[u] for u in idx[:, 0].tolist() for _ in range(rep)]
        readers = [graph.readers_of(graph.downstream[v]) for v in idx[:, 1].tolist()]
        downs = [r for r in readers for _ in range(rep)]
        mask = torch.zeros(n, dtype=torch.bool)
        in_circuit = {"logits"}
        ranked: list[int] = torch.argsort(mag, descending=True, stable=True).tolist()
        for _ in range(int(top_n or 0)):
            pick = next(
                (i for i in ranked if not mask[i] and in_circuit.intersection(downs[i])), None
            )
            if pick is None:
                break
            mask[pick] = True
            in_circuit.add(ups[pick])
    if prune:
        mask = prune_dangling(graph, mask)
    meta = {
        "how": "greedy" if greedy else ("threshold" if threshold is not None else "top_n"),
        "top_n": top_n,
        "threshold": threshold,
        "fraction": fraction,
        "source_method": attr.method,
        "target": attr.target,
        "model_id": attr.model_id,
    }
    return Circuit(graph, mask, scores, meta)


# ---------------------------------------------------------------------- ACDC
def _acdc_order(graph: EdgeGraph) -> list[int]:
    """Edge numbers in ACDC's visiting order: downstream nodes from the logits
    back, each node's upstream edges from the latest writer back."""
    index = {(u, v): i for i, (u, v) in enumerate(graph.edge_index().tolist())}
    order = sorted(
        range(len(graph.downstream)),
        key=lambda v: -node_rank(EdgeGraph.node_of(graph.downstream[v])),
    )
    out = []
    for v in order:
        for u in reversed(range(len(graph.upstream))):
            if graph.adjacency[u, v]:
                out.append(index[(u, v)])
    return out


def run_acdc(
    bound: EdgesBound, tau: float, distance: bool, progress: bool = False, max_batch: int = 32
) -> tuple[Tensor, Tensor, float, int]:
    """ACDC on a bound edge question: ``(keep [n_edges] bool, increase of the
    criterion when each edge was tried [n_edges], final criterion, forwards)``.

    The criterion is ``f(keep)`` (a KL target) or, with ``distance``,
    ``|f(keep) - f(all)|``. Removals are evaluated speculatively in batches
    (see the module docs); the decisions equal one-at-a-time ACDC's.
    """
    from tqdm.auto import tqdm

    if bound.graph.n_pos:
        raise InputError("ACDC here prunes edges summed over positions; use Edges()")
    n = bound.n
    full = float(bound.clean()[0])

    def crit(v: Tensor) -> Tensor:
        return (v - full).abs() if distance else v

    keep = torch.ones(n, dtype=torch.bool)
    current = float(crit(bound.clean())[0])
    delta = torch.zeros(n, dtype=torch.float64)
    order = _acdc_order(bound.graph)
    cap = max(1, min(max_batch, bound._masks_per_forward()))
    k, accepting, forwards = min(4, cap), True, 0
    pbar = tqdm(total=len(order), disable=not progress, desc="ACDC")
    i = 0
    while i < len(order):
        cand = order[i : i + k]
        rows = keep.repeat(len(cand), 1)
        for j, e in enumerate(cand):
            if accepting:  # row j: every earlier candidate removed as well
                rows[j:, e] = False
            else:  # row j: only this candidate removed
                rows[j, e] = False
        vals = crit(bound.f(rows)[:, 0]).tolist()
        forwards += 1
        done = 0
        for j, e in enumerate(cand):
            new = vals[j]
            delta[e] = new - current
            accept = new - current < tau
            done += 1
            if accept:
                keep[e] = False
                current = new
            if accept != accepting:  # later rows assumed the other decision
                accepting = accept
                break
        i += done
        pbar.update(done)
        # speculate further while the guesses hold, less when they do not
        k = min(cap, 2 * k) if done == len(cand) else max(1, min(cap, done))
    pbar.close()
    return keep, delta, current, forwards


def _acdc_bound(
    lm: LM,
    inputs: Inputs,
    counterfactual: Inputs | None,
    units: Edges | None,
    target: Any,
    ablation: Any,
    reference: Any,
    batch_size: int | None,
) -> tuple[EdgesBound, bool]:
    units = units or Edges()
    if not isinstance(units, Edges):
        raise InputError("ACDC needs units='edges'")
    if units.per_position:
        raise InputError("ACDC here prunes edges summed over positions; use Edges()")
    abl: Ablation | None
    if isinstance(ablation, Ablation):
        abl = ablation
    else:
        abl = resolve_ablation(ablation, counterfactual=counterfactual, reference=reference)
    if target is None:
        tgt: Target = KL()
    elif isinstance(target, Target):
        tgt = target
    else:
        tgt = resolve_target(target, lm)
    bound = units.bind(lm, inputs, tgt, abl, batch_size=batch_size)
    return bound, target is not None


def acdc(
    lm: LM,
    inputs: Inputs,
    counterfactual: Inputs | None = None,
    tau: float = 0.01,
    units: Edges | None = None,
    target: Any = None,
    progress: bool = False,
    ablation: Any = None,
    reference: Any = None,
    batch_size: int | None = None,
) -> Circuit:
    """ACDC edge pruning (see the module docs); returns the :class:`Circuit`.

    The criterion is the KL divergence of the last position's next-token
    distribution from the full model's, averaged over prompts; with
    ``target=`` it is instead ``|metric(circuit) - metric(model)|``. Edges
    outside the circuit are ablated with ``ablation`` (default: the
    ``counterfactual`` prompt; ``"zero"``, ``"mean"``/``"resample"`` with
    ``reference=``).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> c = acdc(lm, "a b c", "a c c", tau=0.5, units=al.units.Edges(qkv=False))
        >>> c.n_edges <= al.units.Edges(qkv=False).graph(lm).n_edges
        True
    """
    bound, distance = _acdc_bound(
        lm, inputs, counterfactual, units, target, ablation, reference, batch_size
    )
    keep, delta, final, forwards = run_acdc(bound, tau, distance, progress)
    meta = {
        "how": "acdc",
        "tau": tau,
        "criterion": bound.target_name if distance else "kl",
        "final_distance": final,
        "n_forwards": forwards,
        "model_id": lm.name,
    }
    return Circuit(bound.graph, keep, delta, meta)


@register("acdc", ("edges",))
class ACDC(Method):
    """ACDC as an attribution method: scores are each edge's increase of the
    criterion when it was tried for removal; the circuit's mask is in
    ``extra["mask"]`` (see :func:`acdc`).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=None, units=al.units.Edges(qkv=False),
        ...                  method="acdc", counterfactual="a c c", tau=0.5)
        >>> "mask" in r.extra
        True
    """

    target_kind = "raw"

    def __init__(self, tau: float = 0.01, progress: bool = False, batch_size: int | None = None):
        self.tau = check_float("acdc", "tau", tau, strict=False)
        self.progress = progress
        self.batch_size = batch_size

    def attribute(
        self,
        lm: LM,
        inputs: Inputs,
        target: Target,
        units: Units,
        counterfactual: Inputs | None = None,
        ablation: Any = None,
    ) -> Attribution:
        if not isinstance(units, Edges):
            raise InputError("ACDC needs units='edges'")
        bound, distance = _acdc_bound(
            lm, inputs, counterfactual, units, target, ablation, None, self.batch_size
        )
        keep, delta, final, forwards = run_acdc(bound, self.tau, distance, self.progress)
        circuit = {"how": "acdc", "tau": self.tau, "final_distance": final}
        return bound.result(
            delta,
            self,
            diagnostics={
                "final_distance": final,
                "n_edges": int(keep.sum()),
                "n_forwards": forwards,
            },
            extra={"mask": keep.to(torch.uint8)},
            meta={"circuit": circuit},
        )
