"""HTML rendering of results. Every string that reaches the page goes through
:func:`esc`; nothing here loads anything from the network and nothing needs
JavaScript. The same panel renderers serve the notebook view
(``Attribution._repr_html_``) and the report (:mod:`attrlab.report`).

A panel is chosen from the result's unit kind and label columns:

=====================================  ==========================================
tokens / words / sentences / spans      inline heatmap over the text (1-D scores)
                                        or a prompt x generated-token grid (2-D)
heads (``layer``, ``head``)             layer x head heatmap
components with ``layer``+``position``  layer x position heatmap
layers / attn / mlp / neurons           diverging bars
sources, train (a ``text`` column)      ranked list with the text
edges                                   circuit graph (SVG) and the top edges
logit lens                              per-layer table of logprob, rank, top tokens
=====================================  ==========================================

Text that would display differently from what it is never reaches the page
as is: control, zero-width and bidirectional-control characters (U+202E and
friends) are shown as visible escapes such as ``\\u202e`` (:func:`visible`),
and each token, label and prompt is its own bidirectional island (``<bdi>``,
``unicode-bidi: isolate``), so right-to-left text in one token cannot reorder
its neighbours.

Example:
    >>> from attrlab.viz.html import esc
    >>> esc('<script>alert(1)</script>')
    '&lt;script&gt;alert(1)&lt;/script&gt;'
    >>> print(esc("abc" + chr(0x202E) + "def"))
    abc\\u202edef
"""

from __future__ import annotations

import html
import json
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..result import Attribution

TOKEN_KINDS = ("tokens", "words", "sentences", "spans")
TEXT_KINDS = ("sources", "train", "examples", "training", "documents")
LENS_METHODS = ("logit_lens", "logit-lens", "lens")

CSS = """
.al-root{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 color:#1f2328;font-size:14px;line-height:1.45}
.al-root code,.al-root .al-mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
 font-size:12.5px}
.al-panel{border:1px solid #d0d7de;border-radius:8px;padding:14px 16px;margin:14px 0;background:#fff}
.al-panel h3{margin:0 0 4px 0;font-size:16px}
.al-sub{color:#57606a;font-size:12.5px;margin-bottom:10px}
.al-tok{unicode-bidi:isolate;white-space:pre;border-radius:3px;padding:1px 1px;margin:0 1px;font-family:ui-monospace,
 SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;line-height:2}
.al-text{background:#f6f8fa;border-radius:6px;padding:8px 10px;word-wrap:break-word}
.al-table{border-collapse:collapse;margin:8px 0;font-size:12.5px}
.al-table th,.al-table td{border-bottom:1px solid #eaeef2;padding:3px 8px;text-align:left;
 vertical-align:top}
.al-table th{background:#f6f8fa;font-weight:600}
.al-table td.al-num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.al-table td.al-long{max-width:620px;white-space:pre-wrap;word-break:break-word}
.al-hm{border-collapse:separate;border-spacing:2px;margin:8px 0;font-size:11.5px}
.al-hm td.al-cell{min-width:30px;height:24px;text-align:center;border-radius:3px;
 font-variant-numeric:tabular-nums;color:#1f2328}
.al-hm td.al-cell.al-na{background:repeating-linear-gradient(45deg,#f6f8fa,#f6f8fa 3px,#eaeef2 3px,
 #eaeef2 6px)}
.al-hm th{font-weight:500;color:#57606a;padding:0 4px;white-space:pre;font-family:ui-monospace,
 SFMono-Regular,Menlo,Consolas,monospace}
.al-hm th.al-col{writing-mode:vertical-rl;transform:rotate(180deg);text-align:left;
 vertical-align:bottom;max-height:110px;overflow:hidden}
.al-hm th.al-axis{color:#8c959f;font-family:inherit;font-style:italic}
.al-bars{margin:8px 0;font-size:12.5px}
.al-bar-row{display:flex;align-items:center;height:20px}
.al-bar-label{width:190px;text-align:right;padding-right:8px;white-space:pre;overflow:hidden;
 text-overflow:ellipsis;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
 font-size:12px}
.al-bar-track{position:relative;width:360px;height:14px;background:#f6f8fa;border-radius:2px}
.al-bar-mid{position:absolute;left:50%;top:0;bottom:0;width:1px;background:#8c959f}
.al-bar{position:absolute;top:2px;height:10px;border-radius:2px}
.al-bar-val{width:80px;padding-left:8px;font-variant-numeric:tabular-nums;color:#57606a}
.al-meta{margin-top:10px;font-size:12px;color:#57606a;display:grid;
 grid-template-columns:max-content 1fr;gap:2px 10px}
.al-meta dt{font-weight:600;color:#424a53}
.al-meta dd{margin:0;word-break:break-word}
.al-kv{display:inline-block;background:#f6f8fa;border:1px solid #eaeef2;border-radius:4px;
 padding:0 5px;margin:1px 4px 1px 0;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,
 monospace;font-size:11.5px}
.al-kv.al-warn{background:#fff8c5;border-color:#d4a72c}
.al-legend{display:inline-flex;align-items:center;gap:6px;font-size:11.5px;color:#57606a}
.al-legend span.al-sw{display:inline-block;width:90px;height:10px;border-radius:2px;
 background:linear-gradient(90deg,rgba(40,90,220,1),rgba(40,90,220,0),rgba(220,40,40,0),
 rgba(220,40,40,1))}
.al-note{color:#57606a;font-style:italic}
.al-minibar{width:90px;height:9px;background:#f6f8fa;border-radius:2px;margin-top:4px}
.al-minibar div{height:9px;border-radius:2px}
.al-root bdi{unicode-bidi:isolate}
.al-circuit svg{max-width:100%;height:auto;border:1px solid #eaeef2;border-radius:6px;
 background:#fcfcfd}
"""


