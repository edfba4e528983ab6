"""Circuit evaluation by running the circuit: faithfulness, completeness, minimality.

Running a circuit is ``f(keep)`` of the bound edge kind
(:class:`attrlab.units.edges.EdgesBound`) with the circuit's keep-mask: one
forward in which every edge *outside* the circuit is ablated — its downstream
node sees the upstream node's counterfactual output (``counterfactual=``, the
default), or zero, its mean or a resampled value over ``reference=`` prompts
(``ablation="zero" | "mean" | "resample"``) — while in-circuit edges carry the
actual values of this very run. Every evaluation here is a few keep-masks
through one batched ``f``.

* **faithfulness** = ``(m_circuit - m_ablated) / (m_clean - m_ablated)``: the
  share of the clean-vs-ablated metric gap the circuit recovers (1 = all, 0 =
  none), with means over prompts. (``metric(circuit) / metric(model)`` alone is
  ``faithfulness_ratio``.) If the ablation does not change the metric, a
  :class:`~attrlab.errors.CounterfactualWarning` is raised and faithfulness is
  reported as 1.0 (nothing to explain), never NaN.
* **completeness** (IOI paper): for random subsets ``K`` of the circuit's
  nodes, knock ``K`` out of the circuit and of the full model;
  ``|F(C \\ K) - F(M \\ K)|`` (normalized by the gap) should be small.
* **minimality**: for each node ``v`` of the circuit, ``|F(C \\ {v}) - F(C)|``
  (normalized); nodes with a tiny value are not needed.
* **circuit_curve**: the MIB circuit-localization curves of a result (top-k%
  circuits by signed and by absolute score, CPR and CMD), or the faithfulness
  of given keep-masks, from one batched ``f``.

Example:
    >>> import attrlab as al, torch
    >>> from attrlab.circuit import Circuit
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> g = al.units.Edges().graph(lm)
    >>> full = Circuit(g, torch.ones(g.n_edges, dtype=torch.bool))
    >>> round(evaluate_circuit(lm, full, "a b c", " a", "a c c")["faithfulness"], 4)
    1.0
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ..ablations import Ablation, Mean
from ..ablations import resolve as resolve_ablation
from ..circuit import Circuit
from ..errors import CounterfactualWarning, InputError
from ..model.lock import holds_model_lock
from ..model.wrapper import LM, Inputs
from ..units.edges import EdgeGraph, Edges, EdgesBound

__all__ = [
    "MIB_FRACTIONS",
    "circuit_curve",
    "circuit_metric",
    "completeness",
    "evaluate_circuit",
    "faithfulness",
    "minimality",
]


def bind_circuit(
    lm: LM,
    graph: EdgeGraph,
    inputs: Inputs,
    target: Any,
    counterfactual: Inputs | None = None,
    ablation: Any = None,
    reference: Any = None,
    mean_inputs: Inputs | None = None,
) -> EdgesBound:
    """The bound edge question circuits over ``graph`` are run on.

    ``ablation``: None or ``"counterfactual"`` (with ``counterfactual=``),
    ``"zero"``, ``"mean"`` / ``"resample"`` (over ``reference=``; ``"mean"``
    without one: the mean over ``inputs``), or an :mod:`attrlab.ablations`
    object. ``mean_inputs=`` is the deprecated name of ``reference=``.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> g = al.units.Edges().graph(lm)
        >>> bind_circuit(lm, g, "a b c", " a", ablation="mean").ablation
        Mean(reference='a b c')
    """
    if mean_inputs is not None:
        warnings.warn(
            "mean_inputs= is deprecated; pass reference= (with ablation='mean')",
            DeprecationWarning,
            stacklevel=3,
        )
        reference = mean_inputs if reference is None else reference
    abl: Ablation | None
    if isinstance(ablation, Ablation):
        abl = ablation
    else:
        if ablation == "counterfactual" and counterfactual is None:
            raise InputError("counterfactual ablation needs counterfactual=")
        if ablation == "mean" and reference is None:
            reference = inputs  # the mean over the prompts themselves
        abl = resolve_ablation(ablation, counterfactual=counterfactual, reference=reference)
    if isinstance(abl, Mean) and abl.reference is None:
        abl = Mean(inputs)
    units = Edges(qkv=graph.qkv, per_position=bool(graph.n_pos))
    bound = units.bind(lm, inputs, target, abl)
    if bound.graph.to_meta() != graph.to_meta():
        raise InputError(
            f"the circuit's graph {graph.to_meta()} does not fit this model and prompt "
            f"({bound.graph.to_meta()}); per-position circuits need prompts of their length"
        )
    return bound


def _normalize(m_circ: float, m_clean: float, m_abl: float) -> float:
    gap = m_clean - m_abl
    if abs(gap) <= 1e-6 * max(1.0, abs(m_clean)):
        warnings.warn(
            f"the ablation does not change the target (clean {m_clean:.6g} == "
            f"ablated {m_abl:.6g}); faithfulness is undefined and reported as 1.0",
            CounterfactualWarning,
            stacklevel=3,
        )
        return 1.0
    return (m_circ - m_abl) / gap


def _bound_for(
    lm: LM, circuit: Circuit, inputs: Inputs, target: Any, counterfactual: Any, ablation: Any,
    mean_inputs: Any, reference: Any, bound: EdgesBound | None,
) -> EdgesBound:  # fmt: skip
    if bound is not None:
        return bound
    return bind_circuit(
        lm, circuit.graph, inputs, target, counterfactual, ablation, reference, mean_inputs
    )


@holds_model_lock
def circuit_metric(
    lm: LM,
    circuit: Circuit,
    inputs: Inputs,
    target: Any,
    counterfactual: Inputs | None = None,
    ablation: Any = None,
    mean_inputs: Inputs | None = None,
    reference: Any = None,
) -> float:
    """The mean metric when only ``circuit``'s edges carry actual values.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> g = al.units.Edges().graph(lm)
        >>> empty = Circuit(g, torch.zeros(g.n_edges, dtype=torch.bool))
        >>> cf_value = circuit_metric(lm, empty, "a b c", " a", "a c c")
        >>> logits, _ = lm.run("a c c")
        >>> abs(cf_value - float(logits[0, -1, lm.token_id(" a")])) < 1e-4
        True
    """
    b = bind_circuit(
        lm, circuit.graph, inputs, target, counterfactual, ablation, reference, mean_inputs
    )
    return float(b.f(circuit.mask[None])[0, 0])


@holds_model_lock
def faithfulness(
    lm: LM,
    circuit: Circuit,
    inputs: Inputs,
    target: Any,
    counterfactual: Inputs | None = None,
    ablation: Any = None,
    mean_inputs: Inputs | None = None,
    reference: Any = None,
    bound: EdgesBound | None = None,
) -> dict[str, Any]:
    """Faithfulness of ``circuit`` (see the module docs).

    Returns ``faithfulness``, ``faithfulness_ratio`` (``m_circuit / m_clean``),
    ``metric_circuit``, ``metric_clean``, ``metric_ablated`` (every edge
    ablated), ``n_edges``, ``fraction`` and the ``ablation``'s name. ``bound``:
    an :class:`~attrlab.units.edges.EdgesBound` to reuse (then ``inputs`` ...
    are not read).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> g = al.units.Edges().graph(lm)
        >>> full = Circuit(g, torch.ones(g.n_edges, dtype=torch.bool))
        >>> round(faithfulness(lm, full, "a b c", " a", "a c c")["faithfulness"], 4)
        1.0
    """
    b = _bound_for(lm, circuit, inputs, target, counterfactual, ablation, mean_inputs,
                   reference, bound)  # fmt: skip
    masks = torch.stack([circuit.mask, torch.zeros(b.n, dtype=torch.bool)])
    m_circ, m_abl = b.f(masks)[:, 0].tolist()
    m_clean = float(b.clean()[0])
    return {
        "faithfulness": _normalize(m_circ, m_clean, m_abl),
        "faithfulness_ratio": m_circ / m_clean if m_clean != 0 else float("inf"),
        "metric_circuit": m_circ,
        "metric_clean": m_clean,
        "metric_ablated": m_abl,
        "n_edges": circuit.n_edges,
        "fraction": circuit.fraction,
        "ablation": b.ablation.name if b.ablation is not None else None,
    }


#: the edge fractions of the MIB circuit-localization track
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _area(xs: list[float], ys: list[float], log_scale: bool) -> float:
    """Trapezoid area under ``ys`` over ``xs`` (``log(xs)`` with ``log_scale``)."""
    import math

    x = [math.log(v) for v in xs] if log_scale else list(xs)
    return float(sum((x[i + 1] - x[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(x) - 1)))


def top_fraction_masks(scores: Tensor, fractions: Any, absolute: bool) -> Tensor:
    """Keep-masks ``[len(fractions), n]`` of the top ``int(k * n)`` units by score
    (``absolute``: by ``|score|``), ties broken by unit order.

    Example:
        >>> top_fraction_masks(torch.tensor([0.1, -3.0, 2.0, 0.0]), [0.25, 0.5, 1.0], False).int().tolist()
        [[0, 0, 1, 0], [1, 0, 1, 0], [1, 1, 1, 1]]
    """
    s = scores.double().reshape(-1)
    key = s.abs() if absolute else s
    order = torch.sort(key, descending=True, stable=True).indices
    masks = torch.zeros(len(fractions), len(s), dtype=torch.bool)
    for i, k in enumerate(fractions):
        masks[i, order[: int(float(k) * len(s))]] = True
    return masks


@holds_model_lock
def circuit_curve(
    lm: LM,
    result: Any,
    graph: EdgeGraph | None = None,
    inputs: Inputs | None = None,
    target: Any = None,
    counterfactual: Inputs | None = None,
    ablation: Any = None,
    reference: Any = None,
    bound: EdgesBound | None = None,
    *,
    fractions: Any = MIB_FRACTIONS,
    log_scale: bool = False,
    prune: bool = True,
) -> dict[str, Any]:
    """Circuit curves of a result (MIB's circuit-localization metrics), or the
    faithfulness of given keep-masks.

    **With a result** ``r`` (edge scores, or node scores of any kind with
    ``f``: heads, mlp, neurons …): for each fraction ``k`` keep the top
    ``int(k * n)`` units and ablate the rest (the result's ablation, usually its
    counterfactual), measuring ``f(k) = (m(C_k) - m(none)) / (m(all) - m(none))``.
    Two rankings: by signed score (``faithfulness``, whose trapezoid area over
    ``k`` is **CPR**, higher is better) and by ``|score|``
    (``faithfulness_abs``; the area of ``|1 - f(k)|`` is **CMD**, lower is
    better). ``log_scale``: areas over ``log k`` (MIB's default is linear).
    ``prune`` (edges): drop edges left dangling, as MIB does. Every circuit
    goes through one batched ``f``. ``inputs`` / ``target`` /
    ``counterfactual`` are read from the result (give them for an imported
    result, e.g. :func:`attrlab.circuit.from_mib_json`).

    Returns ``fractions``, ``n_units`` / ``n_units_abs``, ``faithfulness`` /
    ``faithfulness_abs``, ``cpr``, ``cmd``, ``metric_clean``, ``metric_ablated``.

    **With keep-masks** ``[k, n_edges]`` and an edge ``graph`` (the older
    form): ``faithfulness [k]``, ``metric [k]``, ``n_edges [k]``,
    ``metric_clean``, ``metric_ablated``.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", units="edges", method="eap",
        ...                  counterfactual="a c c")
        >>> c = circuit_curve(lm, r)
        >>> round(c["faithfulness"][-1], 6), c["n_units"][-1] == len(r), c["cmd"] >= 0
        (1.0, True, True)
    """
    if isinstance(result, Tensor):
        if graph is None or (bound is None and inputs is None):
            raise InputError(
                "circuit_curve(lm, masks, graph, inputs, target, ...) needs the graph and inputs"
            )
        b = bound or bind_circuit(
            lm,
            graph,
            inputs,  # type: ignore[arg-type]
            target,
            counterfactual,
            ablation,
            reference,  # type: ignore[arg-type]
        )
        masks = b.check_keep(result)
        vals = b.f(torch.cat([masks, torch.zeros(1, b.n, dtype=torch.bool)]))[:, 0]
        m_clean, m_abl = float(b.clean()[0]), float(vals[-1])
        return {
            "faithfulness": [_normalize(float(v), m_clean, m_abl) for v in vals[:-1]],
            "metric": vals[:-1].tolist(),
            "n_edges": masks.sum(1).tolist(),
            "metric_clean": m_clean,
            "metric_ablated": m_abl,
        }
    from .lds import _bind, _question

    fr = [float(k) for k in fractions]
    if not fr or any(not 0 < k <= 1 for k in fr) or fr != sorted(fr):
        raise InputError(f"fractions must increase within (0, 1], got {fractions!r}")
    if log_scale and len(fr) > 1 and fr[0] <= 0:
        raise InputError("log_scale needs positive fractions")
    scores = torch.as_tensor(result.scores).double()
    if scores.dim() > 1 and scores.shape[0] > 1:
        raise InputError("circuit curves need one target row; attribute a single target")
    scores = scores.reshape(-1)
    if bound is None:
        q, u, opts = _question(lm, result, inputs, target, None, "circuit_curve", ablation,
                               counterfactual, reference)  # fmt: skip
        if "f" not in getattr(u, "provides", ()):
            raise InputError(f"units {u.kind!r} cannot be run as circuits (no f)")
        b = _bind(lm, q, u, **opts)
    else:
        b = bound
    if b.n != len(scores):
        raise InputError(f"the units give {b.n} units, the result has {len(scores)}; pass units=")
    signed = top_fraction_masks(scores, fr, absolute=False)
    absolute = top_fraction_masks(scores, fr, absolute=True)
    if prune and b.kind == "edges":
        from ..circuit import prune_dangling

        signed = torch.stack([prune_dangling(b.graph, m) for m in signed])
        absolute = torch.stack([prune_dangling(b.graph, m) for m in absolute])
    masks = torch.cat([signed, absolute, torch.zeros(1, b.n, dtype=torch.bool)])
    vals = b.f(masks).double().mean(-1)  # [2k + 1]
    m_clean, m_abl = float(b.clean().double().mean()), float(vals[-1])
    k = len(fr)
    f_signed = [_normalize(float(v), m_clean, m_abl) for v in vals[:k]]
    f_abs = [_normalize(float(v), m_clean, m_abl) for v in vals[k : 2 * k]]
    return {
        "fractions": fr,
        "n_units": signed.sum(1).tolist(),
        "n_units_abs": absolute.sum(1).tolist(),
        "faithfulness": f_signed,
        "faithfulness_abs": f_abs,
        "cpr": _area(fr, f_signed, log_scale),
        "cmd": _area(fr, [abs(1 - f) for f in f_abs], log_scale),
        "metric_clean": m_clean,
        "metric_ablated": m_abl,
        "log_scale": log_scale,
    }


@holds_model_lock
def completeness(
    lm: LM,
    circuit: Circuit,
    inputs: Inputs,
    target: Any,
    counterfactual: Inputs | None = None,
    n_subsets: int = 8,
    p: float = 0.5,
    seed: int = 0,
    ablation: Any = None,
    mean_inputs: Inputs | None = None,
    reference: Any = None,
    bound: EdgesBound | None = None,
) -> dict[str, Any]:
    """Incompleteness ``max_K |F(C \\ K) - F(M \\ K)| / |m_clean - m_ablated|`` over
    random node subsets ``K`` of the circuit (each node kept with prob. ``1 - p``).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> g = al.units.Edges().graph(lm)
        >>> full = Circuit(g, torch.ones(g.n_edges, dtype=torch.bool))
        >>> completeness(lm, full, "a b c", " a", "a c c", n_subsets=2)["incompleteness"] < 1e-4
        True
    """
    b = _bound_for(lm, circuit, inputs, target, counterfactual, ablation, mean_inputs,
                   reference, bound)  # fmt: skip
    g = circuit.graph
    nodes = [n for n in circuit.nodes() if n not in ("embed", "logits")]
    gen = torch.Generator().manual_seed(seed)
    full = Circuit(g, torch.ones(g.n_edges, dtype=torch.bool))
    masks, subsets = [], []
    for _ in range(n_subsets):
        k = [n for n in nodes if float(torch.rand(1, generator=gen)) < p]
        subsets.append(k)
        masks += [circuit.knockout(k), full.knockout(k)]
    masks.append(torch.zeros(g.n_edges, dtype=torch.bool))
    vals = b.f(torch.stack(masks))[:, 0].tolist()
    gap = float(b.clean()[0]) - vals[-1]
    scale = abs(gap) if abs(gap) > 1e-12 else 1.0
    diffs = [abs(vals[2 * i] - vals[2 * i + 1]) / scale for i in range(n_subsets)]
    return {"incompleteness": max(diffs, default=0.0), "per_subset": diffs, "subsets": subsets}


@holds_model_lock
def minimality(
    lm: LM,
    circuit: Circuit,
    inputs: Inputs,
    target: Any,
    counterfactual: Inputs | None = None,
    ablation: Any = None,
    mean_inputs: Inputs | None = None,
    reference: Any = None,
    bound: EdgesBound | None = None,
) -> dict[str, Any]:
    """Per node of the circuit: ``|F(C \\ {v}) - F(C)| / |m_clean - m_ablated|``.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> g = al.units.Edges().graph(lm)
        >>> full = Circuit(g, torch.ones(g.n_edges, dtype=torch.bool))
        >>> len(minimality(lm, full, "a b c", " a", "a c c")["per_node"]) == 2 * 5
        True
    """
    b = _bound_for(lm, circuit, inputs, target, counterfactual, ablation, mean_inputs,
                   reference, bound)  # fmt: skip
    nodes = [n for n in circuit.nodes() if n not in ("embed", "logits")]
    masks = [circuit.mask] + [circuit.knockout([n]) for n in nodes]
    masks.append(torch.zeros(circuit.graph.n_edges, dtype=torch.bool))
    vals = b.f(torch.stack(masks))[:, 0].tolist()
    gap = float(b.clean()[0]) - vals[-1]
    scale = abs(gap) if abs(gap) > 1e-12 else 1.0
    per = {n: abs(vals[1 + i] - vals[0]) / scale for i, n in enumerate(nodes)}
    return {"per_node": per, "min": min(per.values(), default=0.0)}


@holds_model_lock
def evaluate_circuit(
    lm: LM,
    circuit: Circuit,
    inputs: Inputs,
    target: Any,
    counterfactual: Inputs | None = None,
    ablation: Any = None,
    mean_inputs: Inputs | None = None,
    completeness_subsets: int = 0,
    with_minimality: bool = False,
    seed: int = 0,
    reference: Any = None,
) -> dict[str, Any]:
    """Faithfulness (always), completeness (``completeness_subsets > 0``) and
    minimality (``with_minimality``) of a circuit, by running it (one bound
    question for all three).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> g = al.units.Edges().graph(lm)
        >>> full = Circuit(g, torch.ones(g.n_edges, dtype=torch.bool))
        >>> sorted(evaluate_circuit(lm, full, "a b c", " a", "a c c"))[:2]
        ['ablation', 'faithfulness']
    """
    b = bind_circuit(
        lm, circuit.graph, inputs, target, counterfactual, ablation, reference, mean_inputs
    )
    res = faithfulness(lm, circuit, inputs, target, bound=b)
    if completeness_subsets > 0:
        res["completeness"] = completeness(
            lm, circuit, inputs, target, n_subsets=completeness_subsets, seed=seed, bound=b
        )
    if with_minimality:
        res["minimality"] = minimality(lm, circuit, inputs, target, bound=b)
    return res
