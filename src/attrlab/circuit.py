"""Circuits: sets of edges of a model's residual graph, as plain data.

A :class:`Circuit` is a keep-mask over the edges of an
:class:`~attrlab.units.edges.EdgeGraph` with the scores it came from. It
saves and loads (safetensors + JSON through :class:`~attrlab.result.Attribution`)
and draws itself as Graphviz DOT source or as an SVG made by its own small
layered layout (no system Graphviz needed). Finding circuits is in
:mod:`attrlab.methods.circuits` (extraction from edge scores, ACDC); running
them in :mod:`attrlab.evaluate.circuits` (faithfulness, completeness,
minimality): both build on this module and on the bound edge kind, not on
each other.

Example:
    >>> from attrlab.units.edges import EdgeGraph
    >>> g = EdgeGraph.build(1, 1, qkv=False)
    >>> Circuit(g, torch.tensor([True, False, False, False, False, True])).nodes()
    ['embed', 'a0.h0', 'm0', 'logits']
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import FileFormatError, InputError
from .result import Attribution
from .units.edges import EdgeGraph

__all__ = ["Circuit", "edges_touching", "prune_dangling", "to_mib_json", "from_mib_json"]


def edges_touching(graph: EdgeGraph, nodes: Iterable[str]) -> Tensor:
    """Bool ``[n_edges]``: the edge leaves one of ``nodes`` or enters one of them
    (its downstream input belongs to the node).

    Example:
        >>> g = EdgeGraph.build(1, 1, qkv=False)
        >>> edges_touching(g, ["a0.h0"]).int().tolist()
        [1, 0, 0, 1, 1, 0]
    """
    want = set(nodes)
    lab = graph.labels()
    return torch.tensor(
        [
            u in want or EdgeGraph.node_of(v) in want
            for u, v in zip(lab["upstream"], lab["downstream"])
        ],
        dtype=torch.bool,
    )


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
            seen[EdgeGraph.node_of(v)] = None
        return list(seen)

    def matrix(self) -> Tensor:
        """Keep-mask ``[U, V]`` (``[U, V, n_pos]`` per position) float, for
        :class:`~attrlab.units.edges.EdgePatcher`."""
        return self.graph.to_matrix(self.mask.float())

    def knockout(self, nodes: Any) -> Tensor:
        """This circuit's keep-mask ``[n_edges]`` without every edge out of or into
        ``nodes`` (component names: ``a0.h1``, ``m0``, ``a1.kv0``).

        Example:
            >>> from attrlab.units.edges import EdgeGraph
            >>> g = EdgeGraph.build(1, 1, qkv=False)
            >>> Circuit(g, torch.ones(6, dtype=torch.bool)).knockout(["m0"]).int().tolist()
            [1, 0, 1, 0, 1, 0]
        """
        return self.mask & ~edges_touching(self.graph, nodes)

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
            meta={"graph": g.to_meta(), "circuit": self.meta},
            extra={"mask": self.mask.to(torch.uint8)},
        )

    @classmethod
    def from_attribution(cls, attr: Attribution) -> Circuit:
        """Inverse of :meth:`to_attribution` (also reads an ACDC result)."""
        if "mask" not in attr.extra or "graph" not in attr.meta:
            raise FileFormatError("this attribution does not hold a circuit (no mask / graph)")
        g = EdgeGraph.from_meta(attr.meta["graph"])
        return cls(g, attr.extra["mask"].bool(), attr.scores, attr.meta.get("circuit", {}))

    def save(self, path: str | Path) -> Path:
        """Write a ``.attr`` file (safetensors + checked JSON)."""
        return self.to_attribution().save(path)

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        """Read a file written by :meth:`save`."""
        return cls.from_attribution(Attribution.load(path))

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
            out.append((u, EdgeGraph.node_of(v), kind, float(s)))
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
            rows.setdefault(node_rank(n), []).append(n)
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


def node_rank(node: str) -> float:
    """Depth of an edge-graph node: ``embed`` first, a layer's attention before
    its MLP, ``logits`` last.

    Example:
        >>> [node_rank(n) for n in ("embed", "a0.h1", "m0", "logits")]
        [-1.0, 0.0, 0.5, 1000000000.0]
    """
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


def prune_dangling(graph: EdgeGraph, mask: Tensor) -> Tensor:
    """Drop edges from nodes nothing in the mask feeds (except ``embed``) and
    into nodes that feed nothing (except ``logits``), until none is left.

    Example:
        >>> from attrlab.units.edges import EdgeGraph
        >>> g = EdgeGraph.build(1, 1, qkv=False)  # edges: embed->a0.h0, embed->m0, ...
        >>> prune_dangling(g, torch.tensor([1, 0, 0, 0, 0, 0]).bool()).int().tolist()
        [0, 0, 0, 0, 0, 0]
    """
    if graph.n_pos:  # prune whole u -> v edges (at every position)
        base = mask.reshape(-1, graph.n_pos).any(1)
        flat = EdgeGraph.build(
            graph.n_layers, graph.n_heads, graph.qkv, graph.parallel, 0, graph.n_kv_heads
        )
        keep = prune_dangling(flat, base)
        return mask & keep.repeat_interleave(graph.n_pos)
    idx = graph.edge_index()
    ups = [graph.upstream[u] for u in idx[:, 0].tolist()]
    downs = [graph.readers_of(graph.downstream[v]) for v in idx[:, 1].tolist()]
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


# ------------------------------------------------------- MIB / EAP-IG graph JSON
def _mib_node(name: str) -> str:
    return "input" if name == "embed" else name


def _mib_edge(up: str, down: str) -> str:
    """``embed -> a1.h2.q`` as ``input->a1.h2<q>`` (the EAP-IG / MIB edge name)."""
    node = EdgeGraph.node_of(down)
    qkv = down[len(node) + 1 :] if down != node else ""
    return f"{_mib_node(up)}->{_mib_node(node)}" + (f"<{qkv}>" if qkv else "")


def _mib_graph(graph: EdgeGraph) -> None:
    if graph.n_pos:
        raise InputError("MIB graphs have no positions; use units=Edges(per_position=False)")
    if not graph.qkv:
        raise InputError("MIB graphs split q/k/v inputs; attribute with units=Edges(qkv=True)")
    if graph.n_kv_heads and graph.n_kv_heads != graph.n_heads:
        raise InputError(
            "MIB graphs have one k and v input per query head; this model groups them "
            f"({graph.n_kv_heads} key/value heads for {graph.n_heads} query heads)"
        )


def to_mib_json(result: Attribution, path: str | Path | None = None,
                in_graph: Tensor | None = None) -> dict[str, Any]:  # fmt: skip
    """An edge result as the graph JSON of EAP-IG and the MIB circuit-localization
    track: ``{"cfg", "nodes": {name: in_graph}, "edges": {"input->a0.h1<q>":
    {"score", "in_graph"}}}``. ``in_graph``: a keep-mask ``[n_edges]`` (default:
    every edge). Written to ``path`` if given (atomically). Scores are
    contributions (attrlab's sign; EAP-IG's scores have the same sign for a
    metric that the clean run raises).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", units="edges", method="eap",
        ...                  counterfactual="a c c")
        >>> d = to_mib_json(r)
        >>> d["cfg"]["n_layers"], "input->a0.h0<q>" in d["edges"], "a1.h3->logits" in d["edges"]
        (2, True, True)
    """
    if result.unit_kind != "edges":
        raise InputError(f"MIB graphs hold edge scores, not {result.unit_kind!r}")
    graph = EdgeGraph.from_meta(result.meta.get("graph") or {})
    _mib_graph(graph)
    scores = torch.as_tensor(result.scores).double().reshape(-1, graph.n_edges)[0]
    keep = torch.ones(graph.n_edges, dtype=torch.bool) if in_graph is None else in_graph.bool()
    lab = graph.labels()
    edges: dict[str, Any] = {}
    touched: set[str] = set()
    for i, (u, v) in enumerate(zip(lab["upstream"], lab["downstream"])):
        edges[_mib_edge(u, v)] = {"score": float(scores[i]), "in_graph": bool(keep[i])}
        if keep[i]:
            touched.update((_mib_node(u), _mib_node(EdgeGraph.node_of(v))))
    nodes = ["input"] + [n for n in graph.upstream[1:]] + ["logits"]
    out = {
        "cfg": {
            "n_layers": graph.n_layers,
            "n_heads": graph.n_heads,
            "parallel_attn_mlp": bool(graph.parallel),
        },  # fmt: skip
        "nodes": {_mib_node(n): n in touched or _mib_node(n) in touched for n in nodes},
        "edges": edges,
    }
    if path is not None:
        import json

        from ._files import write_atomically

        text = json.dumps(out)
        write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return out


def from_mib_json(source: str | Path | dict[str, Any]) -> Attribution:
    """An edge result (method ``"mib"``) from an EAP-IG / MIB graph JSON (a path or
    the loaded dict), in attrlab's edge order; ``extra["in_graph"]`` holds the
    file's edge mask. Evaluate it with ``al.evaluate.circuit_curve(lm, r,
    inputs=..., target=..., counterfactual=...)``.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", units="edges", method="eap",
        ...                  counterfactual="a c c")
        >>> back = from_mib_json(to_mib_json(r))
        >>> bool(torch.allclose(back.scores, r.scores.double()))
        True
    """
    import json

    if isinstance(source, dict):
        d = source
    else:
        try:
            d = json.loads(Path(source).read_text())
        except (OSError, ValueError) as e:
            raise FileFormatError(f"cannot read a MIB graph JSON from {source}: {e}") from e
    try:
        cfg, edges = d["cfg"], d["edges"]
        graph = EdgeGraph.build(int(cfg["n_layers"]), int(cfg["n_heads"]), qkv=True,
                                parallel=bool(cfg.get("parallel_attn_mlp", False)))  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"not a MIB graph JSON (needs cfg and edges): {e}") from e
    lab = graph.labels()
    scores = torch.zeros(graph.n_edges, dtype=torch.float64)
    keep = torch.zeros(graph.n_edges, dtype=torch.bool)
    missing = []
    for i, (u, v) in enumerate(zip(lab["upstream"], lab["downstream"])):
        entry = edges.get(_mib_edge(u, v))
        if entry is None:
            missing.append(_mib_edge(u, v))
            continue
        score = entry.get("score")
        scores[i] = float("nan") if score is None else float(score)
        keep[i] = bool(entry.get("in_graph", True))
    if missing:
        raise FileFormatError(f"the MIB graph lacks {len(missing)} edges, e.g. {missing[0]!r}")
    if not bool(torch.isfinite(scores).all()):
        raise FileFormatError("the MIB graph has edges without a finite score")
    meta = {"graph": graph.to_meta(), **graph.to_meta()}
    return Attribution(scores, lab, "edges", "mib", meta=meta, extra={"in_graph": keep})
