"""Live causal checks on graph results: route graphs and attribution graphs.

The page sends the ids of the nodes the user pinned; :func:`check_graph` turns
them into an intervention and measures the graph's own target.

* **Attribution graphs** (:func:`attrlab.attribution_graph`; node ids
  ``f{layer}.{feature}@{pos}``, ``err{l}@{p}``, ``emb.{p}``, ``tcbias{l}``,
  ``logit``). The selected *feature* nodes are the units; error nodes are kept
  (as :func:`attrlab.evaluate.graph_faithfulness` keeps them), embeddings,
  biases and the logit are not interventions and are listed as ``ignored``.
  The target is the graph's (``meta["target_id"]``, minus
  ``meta["target_wrong_id"]`` for a logit difference) at the last position of
  the graph's prompt (``meta["ids"]``). Operations:

  - ``ablate``: the transcoders' features as units
    (:class:`attrlab.units.Features`, zero ablation) on four keep-masks in one
    batched call — every feature kept, the selection ablated, only the
    selection kept (every other feature zeroed, errors kept: exactly
    ``graph_faithfulness`` of the selection as a graph), no feature kept;
  - ``patch``: the same four masks with the features (and, where ablated, the
    errors' features' values) taken from a counterfactual prompt of the same
    token length (:class:`attrlab.ablations.Counterfactual`);
  - ``steer``: :func:`attrlab.dictionaries.intervene` with ``op`` ``"add"``,
    ``"set"`` or ``"scale"`` and ``value`` on every selected feature at its
    position; the metric before and after.

  The selected features' activations recomputed with the given transcoders
  must equal the ``activation`` the graph recorded: a graph and transcoders
  that do not belong together are refused (:class:`~attrlab.errors.InputError`).

* **Route graphs** (:func:`attrlab.routes`; nodes ``x{l}.{p}`` / ``m{l}.{p}``).
  The subgraph among the pinned nodes (edges whose two ends are pinned) names
  components: an ``attention`` edge into position ``i`` through head ``h`` of
  layer ``l`` is that head's output at ``i`` (``blocks.l.attn.z``; with
  ``per_head=False`` every head of the layer at ``i``), an ``mlp`` edge into
  ``i`` is the MLP's output at ``i`` (``blocks.l.mlp.out``); ``residual`` edges
  are the stream itself and name nothing. The target is the logit of the
  model's own top prediction at each root position (their mean). ``ablate``
  zeroes the components, ``patch`` sets them to the counterfactual run's; the
  four masks (all, selection ablated, only the selection kept among every head
  and MLP at every position, none) run as one batch of four.

Example:
    >>> import attrlab as al
    >>> lm = al.zoo.load("ioi")
    >>> g = al.routes(lm, "When Mary and John went to the store, John gave a drink to")
    >>> out = check_graph(lm, g, g.nodes["id"])  # every node: every component of the graph
    >>> out["n_components"] > 0, round(out["faithfulness"], 6) == round(out["faithfulness"], 6)
    (True, True)
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InputError
from ..graph import GraphResult
from ..model.lock import holds_model_lock

__all__ = ["OPS", "check_graph", "graph_kind"]

#: the checks a graph selection can run
OPS = ("ablate", "patch", "steer")
STEER_OPS = ("add", "set", "scale")
_FEATURE = re.compile(r"^f(\d+)\.(\d+)@(\d+)$")
_ROUTE = re.compile(r"^[xm](\d+)\.(\d+)$")


def graph_kind(graph: GraphResult) -> str:
    """``"attribution_graph"``, ``"routes"`` or ``"other"`` (a graph the server
    cannot run checks on, e.g. a circuit-tracer file without prompt ids).

    Example:
        >>> graph_kind(GraphResult({"id": ["a"]}, {"source": [], "target": [], "weight": []}))
        'other'
    """
    meta = graph.meta or {}
    if graph.method == "attribution_graph" and "ids" in meta and "target_id" in meta:
        return "attribution_graph"
    if graph.method == "routes":
        return "routes"
    return "other"


def _selected(graph: GraphResult, select: Sequence[Any]) -> list[str]:
    if not isinstance(select, (list, tuple)) or not select:
        raise InputError("pin at least one node (select: a list of node ids)")
    ids = set(graph.nodes["id"])
    out: list[str] = []
    for s in select:
        if not isinstance(s, str):
            raise InputError(f"graph nodes are selected by id (text), got {s!r}")
        if s not in ids:
            raise InputError(f"no node {s!r} in this graph")
        if s not in out:
            out.append(s)
    return out


def _metric(logits: torch.Tensor, tok: int, wrong: int | None) -> torch.Tensor:
    last = logits[:, -1].double()
    return last[:, tok] - (last[:, wrong] if wrong is not None else 0.0)


def _faith(m_all: float, m_sel: float, m_none: float) -> float | None:
    gap = m_all - m_none
    return None if abs(gap) <= 1e-6 * max(1.0, abs(m_all)) else (m_sel - m_none) / gap


def _summary(vals: Sequence[float], **extra: Any) -> dict[str, Any]:
    m_all, m_abl, m_sel, m_none = (float(v) for v in vals)
    return {"metric_clean": m_all, "metric_ablated": m_abl, "change": m_abl - m_all,
            "metric_selection_only": m_sel, "metric_none": m_none,
            "faithfulness": _faith(m_all, m_sel, m_none), **extra}  # fmt: skip


@holds_model_lock
def check_graph(
    lm: Any,
    graph: GraphResult,
    select: Sequence[str],
    transcoders: Sequence[Any] | None = None,
    op: str = "ablate",
    counterfactual: str | None = None,
    steer_op: str = "add",
    value: float = 1.0,
) -> dict[str, Any]:
    """Run a live check on the pinned nodes ``select`` of a graph result (see
    the module docs for what each ``op`` does on each graph kind).

    Args:
        lm: the model the graph was computed on.
        graph: a route graph or an attribution graph.
        select: node ids.
        transcoders: the per-layer transcoders of an attribution graph.
        op: ``"ablate"``, ``"patch"`` or ``"steer"``.
        counterfactual: the prompt to patch from (``patch``; same token length).
        steer_op, value: the edit for ``steer`` (``"add"``, ``"set"``, ``"scale"``).

    Returns:
        ``metric_clean``, ``metric_ablated`` (the selection ablated / patched /
        steered), ``change``, and for ``ablate`` / ``patch``
        ``metric_selection_only``, ``metric_none``, ``faithfulness``; ``op``,
        ``graph_kind``, ``selected`` (the nodes acted on), ``ignored`` (pinned
        nodes that are not interventions), ``elapsed_ms``.

    Raises:
        InputError: an unknown op or node, nothing to intervene on, a graph
            without what the check needs, transcoders that do not match.

    Example:
        >>> import attrlab as al
        >>> lm = al.zoo.load("ioi")
        >>> tcs = al.dictionaries.zoo_transcoders("ioi")
        >>> g = al.attribution_graph(lm, "When Mary and John went to the store, John gave a drink to",
        ...                          tcs, target=(" Mary", " John"))
        >>> feats = [n for n in g.nodes["id"] if n.startswith("f")]
        >>> out = check_graph(lm, g, feats, tcs)
        >>> abs(out["faithfulness"] - al.evaluate.graph_faithfulness(lm, g, tcs)["faithfulness"]) < 1e-6
        True
    """
    t0 = time.perf_counter()
    if op not in OPS:
        raise InputError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    if not isinstance(graph, GraphResult):
        raise InputError("check_graph takes a graph result (route graph or attribution graph)")
    kind = graph_kind(graph)
    sel = _selected(graph, select)
    if kind == "attribution_graph":
        out = _attribution_graph(lm, graph, sel, transcoders, op, counterfactual, steer_op, value)
    elif kind == "routes":
        if op == "steer":
            raise InputError("steering acts on dictionary features: open an attribution graph "
                             "(route graphs can be ablated or patched)")  # fmt: skip
        out = _routes(lm, graph, sel, op, counterfactual)
    else:
        raise InputError(
            "live checks run on attrlab route graphs and attribution graphs (with their prompt "
            "ids and target in meta); this graph has neither"
        )
    out.update(op=op, graph_kind=kind, elapsed_ms=(time.perf_counter() - t0) * 1000)
    return out


# ------------------------------------------------------------------ attribution graphs


def _attribution_graph(lm: Any, graph: GraphResult, sel: list[str], transcoders: Any, op: str,
                       counterfactual: str | None, steer_op: str, value: float) -> dict[str, Any]:  # fmt: skip
    from ..ablations import Counterfactual, Zero
    from ..dictionaries import intervene
    from ..targets import Logit, LogitDiff
    from ..units.features import Features

    if not transcoders:
        raise InputError("checks on an attribution graph need its transcoders: start the server "
                         "with --transcoders DIR (zoo models use their bundled set)")  # fmt: skip
    by_layer = {}
    for d in transcoders:
        parts = str(d.in_site).split(".")
        if len(parts) < 2 or not parts[1].isdigit():
            raise InputError(f"transcoder on {d.in_site!r}: not a per-layer transcoder")
        by_layer[int(parts[1])] = d
    layers = sorted(by_layer)
    ds = [by_layer[layer] for layer in layers]
    k_of = {layer: k for k, layer in enumerate(layers)}
    feats: list[tuple[str, int, int, int]] = []
    ignored: list[str] = []
    for nid in sel:
        m = _FEATURE.match(nid)
        if m is None:
            ignored.append(nid)
            continue
        layer, i, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if layer not in by_layer:
            raise InputError(f"node {nid}: no transcoder for layer {layer} (have {layers})")
        if i >= by_layer[layer].width:
            raise InputError(f"node {nid}: feature {i} is beyond the layer-{layer} transcoder's "
                             f"{by_layer[layer].width} features: not this graph's transcoders")  # fmt: skip
        feats.append((nid, layer, i, p))
    if not feats:
        raise InputError("pin at least one feature node (f{layer}.{feature}@{pos}): errors, "
                         "embeddings, biases and the logit are not interventions")  # fmt: skip
    ids = [int(t) for t in graph.meta["ids"]]
    prompt = torch.tensor([ids])
    tok = int(graph.meta["target_id"])
    wrong = graph.meta.get("target_wrong_id")
    wrong = None if wrong is None else int(wrong)
    P = len(ids)
    if any(p >= P for _, _, _, p in feats):
        raise InputError("a pinned feature's position is beyond the graph's prompt")
    base = {"selected": [f[0] for f in feats], "ignored": ignored, "n_selected": len(feats)}
    if op == "steer":
        if steer_op not in STEER_OPS:
            raise InputError(f"steer op must be one of {', '.join(STEER_OPS)}, got {steer_op!r}")
        edits = [(k_of[layer], p, i, steer_op, float(value)) for _, layer, i, p in feats]
        logits = intervene(lm, prompt, ds, [[], edits])
        mv = [float(x) for x in _metric(logits, tok, wrong).tolist()]
        return {**base, "metric_clean": mv[0], "metric_ablated": mv[1], "change": mv[1] - mv[0],
                "steer_op": steer_op, "value": float(value)}  # fmt: skip
    if op == "patch":
        if not counterfactual:
            raise InputError("patching needs a counterfactual prompt (same token length)")
        abl: Any = Counterfactual(counterfactual)
    else:
        abl = Zero()
    target = Logit(tok) if wrong is None else LogitDiff(tok, wrong)
    b = Features(ds).bind(lm, prompt, target.bind(lm), ablation=abl)
    lab = b.labels()
    unit_of = {
        (s, p, f): u
        for u, (s, p, kind, f) in enumerate(
            zip(lab["site"], lab["position"], lab["unit"], lab["feature"])
        )  # fmt: skip
        if kind == "feature"
    }
    act_of = dict(zip(graph.nodes["id"], graph.nodes.get("activation", [None] * graph.n_nodes)))
    idx = []
    for nid, layer, i, p in feats:
        d = by_layer[layer]
        u = unit_of.get((d.out_site, p, i))
        now = float(b.clean_acts[k_of[layer]][0, p, i])
        rec = act_of.get(nid)
        if (
            u is None
            or now == 0.0
            or (rec is not None and abs(now - float(rec)) > 1e-3 * max(1.0, abs(float(rec))))
        ):
            raise InputError(f"feature {nid} has activation {now:.4g} with these transcoders; the "
                             f"graph recorded {rec}: are they the transcoders the graph was "
                             "computed with?")  # fmt: skip
        idx.append(u)
    errors = torch.tensor([kind == "error" for kind in lab["unit"]])
    masks = torch.ones(4, b.n, dtype=torch.bool)
    masks[1, idx] = False
    masks[2] = errors
    masks[2, idx] = True
    masks[3] = errors
    vals = torch.as_tensor(b.f(masks)).double()
    vals = vals[:, 0] if vals.dim() == 2 else vals
    return {**base, **_summary(vals.tolist()), "n_features": int((~errors).sum()),
            "ablation": "counterfactual" if op == "patch" else "zero"}  # fmt: skip


# ------------------------------------------------------------------ route graphs


def _route_ids(lm: Any, graph: GraphResult) -> list[int]:
    meta = graph.meta or {}
    if meta.get("ids"):
        return [int(t) for t in meta["ids"]]
    toks = meta.get("tokens")
    if not toks:
        raise InputError("this route graph has neither prompt ids nor tokens in meta")
    for bos in (False, None):
        ids = [int(t) for t in lm.tokenize("".join(toks), prepend_bos=bos).input_ids[0]]
        if lm.to_str_tokens(torch.tensor(ids)) == list(toks):
            return ids
    raise InputError("the route graph's tokens do not re-tokenize to themselves with this "
                     "model: was it computed on another model?")  # fmt: skip


def _components(graph: GraphResult, sel: list[str], n_heads: int) -> set[tuple[str, int, int, int]]:
    """``("attn", layer, head, pos)`` / ``("mlp", layer, -1, pos)`` of the subgraph's edges."""
    pinned = set(sel)
    kinds = graph.edges.get("kind") or ["?"] * graph.n_edges
    layers = graph.edges.get("layer") or [None] * graph.n_edges
    heads = graph.edges.get("head") or [-1] * graph.n_edges
    out: set[tuple[str, int, int, int]] = set()
    for s, t, kind, layer, head in zip(graph.edges["source"], graph.edges["target"], kinds, layers,
                                       heads):  # fmt: skip
        if s not in pinned or t not in pinned or kind not in ("attention", "mlp"):
            continue
        m = _ROUTE.match(str(t))
        if m is None or layer is None:
            continue
        pos = int(m.group(2))
        if kind == "mlp":
            out.add(("mlp", int(layer), -1, pos))
        elif int(head) >= 0:
            out.add(("attn", int(layer), int(head), pos))
        else:
            out.update(("attn", int(layer), h, pos) for h in range(n_heads))
    return out


