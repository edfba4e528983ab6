"""HTML rendering of results. Every string that reaches the page goes through
:func:`esc`; nothing here loads anything from the network.

Example:
    >>> from attrlab.viz.html import esc
    >>> esc('<script>alert(1)</script>')
    '&lt;script&gt;alert(1)&lt;/script&gt;'
"""

from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..result import Attribution


def esc(x: Any) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return html.escape(str(x), quote=True)


def color(score: float, scale: float) -> str:
    """A red (positive) / blue (negative) background for ``score`` relative to ``scale``."""
    if scale <= 0 or score != score:
        return "rgba(0,0,0,0)"
    a = min(1.0, abs(score) / scale)
    return f"rgba(220,40,40,{a:.3f})" if score >= 0 else f"rgba(40,90,220,{a:.3f})"


def render_tokens(tokens: list[str], scores: list[float]) -> str:
    """Inline token heatmap: one escaped ``<span>`` per token."""
    scale = max((abs(s) for s in scores), default=0.0)
    spans = [
        f'<span class="al-tok" title="{esc(f"{s:.4g}")}" '
        f'style="background:{color(s, scale)}">{esc(t)}</span>'
        for t, s in zip(tokens, scores)
    ]
    return "".join(spans)


def render_table(columns: dict[str, list[Any]], max_rows: int = 20) -> str:
    """An escaped HTML table from label columns."""
    names = list(columns)
    n = len(next(iter(columns.values()), []))
    head = "".join(f"<th>{esc(c)}</th>" for c in names)
    rows = []
    for i in range(min(n, max_rows)):
        cells = []
        for c in names:
            v = columns[c][i]
            cells.append(f"<td>{esc(f'{v:.4g}' if isinstance(v, float) else v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="al-table"><tr>{head}</tr>{"".join(rows)}</table>'


def render_attribution(r: Attribution, k: int = 15) -> str:
    """The notebook / report view of one result: header, top units, token heatmap."""
    parts = [
        '<div class="al-result">',
        f"<div><b>{esc(r.method)}</b> over <b>{esc(r.unit_kind)}</b> "
        f"({len(r)} units) — target <code>{esc(r.target)}</code>"
        f"{' — model ' + esc(r.model_id) if r.model_id else ''}</div>",
    ]
    if r.unit_kind in ("tokens", "words", "sentences", "spans") and "token" in r.units and r.scores.dim() == 1:
        parts.append(f"<div>{render_tokens([str(t) for t in r.units['token']], r.scores.tolist())}</div>")
    top = r.top(k)
    parts.append(render_table({c: top[c].tolist() for c in top.columns}, max_rows=k))
    if r.params:
        parts.append(f"<div><small>params: {esc(json.dumps(r.params, default=str))}</small></div>")
    if r.diagnostics:
        parts.append(
            f"<div><small>diagnostics: {esc(json.dumps(r.diagnostics, default=str))}</small></div>"
        )
    parts.append("</div>")
    return "".join(parts)