# ----------------------------------------------------------------- basics
# categories of characters that draw nothing or change how their neighbours are
# drawn: controls, format characters (zero-width, bidirectional controls, tags),
# line / paragraph separators, surrogates
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
# letters that render as blanks (Hangul fillers, Khmer inherent vowels)
_BLANK_LETTERS = frozenset("\u115f\u1160\u17b4\u17b5\u3164\uffa0")


def visible(text: str, keep: str = "\n\t") -> str:
    """``text`` with every invisible or reordering character written as an escape.

    Control, zero-width and bidirectional-control characters (``U+202E``
    RIGHT-TO-LEFT OVERRIDE, ``U+200B`` ZERO WIDTH SPACE, ...) become
    ``\\u202e``-style text, so what is shown is what the string holds. Characters
    in ``keep`` (newline and tab by default) stay. Printable text is returned as is.

    Example:
        >>> print(visible("pay" + chr(0x202E) + "txt.exe " + chr(0x200B) + "Mary"))
        pay\\u202etxt.exe \\u200bMary
        >>> visible("plain text")
        'plain text'
    """
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c in keep or not (unicodedata.category(c) in _HIDDEN_CATEGORIES or c in _BLANK_LETTERS):
            out.append(c)
        elif ord(c) < 0x100:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return "".join(out)


def esc(x: Any) -> str:
    """Escape any value for HTML text or a quoted attribute (invisible and
    bidirectional-control characters made visible, see :func:`visible`)."""
    return html.escape(visible(str(x)), quote=True)


def bdi(x: Any) -> str:
    """``x`` escaped, in its own bidirectional island: right-to-left text inside
    it cannot reorder the text around it.

    Example:
        >>> bdi("<b>")
        '<bdi>&lt;b&gt;</bdi>'
    """
    return f"<bdi>{esc(x)}</bdi>"


