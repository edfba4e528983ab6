"""Graph results: nodes and weighted edges, as plain data (information-flow
routes today; attribution graphs build on the same type).

A :class:`GraphResult` holds two column tables, ``nodes`` (``id`` plus label
columns) and ``edges`` (``source``, ``target``, ``weight`` plus label columns),
the method and its parameters, the model and the question it answers. It turns
into pandas tables and a networkx ``MultiDiGraph``, saves and loads as one JSON
file (no pickle; floats round-trip exactly), and draws itself as an SVG
(:func:`attrlab.viz.graph.graph_svg`) in notebooks and in the report.

Example:
    >>> g = GraphResult({"id": ["a", "b"]}, {"source": ["a"], "target": ["b"], "weight": [0.7]},
    ...                 method="demo")
    >>> g.to_pandas("edges").weight.tolist(), g.n_edges
    ([0.7], 1)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import FileFormatError, InputError, NonFiniteError

__all__ = ["GraphResult", "dependency_graph"]

FORMAT = "attrlab.graph/1"


def _columns(
    table: Mapping[str, Sequence[Any]], what: str, required: tuple[str, ...]
) -> dict[str, list[Any]]:
    cols = {str(k): list(v) for k, v in table.items()}
    missing = [c for c in required if c not in cols]
    if missing:
        raise InputError(f"{what} need columns {', '.join(required)}; missing {', '.join(missing)}")
    lengths = {len(v) for v in cols.values()}
    if len(lengths) > 1:
        raise InputError(f"{what} columns have different lengths: {sorted(lengths)}")
    return cols


class GraphResult:
    """A graph result: ``nodes`` and ``edges`` column tables plus provenance.

    Args:
        nodes: columns, one entry per node; needs ``id``.
        edges: columns, one entry per edge; needs ``source``, ``target`` (node
            ids) and ``weight`` (finite numbers).
        method, target, params, model_id, meta, diagnostics: as for
            :class:`attrlab.result.Attribution` (JSON-able).
        tables: further named column tables about the graph (e.g. an
            attribution graph's ``head_loadings``); saved and loaded with it.

    Example:
        >>> g = GraphResult({"id": ["x", "y"]}, {"source": ["x"], "target": ["y"], "weight": [1.0]})
        >>> g.to_pandas("nodes").id.tolist()
        ['x', 'y']
    """

    def __init__(
        self,
        nodes: Mapping[str, Sequence[Any]],
        edges: Mapping[str, Sequence[Any]],
        method: str = "",
        target: str = "",
        params: Mapping[str, Any] | None = None,
        model_id: str = "",
        meta: Mapping[str, Any] | None = None,
        diagnostics: Mapping[str, Any] | None = None,
        tables: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    ):
        self.nodes = _columns(nodes, "nodes", ("id",))
        self.edges = _columns(edges, "edges", ("source", "target", "weight"))
        ids = set(self.nodes["id"])
        if len(ids) != len(self.nodes["id"]):
            raise InputError("node ids must be unique")
        unknown = [n for n in self.edges["source"] + self.edges["target"] if n not in ids]
        if unknown:
            raise InputError(f"edges name nodes that are not in the graph, e.g. {unknown[0]!r}")
        bad = [w for w in self.edges["weight"] if not math.isfinite(float(w))]
        if bad:
            raise NonFiniteError(f"{len(bad)} edge weights are not finite")
        self.edges["weight"] = [float(w) for w in self.edges["weight"]]
        self.method = method
        self.target = target
        self.params = dict(params or {})
        self.model_id = model_id
        self.meta = dict(meta or {})
        self.diagnostics = dict(diagnostics or {})
        self.tables = {str(k): _columns(v, f"table {k!r}", ()) for k, v in (tables or {}).items()}
        clash = {"nodes", "edges"} & set(self.tables)
        if clash:
            raise InputError(f"a table may not be called {sorted(clash)[0]!r}")

    @property
    def n_nodes(self) -> int:
        return len(self.nodes["id"])

    @property
    def n_edges(self) -> int:
        return len(self.edges["source"])

    def __repr__(self) -> str:
        return (f"GraphResult(method={self.method!r}, nodes={self.n_nodes}, edges={self.n_edges}, "
                f"target={self.target!r})")  # fmt: skip

    # ------------------------------------------------------------ conversions
    def to_pandas(self, what: str = "edges") -> Any:
        """``"edges"`` (default), ``"nodes"`` or one of :attr:`tables` as a DataFrame.

        Example:
            >>> g = GraphResult({"id": ["a"]}, {"source": [], "target": [], "weight": []})
            >>> len(g.to_pandas("nodes"))
            1
        """
        import pandas as pd

        tables = {"edges": self.edges, "nodes": self.nodes, **self.tables}
        if what not in tables:
            raise InputError(f"to_pandas takes one of {', '.join(map(repr, tables))}, not {what!r}")
        return pd.DataFrame(tables[what])

    def to_networkx(self) -> Any:
        """A ``networkx.MultiDiGraph`` (node and edge columns as attributes; two
        nodes may be joined by several edges, e.g. a residual and an MLP edge).

        Example:
            >>> g = GraphResult({"id": ["a", "b"]}, {"source": ["a"], "target": ["b"], "weight": [0.5]})
            >>> g.to_networkx().number_of_edges()
            1
        """
        try:
            import networkx as nx
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise InputError("to_networkx needs networkx: pip install networkx") from e
        G = nx.MultiDiGraph()
        keys = list(self.nodes)
        for i, n in enumerate(self.nodes["id"]):
            G.add_node(n, **{k: self.nodes[k][i] for k in keys if k != "id"})
        ekeys = [k for k in self.edges if k not in ("source", "target")]
        for i in range(self.n_edges):
            G.add_edge(self.edges["source"][i], self.edges["target"][i],
                       **{k: self.edges[k][i] for k in ekeys})  # fmt: skip
        return G

    def incoming(self, node: str) -> dict[str, list[Any]]:
        """The edges into ``node`` (columns).

        Example:
            >>> g = GraphResult({"id": ["a", "b"]}, {"source": ["a"], "target": ["b"], "weight": [0.5]})
            >>> g.incoming("b")["source"]
            ['a']
        """
        idx = [i for i, t in enumerate(self.edges["target"]) if t == node]
        return {k: [v[i] for i in idx] for k, v in self.edges.items()}

    # ------------------------------------------------------------ save / load
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "method": self.method, "target": self.target,
            "params": self.params, "model_id": self.model_id, "meta": self.meta,
            "diagnostics": self.diagnostics, "nodes": self.nodes, "edges": self.edges,
            "tables": self.tables,
        }  # fmt: skip

    def save(self, path: str | Path) -> Path:
        """Write the graph as one JSON file (atomically; never pickle).

        Example:
            >>> import tempfile, os
            >>> g = GraphResult({"id": ["a"]}, {"source": [], "target": [], "weight": []}, method="m")
            >>> p = g.save(os.path.join(tempfile.mkdtemp(), "g.graph.json"))
            >>> GraphResult.load(p).method
            'm'
        """
        from ._files import write_atomically

        text = json.dumps(self.to_dict(), allow_nan=False)
        return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, path: str | Path) -> GraphResult:
        """Read a graph written by :meth:`save`.

        Raises:
            FileFormatError: not a graph file.
        """
        try:
            d = json.loads(Path(path).read_text())
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r}")
            return cls(d["nodes"], d["edges"], d.get("method", ""), d.get("target", ""),
                       d.get("params"), d.get("model_id", ""), d.get("meta"),
                       d.get("diagnostics"), d.get("tables"))  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError, InputError) as e:
            raise FileFormatError(f"not an attrlab graph file: {path} ({e})") from e

    # ------------------------------------------------------------ views
    def to_svg(self, **options: Any) -> str:
        """An SVG drawing (see :func:`attrlab.viz.graph.graph_svg`)."""
        from .viz.graph import graph_svg

        return graph_svg(self, **options)

    def to_html(self) -> str:
        """An HTML fragment: the drawing and the strongest edges (every string escaped)."""
        from .viz.graph import graph_html

        return graph_html(self)

    def _repr_html_(self) -> str:
        return self.to_html()


def dependency_graph(result: Any, k: int | None = None) -> GraphResult:
    """A :class:`~attrlab.graph.GraphResult` of a sentence x sentence result
    (``attention-suppression``): one node per sentence, an edge ``i -> j`` of
    weight ``M[j, i]`` for the ``k`` strongest entries (default: ``2 n``).

    Example:
        >>> import attrlab as al
        >>> ex = al.zoo.task("reasoning").examples(1)[0]
        >>> r = al.attribute(al.zoo.load("reasoning"), ex.prompt, units="trace",
        ...                  method="attention-suppression")
        >>> g = al.graph.dependency_graph(r, k=3)
        >>> g.n_edges
        3
    """
    m = result.scores
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise InputError(
            "dependency_graph needs a sentence x sentence result (attention-suppression)"
        )
    n = m.shape[0]
    texts = result.units.get("text") or [str(i) for i in range(n)]
    ids = [f"S{i}: {t}" for i, t in enumerate(texts)]
    pairs = sorted(((float(m[j, i]), i, j) for j in range(n) for i in range(j)), reverse=True)
    pairs = pairs[: (2 * n if k is None else k)]
    return GraphResult(
        {"id": ids, "position": list(range(n)), "level": [float(i % 2) for i in range(n)]},
        {
            "source": [ids[i] for _, i, _ in pairs],
            "target": [ids[j] for _, _, j in pairs],
            "weight": [w for w, _, _ in pairs],
            "kind": ["attention"] * len(pairs),
        },
        method=result.method,
        target=result.target,
        params=result.params,
        model_id=result.model_id,
        meta={"tokens": texts},
    )
