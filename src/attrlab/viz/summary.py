"""One-line text summaries of computed results (the terminal lines of
``attrlab demo`` and its "At a glance" table): the top units of a result and its
headline diagnostics. Pure formatting of what a result already holds.

Example:
    >>> import torch
    >>> from attrlab.result import Attribution
    >>> r = Attribution(torch.tensor([0.5, -2.0, 1.0]), {"layer": [0, 1, 2]}, "mlp", "dla")
    >>> top_units(r, 2)
    'L1 -2, L2 +1'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .html import TEXT_KINDS, unit_label

if TYPE_CHECKING:  # pragma: no cover
    from ..result import Attribution

__all__ = ["headline_diagnostics", "summary_line", "top_units"]


def top_units(r: Attribution, k: int = 3) -> str:
    """The ``k`` top units of ``r`` with their scores: for text units the most
    supporting first, for components the largest ``|score|`` first (rows summed)."""
    s = r.scores if r.scores.dim() == 1 else r.scores.nan_to_num().sum(0)
    key = s.double() if r.unit_kind in TEXT_KINDS else s.abs().double()
    order = torch.argsort(key.nan_to_num(), descending=True)[:k].tolist()
    return ", ".join(f"{_short(unit_label(r, i))} {float(s[i]):+.3g}" for i in order)


def summary_line(title: str, r: Attribution, k: int = 3, headline: str = "") -> str:
    """One terminal line: ``title``, the method, the top ``k`` units (or
    ``headline``) and the headline diagnostics.

    Example:
        >>> import torch
        >>> from attrlab.result import Attribution
        >>> r = Attribution(torch.tensor([1.0, 3.0]), {"layer": [0, 1]}, "mlp", "dla",
        ...                 diagnostics={"completeness_error": 1e-6})
        >>> summary_line("MLPs", r, 1)
        '  MLPs                               [dla] L1 +3  (completeness_error=1e-06)'
    """
    tops = headline or top_units(r, k)
    diag = headline_diagnostics(r.diagnostics)
    return f"  {title:<34} [{r.method}] {tops}{'  (' + diag + ')' if diag else ''}"


def _short(text: str, n: int = 28) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else text[: n - 1] + "…"


def headline_diagnostics(d: dict[str, Any]) -> str:
    """Up to three headline numbers of a diagnostics dict (completeness error,
    Pearson / Spearman agreement, circuit faithfulness), found at any depth; for a
    list of per-row values the worst row.

    Example:
        >>> headline_diagnostics({"agreement_with_patch": {"pearson": 0.91}, "x": 2})
        'pearson=0.91'
    """
    out = []
    for key in ("completeness_error", "pearson", "spearman", "faithfulness"):
        for k, v in _walk(d):
            if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                v = max(v, key=abs)  # the worst row
            if k.endswith(key) and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append(f"{key}={v:.3g}")
                break
    return ", ".join(out[:3])


def _walk(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            out.extend(_walk(v, f"{prefix}{k}."))
    else:
        out.append((prefix.rstrip("."), d))
    return out
