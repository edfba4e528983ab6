"""Matplotlib views of a result (``Attribution.plot``): the same choice of view
as the HTML panels.

=====================================  ==========================================
logit lens                              target log-probability by layer
heads (``layer``, ``head``)             layer x head heatmap
2-D scores (e.g. generated tokens)      rows x units heatmap
components with ``layer``+``position``  layer x position heatmap
tokens / words (1-D)                    bars in text order
anything else                           the top ``k`` units by |score| as bars
=====================================  ==========================================

Example:
    >>> import torch, attrlab as al
    >>> r = al.Attribution(torch.randn(8), {"layer": [0] * 4 + [1] * 4, "head": [0, 1, 2, 3] * 2},
    ...                    unit_kind="heads", method="dla", target="logit(' Mary')")
    >>> ax = r.plot()  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .html import LENS_METHODS, TOKEN_KINDS, _grid, _row_labels, unit_label

if TYPE_CHECKING:
    from ..result import Attribution


def _plain(text: str) -> str:
    """Matplotlib text without mathtext surprises."""
    return text.replace("$", r"\$")


def _imshow(
    ax: Any, matrix: Any, xlabels: list[str], ylabels: list[str], xname: str, yname: str
) -> None:
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    finite = np.abs(m[np.isfinite(m)])
    v = float(finite.max()) if finite.size else 1.0
    im = ax.imshow(
        m, aspect="auto", cmap="RdBu_r", vmin=-v or -1, vmax=v or 1, interpolation="nearest"
    )
    ax.figure.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    if len(xlabels) <= 60:
        ax.set_xticks(
            range(len(xlabels)),
            [_plain(x) for x in xlabels],
            rotation=90 if max((len(x) for x in xlabels), default=0) > 3 else 0,
        )
    if len(ylabels) <= 60:
        ax.set_yticks(range(len(ylabels)), [_plain(y) for y in ylabels])
    ax.set_xlabel(xname)
    ax.set_ylabel(yname)


def plot(r: Attribution, ax: Any = None, k: int = 20) -> Any:
    """Draw ``r`` on ``ax`` (a new figure when None) and return the axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    if r.method in LENS_METHODS and "layer" in r.units and "position" not in r.units:
        layers = [int(x) for x in r.units["layer"]]
        ax.plot(layers, r.scores.double().numpy(), marker="o", color="#d62828")
        ax.set_xticks(layers)
        ax.set_xlabel("layer (residual stream read out after it)")
        ax.set_ylabel("target log-probability")
    elif r.scores.dim() == 2:
        cols = r.units.get("token") or [unit_label(r, i) for i in range(len(r))]
        _imshow(
            ax,
            r.scores.double().numpy(),
            [str(c) for c in cols],
            _row_labels(r),
            r.unit_kind,
            "row",
        )
    elif "layer" in r.units and "head" in r.units:
        layers, heads, grid = _grid(r, "layer", "head")
        _imshow(ax, grid, [str(h) for h in heads], [str(x) for x in layers], "head", "layer")
    elif "layer" in r.units and "position" in r.units:
        layers, pos, grid = _grid(r, "layer", "position")
        _imshow(ax, grid, [str(p) for p in pos], [str(x) for x in layers], "position", "layer")
    elif r.unit_kind in TOKEN_KINDS and len(r) <= 80:
        labels = [
            str(t)
            for t in (
                r.units.get("token")
                or r.units.get("text")
                or [unit_label(r, i) for i in range(len(r))]
            )
        ]
        s = r.scores.double()
        ax.bar(range(len(r)), s.numpy(), color=["#d62828" if x >= 0 else "#2856dc" for x in s])
        ax.set_xticks(range(len(r)), [_plain(t) for t in labels], rotation=90)
        ax.axhline(0, color="#57606a", lw=0.8)
        ax.set_ylabel(f"{r.method} score")
    else:
        s = r.scores.double()
        order = torch.argsort(s.abs().nan_to_num(), descending=True, stable=True)[:k].tolist()
        vals = [float(s[i]) for i in order]
        ax.barh(
            range(len(order))[::-1], vals, color=["#d62828" if x >= 0 else "#2856dc" for x in vals]
        )
        ax.set_yticks(range(len(order))[::-1], [_plain(_short(unit_label(r, i))) for i in order])
        ax.axvline(0, color="#57606a", lw=0.8)
        ax.set_xlabel(f"{r.method} score")
    ax.set_title(_plain(f"{r.method} over {r.unit_kind}: {r.target}"))
    ax.figure.tight_layout()
    return ax


def _short(text: str, n: int = 50) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
