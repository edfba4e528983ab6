"""The results directory the server shows: listing, safe lookup, JSON views.

A *result id* is a file's path relative to the results directory, with ``/``
separators (``"ioi/heads.attr"``). :class:`ResultStore` resolves ids only to
regular files inside the directory (no ``..``, no absolute paths, no symlink
escaping it) and reads three kinds of file:

* ``*.attr``: an :class:`attrlab.result.Attribution` (``kind: "attribution"``);
* ``*.json``: an attrlab graph (:meth:`attrlab.graph.GraphResult.save`), a
  circuit-tracer / Neuronpedia graph (:func:`attrlab.neuronpedia.load_graph_json`),
  both ``kind: "graph"``, or an EAP-IG / MIB edge-score graph
  (:func:`attrlab.circuit.from_mib_json`, an edge ``Attribution``).

Loaded files are cached by (path, size, mtime). A file that cannot be read is
listed with its error instead of breaking the listing.

Example:
    >>> import tempfile, torch
    >>> from attrlab.result import Attribution
    >>> d = tempfile.mkdtemp()
    >>> _ = Attribution(torch.tensor([1.0, -2.0]), {"layer": [0, 1]}, "mlp", "dla").save(f"{d}/r.attr")
    >>> [e["id"] for e in ResultStore(d).list()]
    ['r.attr']
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

from ..errors import FileFormatError, InputError
from ..graph import GraphResult
from ..result import Attribution

__all__ = ["ResultStore", "attribution_json", "graph_json", "load_result"]

#: the most files a listing reads (a results directory is not a data lake)
MAX_FILES = 2000
#: extra tensors up to this many numbers are sent with a result
MAX_EXTRA = 200_000


def _num(x: float) -> Any:
    return x if math.isfinite(x) else None


def attribution_json(r: Attribution) -> dict[str, Any]:
    """An :class:`Attribution` as plain JSON for the page: its metadata (as
    :meth:`Attribution.save` writes it), ``scores`` (nested lists; non-finite
    entries as ``null``), ``shape`` and the small ``extra`` tensors.

    Example:
        >>> import torch
        >>> j = attribution_json(Attribution(torch.tensor([0.5]), {"token": ["a"]}, "tokens", "ig"))
        >>> j["kind"], j["scores"], j["units"]
        ('attribution', [0.5], [['token', ['a']]])
    """
    m = r._metadata()
    flat = [_num(x) for x in r.scores.double().flatten().tolist()]
    if r.scores.dim() == 2:
        n = r.scores.shape[1]
        m["scores"] = [flat[i : i + n] for i in range(0, len(flat), n)]
    else:
        m["scores"] = flat
    m["shape"] = list(r.scores.shape)
    m["extra"] = {
        k: {"shape": list(v.shape), "values": [_num(float(x)) for x in v.double().flatten()]}
        for k, v in r.extra.items()
        if v.numel() <= MAX_EXTRA and not v.is_complex()
    }
    m["kind"] = "attribution"
    return m


def graph_json(g: GraphResult, max_edges: int | None = None) -> dict[str, Any]:
    """A :class:`GraphResult` as plain JSON for the page (its file format plus
    ``kind: "graph"``). With ``max_edges``, a graph with more edges keeps its
    ``max_edges`` strongest (by ``|weight|``; ties by order) and the nodes they
    touch, in file order, and says so in ``capped`` (``n_edges``, ``n_nodes``
    of the whole graph, ``max_edges``, ``min_abs_weight`` kept).

    Example:
        >>> g = GraphResult({"id": ["a", "b", "c"]}, {"source": ["a", "b"], "target": ["b", "c"],
        ...                 "weight": [1.0, -3.0]})
        >>> graph_json(g)["kind"], graph_json(g)["edges"]["weight"]
        ('graph', [1.0, -3.0])
        >>> j = graph_json(g, max_edges=1)
        >>> j["edges"]["weight"], j["nodes"]["id"], j["capped"]["n_edges"]
        ([-3.0], ['b', 'c'], 2)
    """
    d = g.to_dict()
    d["kind"] = "graph"
    if max_edges is not None and g.n_edges > max_edges:
        w = g.edges["weight"]
        keep = sorted(sorted(range(len(w)), key=lambda j: -abs(w[j]))[:max_edges])
        used = {g.edges["source"][j] for j in keep} | {g.edges["target"][j] for j in keep}
        rows = [i for i, n in enumerate(g.nodes["id"]) if n in used]
        d["edges"] = {k: [v[j] for j in keep] for k, v in g.edges.items()}
        d["nodes"] = {k: [v[i] for i in rows] for k, v in g.nodes.items()}
        d["capped"] = {"n_edges": g.n_edges, "n_nodes": g.n_nodes, "max_edges": max_edges,
                       "min_abs_weight": min((abs(w[j]) for j in keep), default=0.0)}  # fmt: skip
    return d


def load_result(path: Path) -> Attribution | GraphResult:
    """Read one result file (see the module docs for the kinds).

    Raises:
        FileFormatError: not a file attrlab can show.

    Example:
        >>> load_result(Path("/no/such.attr"))
        Traceback (most recent call last):
        ...
        attrlab.errors.FileFormatError: no such file: /no/such.attr
    """
    if path.suffix == ".attr":
        return Attribution.load(path)
    if path.suffix != ".json":
        raise FileFormatError(f"{path.name}: not a result file (.attr or .json)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise FileFormatError(f"{path.name}: not readable JSON ({e})") from e
    if not isinstance(d, dict):
        raise FileFormatError(f"{path.name}: a JSON result file holds an object")
    if d.get("format") == "attrlab.graph/1":
        return GraphResult.load(path)
    if "links" in d and "nodes" in d:
        from ..neuronpedia import load_graph_json

        return load_graph_json(path)
    if "cfg" in d and isinstance(d.get("edges"), dict):
        from ..circuit import from_mib_json

        try:
            return from_mib_json(d)
        except (InputError, KeyError, TypeError, ValueError) as e:
            raise FileFormatError(f"{path.name}: not a MIB edge-score graph ({e})") from e
    raise FileFormatError(
        f"{path.name}: JSON, but not an attrlab graph, a circuit-tracer graph or a MIB graph"
    )


class ResultStore:
    """The result files under one directory (see the module docs).

    Args:
        root: the results directory (created if missing).

    Example:
        >>> import tempfile
        >>> ResultStore(tempfile.mkdtemp()).list()
        []
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.root.is_dir():
            raise InputError(f"results directory {root} is not a directory")
        self._cache: dict[Path, tuple[tuple[int, int], Any]] = {}
        self._lock = threading.Lock()

    def path(self, rid: str) -> Path:
        """The file a result id names.

        Raises:
            InputError: the id leaves the directory or is malformed.
            FileFormatError: no such result file.

        Example:
            >>> import tempfile
            >>> ResultStore(tempfile.mkdtemp()).path("../etc/passwd")
            Traceback (most recent call last):
            ...
            attrlab.errors.InputError: result id '../etc/passwd' is not a file name inside the results directory
        """
        if (not isinstance(rid, str) or not rid or len(rid) > 1000 or "\\" in rid
                or "\x00" in rid or rid.startswith("/")
                or any(part in ("", ".", "..") for part in rid.split("/"))):  # fmt: skip
            raise InputError(f"result id {rid!r} is not a file name inside the results directory")
        p = (self.root / rid).resolve()
        if not p.is_relative_to(self.root):
            raise InputError(f"result id {rid!r} leaves the results directory")
        if not p.is_file():
            raise FileFormatError(f"no result {rid!r} in {self.root}")
        return p

    def load(self, rid: str) -> Attribution | GraphResult:
        """The result a result id names (cached while the file is unchanged).

        Example:
            >>> import tempfile, torch
            >>> d = tempfile.mkdtemp()
            >>> _ = Attribution(torch.tensor([1.0]), {"i": [0]}, "mlp", "x").save(f"{d}/a.attr")
            >>> ResultStore(d).load("a.attr").method
            'x'
        """
        p = self.path(rid)
        st = p.stat()
        key = (st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._cache.get(p)
        if hit is not None and hit[0] == key:
            return hit[1]  # type: ignore[no-any-return]
        r = load_result(p)
        with self._lock:
            self._cache[p] = (key, r)
        return r

    def json(self, rid: str, max_edges: int | None = None) -> dict[str, Any]:
        """The result as JSON for the page, with its ``id`` (graphs: at most
        ``max_edges`` edges, :func:`graph_json`).

        Example:
            >>> import tempfile, torch
            >>> d = tempfile.mkdtemp()
            >>> _ = Attribution(torch.tensor([2.0]), {"i": [0]}, "mlp", "x").save(f"{d}/a.attr")
            >>> ResultStore(d).json("a.attr")["scores"]
            [2.0]
        """
        r = self.load(rid)
        d = attribution_json(r) if isinstance(r, Attribution) else graph_json(r, max_edges)
        d["id"] = rid
        return d

    def list(self) -> list[dict[str, Any]]:
        """One summary per result file (newest first): ``id``, ``kind``, ``method``,
        ``unit_kind``, ``target``, ``model_id``, ``size`` …, or ``error``.

        Example:
            >>> import tempfile
            >>> d = tempfile.mkdtemp()
            >>> _ = open(f"{d}/notes.json", "w").write("[]")
            >>> ResultStore(d).list()[0]["error"][:10]
            'notes.json'
        """
        files: list[Path] = []
        for p in self.root.rglob("*"):
            if len(files) >= MAX_FILES:
                break
            if p.suffix in (".attr", ".json") and p.is_file() and not p.name.startswith("."):
                if p.resolve().is_relative_to(self.root):
                    files.append(p)
        files.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
        out = []
        for p in files:
            rid = p.relative_to(self.root).as_posix()
            entry: dict[str, Any] = {"id": rid, "size": p.stat().st_size}
            try:
                r = self.load(rid)
            except (FileFormatError, InputError, OSError) as e:
                entry["error"] = str(e)
                out.append(entry)
                continue
            entry.update(method=r.method, target=r.target, model_id=r.model_id)
            if isinstance(r, Attribution):
                entry.update(kind="attribution", unit_kind=r.unit_kind,
                             shape=list(r.scores.shape),
                             label_columns=list(r.units))  # fmt: skip
            else:
                entry.update(kind="graph", unit_kind="graph", n_nodes=r.n_nodes,
                             n_edges=r.n_edges)  # fmt: skip
            out.append(entry)
        return out
