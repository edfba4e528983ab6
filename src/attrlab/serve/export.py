"""Static export: one view of one result as a self-contained offline HTML file.

The file holds the result as JSON in a ``<script type="application/json">``
block (``<``, ``>``, ``&`` and the line separators escaped as ``\\uXXXX``, so no
string in it can close the block), the page's stylesheet, the vendored
Cytoscape.js when the view draws a graph, and the page's own ES modules
bundled into one module script by :func:`bundle` (each module wrapped in a
function, its imports rebound from the modules before it). The same code draws
the view in the server and in the file. The file carries its own
Content-Security-Policy (a ``<meta>`` tag): scripts only by the SHA-256 hashes of
its own inline scripts, no network at all.

Example:
    >>> import torch
    >>> from attrlab.result import Attribution
    >>> from attrlab.serve.store import attribution_json
    >>> r = Attribution(torch.tensor([1.0]), {"token": ["<script>"]}, "tokens", "ig")
    >>> page = export_html(attribution_json(r))
    >>> "<script>\\"" in page, "\\\\u003cscript\\\\u003e" in page
    (False, True)
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["VIEWS", "bundle", "export_html"]

STATIC = Path(__file__).parent / "static"
JS = STATIC / "js"
CYTOSCAPE = STATIC / "vendor" / "cytoscape-3.34.4" / "cytoscape.min.js"

#: the views a file can be exported with ("auto": the result kind's own view)
VIEWS = ("auto", "tokens", "heatmap", "sources", "train", "lens", "graph", "table")

_IMPORT = re.compile(r'^import\s*\{([^}]*)\}\s*from\s*"\./([A-Za-z0-9_]+)\.js";\s*$', re.M)
_EXPORT = re.compile(r"^export\s+(?:async\s+)?(function|const|let|class)\s+([A-Za-z0-9_$]+)", re.M)


def bundle(entry: str = "main", root: Path = JS) -> str:
    """The page's ES modules (``root/*.js``, starting from ``entry``) as one
    module's source: each module becomes ``const __m_name = (() => {...; return
    {exports}})();`` in dependency order, its ``import {a, b} from "./x.js"``
    lines becoming ``const {a, b} = __m_x;``. Only that import form and
    ``export function|const|let|class`` declarations are allowed.

    Raises:
        InputError: an import cycle or a missing module.

    Example:
        >>> "const __m_dom = " in bundle()
        True
    """
    order: list[str] = []
    visiting: set[str] = set()
    sources: dict[str, str] = {}

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise InputError(f"import cycle through {name}.js")
        visiting.add(name)
        path = root / f"{name}.js"
        if not path.is_file():
            raise InputError(f"no module {name}.js in {root}")
        src = path.read_text(encoding="utf-8")
        sources[name] = src
        for m in _IMPORT.finditer(src):
            visit(m.group(2))
        visiting.discard(name)
        order.append(name)

    visit(entry)
    parts = ['"use strict";']
    for name in order:
        src = sources[name]
        exports = [m.group(2) for m in _EXPORT.finditer(src)]
        body = _IMPORT.sub(lambda m: f"const {{{m.group(1)}}} = __m_{m.group(2)};", src)
        body = _EXPORT.sub(lambda m: m.group(0)[len("export") :].lstrip(), body)
        parts.append(
            f"const __m_{name} = (() => {{\n{body}\nreturn {{{', '.join(exports)}}};\n}})();"
        )
    return "\n".join(parts)


def _json_block(data: Any) -> str:
    text = json.dumps(data, allow_nan=False, ensure_ascii=False)
    for c, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                   ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):  # fmt: skip
        text = text.replace(c, esc)
    return text


def _sha(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _needs_graph(result: dict[str, Any], view: str) -> bool:
    if view == "graph":
        return True
    return view == "auto" and (result.get("kind") == "graph" or result.get("unit_kind") == "edges")


def export_html(
    result: dict[str, Any],
    view: str = "auto",
    other: dict[str, Any] | None = None,
    title: str | None = None,
) -> str:
    """A self-contained HTML page showing ``view`` of ``result`` (JSON from
    :func:`attrlab.serve.store.attribution_json` / ``graph_json``); with
    ``other``, the method-agreement comparison of the two as well.

    Raises:
        InputError: an unknown view.

    Example:
        >>> import torch
        >>> from attrlab.result import Attribution
        >>> from attrlab.serve.store import attribution_json
        >>> r = Attribution(torch.tensor([1.0, -1.0]), {"layer": [0, 1]}, "mlp", "dla")
        >>> export_html(attribution_json(r), view="table").startswith("<!doctype html>")
        True
    """
    if view not in VIEWS:
        raise InputError(f"unknown view {view!r}; choose from {', '.join(VIEWS)}")
    data: dict[str, Any] = {"result": result, "view": view}
    if other is not None:
        from ..result import Attribution  # noqa: F401  (the comparison reads JSON back)
        from .live import compare

        data["compare"] = compare(_from_json(result), _from_json(other))
    app_js = bundle()
    css = (STATIC / "app.css").read_text(encoding="utf-8")
    scripts = [CYTOSCAPE.read_text(encoding="utf-8")] if _needs_graph(result, view) else []
    csp = (
        "default-src 'none'; img-src data:; base-uri 'none'; form-action 'none'; "
        f"style-src {_sha(css)}; script-src {' '.join(_sha(s) for s in [*scripts, app_js])}"
    )
    name = title or f"attrlab: {result.get('id') or result.get('method') or 'result'}"
    classic = "".join(f"<script>{s}</script>\n" for s in scripts)
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{html.escape(csp, quote=False)}">\n'
        f'<title>{html.escape(name)}</title>\n<style id="__________cytoscape_stylesheet">{css}</style>\n</head>\n<body data-static="1">\n'
        '<header><h1>attrlab</h1><span id="model">exported view (offline)</span></header>\n'
        '<div class="layout"><main>\n<div id="view"></div>\n<section id="agreement"></section>\n'
        "</main></div>\n"
        f'<script type="application/json" id="attrlab-data">{_json_block(data)}</script>\n'
        f'{classic}<script type="module">{app_js}</script>\n</body>\n</html>\n'
    )


def _from_json(d: dict[str, Any]) -> Any:
    """An :class:`~attrlab.result.Attribution` back from its page JSON (for the
    comparison in an export)."""
    import torch

    from ..result import Attribution

    if d.get("kind") != "attribution":
        raise InputError("method agreement compares two attribution results, not graphs")
    scores = torch.tensor(
        [[float("nan") if v is None else v for v in r] for r in d["scores"]]
        if d["scores"] and isinstance(d["scores"][0], list)
        else [float("nan") if v is None else v for v in d["scores"]],
        dtype=torch.float64,
    )
    return Attribution(scores, dict(d["units"]), d["unit_kind"], d["method"], d.get("target", ""),
                       d.get("params"), d.get("model_id", ""), rows=dict(d.get("rows") or []),
                       meta=d.get("meta"))  # fmt: skip
