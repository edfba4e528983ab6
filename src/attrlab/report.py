"""The HTML report: one self-contained file with a panel per result.

The report is built from :class:`~attrlab.result.Attribution` objects alone:
the panel is chosen from the unit kind and label columns (see
:mod:`attrlab.viz.html`), and every panel shows the method, its parameters and
its diagnostics. The file has inline CSS and SVG only — no JavaScript, no
fonts, no network — and a Content-Security-Policy that forbids scripts, on top
of escaping every string.

Example:
    >>> import torch, attrlab as al
    >>> from attrlab.report import Report
    >>> r = al.Attribution(torch.tensor([0.5, -1.0]), {"layer": [0, 1], "head": [0, 0]},
    ...                    unit_kind="heads", method="dla", target="logit(' Mary')")
    >>> page = Report("IOI", info={"prompt": "<b>hi</b>"}).add(r).to_html()
    >>> "&lt;b&gt;hi&lt;/b&gt;" in page and "<b>hi</b>" not in page
    True
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .result import Attribution
from .viz.html import CSS, bdi, esc, fmt, render_panel, render_table

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"

PAGE_CSS = """
body{margin:0;background:#f6f8fa}
.al-page{max-width:1120px;margin:0 auto;padding:24px 28px 60px 28px}
.al-page h1{font-size:24px;margin:0 0 4px 0}
.al-page h2{font-size:18px;margin:28px 0 6px 0;padding-bottom:4px;border-bottom:1px solid #d0d7de}
.al-info{display:grid;grid-template-columns:max-content 1fr;gap:4px 14px;margin:12px 0;
 background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px 16px}
.al-info dt{font-weight:600;color:#424a53}
.al-info dd{margin:0;white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,
 SFMono-Regular,Menlo,Consolas,monospace;font-size:13px}
.al-nav{font-size:13px;margin:10px 0}
.al-nav a{color:#0969da;text-decoration:none;margin-right:12px;white-space:nowrap}
.al-missing{color:#57606a;font-size:13px;margin:4px 0}
.al-missing b{color:#424a53}
.al-foot{color:#8c959f;font-size:12px;margin-top:30px}
"""


@dataclass
class _Item:
    kind: str  # "result" | "html" | "missing" | "heading"
    title: str
    anchor: str
    result: Attribution | None = None
    note: str = ""
    html: str = ""
    k: int = 15


def _slug(text: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "panel"
    slug, i = base, 2
    while slug in used:
        slug, i = f"{base}-{i}", i + 1
    used.add(slug)
    return slug


class Report:
    """A report under construction: add results (and notes), then :meth:`save`.

    Args:
        title: the page title.
        info: key/value lines shown at the top (model, prompt, prediction …); escaped.

    Example:
        >>> import torch, attrlab as al, tempfile, os
        >>> r = al.Attribution(torch.tensor([1.0, 2.0]), {"token": ["a", "b"]},
        ...                    unit_kind="tokens", method="ig", target="logit(' b')")
        >>> path = Report("demo").add(r).missing("training examples", "no method yet").save(
        ...     os.path.join(tempfile.mkdtemp(), "r.html"))
        >>> path.read_text().count('class="al-panel"')
        1
    """

    def __init__(self, title: str = "attrlab report", info: Mapping[str, Any] | None = None):
        self.title = title
        self.info = dict(info or {})
        self.items: list[_Item] = []
        self._used: set[str] = set()

    def heading(self, title: str) -> Report:
        """Start a new group of panels."""
        self.items.append(_Item("heading", title, _slug(title, self._used)))
        return self

    def add(self, result: Any, title: str | None = None, note: str = "", k: int = 15) -> Report:
        """Add a panel for ``result`` (its view, method, parameters and diagnostics):
        an :class:`~attrlab.result.Attribution`, or a
        :class:`~attrlab.graph.GraphResult` (route graphs: drawn as SVG with its
        strongest edges)."""
        from .graph import GraphResult
        from .viz.graph import graph_svg

        if isinstance(result, GraphResult):
            t = title or f"{result.method}: {result.target}"
            order = sorted(range(result.n_edges), key=lambda i: -result.edges["weight"][i])[:k]
            cols = {c: [v[i] for i in order] for c, v in result.edges.items() if c != "roots"}
            sub = f'<div class="al-sub">{esc(note)}</div>' if note else ""
            params = ", ".join(f"{esc(a)}={esc(b)}" for a, b in result.params.items())
            html = (
                f'<section class="al-panel" data-panel="graph"><h3>{esc(t)}</h3>{sub}'
                f'<div class="al-sub">{params}</div>'
                f'<div style="overflow-x:auto">{graph_svg(result)}</div>'
                f"{render_table(cols, max_rows=k)}</section>"
            )
            self.items.append(_Item("html", t, _slug(t, self._used), html=html))
            return self
        if not isinstance(result, Attribution):
            raise TypeError(
                f"Report.add takes an Attribution or a GraphResult, got {type(result).__name__}"
            )
        t = title or f"{result.method} over {result.unit_kind}"
        self.items.append(_Item("result", t, _slug(t, self._used), result=result, note=note, k=k))
        return self

    def add_table(
        self,
        title: str,
        columns: Mapping[str, Iterable[Any]],
        note: str = "",
        panel: str = "table",
        at: int | None = None,
    ) -> Report:
        """Add a plain table panel (escaped), e.g. a summary; ``at`` inserts it at that index."""
        cols = {str(k): list(v) for k, v in columns.items()}
        body = render_table(cols, max_rows=200, long=[c for c in cols if c.startswith("top")])
        sub = f'<div class="al-sub">{esc(note)}</div>' if note else ""
        html = (
            f'<section class="al-panel" data-panel="{esc(panel)}"><h3>{esc(title)}</h3>'
            f"{sub}{body}</section>"
        )
        item = _Item("html", title, _slug(title, self._used), html=html)
        if at is None:
            self.items.append(item)
        else:
            self.items.insert(at, item)
        return self

    def missing(self, title: str, reason: str) -> Report:
        """One line saying why a section is absent (method not available, failed …)."""
        self.items.append(_Item("missing", title, _slug(title, self._used), note=reason))
        return self

    def panels(self) -> list[str]:
        """Titles of the panels with content (not headings or missing notes)."""
        return [it.title for it in self.items if it.kind in ("result", "html")]

    def to_html(self, csp: bool = True) -> str:
        """The whole page as a string. ``csp=False`` drops the script-forbidding
        Content-Security-Policy (used by tests to check that escaping alone is enough)."""
        parts: list[str] = []
        nav: list[str] = []
        for it in self.items:
            if it.kind == "heading":
                parts.append(f'<h2 id="{esc(it.anchor)}">{esc(it.title)}</h2>')
                nav.append(f'<a href="#{esc(it.anchor)}">{esc(it.title)}</a>')
            elif it.kind == "result":
                assert it.result is not None
                parts.append(
                    render_panel(it.result, it.title, k=it.k, note=it.note, anchor=it.anchor)
                )
            elif it.kind == "html":
                parts.append(f'<div id="{esc(it.anchor)}">{it.html}</div>')
            else:
                parts.append(
                    f'<div class="al-missing" data-missing="{esc(it.anchor)}"><b>{esc(it.title)}</b>: '
                    f"{esc(it.note)}</div>"
                )
        info = "".join(
            f"<dt>{esc(k)}</dt><dd>{bdi(fmt(v) if isinstance(v, float) else v)}</dd>"
            for k, v in self.info.items()
        )
        info_html = f'<dl class="al-info">{info}</dl>' if info else ""
        nav_html = f'<nav class="al-nav">{"".join(nav)}</nav>' if nav else ""
        from . import __version__

        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        csp_meta = (
            f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">' if csp else ""
        )
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'{csp_meta}<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(self.title)}</title><style>{CSS}{PAGE_CSS}</style></head>"
            f'<body><div class="al-root al-page"><h1>{esc(self.title)}</h1>{info_html}{nav_html}'
            f"{''.join(parts)}"
            f'<div class="al-foot">attrlab {esc(__version__)} · {esc(stamp)} · red = pushes the '
            "target up, blue = pushes it down · self-contained file: no scripts, no network</div>"
            "</div></body></html>\n"
        )

    def save(self, path: str | Path, csp: bool = True) -> Path:
        """Write the page (UTF-8, atomically: complete or not written) and return its path.

        Missing parent directories are created.
        """
        from ._files import write_atomically

        path = Path(path)
        page = self.to_html(csp=csp)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomically(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))


def build_report(
    results: Iterable[Attribution],
    title: str = "attrlab report",
    info: Mapping[str, Any] | None = None,
) -> str:
    """A report page (string) with one panel per result.

    Example:
        >>> import torch, attrlab as al
        >>> r = al.Attribution(torch.tensor([1.0]), {"token": ["a"]}, unit_kind="tokens", method="ig")
        >>> build_report([r]).startswith("<!DOCTYPE html>")
        True
    """
    rep = Report(title, info)
    for r in results:
        rep.add(r)
    return rep.to_html()


def write_report(
    path: str | Path,
    results: Iterable[Attribution],
    title: str = "attrlab report",
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write :func:`build_report` to ``path``; returns the path."""
    rep = Report(title, info)
    for r in results:
        rep.add(r)
    return rep.save(path)
