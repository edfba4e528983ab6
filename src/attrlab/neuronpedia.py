"""circuit-tracer / Neuronpedia attribution-graph JSON.

The format (circuit-tracer's ``frontend/graph_models.py``, schema version 1):
``{"metadata": {slug, scan, transcoder_list, prompt_tokens, prompt,
node_threshold, schema_version}, "qParams": {pinnedIds, supernodes, linkType,
clickedId, sg_pos}, "nodes": [{node_id, feature, layer, ctx_idx, feature_type,
token_prob, is_target_logit, run_idx, reverse_ctx_idx, jsNodeId, clerp,
influence, activation}], "links": [{source, target, weight}]}``.

:func:`load_graph_json` reads a file into a :class:`~attrlab.graph.GraphResult`
keeping every field, so :func:`save_graph_json` writes it back unchanged.
Graphs made by :func:`attrlab.attribution_graph` are written with
circuit-tracer's node ids (``{layer}_{feature}_{pos}``, errors
``{layer}_-1_{pos}``, tokens ``E_{vocab}_{pos}``, the logit
``{n_layers + 1}_{vocab}_{pos}``); attrlab's transcoder-bias nodes have no
counterpart in the format and are left out (their edges with them).

Example:
    >>> import attrlab as al, tempfile, os
    >>> lm = al.wrap(*al.testing.tiny_model("llama"))
    >>> tcs = [al.dictionaries.Dictionary.random(lm.cfg.d_model, 32, f"blocks.{l}.mlp.in",
    ...        f"blocks.{l}.mlp.out", activation="topk", k=4, seed=l) for l in range(lm.cfg.n_layers)]
    >>> g = al.attribution_graph(lm, "a b c", tcs, target=" a")
    >>> p = save_graph_json(g, os.path.join(tempfile.mkdtemp(), "g.json"), slug="abc")
    >>> back = load_graph_json(p)
    >>> back.method, any(n.startswith("E_") for n in back.nodes["id"])
    ('circuit-tracer', True)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ._files import write_atomically
from .errors import FileFormatError, InputError
from .graph import GraphResult

__all__ = ["load_graph_json", "save_graph_json"]

NODE_FIELDS = ("node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob",
               "is_target_logit", "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp",
               "influence", "activation")  # fmt: skip


def load_graph_json(path: str | Path) -> GraphResult:
    """A circuit-tracer / Neuronpedia graph file as a :class:`GraphResult`
    (``method="circuit-tracer"``; node columns are the file's fields plus ``id``;
    ``meta["circuit_tracer"]`` keeps ``metadata`` and ``qParams``).

    Raises:
        FileFormatError: not such a file.
    """
    try:
        d = json.loads(Path(path).read_text())
        nodes_in, links = d["nodes"], d["links"]
        fields: list[str] = []
        for n in nodes_in:
            for k in n:
                if k not in fields:
                    fields.append(k)
        nodes: dict[str, list[Any]] = {"id": [n["node_id"] for n in nodes_in]}
        for k in fields:
            nodes[k] = [n.get(k, _MISSING) for n in nodes_in]
        edges = {"source": [lk["source"] for lk in links], "target": [lk["target"] for lk in links],
                 "weight": [lk["weight"] for lk in links]}  # fmt: skip
        extra_link_keys = sorted({k for lk in links for k in lk} - {"source", "target", "weight"})
        for k in extra_link_keys:
            edges[k] = [lk.get(k, _MISSING) for lk in links]
        meta = {"circuit_tracer": {k: v for k, v in d.items() if k not in ("nodes", "links")},
                "node_fields": fields, "link_fields": list(links[0]) if links else
                ["source", "target", "weight"]}  # fmt: skip
        return GraphResult(nodes, edges, method="circuit-tracer",
                           target=str(d.get("metadata", {}).get("prompt", "")), meta=meta)  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, InputError) as e:
        raise FileFormatError(f"not a circuit-tracer graph JSON: {path} ({e})") from e


_MISSING = "\x00missing"


def save_graph_json(graph: GraphResult, path: str | Path, slug: str = "attrlab-graph",
                    scan: str = "attrlab") -> Path:  # fmt: skip
    """Write ``graph`` as a circuit-tracer / Neuronpedia graph file (atomically).
    A graph read by :func:`load_graph_json` is written back unchanged; an
    :func:`attrlab.attribution_graph` result is converted (see the module docs).

    Raises:
        InputError: a graph of another kind (e.g. routes).
    """
    if graph.method == "circuit-tracer":
        d = _from_loaded(graph)
    elif graph.method == "attribution_graph":
        d = _from_attrlab(graph, slug, scan)
    else:
        raise InputError(
            f"only attribution graphs have the circuit-tracer format, not {graph.method!r}"
        )
    text = json.dumps(d)
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _from_loaded(g: GraphResult) -> dict[str, Any]:
    fields = g.meta["node_fields"]
    nodes = []
    for i in range(g.n_nodes):
        nodes.append({k: g.nodes[k][i] for k in fields if g.nodes[k][i] != _MISSING})
    lf = g.meta["link_fields"]
    links = []
    for i in range(g.n_edges):
        links.append({k: g.edges[k][i] for k in lf if g.edges[k][i] != _MISSING})
    return {**g.meta["circuit_tracer"], "nodes": nodes, "links": links}


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _from_attrlab(g: GraphResult, slug: str, scan: str) -> dict[str, Any]:
    toks = g.meta.get("tokens") or []
    ids = g.meta.get("ids") or [0] * len(toks)
    L = max([int(v) for v in g.nodes["layer"]] + [0])  # the logit node's layer is n_layers
    tok = int(g.meta.get("target_id", 0))
    out_id: dict[str, str] = {}
    nodes = []
    for i, nid in enumerate(g.nodes["id"]):
        kind = g.nodes["kind"][i]
        layer, pos, feat = (
            int(g.nodes["layer"][i]),
            int(g.nodes["position"][i]),
            int(g.nodes["feature"][i]),
        )
        infl = float(g.nodes["influence"][i])
        if kind == "feature":
            node = {"node_id": f"{layer}_{feat}_{pos}", "feature": _cantor(layer, feat),
                    "layer": str(layer), "ctx_idx": pos, "feature_type": "cross layer transcoder",
                    "jsNodeId": f"{layer}_{feat}-0", "influence": infl,
                    "activation": float(g.nodes["activation"][i])}  # fmt: skip
        elif kind == "error":
            node = {"node_id": f"{layer}_-1_{pos}", "feature": -1, "layer": str(layer),
                    "ctx_idx": pos, "feature_type": "mlp reconstruction error",
                    "jsNodeId": f"{layer}_-1-{pos}", "influence": infl}  # fmt: skip
        elif kind == "embedding":
            v = int(ids[pos]) if pos < len(ids) else 0
            node = {"node_id": f"E_{v}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos,
                    "feature_type": "embedding", "jsNodeId": f"E_{v}-{pos}", "influence": infl}  # fmt: skip
        elif kind == "logit":
            node = {"node_id": f"{L + 1}_{tok}_{pos}", "feature": tok, "layer": str(L + 1),
                    "ctx_idx": pos, "feature_type": "logit", "is_target_logit": True,
                    "jsNodeId": f"L_{tok}-{pos}", "clerp": f"Output {g.target}"}  # fmt: skip
        else:
            continue  # transcoder biases: no counterpart in the format
        node.setdefault("token_prob", 0.0)
        node.setdefault("is_target_logit", False)
        node.setdefault("run_idx", 0)
        node.setdefault("reverse_ctx_idx", 0)
        node.setdefault("clerp", "")
        out_id[nid] = str(node["node_id"])
        nodes.append(node)
    links = [{"source": out_id[s], "target": out_id[t], "weight": float(w)}
             for s, t, w in zip(g.edges["source"], g.edges["target"], g.edges["weight"])
             if s in out_id and t in out_id]  # fmt: skip
    meta = {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": list(toks),
            "prompt": "".join(toks), "node_threshold": g.params.get("node_threshold"),
            "schema_version": 1}  # fmt: skip
    qp = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": meta, "qParams": qp, "nodes": nodes, "links": links}