def fmt(v: Any, digits: int = 4) -> str:
    """A compact number (``0.1235``, ``-3.2e-05``) or ``str(v)`` for non-numbers."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if f != f:
        return "nan"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    return f"{f + 0.0:.{digits}g}" if f != 0 else "0"


def color(score: float, scale: float) -> str:
    """A red (positive) / blue (negative) background for ``score`` relative to ``scale``."""
    if scale <= 0 or score != score:
        return "rgba(0,0,0,0)"
    a = min(1.0, abs(score) / scale)
    return f"rgba(220,40,40,{a:.3f})" if score >= 0 else f"rgba(40,90,220,{a:.3f})"


def _scale(values: Sequence[float]) -> float:
    finite = [abs(v) for v in values if v == v and not math.isinf(v)]
    return max(finite, default=0.0)


def show_token(t: Any) -> str:
    """A token as displayed: newlines and tabs made visible (the caller escapes)."""
    return str(t).replace("\n", "\u21b5").replace("\t", "\u2192")


def legend(scale: float) -> str:
    """The colour legend: blue negative, red positive, with the scale."""
    return (
        f'<span class="al-legend">{esc(fmt(-scale, 3))}<span class="al-sw"></span>'
        f"{esc(fmt(scale, 3))}</span>"
    )


def _fg(s: float, scale: float) -> str:
    return ";color:#fff" if scale > 0 and s == s and abs(s) / scale > 0.6 else ""


# ----------------------------------------------------------- primitives
def render_tokens(tokens: list[str], scores: list[float]) -> str:
    """Inline token heatmap: one escaped, bidi-isolated ``<bdi>`` per token."""
    scale = _scale(scores)
    # <bdi>: each token is its own bidirectional island (no reordering across tokens)
    spans = [
        f'<bdi class="al-tok" title="{esc(fmt(s))}" '
        f'style="background:{color(s, scale)}{_fg(s, scale)}">{esc(show_token(t))}</bdi>'
        for t, s in zip(tokens, scores)
    ]
    return "".join(spans)


def render_table(
    columns: Mapping[str, Sequence[Any]], max_rows: int = 20, long: Sequence[str] = ()
) -> str:
    """An escaped HTML table from label columns (``long`` columns wrap their text)."""
    names = list(columns)
    n = len(next(iter(columns.values()), []))
    head = "".join(f"<th>{esc(c)}</th>" for c in names)
    rows = []
    for i in range(min(n, max_rows)):
        cells = []
        for c in names:
            v = columns[c][i]
            if isinstance(v, float) or _is_number(v):
                cells.append(f'<td class="al-num">{esc(fmt(v))}</td>')
            elif c in long:
                cells.append(f'<td class="al-long">{bdi(v)}</td>')
            else:
                cells.append(f"<td>{bdi(show_token(v) if isinstance(v, str) else v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f'<div class="al-note">… {n - max_rows} more rows</div>' if n > max_rows else ""
    return f'<table class="al-table"><tr>{head}</tr>{"".join(rows)}</table>{more}'


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    try:
        import numpy as np

        return isinstance(v, (int, float, np.integer, np.floating))
    except ImportError:  # pragma: no cover
        return isinstance(v, (int, float))


def render_heatmap(
    matrix: Sequence[Sequence[float]],
    row_labels: Sequence[Any],
    col_labels: Sequence[Any],
    row_title: str = "",
    col_title: str = "",
    values: bool | None = None,
    vertical_cols: bool = False,
) -> str:
    """A coloured grid (HTML table): ``matrix[i][j]`` at row ``i``, column ``j``.

    NaN cells are drawn hatched (e.g. a generated token cannot depend on later ones).
    ``values`` prints the numbers in the cells (default: when the grid is small).
    """
    flat = [float(v) for row in matrix for v in row]
    scale = _scale(flat)
    n_cols = len(col_labels)
    if values is None:
        values = n_cols <= 16
    col_cls = ' class="al-col"' if vertical_cols else ""
    head = f'<th class="al-axis">{esc(row_title)} \\ {esc(col_title)}</th>' + "".join(
        f"<th{col_cls}>{bdi(show_token(c))}</th>" for c in col_labels
    )
    body = []
    for i, row in enumerate(matrix):
        cells = []
        for j, v in enumerate(row):
            v = float(v)
            tip = f"{show_token(row_labels[i])} / {show_token(col_labels[j])}: {fmt(v)}"
            if v != v:
                cells.append(f'<td class="al-cell al-na" title="{esc(tip)}"></td>')
                continue
            text = esc(fmt(v, 2)) if values else ""
            fg = ";color:#fff" if scale > 0 and abs(v) / scale > 0.6 else ""
            cells.append(
                f'<td class="al-cell" title="{esc(tip)}" style="background:{color(v, scale)}{fg}">'
                f"{text}</td>"
            )
        body.append(f"<tr><th>{bdi(show_token(row_labels[i]))}</th>{''.join(cells)}</tr>")
    return f'<div>{legend(scale)}</div><table class="al-hm"><tr>{head}</tr>{"".join(body)}</table>'


def render_bars(labels: Sequence[Any], scores: Sequence[float], max_rows: int = 40) -> str:
    """Diverging horizontal bars (negative left, positive right of the centre line)."""
    scores = [float(s) for s in scores]
    scale = _scale(scores)
    rows = []
    for lab, s in list(zip(labels, scores))[:max_rows]:
        frac = 0.0 if scale <= 0 or s != s else min(1.0, abs(s) / scale) * 50
        side = (
            f"left:50%;width:{frac:.2f}%" if s >= 0 else f"left:{50 - frac:.2f}%;width:{frac:.2f}%"
        )
        col = "rgba(220,40,40,.85)" if s >= 0 else "rgba(40,90,220,.85)"
        rows.append(
            f'<div class="al-bar-row" title="{esc(show_token(lab))}: {esc(fmt(s))}">'
            f'<div class="al-bar-label">{bdi(show_token(lab))}</div>'
            f'<div class="al-bar-track"><div class="al-bar-mid"></div>'
            f'<div class="al-bar" style="{side};background:{col}"></div></div>'
            f'<div class="al-bar-val">{esc(fmt(s, 3))}</div></div>'
        )
    more = (
        f'<div class="al-note">… {len(scores) - max_rows} more</div>'
        if len(scores) > max_rows
        else ""
    )
    return f'<div class="al-bars">{"".join(rows)}</div>{more}'


def _kv(key: str, value: Any, warn: bool = False) -> str:
    if isinstance(value, (list, tuple)) and value and all(_is_number(v) for v in value):
        shown = [fmt(v, 3) for v in value[:8]]
        text = "[" + ", ".join(shown) + (", …" if len(value) > 8 else "") + "]"
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=str)
        if len(text) > 110:
            text = text[:107] + "…"
    else:
        text = fmt(value)
    cls = "al-kv al-warn" if warn else "al-kv"
    return f'<span class="{cls}">{esc(key)}={esc(text)}</span>'


def _warn_key(key: str, value: Any) -> bool:
    """Flag large relative completeness errors and weak agreement."""
    if isinstance(value, (list, tuple)) and value and all(_is_number(x) for x in value):
        value = max(value, key=lambda x: abs(float(x)))
    try:
        v = float(value)
    except (TypeError, ValueError):
        return False
    k = key.lower()
    if "completeness" in k and "rel" in k:
        return abs(v) > 0.05
    if k.startswith(("pearson", "spearman", "agreement")):
        return v < 0.5
    return False


def render_meta(r: Attribution) -> str:
    """Method, target, model, parameters and diagnostics of a result."""
    items = [
        (
            "method",
            f"<code>{esc(r.method)}</code> over <code>{esc(r.unit_kind)}</code> "
            f"({len(r)} units{_shape_note(r)})",
        ),
        ("target", f"<code>{bdi(r.target)}</code>"),
    ]
    if r.model_id:
        items.append(("model", f"<code>{bdi(r.model_id)}</code>"))
    params = {k: v for k, v in r.params.items() if k != "progress" and v is not None}
    items.append(
        (
            "parameters",
            "".join(_kv(k, v) for k, v in params.items()) or '<span class="al-note">none</span>',
        )
    )
    diag = _flatten(r.diagnostics)
    items.append(
        (
            "diagnostics",
            "".join(_kv(k, v, _warn_key(k, v)) for k, v in diag.items())
            or '<span class="al-note">none reported</span>',
        )
    )
    body = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items)
    return f'<dl class="al-meta">{body}</dl>'


def _shape_note(r: Attribution) -> str:
    return f" x {r.scores.shape[0]} rows" if r.scores.dim() == 2 else ""


def _flatten(d: Mapping[str, Any], prefix: str = "", depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and depth < 2:
            out.update(_flatten(v, key + ".", depth + 1))
        else:
            out[key] = v
    return out


# ------------------------------------------------------------- panels
def unit_label(r: Attribution, i: int) -> str:
    """A short label for unit ``i``: ``L3H2``, ``L1 mlp``, ``@4 ' Mary'`` (strings unquoted)."""
    for a, b in (("upstream", "downstream"), ("src", "dst")):
        if a in r.units and b in r.units:
            return f"{r.units[a][i]}\u2192{r.units[b][i]}"
    parts = []
    for key in ordered_columns(list(r.units)):
        if key in _QUIET_COLUMNS:
            continue
        x = r.units[key][i]
        if isinstance(x, bool):
            continue
        if key == "layer":
            if isinstance(x, int) and x < 0 and len(r.units) > 1:
                continue  # embeddings / final-norm terms: their other label says it
            parts.append(f"L{x}")
        elif key == "head":
            parts.append(f"H{x}")
        elif key == "position":
            parts.append(f"@{x}")
        elif isinstance(x, str):
            parts.append(x)
        else:
            parts.append(f"{key}={x}")
    return " ".join(parts)


def _col(r: Attribution, *names: str) -> list[Any] | None:
    for n in names:
        if n in r.units:
            return r.units[n]
    return None


def _row_scores(r: Attribution) -> list[float]:
    s = r.scores if r.scores.dim() == 1 else r.scores.sum(0)
    return [float(x) for x in s.tolist()]


def _token_panel(r: Attribution, k: int) -> str:
    tokens = _col(r, "token", "text", "word", "sentence", "span")
    if tokens is None:
        tokens = [unit_label(r, i) for i in range(len(r))]
    tokens = [str(t) for t in tokens]
    if r.scores.dim() == 1:
        scores = r.scores.tolist()
        return (
            f"<div>{legend(_scale(scores))}</div>"
            f'<div class="al-text">{render_tokens(tokens, scores)}</div>' + _top_table(r, min(k, 8))
        )
    rows = _row_labels(r)
    matrix = r.scores.tolist()
    upos, rpos = r.units.get("position"), r.rows.get("position")
    if upos is not None and rpos is not None and len(rpos) == len(matrix):
        # a row's token cannot depend on itself or later tokens: hatch those cells
        for i, p in enumerate(rpos):
            for j, q in enumerate(upos):
                if _is_number(p) and _is_number(q) and q >= p:
                    matrix[i][j] = float("nan")
    return render_heatmap(
        matrix,
        rows,
        tokens,
        row_title="generated",
        col_title="input token",
        values=False,
        vertical_cols=True,
    )


def _row_labels(r: Attribution) -> list[str]:
    n = r.scores.shape[0]
    for key in ("token", "text", "target", "label"):
        if key in r.rows and len(r.rows[key]) == n:
            return [str(x) for x in r.rows[key]]
    if r.rows:
        first = next(iter(r.rows.values()))
        if len(first) == n:
            return [str(x) for x in first]
    return [f"row {i}" for i in range(n)]


def _grid(
    r: Attribution, row_key: str, col_key: str
) -> tuple[list[Any], list[Any], list[list[float]]]:
    """Sum scores into a ``row_key`` x ``col_key`` grid (NaN where no unit)."""
    rk, ck = r.units[row_key], r.units[col_key]
    rows = sorted(set(rk), key=_sort_key)
    cols = sorted(set(ck), key=_sort_key)
    ri = {v: i for i, v in enumerate(rows)}
    ci = {v: i for i, v in enumerate(cols)}
    grid = [[float("nan")] * len(cols) for _ in rows]
    for a, b, s in zip(rk, ck, _row_scores(r)):
        cur = grid[ri[a]][ci[b]]
        grid[ri[a]][ci[b]] = s if cur != cur else cur + s
    return rows, cols, grid


def _sort_key(v: Any) -> tuple[int, Any]:
    return (0, v) if isinstance(v, (int, float)) else (1, str(v))


def _grid_by(
    r: Attribution, row_fn: Any, col_key: str, rows_subset: Sequence[int] | None = None
) -> tuple[list[Any], list[Any], list[list[float]]]:
    """Grid of summed scores with rows keyed by ``row_fn(i)`` and columns by ``col_key``."""
    idx = list(rows_subset) if rows_subset is not None else list(range(len(r)))
    scores = _row_scores(r)
    rkeys = [row_fn(i) for i in idx]
    rows = list(dict.fromkeys(sorted(rkeys, key=_sort_key)))
    cols = sorted({r.units[col_key][i] for i in idx}, key=_sort_key)
    ri = {v: n for n, v in enumerate(rows)}
    ci = {v: n for n, v in enumerate(cols)}
    grid = [[float("nan")] * len(cols) for _ in rows]
    for i, rk in zip(idx, rkeys):
        a, b = ri[rk], ci[r.units[col_key][i]]
        grid[a][b] = scores[i] if grid[a][b] != grid[a][b] else grid[a][b] + scores[i]
    return rows, cols, grid


def _position_labels(r: Attribution, positions: Sequence[Any]) -> tuple[list[Any], bool]:
    tok = _col(r, "token")
    if tok is None:
        return list(positions), False
    by_pos = {p: t for p, t in zip(r.units["position"], tok)}
    return [f"{p}:{by_pos.get(p, '')}" for p in positions], True


def _heads_panel(r: Attribution, k: int) -> str:
    n_heads = len({(a, b) for a, b in zip(r.units["layer"], r.units["head"])})
    if "position" in r.units and n_heads <= 64:
        # per position: one row per head (L{l}H{h}), one column per position
        rows, positions, grid = _grid_by(
            r, lambda i: (r.units["layer"][i], r.units["head"][i]), "position"
        )
        labels, vertical = _position_labels(r, positions)
        grid_html = render_heatmap(
            grid,
            [f"L{a}H{b}" for a, b in rows],
            labels,
            row_title="head",
            col_title="position",
            values=False,
            vertical_cols=vertical,
        )
        return grid_html + _top_table(r, min(k, 8))
    layers, heads, grid = _grid(r, "layer", "head")
    note = ""
    if "position" in r.units:
        note = '<div class="al-note">summed over positions</div>'
    grid_html = render_heatmap(
        grid,
        [f"L{x}" for x in layers],
        [f"H{h}" for h in heads],
        row_title="layer",
        col_title="head",
    )
    return note + grid_html + _top_table(r, min(k, 5))


def _layer_position_panel(r: Attribution, k: int) -> str:
    """Layer x position heatmaps, one per site / component when there are several."""
    group_key = next(
        (c for c in ("site", "component", "kind") if c in r.units and len(set(r.units[c])) > 1),
        None,
    )
    groups: list[tuple[str, list[int]]] = [("", list(range(len(r))))]
    if group_key is not None:
        values = list(dict.fromkeys(r.units[group_key]))
        groups = [
            (str(v), [i for i in range(len(r)) if r.units[group_key][i] == v]) for v in values
        ]
    parts = []
    for name, idx in groups:
        layers, positions, grid = _grid_by(r, lambda i: r.units["layer"][i], "position", idx)
        labels, vertical = _position_labels(r, positions)
        if name:
            parts.append(f'<div class="al-sub"><code>{esc(name)}</code></div>')
        parts.append(
            render_heatmap(
                grid,
                [f"L{x}" for x in layers],
                labels,
                row_title="layer",
                col_title="position",
                values=len(positions) <= 12,
                vertical_cols=vertical,
            )
        )
    return "".join(parts) + _top_table(r, min(k, 8))


def _bars_panel(r: Attribution, k: int) -> str:
    labels = [unit_label(r, i) for i in range(len(r))]
    scores = _row_scores(r)
    if len(r) > 40:
        order = sorted(range(len(r)), key=lambda i: -abs(scores[i]))[:k]
        labels = [labels[i] for i in order]
        scores = [scores[i] for i in order]
        return '<div class="al-note">largest |score| first</div>' + render_bars(labels, scores)
    return render_bars(labels, scores)


def _text_panel(r: Attribution, k: int) -> str:
    # sources / training examples: the most supporting first (positive = raises the target)
    top = top_frame(r, k, by="pos")
    scores = [float(x) for x in top["score"].tolist()]
    scale = _scale(scores)
    long = [c for c in top.columns if c in ("text", "source_text", "document", "content")]
    other = [c for c in top.columns if c != "score" and c not in long]
    head = "<th>rank</th><th>score</th><th></th>" + "".join(
        f"<th>{esc(c)}</th>" for c in other + long
    )
    rows = []
    for i in range(len(top)):
        s = scores[i]
        frac = 0.0 if scale <= 0 or s != s else min(1.0, abs(s) / scale) * 100
        col = "rgba(220,40,40,.85)" if s >= 0 else "rgba(40,90,220,.85)"
        bar = (
            f'<div class="al-minibar"><div style="width:{frac:.1f}%;background:{col}"></div></div>'
        )
        cells = [
            f'<td class="al-num">{i + 1}</td>',
            f'<td class="al-num">{esc(fmt(s))}</td>',
            f"<td>{bar}</td>",
        ]
        for c in other:
            v = top[c].iloc[i]
            cells.append(
                f'<td class="al-num">{esc(fmt(v))}</td>' if _is_number(v) else f"<td>{bdi(v)}</td>"
            )
        for c in long:
            cells.append(f'<td class="al-long">{bdi(top[c].iloc[i])}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        '<div class="al-note">most supporting first</div>'
        f'<table class="al-table"><tr>{head}</tr>{"".join(rows)}</table>'
    )


_QUIET_COLUMNS = ("segment", "special", "kind_detail")
_COLUMN_ORDER = (
    "row",
    "layer",
    "head",
    "position",
    "component",
    "site",
    "neuron",
    "src",
    "dst",
    "source",
    "id",
    "token",
    "word",
    "text",
)


def ordered_columns(columns: Sequence[str]) -> list[str]:
    """Label columns in reading order (layer before head …; saved files sort them)."""
    rank = {c: i for i, c in enumerate(_COLUMN_ORDER)}
    cols = [c for c in columns if c != "score"]
    out = sorted(cols, key=lambda c: (rank.get(c, len(rank)), cols.index(c)))
    return out + (["score"] if "score" in columns else [])


def top_frame(r: Attribution, k: int, by: str = "abs") -> Any:
    """``r.top(k, by)`` with its columns in reading order (flag columns such as
    ``special`` / ``segment`` left out)."""
    top = r.top(k, by=by)
    cols = []
    for c in ordered_columns(list(top.columns)):
        if c in _QUIET_COLUMNS:
            continue
        cols.append(c)
    return top[cols]


def _top_table(r: Attribution, k: int) -> str:
    top = top_frame(r, k)
    return render_table({c: top[c].tolist() for c in top.columns}, max_rows=k)


def edge_list(r: Attribution) -> list[tuple[str, str, float]]:
    """``(source node, destination node, score)`` for every edge of an edge result.

    Reads ``src``/``dst`` (or ``upstream``/``downstream``, ``source``/``target``,
    ``parent``/``child``) label columns, or an ``edge`` column ``"a->b"``.
    """
    pairs = (
        ("src", "dst"),
        ("upstream", "downstream"),
        ("source", "target"),
        ("parent", "child"),
        ("from", "to"),
        ("sender", "receiver"),
    )
    scores = _row_scores(r)
    for a, b in pairs:
        if a in r.units and b in r.units:
            return [(str(x), str(y), s) for x, y, s in zip(r.units[a], r.units[b], scores)]
    col = _col(r, "edge", "name", "label")
    if col is not None:
        out = []
        for e, s in zip(col, scores):
            parts = re.split(r"\s*(?:->|→|=>)\s*", str(e), maxsplit=1)
            if len(parts) == 2:
                out.append((parts[0], parts[1], s))
        if out:
            return out
    return []


def _edges_panel(r: Attribution, k: int) -> str:
    edges = edge_list(r)
    parts = []
    svg = r.meta.get("svg") if isinstance(r.meta.get("svg"), str) else None
    if svg:
        parts.append(f'<div class="al-circuit">{sanitize_svg(svg)}</div>')
    elif edges:
        in_circuit = r.meta.get("circuit_edges") or r.meta.get("edges_in_circuit")
        keep = None
        if isinstance(in_circuit, list) and in_circuit:
            keep = {(str(a), str(b)) for a, b in (_pair(e) for e in in_circuit) if a is not None}
        mask = r.extra.get("mask")
        if keep is None and mask is not None and mask.numel() == len(edges):
            # a saved circuit (attrlab.methods.circuits.Circuit): its keep-mask over all edges
            keep = {(a, b) for (a, b, _), m in zip(edges, mask.flatten().tolist()) if m}
        if keep is not None:
            parts.append(f'<div class="al-sub">circuit: {len(keep)} of {len(edges)} edges</div>')
        parts.append(f'<div class="al-circuit">{render_circuit(edges, keep=keep)}</div>')
    parts.append(_top_table(r, min(k, 12)))
    return "".join(parts)


def _pair(e: Any) -> tuple[str | None, str | None]:
    if isinstance(e, (list, tuple)) and len(e) >= 2:
        return str(e[0]), str(e[1])
    if isinstance(e, str):
        p = re.split(r"\s*(?:->|→|=>)\s*", e, maxsplit=1)
        if len(p) == 2:
            return p[0], p[1]
    return None, None


def _lens_panel(r: Attribution, k: int) -> str:
    """Logit lens: one row per layer (and position) with the target's
    log-probability and rank, and the top tokens with their probabilities."""
    try:
        df = r.to_pandas()
    except Exception:  # a plain Attribution from a file: labels + score
        df = None
    if df is None or r.scores.dim() != 1:
        cols = {c: list(v) for c, v in r.units.items()}
        if r.scores.dim() == 1:
            cols["score"] = r.scores.tolist()
        return render_table(cols, max_rows=200)
    n = len(df)
    # a result loaded from a file is a plain Attribution: rebuild the columns it keeps
    if "rank" not in df.columns and "rank" in r.extra and r.extra["rank"].numel() == n:
        df["rank"] = r.extra["rank"].flatten().tolist()
    tk = r.meta.get("topk_tokens")
    if "top_tokens" not in df.columns and isinstance(tk, list) and len(tk) == n:
        df["top_tokens"] = tk
        lp = r.extra.get("topk_logprobs")
        if lp is not None and lp.dim() >= 1 and n and lp.numel() % n == 0:
            df["top_logprobs"] = lp.reshape(n, -1).tolist()
    cols = {}
    for c in ordered_columns([c for c in df.columns if not c.startswith("top_")]):
        cols[c] = df[c].tolist()
    if "score" in cols and "logprob" not in cols:
        cols["logprob"] = cols.pop("score")
    cols.pop("score", None)
    if "logprob" in cols:
        cols["target prob"] = [math.exp(float(v)) for v in cols["logprob"]]
    if "top_tokens" in df.columns:
        toks = df["top_tokens"].tolist()
        lps = df["top_logprobs"].tolist() if "top_logprobs" in df.columns else [None] * len(toks)
        cols["top tokens (prob)"] = [
            "  ".join(
                f"{show_token(t)!r} {math.exp(float(lp)):.2f}" if lp is not None else repr(t)
                for t, lp in zip(ts, lp_row if lp_row is not None else [None] * len(ts))
            )
            for ts, lp_row in zip(toks, lps)
        ]
    first = ["layer", "site", "position", "token", "logprob", "rank", "target prob"]
    cols = {c: cols[c] for c in sorted(cols, key=lambda c: first.index(c) if c in first else 99)}
    body = render_table(cols, max_rows=200, long=["top tokens (prob)"])
    if "logprob" in cols and "position" not in cols:
        labels = [
            f"L{lay} {site}" if site is not None else f"L{lay}"
            for lay, site in zip(
                cols.get("layer", range(len(df))), cols.get("site", [None] * len(df))
            )
        ]
        body = render_bars(labels, cols["target prob"]) + body
    return body


def _trace_matrix_panel(r: Attribution, k: int) -> str:
    """A sentence x sentence result (attention suppression): the matrix (rows =
    receiving sentence) and the dependency graph of its strongest entries."""
    from ..graph import dependency_graph
    from .graph import graph_svg

    texts = [str(t) for t in r.units.get("text", [])]
    labels = [f"S{i}: {t}" for i, t in enumerate(texts)]
    heat = render_heatmap(
        r.scores.tolist(), labels, labels, row_title="receiving sentence",
        col_title="sentence", values=False, vertical_cols=True,
    )  # fmt: skip
    graph = graph_svg(dependency_graph(r, k=min(k, 2 * len(texts))))
    return (
        f'{heat}<div class="al-note">dependency graph: the strongest entries, '
        f"sentence -> the later sentence that depends on it</div>"
        f'<div style="overflow-x:auto">{graph}</div>'
    )


def panel_body(r: Attribution, k: int = 15) -> str:
    """The visualization of one result (without the header and metadata)."""
    kind = r.unit_kind
    if r.method.lower() in LENS_METHODS or kind in ("lens", "logit_lens"):
        return _lens_panel(r, k)
    if kind in TOKEN_KINDS:
        return _token_panel(r, k)
    if kind == "trace" and r.scores.dim() == 2:
        return _trace_matrix_panel(r, k)
    if kind == "edges" or edge_list(r) and kind in ("circuit", "graph"):
        return _edges_panel(r, k)
    if kind in TEXT_KINDS or ("text" in r.units and kind not in ("heads", "layers")):
        return _text_panel(r, k)
    if r.scores.dim() == 2 and len(r) <= 64:
        return render_heatmap(
            r.scores.tolist(),
            _row_labels(r),
            [unit_label(r, i) for i in range(len(r))],
            row_title="row",
            col_title="unit",
            values=False,
            vertical_cols=True,
        )
    if "layer" in r.units and "head" in r.units:
        return _heads_panel(r, k)
    if "layer" in r.units and "position" in r.units:
        return _layer_position_panel(r, k)
    if len(r) <= 200:
        return _bars_panel(r, k)
    return _top_table(r, k)


def render_panel(
    r: Attribution, title: str | None = None, k: int = 15, note: str = "", anchor: str = ""
) -> str:
    """One report panel: title, one-line description, the view, and the method box."""
    title = title or f"{r.method} over {r.unit_kind}"
    aid = f' id="{esc(anchor)}"' if anchor else ""
    sub = f'<div class="al-sub">{esc(note)}</div>' if note else ""
    return (
        f'<section class="al-panel" data-panel="{esc(r.unit_kind)}" data-method="{esc(r.method)}"{aid}>'
        f"<h3>{esc(title)}</h3>{sub}{panel_body(r, k)}{render_meta(r)}</section>"
    )


def render_attribution(r: Attribution, k: int = 15) -> str:
    """The notebook view of one result: the report's panel, with its stylesheet."""
    return f'<div class="al-root"><style>{CSS}</style>{render_panel(r, k=k)}</div>'