@torch.no_grad()
def _routes(lm: Any, graph: GraphResult, sel: list[str], op: str,
            counterfactual: str | None) -> dict[str, Any]:  # fmt: skip
    from ..model.interventions import Intervention

    cfg = lm.cfg
    L, H = cfg.n_layers, cfg.n_heads
    ids = _route_ids(lm, graph)
    P = len(ids)
    comps = _components(graph, sel, H)
    if not comps:
        raise InputError("the pinned nodes join no attention or MLP edge: pin both ends of at "
                         "least one such edge (residual edges are the stream itself)")  # fmt: skip
    if any(c[3] >= P or c[1] >= L for c in comps):
        raise InputError("the route graph names positions or layers this model does not have")
    roots = [int(r) for r in (graph.meta.get("roots") or [P - 1])]
    prompt = torch.tensor([ids])
    sites = [f"blocks.{layer}.{s}" for layer in range(L) for s in ("attn.z", "mlp.out")]
    clean, cache = lm.run(prompt, cache=sites)
    toks = [int(clean[0, r].argmax()) for r in roots]
    if op == "patch":
        if not counterfactual:
            raise InputError("patching needs a counterfactual prompt (same token length)")
        cf = lm.tokenize(counterfactual)
        if cf.shape[1] != P:
            raise InputError(f"the counterfactual has {cf.shape[1]} tokens, the graph's prompt "
                             f"{P}: patching needs the same length")  # fmt: skip
        _, src = lm.run(cf, cache=sites)
        a0 = {s: src[s] for s in sites}
    else:
        a0 = {s: torch.zeros_like(cache[s][:1]) for s in sites}
    head_keep = torch.ones(4, L, P, H)
    mlp_keep = torch.ones(4, L, P)
    head_keep[2:] = 0
    mlp_keep[2:] = 0
    for kind, layer, head, pos in comps:
        if kind == "attn":
            head_keep[1, layer, pos, head] = 0
            head_keep[2, layer, pos, head] = 1
        else:
            mlp_keep[1, layer, pos] = 0
            mlp_keep[2, layer, pos] = 1

    def mix(keep: torch.Tensor, ablated: torch.Tensor) -> Any:
        def fn(y: torch.Tensor) -> torch.Tensor:
            k = keep.to(y.device, y.dtype).reshape(keep.shape + (1,) * (y.dim() - keep.dim()))
            return y * k + ablated.to(y.device, y.dtype) * (1 - k)

        return fn

    ivs = []
    for layer in range(L):
        z, mo = f"blocks.{layer}.attn.z", f"blocks.{layer}.mlp.out"
        ivs.append(Intervention(z, mix(head_keep[:, layer], a0[z])))
        ivs.append(Intervention(mo, mix(mlp_keep[:, layer], a0[mo])))
    logits, _ = lm.run(prompt.repeat(4, 1), interventions=ivs)
    vals = torch.stack([logits[:, r, t].double() for r, t in zip(roots, toks)]).mean(0)
    labels = sorted(f"a{layer}.h{head}@{pos}" if kind == "attn" else f"m{layer}@{pos}"
                    for kind, layer, head, pos in comps)  # fmt: skip
    return {**_summary(vals.tolist()), "selected": sel, "ignored": [], "components": labels,
            "n_components": len(comps), "n_selected": len(sel),
            "target_tokens": [lm.to_str_tokens(torch.tensor([t]))[0] for t in toks],
            "ablation": "counterfactual" if op == "patch" else "zero"}  # fmt: skip
