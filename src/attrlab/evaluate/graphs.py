"""Causal checks of attribution graphs: run the model with every transcoder
feature outside the graph ablated (zeroed) and see how much of the target the
graph's features carry.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("llama"))
    >>> tcs = [al.dictionaries.Dictionary.random(lm.cfg.d_model, 32, f"blocks.{l}.mlp.in",
    ...        f"blocks.{l}.mlp.out", activation="topk", k=4, seed=l) for l in range(lm.cfg.n_layers)]
    >>> g = al.attribution_graph(lm, "a b c", tcs, target=" a")
    >>> r = graph_faithfulness(lm, g, tcs)
    >>> abs(r["metric_full"] - r["metric_clean"]) < 1e-4
    True
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from ..model.lock import holds_model_lock

__all__ = ["graph_faithfulness"]


@holds_model_lock
def graph_faithfulness(lm: Any, graph: Any, transcoders: list[Any]) -> dict[str, Any]:
    """Ablate (zero) every transcoder feature that is not a node of ``graph``,
    keep the error terms, and measure the graph's target (its logit, or logit
    difference).

    Returns ``metric_clean`` (the model), ``metric_full`` (every feature kept:
    equals clean), ``metric_graph`` (only the graph's features), ``metric_none``
    (no feature, errors kept), ``faithfulness`` = ``(graph - none) / (full -
    none)``, ``n_graph_features``, ``n_features``.
    """
    from ..targets import Logit, LogitDiff
    from ..units.features import Features

    ids = graph.meta.get("ids")
    tok = graph.meta.get("target_id")
    if ids is None or tok is None:
        raise InputError(
            "graph_faithfulness needs a graph from al.attribution_graph (prompt ids, target)"
        )
    prompt = torch.tensor([ids])
    wrong = graph.meta.get("target_wrong_id")
    target = Logit(int(tok)) if wrong is None else LogitDiff(int(tok), int(wrong))
    if not isinstance(transcoders, (list, tuple)):
        raise InputError("graph_faithfulness takes per-layer transcoders (a list); cross-layer "
                         "transcoders are not supported yet")  # fmt: skip
    ds = sorted(transcoders, key=lambda d: int(d.in_site.split(".")[1]))
    b = Features(ds).bind(lm, prompt, target.bind(lm))
    lab = b.labels()
    layer_of = {d.out_site: int(d.in_site.split(".")[1]) for d in ds}
    in_graph = set(graph.nodes["id"])
    keep_graph = torch.tensor([
        kind == "error" or f"f{layer_of[s]}.{f}@{p}" in in_graph
        for s, p, kind, f in zip(lab["site"], lab["position"], lab["unit"], lab["feature"])
    ])  # fmt: skip
    errors = torch.tensor([kind == "error" for kind in lab["unit"]])
    masks = torch.stack([torch.ones(b.n, dtype=torch.bool), keep_graph, errors])
    full, g, none = b.f(masks)[:, 0].tolist()
    logits, _ = lm.run(prompt)
    clean = float(logits[0, -1, int(tok)] - (0.0 if wrong is None else logits[0, -1, int(wrong)]))
    gap = full - none
    return {
        "metric_clean": clean, "metric_full": full, "metric_graph": g, "metric_none": none,
        "faithfulness": (g - none) / gap if abs(gap) > 1e-12 else float("nan"),
        "n_graph_features": int((keep_graph & ~errors).sum()), "n_features": int((~errors).sum()),
    }  # fmt: skip