# ------------------------------------------------------------- circuit graph
_LAYER_RE = re.compile(r"(\d+)")
_QKV = re.compile(r"[.:_](q|k|v)$")


def _node_layer(name: str, n_max: int) -> float:
    low = name.lower()
    if low.startswith(("embed", "input", "tok", "wte", "emb")):
        return -1
    if low.startswith(("logit", "output", "unembed", "resid_post", "final")):
        return n_max + 1
    m = _LAYER_RE.search(low)
    if not m:
        return n_max + 0.5
    layer = int(m.group(1))
    # an MLP sits above the attention heads of its own layer
    return layer + (0.5 if low.startswith(("m", "mlp")) else 0.0)


def render_circuit(
    edges: Sequence[tuple[str, str, float]],
    keep: set[tuple[str, str]] | None = None,
    max_edges: int = 40,
) -> str:
    """An SVG drawing of a circuit: nodes by layer (inputs at the bottom), edges
    coloured by sign and drawn thicker for larger |score|.

    ``keep`` restricts the drawing to the circuit's edges; otherwise the
    ``max_edges`` largest |score| edges are drawn.
    """
    if keep:
        chosen = [e for e in edges if (e[0], e[1]) in keep]
    else:
        chosen = sorted(edges, key=lambda e: -abs(e[2]))[:max_edges]
    # a head's q / k / v inputs are drawn as one node; their edges are summed
    merged: dict[tuple[str, str], float] = {}
    for a, b, sc in chosen:
        key = (_QKV.sub("", a), _QKV.sub("", b))
        merged[key] = merged.get(key, 0.0) + sc
    chosen = [(a, b, sc) for (a, b), sc in merged.items() if a != b]
    if not chosen:
        return '<div class="al-note">no edges to draw</div>'
    names = sorted({n for e in chosen for n in e[:2]})
    nums = [int(m.group(1)) for n in names if (m := _LAYER_RE.search(n))]
    n_max = max(nums, default=0)
    levels: dict[float, list[str]] = {}
    for n in names:
        levels.setdefault(_node_layer(n, n_max), []).append(n)
    ordered = sorted(levels)
    width = max(520, 110 * max(len(v) for v in levels.values()))
    row_h = 70
    height = row_h * len(ordered) + 40
    pos: dict[str, tuple[float, float]] = {}
    for li, lvl in enumerate(ordered):
        group = sorted(levels[lvl], key=_natural)
        y = height - 30 - li * row_h
        for j, n in enumerate(group):
            x = width * (j + 1) / (len(group) + 1)
            pos[n] = (x, y)
    scale = max(abs(e[2]) for e in chosen) or 1.0
    lines = []
    for a, b, s in sorted(chosen, key=lambda e: abs(e[2])):
        (x1, y1), (x2, y2) = pos[a], pos[b]
        w = 0.8 + 4.2 * abs(s) / scale
        c = "#d62828" if s >= 0 else "#2856dc"
        op = 0.35 + 0.6 * abs(s) / scale
        lines.append(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{c}" '
            f'stroke-width="{w:.2f}" stroke-opacity="{op:.2f}"><title>{esc(a)} → {esc(b)}: '
            f"{esc(fmt(s))}</title></line>"
        )
    nodes = []
    for n, (nx, ny) in pos.items():
        wbox = max(44, 8 * len(n) + 12)
        nodes.append(
            f'<g><rect x="{nx - wbox / 2:.1f}" y="{ny - 12:.1f}" width="{wbox}" height="24" rx="6" '
            f'fill="#ffffff" stroke="#57606a"/><text x="{nx:.1f}" y="{ny + 4:.1f}" '
            f'text-anchor="middle" font-size="12" font-family="monospace" fill="#1f2328">'
            f"{esc(n)}</text></g>"
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="circuit graph">'
        f"{''.join(lines)}{''.join(nodes)}</svg>"
    )


