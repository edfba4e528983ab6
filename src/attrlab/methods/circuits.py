"""Circuits: sets of edges, extracted from edge scores or found by ACDC.

A :class:`Circuit` is a keep-mask over the edges of an
:class:`~attrlab.units.edges.EdgeGraph` with the scores it came from. It
saves and loads (safetensors + JSON through :class:`~attrlab.result.Attribution`),
draws itself as Graphviz DOT source or as an SVG made by its own small
layered layout (no system Graphviz needed), and re-evaluates by actually
running the model with every edge outside it patched
(:func:`attrlab.evaluate.circuits.evaluate_circuit`).

Extraction (:func:`extract_circuit`): the ``top_n`` edges by ``|score|``, the
edges with ``|score| >= threshold``, or ``greedy`` growth from the logits
(add the best-scoring edge into a node already in the circuit). Dangling
edges (from a node nothing feeds, or into a node that feeds nothing) are pruned:
with counterfactual patching this does not change what the circuit computes.

ACDC (:func:`acdc`; Conmy et al., "Towards Automated Circuit Discovery for
Mechanistic Interpretability"): visit downstream nodes from the logits back,
try removing each incoming edge, keep it removed if the KL divergence to the
full model's next-token distribution grows by less than ``tau``. One forward per
edge: a slow exact reference for small models.

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

import html
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import FileFormatError, InputError
from ..model.wrapper import LM, Inputs
from ..result import Attribution
from ..targets import Target
from ..targets import resolve as resolve_target
from ..units.base import Units
from ..units.edges import EdgeGraph, EdgePatcher, Edges, edge_activations
from .base import Method, register

__all__ = ["ACDC", "Circuit", "acdc", "extract_circuit"]


def _node_of(down: str) -> str:
    """The node a downstream input belongs to (``a1.h2.q`` -> ``a1.h2``; a shared
    key/value input ``a1.kv0.k`` -> ``a1.kv0``)."""
    if down.endswith((".q", ".k", ".v")):
        return down[:-2]
    return down


def _readers(down: str, graph: EdgeGraph) -> list[str]:
    """The upstream nodes whose output depends on downstream input ``down``: its
    head (or MLP), every query head sharing a key/value input, or ``logits``."""
    node = _node_of(down)
    parts = node.split(".")
    if len(parts) == 2 and parts[1].startswith("kv"):
        r = graph.n_heads // graph.n_kv_heads
        g = int(parts[1][2:])
        return [f"{parts[0]}.h{h}" for h in range(g * r, (g + 1) * r)]
    return [node]


class Circuit:
    """A set of edges of a model's graph, with the scores it was chosen by.

    Args:
        graph: the :class:`EdgeGraph`.
        mask: bool ``[n_edges]`` (True = in the circuit).
        scores: ``[n_edges]`` edge scores (optional).
        meta: JSON-able facts (how it was found, model id, target ...).

    Example:
        >>> from attrlab.units.edges import EdgeGraph
        >>> g = EdgeGraph.build(1, 1, qkv=False)
        >>> c = Circuit(g, torch.tensor([True, False, False, False, False, True]))
        >>> c.edges()
        [('embed', 'a0.h0'), ('m0', 'logits')]
    """

    def __init__(
        self,
        graph: EdgeGraph,
        mask: Tensor,
        scores: Tensor | None = None,
        meta: dict[str, Any] | None = None,
    ):
        mask = torch.as_tensor(mask).bool().reshape(-1)
        if mask.numel() != graph.n_edges:
            raise InputError(f"mask has {mask.numel()} entries for {graph.n_edges} edges")
        self.graph = graph
        self.mask = mask
        self.scores = (
            torch.zeros(graph.n_edges)
            if scores is None
            else torch.as_tensor(scores).float().reshape(-1)
        )
        self.meta = dict(meta or {})

    def __repr__(self) -> str:
        return (
            f"Circuit({self.n_edges} of {self.graph.n_edges} edges "
            f"({100 * self.fraction:.1f}%), {len(self.nodes())} nodes)"
        )

    @property
    def n_edges(self) -> int:
        return int(self.mask.sum())

    @property
    def fraction(self) -> float:
        return self.n_edges / max(1, self.graph.n_edges)

    def base_mask(self) -> Tensor:
        """``[n_base_edges]``: ``u -> v`` is kept at some position."""
        if self.graph.n_pos:
            return self.mask.reshape(-1, self.graph.n_pos).any(1)
        return self.mask

    def edges(self) -> list[tuple[str, str]]:
        """``(upstream, downstream)`` names of the edges in the circuit (at any position)."""
        idx = self.graph.edge_index()[self.base_mask()]
        g = self.graph
        return [(g.upstream[u], g.downstream[v]) for u, v in idx.tolist()]

    def nodes(self) -> list[str]:
        """Component names touched by the circuit (``embed``, heads, MLPs, ``logits``)."""
        seen: dict[str, None] = {}
        for u, v in self.edges():
            seen[u] = None
            seen[_node_of(v)] = None
        return list(seen)

    def matrix(self) -> Tensor:
        """Keep-mask ``[U, V]`` float for :class:`~attrlab.units.edges.EdgePatcher`."""
        return self.graph.to_matrix(self.mask.float())

    # ------------------------------------------------------------ files
    def to_attribution(self) -> Attribution:
        """The circuit as an :class:`Attribution` over all edges (mask in ``extra``)."""
        g = self.graph
        return Attribution(
            self.scores,
            units=g.labels(),
            unit_kind="edges",
            method="circuit",
            target=str(self.meta.get("target", "")),
            params={"qkv": g.qkv},
            model_id=str(self.meta.get("model_id", "")),
            meta={
                "graph": {
                    "n_layers": g.n_layers,
                    "n_heads": g.n_heads,
                    "n_kv_heads": g.n_kv_heads,
                    "qkv": g.qkv,
                    "parallel": g.parallel,
                    "n_pos": g.n_pos,
                },
                "circuit": self.meta,
            },
            extra={"mask": self.mask.to(torch.uint8)},
        )

    @classmethod
    def from_attribution(cls, attr: Attribution) -> Circuit:
        """Inverse of :meth:`to_attribution`."""
        if "mask" not in attr.extra or "graph" not in attr.meta:
            raise FileFormatError("this attribution does not hold a circuit (no mask / graph)")
        gm = attr.meta["graph"]
        g = EdgeGraph.build(
            gm["n_layers"],
            gm["n_heads"],
            gm["qkv"],
            gm["parallel"],
            gm.get("n_pos", 0),
            gm.get("n_kv_heads", 0),
        )
        return cls(g, attr.extra["mask"].bool(), attr.scores, attr.meta.get("circuit", {}))

    def save(self, path: str | Path) -> Path:
        """Write a ``.attr`` file (safetensors + checked JSON)."""
        return self.to_attribution().save(path)

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        """Read a file written by :meth:`save`."""
        return cls.from_attribution(Attribution.load(path))

    # ------------------------------------------------------------ evaluation
    def evaluate(
        self, lm: LM, inputs: Inputs, target: Any, counterfactual: Inputs, **kw: Any
    ) -> dict[str, Any]:
        """Faithfulness etc. by running the circuit
        (:func:`attrlab.evaluate.circuits.evaluate_circuit`)."""
        from ..evaluate.circuits import evaluate_circuit

        return evaluate_circuit(lm, self, inputs, target, counterfactual, **kw)

    # ------------------------------------------------------------ drawing
    def _draw_edges(self) -> list[tuple[str, str, str, float]]:
        """(upstream node, downstream node, input kind, score) of circuit edges."""
        out = []
        if self.graph.n_pos:
            kept = (self.scores * self.mask).reshape(-1, self.graph.n_pos).sum(1)
            sc = kept[self.base_mask()].tolist()
        else:
            sc = self.scores[self.mask].tolist()
        for (u, v), s in zip(self.edges(), sc):
            kind = v[-1] if v.endswith((".q", ".k", ".v")) else ""
            out.append((u, _node_of(v), kind, float(s)))
        return out

    def to_dot(self) -> str:
        """Graphviz DOT source (render with any Graphviz, e.g. ``dot -Tsvg``).

        Example:
            >>> from attrlab.units.edges import EdgeGraph
            >>> g = EdgeGraph.build(1, 1, qkv=False)
            >>> Circuit(g, torch.ones(6, dtype=torch.bool)).to_dot().startswith("digraph")
            True
        """
        lines = ["digraph circuit {", "  rankdir=BT;", "  node [shape=box, style=rounded];"]
        for n in self.nodes():
            shape = "ellipse" if n in ("embed", "logits") else "box"
            lines.append(f'  "{n}" [shape={shape}];')
        top = max((abs(s) for *_, s in self._draw_edges()), default=1.0) or 1.0
        for u, v, kind, s in self._draw_edges():
            color = "#2166ac" if s >= 0 else "#b2182b"
            width = 0.5 + 3.0 * abs(s) / top
            label = f', label="{kind}"' if kind else ""
            lines.append(f'  "{u}" -> "{v}" [color="{color}", penwidth={width:.2f}{label}];')
        lines.append("}")
        return "\n".join(lines)

    def layout(self) -> dict[str, tuple[float, float]]:
        """Node positions (x, y) in a layered drawing: embed at the bottom, logits
        at the top, one row per attention / MLP sublayer."""
        rows: dict[float, list[str]] = {}
        for n in self.nodes():
            rows.setdefault(_rank(n), []).append(n)
        ranks = sorted(rows)
        pos = {}
        width = max((len(v) for v in rows.values()), default=1)
        for i, r in enumerate(ranks):
            names = sorted(rows[r], key=_order_key)
            for j, n in enumerate(names):
                x = (j + 0.5) * (width / len(names))
                pos[n] = (x, float(len(ranks) - 1 - i))
        return pos

    def to_svg(self, scale: float = 110.0) -> str:
        """A self-contained SVG drawing of the circuit (own layout; no Graphviz).

        Example:
            >>> from attrlab.units.edges import EdgeGraph
            >>> g = EdgeGraph.build(1, 1, qkv=False)
            >>> "<svg" in Circuit(g, torch.ones(6, dtype=torch.bool)).to_svg()
            True
        """
        pos = self.layout()
        if not pos:
            return '<svg xmlns="http://www.w3.org/2000/svg" width="120" height="40"></svg>'
        xs = [p[0] for p in pos.values()]
        ys = [p[1] for p in pos.values()]
        pad, bw, bh = 40.0, 70.0, 26.0
        w = (max(xs) + 1) * scale + 2 * pad
        h = (max(ys) + 1) * scale * 0.8 + 2 * pad

        def xy(n: str) -> tuple[float, float]:
            x, y = pos[n]
            return pad + x * scale, pad + y * scale * 0.8 + bh

        parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" '
            f'viewBox="0 0 {w:.0f} {h:.0f}" font-family="sans-serif" font-size="12">',
            '<defs><marker id="arr" viewBox="0 0 10 10" refX="10" refY="5" '
            'markerUnits="userSpaceOnUse" markerWidth="8" markerHeight="8" orient="auto-start-reverse">'
            '<path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>',
        ]
        top = max((abs(s) for *_, s in self._draw_edges()), default=1.0) or 1.0
        offsets = {"q": -12.0, "k": 0.0, "v": 12.0, "": 0.0}
        for u, v, kind, s in self._draw_edges():
            x1, y1 = xy(u)
            x2, y2 = xy(v)
            y1 -= bh / 2
            y2 += bh / 2
            x2 += offsets[kind]
            color = "#2166ac" if s >= 0 else "#b2182b"
            sw = 0.6 + 3.0 * abs(s) / top
            cy = (y1 + y2) / 2
            parts.append(
                f'<path d="M {x1:.1f} {y1:.1f} C {x1:.1f} {cy:.1f} {x2:.1f} {cy:.1f} '
                f'{x2:.1f} {y2:.1f}" stroke="{color}" stroke-width="{sw:.2f}" fill="none" '
                f'opacity="0.75" marker-end="url(#arr)"><title>{html.escape(u)} -&gt; '
                f"{html.escape(v)}{('.' + kind) if kind else ''}: {s:.4g}</title></path>"
            )
        for n in pos:
            x, y = xy(n)
            fill = (
                "#f0f0f0"
                if n in ("embed", "logits")
                else ("#fde0c5" if n.startswith("a") else "#d1e5f0")
            )
            parts.append(
                f'<rect x="{x - bw / 2:.1f}" y="{y - bh / 2:.1f}" width="{bw}" '
                f'height="{bh}" rx="6" fill="{fill}" stroke="#333"/>'
            )
            parts.append(
                f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle">{html.escape(n)}</text>'
            )
        parts.append("</svg>")
        return "\n".join(parts)

    def _repr_svg_(self) -> str:
        return self.to_svg()


def _rank(node: str) -> float:
    if node == "embed":
        return -1.0
    if node == "logits":
        return 1e9
    layer = int(node[1:].split(".")[0])
    return layer + (0.5 if node.startswith("m") else 0.0)


def _order_key(node: str) -> tuple[int, int]:
    if "." in node:  # a{l}.h{h}[.q|k|v] (query heads first), then a{l}.kv{g}.k|v
        head = node.split(".")[1]
        return (0, int(head[1:])) if head.startswith("h") else (0, 10_000 + int(head[2:]))
    return (1, 0)


# ---------------------------------------------------------------- extraction
def _graph_from(attr: Attribution) -> EdgeGraph:
    m = attr.meta
    if attr.unit_kind != "edges" or "upstream" not in m:
        raise InputError("extract_circuit needs an edge attribution (units='edges')")
    qkv = bool(attr.params.get("units", {}).get("qkv", True))
    return EdgeGraph.build(
        m["n_layers"],
        m["n_heads"],
        qkv,
        m.get("parallel", False),
        int(m.get("n_pos", 0)),
        int(m.get("n_kv_heads", 0)),
    )


def prune_dangling(graph: EdgeGraph, mask: Tensor) -> Tensor:
    """Drop edges from nodes nothing in the mask feeds (except ``embed``) and
    into nodes that feed nothing (except ``logits``), until none is left."""
    if graph.n_pos:  # prune whole u -> v edges (at every position)
        base = mask.reshape(-1, graph.n_pos).any(1)
        flat = EdgeGraph.build(
            graph.n_layers, graph.n_heads, graph.qkv, graph.parallel, 0, graph.n_kv_heads
        )
        keep = prune_dangling(flat, base)
        return mask & keep.repeat_interleave(graph.n_pos)
    idx = graph.edge_index()
    ups = [graph.upstream[u] for u in idx[:, 0].tolist()]
    downs = [_readers(graph.downstream[v], graph) for v in idx[:, 1].tolist()]
    mask = mask.clone()
    while True:
        fed = {d for i in range(len(ups)) if mask[i] for d in downs[i]}
        feeding = {ups[i] for i in range(len(ups)) if mask[i]}
        new = mask.clone()
        for i in range(len(ups)):
            if not mask[i]:
                continue
            if ups[i] != "embed" and ups[i] not in fed:
                new[i] = False
            elif downs[i] != ["logits"] and not feeding.intersection(downs[i]):
                new[i] = False
        if torch.equal(new, mask):
            return mask
        mask = new


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
        readers = [_readers(graph.downstream[v], graph) for v in idx[:, 1].tolist()]
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
def _kl(logits: Tensor, ref_logp: Tensor) -> Tensor:
    logp = logits[:, -1].double().log_softmax(-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def acdc(
    lm: LM,
    inputs: Inputs,
    counterfactual: Inputs,
    tau: float = 0.01,
    units: Edges | None = None,
    target: Any = None,
    progress: bool = False,
) -> Circuit:
    """ACDC edge pruning with counterfactual patching (one forward per edge).

    The criterion is the KL divergence of the last position's next-token
    distribution from the full model's, averaged over prompts; with
    ``target=`` it is instead ``|metric(circuit) - metric(model)|``.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> c = acdc(lm, "a b c", "a c c", tau=0.5, units=al.units.Edges(qkv=False))
        >>> c.n_edges <= al.units.Edges(qkv=False).graph(lm).n_edges
        True
    """
    from tqdm.auto import tqdm

    units = units or Edges()
    if units.per_position:
        raise InputError("ACDC here prunes edges summed over positions; use Edges()")
    graph = units.graph(lm)
    batch = lm.tokenize(inputs)
    cf = lm.tokenize(counterfactual)
    if cf.shape[0] == 1 and batch.shape[0] > 1:
        cf = cf.repeat(batch.shape[0])
    tgt = resolve_target(target, lm) if target is not None else None
    if tgt is not None:
        batch = tgt.prepare(lm, batch)
        cf = tgt.prepare(lm, cf)
    lm.check_counterfactual(batch, cf)
    with torch.no_grad():
        ref = edge_activations(lm, cf, graph)
        full_logits, _ = lm.run(batch)
    ref_logp = full_logits[:, -1].double().log_softmax(-1)
    m_full = tgt(full_logits, batch).double().mean() if tgt is not None else None

    def score(keep: Tensor) -> float:
        with torch.no_grad(), EdgePatcher(lm, graph, ref, keep[None].to(lm.dtype)):
            logits, _ = lm.run(batch)
        if tgt is None:
            return float(_kl(logits, ref_logp).mean())
        assert m_full is not None
        return float((tgt(logits, batch).double().mean() - m_full).abs())

    keep = graph.adjacency.clone().float()
    current = score(keep)
    removal_delta = torch.zeros(len(graph.upstream), len(graph.downstream))
    order = sorted(
        range(len(graph.downstream)), key=lambda v: -_rank(_node_of(graph.downstream[v]))
    )
    pbar = tqdm(total=graph.n_edges, disable=not progress, desc="ACDC")
    for v in order:
        for u in reversed(range(len(graph.upstream))):
            if not graph.adjacency[u, v]:
                continue
            pbar.update(1)
            keep[u, v] = 0.0
            new = score(keep)
            removal_delta[u, v] = new - current
            if new - current < tau:
                current = new
            else:
                keep[u, v] = 1.0
    pbar.close()
    mask = graph.from_matrix(keep).bool()
    meta = {
        "how": "acdc",
        "tau": tau,
        "criterion": "kl" if tgt is None else tgt.describe(),
        "final_distance": current,
        "model_id": lm.name,
    }
    return Circuit(graph, mask, graph.from_matrix(removal_delta), meta)


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

    def __init__(self, tau: float = 0.01, progress: bool = False):
        self.tau = tau
        self.progress = progress

    def attribute(
        self,
        lm: LM,
        inputs: Inputs,
        target: Target,
        units: Units,
        counterfactual: Inputs | None = None,
    ) -> Attribution:
        if counterfactual is None:
            raise InputError("ACDC patches edges to a counterfactual: pass counterfactual=")
        if not isinstance(units, Edges):
            raise InputError("ACDC needs units='edges'")
        c = acdc(
            lm,
            inputs,
            counterfactual,
            tau=self.tau,
            units=units,
            target=target,
            progress=self.progress,
        )
        a = c.to_attribution()
        a.method = self.name
        a.params = {**self.params(), "units": {"kind": "edges", "qkv": units.qkv}}
        a.diagnostics = {"final_distance": c.meta["final_distance"], "n_edges": c.n_edges}
        a.meta.update(
            {
                "upstream": c.graph.upstream,
                "downstream": c.graph.downstream,
                "n_layers": c.graph.n_layers,
                "n_heads": c.graph.n_heads,
                "n_kv_heads": c.graph.n_kv_heads,
                "parallel": c.graph.parallel,
            }
        )
        return a
