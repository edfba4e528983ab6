"""SVG and HTML views of a :class:`attrlab.graph.GraphResult` (no computation).

Nodes sit on a grid: ``x`` from the ``position`` column, ``y`` from ``level``
(bottom = the inputs); without those columns, nodes line up in order. Edges are
drawn as lines whose width grows with the weight and whose colour says the
kind (``residual`` grey, ``attention`` blue, ``mlp`` orange); every label is
escaped and carried in ``<title>`` tooltips.

Example:
    >>> from attrlab.graph import GraphResult
    >>> g = GraphResult({"id": ["a", "b"], "position": [0, 0], "level": [0, 1]},
    ...                 {"source": ["a"], "target": ["b"], "weight": [0.9], "kind": ["residual"]})
    >>> svg = graph_svg(g)
    >>> svg.startswith("<svg") and "</svg>" in svg
    True
"""

from __future__ import annotations

from typing import Any

from .html import CSS, esc, fmt, render_table

__all__ = ["graph_svg", "graph_html"]

COLORS = {"residual": "#8c959f", "attention": "#0969da", "mlp": "#bc4c00"}


def graph_svg(
    g: Any, width_per_pos: int = 64, height_per_level: int = 46, max_tokens: int = 200
) -> str:
    """The graph as a standalone SVG string (see the module docs).

    Example:
        >>> from attrlab.graph import GraphResult
        >>> g = GraphResult({"id": ["<x>"]}, {"source": [], "target": [], "weight": []})
        >>> "&lt;x&gt;" in graph_svg(g)
        True
    """
    ids = g.nodes["id"]
    pos = g.nodes.get("position") or list(range(len(ids)))
    lev = g.nodes.get("level") or [0.0] * len(ids)
    cols = sorted(set(pos))
    col_of = {p: i for i, p in enumerate(cols)}
    top = max(lev, default=0.0)
    margin, label_h = 30, 40
    W = margin * 2 + width_per_pos * max(1, len(cols))
    H = margin * 2 + label_h + int(height_per_level * (top + 1))
    xy = {}
    for n, p, lv in zip(ids, pos, lev):
        x = margin + width_per_pos * (col_of[p] + 0.5)
        y = margin + height_per_level * (top - lv) + 10
        xy[n] = (x, y)
    wmax = max((abs(w) for w in g.edges["weight"]), default=1.0) or 1.0
    kinds = g.edges.get("kind") or ["residual"] * g.n_edges
    heads = g.edges.get("head") or [None] * g.n_edges
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" role="img" font-family="sans-serif" font-size="11">']  # fmt: skip
    for s, t, w, k, h in zip(g.edges["source"], g.edges["target"], g.edges["weight"], kinds, heads):
        (x1, y1), (x2, y2) = xy[s], xy[t]
        if k == "mlp":  # an MLP edge joins two nodes at one position: bow it
            x1 += 8
            x2 += 8
        sw = 0.6 + 5.0 * abs(w) / wmax
        label = f"{s} -> {t} ({k}{'' if h in (None, -1) else f', head {h}'}): {fmt(w)}"
        parts.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                     f'stroke="{COLORS.get(str(k), "#57606a")}" stroke-width="{sw:.2f}" '
                     f'stroke-opacity="0.75"><title>{esc(label)}</title></line>')  # fmt: skip
    for n in ids:
        x, y = xy[n]
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#24292f">'
                     f"<title>{esc(n)}</title></circle>")  # fmt: skip
    toks = g.meta.get("tokens") or []
    for p in cols[:max_tokens]:
        if isinstance(p, int) and 0 <= p < len(toks):
            x = margin + width_per_pos * (col_of[p] + 0.5)
            parts.append(f'<text x="{x:.1f}" y="{H - label_h / 2:.1f}" text-anchor="middle">'
                         f"{esc(toks[p])}</text>")  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def _via_heads(g: Any, shown: dict[str, list[Any]], k: int = 2) -> list[str]:
    """Each shown edge's ``k`` strongest head loadings, as shares of its weight."""
    hl = g.tables["head_loadings"]
    by_edge: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for s, t, la, h, w in zip(hl["source"], hl["target"], hl["layer"], hl["head"], hl["weight"]):
        by_edge.setdefault((s, t), []).append((w, "resid" if h < 0 else f"L{la}H{h}"))
    out = []
    for s, t, w in zip(shown["source"], shown["target"], shown["weight"]):
        parts = sorted(by_edge.get((s, t), []), key=lambda x: -abs(x[0]))[:k]
        out.append(", ".join(f"{name} {x / w:.2f}" for x, name in parts if w))
    return out


def graph_html(g: Any, max_rows: int = 20) -> str:
    """An HTML fragment: title, parameters, the SVG and the strongest edges.

    Example:
        >>> from attrlab.graph import GraphResult
        >>> g = GraphResult({"id": ["a"]}, {"source": [], "target": [], "weight": []}, method="<m>")
        >>> "&lt;m&gt;" in graph_html(g) and "<m>" not in graph_html(g)
        True
    """
    order = sorted(range(g.n_edges), key=lambda i: -abs(g.edges["weight"][i]))[:max_rows]
    shown = {k: [v[i] for i in order] for k, v in g.edges.items() if k != "roots"}
    if "head_loadings" in getattr(g, "tables", {}):
        shown["via heads"] = _via_heads(g, shown)
    params = ", ".join(f"{esc(k)}={esc(v)}" for k, v in g.params.items())
    return (
        f"<div class='al-root'><style>{CSS}</style><div class='al-panel'>"
        f"<h3>{esc(g.method)} <span class='al-mono'>{esc(g.target)}</span></h3>"
        f"<div class='al-mono'>{params}</div>"
        f"<div style='overflow-x:auto'>{graph_svg(g)}</div>"
        f"{render_table(shown, max_rows=max_rows)}</div></div>"
    )