def _natural(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# ------------------------------------------------------------- SVG sanitizer
_SVG_TAGS = {
    "svg",
    "g",
    "path",
    "line",
    "polyline",
    "polygon",
    "rect",
    "circle",
    "ellipse",
    "text",
    "tspan",
    "title",
    "desc",
    "defs",
    "marker",
    "lineargradient",
    "stop",
}
_SVG_ATTRS = {
    "x",
    "y",
    "x1",
    "y1",
    "x2",
    "y2",
    "cx",
    "cy",
    "r",
    "rx",
    "ry",
    "width",
    "height",
    "d",
    "points",
    "fill",
    "stroke",
    "stroke-width",
    "stroke-opacity",
    "fill-opacity",
    "opacity",
    "stroke-dasharray",
    "stroke-linecap",
    "stroke-linejoin",
    "transform",
    "viewbox",
    "text-anchor",
    "font-size",
    "font-family",
    "font-weight",
    "font-style",
    "dominant-baseline",
    "id",
    "class",
    "markerwidth",
    "markerheight",
    "refx",
    "refy",
    "orient",
    "markerunits",
    "marker-end",
    "marker-start",
    "offset",
    "stop-color",
    "stop-opacity",
    "preserveaspectratio",
    "xmlns",
    "version",
    "dx",
    "dy",
    "role",
    "aria-label",
}
_SAFE_VALUE = re.compile(r"^[\w\s.,:;#%()+\-/'\"=]*$")


def sanitize_svg(svg: str) -> str:
    """Re-serialize an SVG keeping only drawing elements and presentation
    attributes: no scripts, no event handlers, no links, no external
    references (``url(#id)`` to the same document is kept). Text is escaped.
    Returns a note instead when the input does not parse.
    """
    import xml.etree.ElementTree as ET

    text = re.sub(r"<\?xml[^>]*\?>|<!DOCTYPE[^>]*>|<!--.*?-->", "", svg, flags=re.S)
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return '<div class="al-note">(circuit drawing could not be read)</div>'

    def local(tag: str) -> str:
        return tag.rsplit("}", 1)[-1].lower() if isinstance(tag, str) else ""

    def render(el: Any) -> str:
        tag = local(el.tag)
        if tag not in _SVG_TAGS:
            return ""
        attrs = []
        for k, v in el.attrib.items():
            name = local(k)
            if name not in _SVG_ATTRS:
                continue
            v = str(v)
            if "url(" in v.lower() and not re.fullmatch(r"\s*url\(#[\w\-]+\)\s*", v):
                continue
            if not _SAFE_VALUE.match(v) or "javascript" in v.lower():
                continue
            real = {
                "viewbox": "viewBox",
                "preserveaspectratio": "preserveAspectRatio",
                "markerwidth": "markerWidth",
                "markerheight": "markerHeight",
                "refx": "refX",
                "refy": "refY",
                "markerunits": "markerUnits",
            }.get(name, name)
            if real == "xmlns":
                continue
            attrs.append(f' {real}="{esc(v)}"')
        if tag == "svg":
            attrs.insert(0, ' xmlns="http://www.w3.org/2000/svg"')
        name = {"lineargradient": "linearGradient"}.get(tag, tag)
        inner = esc(el.text or "") + "".join(render(c) + esc(c.tail or "") for c in el)
        return f"<{name}{''.join(attrs)}>{inner}</{name}>"

    if local(root.tag) != "svg":
        return '<div class="al-note">(circuit drawing is not an SVG)</div>'
    return render(root)
