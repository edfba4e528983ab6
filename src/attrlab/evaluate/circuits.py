"""Circuit evaluation by running the circuit: faithfulness, completeness, minimality.

Running a circuit means one forward pass in which every edge *outside* the
circuit is patched: its downstream node sees the upstream node's
counterfactual output (``ablation="counterfactual"``) or its mean over a set
of reference prompts (``ablation="mean"``), while in-circuit edges carry the
actual values of this very run (see :class:`attrlab.units.edges.EdgePatcher`).

* **faithfulness** = ``(m_circuit - m_corrupt) / (m_clean - m_corrupt)``: the
  share of the clean-vs-counterfactual metric gap the circuit recovers (1 =
  all, 0 = none), with means over prompts. (``metric(circuit) /
  metric(model)`` alone is ``faithfulness_ratio``.) If the counterfactual does
  not change the metric, a :class:`~attrlab.errors.CounterfactualWarning`
  is raised and faithfulness is reported as 1.0 (nothing to explain), never NaN.
* **completeness** (IOI paper): for random subsets ``K`` of the circuit's
  nodes, knock ``K`` out of the circuit and of the full model;
  ``|F(C \\ K) - F(M \\ K)|`` (normalized by the gap) should be small.
* **minimality**: for each node ``v`` of the circuit, ``|F(C \\ {v}) - F(C)|``
  (normalized); nodes with a tiny value are not needed.

Example:
    >>> import attrlab as al
    >>> from attrlab.methods.circuits import extract_circuit
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> r = al.attribute(lm, "a b c", target=" a", units="edges", method="eap",
    ...                  counterfactual="a c c")
    >>> res = evaluate_circuit(lm, extract_circuit(r, fraction=1.0), "a b c", " a", "a c c")
    >>> round(res["faithfulness"], 4)
    1.0
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ..errors import CounterfactualWarning, InputError
from ..methods.circuits import Circuit, _node_of
from ..model.lock import holds_model_lock
from ..model.wrapper import LM, Inputs
from ..targets import resolve as resolve_target
from ..units.edges import EdgePatcher, edge_activations

__all__ = ["circuit_metric", "completeness", "evaluate_circuit", "faithfulness", "minimality"]


def _setup(
    lm: LM,
    inputs: Inputs,
    target: Any,
    counterfactual: Inputs | None,
    ablation: str,
    mean_inputs: Inputs | None,
    graph: Any,
) -> tuple[Any, Any, Tensor, Any]:
    t = resolve_target(target, lm)
    batch = t.prepare(lm, lm.tokenize(inputs))
    if ablation == "counterfactual":
        if counterfactual is None:
            raise InputError("counterfactual ablation needs counterfactual=")
        cf = lm.tokenize(counterfactual)
        if cf.shape[0] == 1 and batch.shape[0] > 1:
            cf = cf.repeat(batch.shape[0])
        cf = t.prepare(lm, cf)
        lm.check_counterfactual(batch, cf)
        with torch.no_grad():
            ref = edge_activations(lm, cf, graph)
    elif ablation == "mean":
        src = t.prepare(lm, lm.tokenize(mean_inputs if mean_inputs is not None else inputs))
        if src.shape[1] != batch.shape[1]:
            raise InputError("mean_inputs must tokenize to the same length as the inputs")
        with torch.no_grad():
            ref = edge_activations(lm, src, graph).mean(1, keepdim=True)
        cf = None
    else:
        raise InputError(f"ablation must be 'counterfactual' or 'mean', got {ablation!r}")
    return t, batch, ref, cf


def _run_masks(
    lm: LM, graph: Any, t: Any, batch: Any, ref: Tensor, masks: Tensor, chunk: int = 32
) -> Tensor:
    """Mean metric for each keep-mask ``[n, U, V]`` (batched; prompt-major rows)."""
    n_b = batch.shape[0]
    out = []
    for s in range(0, masks.shape[0], chunk):
        m = masks[s : s + chunk]
        k = m.shape[0]
        rows = batch.repeat(k)  # row b * k + j
        tiled = m.repeat(n_b, *([1] * (m.dim() - 1))).to(lm.dtype)  # row b * k + j -> mask j
        r = ref if ref.shape[1] == 1 else ref
        with torch.no_grad(), EdgePatcher(lm, graph, r, tiled):
            logits, _ = lm.run(rows)
        vals = t(logits, rows).double().reshape(n_b, k).mean(0)
        out.append(vals)
    return torch.cat(out)


@holds_model_lock
def circuit_metric(
    lm: LM,
    circuit: Circuit,
    inputs: Inputs,
    target: Any,
    counterfactual: Inputs | None = None,
    ablation: str = "counterfactual",
    mean_inputs: Inputs | None = None,
) -> float:
    """The mean metric when only ``circuit``'s edges carry actual values.

    Example:
        >>> import attrlab as al
        >>> from attrlab.units.edges import EdgeGraph
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> g = al.units.Edges().graph(lm)
        >>> empty = Circuit(g, torch.zeros(g.n_edges, dtype=torch.bool))
        >>> cf_value = circuit_metric(lm, empty, "a b c", " a", "a c c")
        >>> logits, _ = lm.run("a c c")
        >>> abs(cf_value - float(logits[0, -1, lm.token_id(" a")])) < 1e-4
        True
    """
    t, batch, ref, _ = _setup(
        lm, inputs, target, counterfactual, ablation, mean_inputs, circuit.graph
    )
    return float(_run_masks(lm, circuit.graph, t, batch, ref, circuit.matrix()[None])[0])


def _normalize(m_circ: float, m_clean: float, m_cf: float) -> float:
    gap = m_clean - m_cf
    if abs(gap) <= 1e-6 * max(1.0, abs(m_clean)):
        warnings.warn(
            f"the counterfactual does not change the target (clean {m_clean:.6g} == "
            f"ablated {m_cf:.6g}); faithfulness is undefined and reported as 1.0",
            CounterfactualWarning,
            stacklevel=3,
        )
        return 1.0
    return (m_circ - m_cf) / gap


@holds_model_lock
def faithfulness(
    lm: LM,
    circuit: Circuit,
    inputs: Inputs,
    target: Any,
    counterfactual: Inputs | None = None,
    ablation: str = "counterfactual",
    mean_inputs: Inputs | None = None,
) -> dict[str, Any]:
    """Faithfulness of ``circuit`` (see the module docs), from two forwards.

    Returns ``faithfulness``, ``faithfulness_ratio`` (``m_circuit / m_clean``),
    ``metric_circuit``, ``metric_clean``, ``metric_ablated`` (everything
    patched), ``n_edges`` and ``fraction``.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> g = al.units.Edges().graph(lm)
        >>> full = Circuit(g, torch.ones(g.n_edges, dtype=torch.bool))
        >>> round(faithfulness(lm, full, "a b c", " a", "a c c")["faithfulness"], 4)
        1.0
    """
    g = circuit.graph
    t, batch, ref, _ = _setup(lm, inputs, target, counterfactual, ablation, mean_inputs, g)
    masks = torch.stack([circuit.matrix(), g.to_matrix(torch.zeros(g.n_edges))])
    m_circ, m_abl = _run_masks(lm, g, t, batch, ref, masks).tolist()
    with torch.no_grad():
        m_clean = float(t(lm.run(batch)[0], batch).double().mean())
    return {
        "faithfulness": _normalize(m_circ, m_clean, m_abl),
        "faithfulness_ratio": m_circ / m_clean if m_clean != 0 else float("inf"),
        "metric_circuit": m_circ,
        "metric_clean": m_clean,
        "metric_ablated": m_abl,
        "n_edges": circuit.n_edges,
        "fraction": circuit.fraction,
        "ablation": ablation,
    }


def _knockout(circuit_matrix: Tensor, graph: Any, nodes: list[str]) -> Tensor:
    """Remove every edge out of (and into) ``nodes``."""
    m = circuit_matrix.clone()
    for i, u in enumerate(graph.upstream):
        if u in nodes:
            m[i] = 0.0
    for j, v in enumerate(graph.downstream):
        if _node_of(v) in nodes:
            m[:, j] = 0.0
    return m


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
    ablation: str = "counterfactual",
    mean_inputs: Inputs | None = None,
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
    g = circuit.graph
    t, batch, ref, _ = _setup(lm, inputs, target, counterfactual, ablation, mean_inputs, g)
    nodes = [n for n in circuit.nodes() if n not in ("embed", "logits")]
    gen = torch.Generator().manual_seed(seed)
    full = g.to_matrix(torch.ones(g.n_edges))
    cm = circuit.matrix()
    masks, subsets = [], []
    for _ in range(n_subsets):
        k = [n for n in nodes if float(torch.rand(1, generator=gen)) < p]
        subsets.append(k)
        masks += [_knockout(cm, g, k), _knockout(full, g, k)]
    masks.append(g.to_matrix(torch.zeros(g.n_edges)))
    vals = _run_masks(lm, g, t, batch, ref, torch.stack(masks)).tolist()
    with torch.no_grad():
        m_clean = float(t(lm.run(batch)[0], batch).double().mean())
    gap = m_clean - vals[-1]
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
    ablation: str = "counterfactual",
    mean_inputs: Inputs | None = None,
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
    g = circuit.graph
    t, batch, ref, _ = _setup(lm, inputs, target, counterfactual, ablation, mean_inputs, g)
    nodes = [n for n in circuit.nodes() if n not in ("embed", "logits")]
    cm = circuit.matrix()
    masks = [cm] + [_knockout(cm, g, [n]) for n in nodes] + [g.to_matrix(torch.zeros(g.n_edges))]
    vals = _run_masks(lm, g, t, batch, ref, torch.stack(masks)).tolist()
    with torch.no_grad():
        m_clean = float(t(lm.run(batch)[0], batch).double().mean())
    gap = m_clean - vals[-1]
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
    ablation: str = "counterfactual",
    mean_inputs: Inputs | None = None,
    completeness_subsets: int = 0,
    with_minimality: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Faithfulness (always), completeness (``completeness_subsets > 0``) and
    minimality (``with_minimality``) of a circuit, by running it.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> g = al.units.Edges().graph(lm)
        >>> full = Circuit(g, torch.ones(g.n_edges, dtype=torch.bool))
        >>> sorted(evaluate_circuit(lm, full, "a b c", " a", "a c c"))[:2]
        ['ablation', 'faithfulness']
    """
    res = faithfulness(lm, circuit, inputs, target, counterfactual, ablation, mean_inputs)
    if completeness_subsets > 0:
        res["completeness"] = completeness(
            lm,
            circuit,
            inputs,
            target,
            counterfactual,
            n_subsets=completeness_subsets,
            seed=seed,
            ablation=ablation,
            mean_inputs=mean_inputs,
        )
    if with_minimality:
        res["minimality"] = minimality(
            lm, circuit, inputs, target, counterfactual, ablation, mean_inputs
        )
    return res
