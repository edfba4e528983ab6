"""The one result type: :class:`Attribution`.

Scores have the units on the last axis: ``[n_units]`` for one target, or
``[n_rows, n_units]`` when several targets are explained at once (e.g. one row
per generated token). Unit labels are columns (``layer``, ``head``,
``position``, ``token``, ``source`` …) of equal length, one entry per unit.
Files are safetensors with the metadata as JSON in the header, checked by a
SHA-256 digest: no pickle anywhere.

Example:
    >>> import torch
    >>> from attrlab.result import Attribution
    >>> r = Attribution(torch.tensor([0.5, -2.0, 1.0]),
    ...                 units={"layer": [0, 0, 1], "head": [0, 1, 0]},
    ...                 unit_kind="heads", method="dla", target="logit(' Mary')")
    >>> r.top(1)["head"].tolist()
    [1]
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import FileFormatError, InputError

FORMAT = "attrlab.attribution"
FORMAT_VERSION = 1


def _jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values, tuples and paths to plain JSON values."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj
    return repr(obj)


class Attribution:
    """Scores for units, with everything needed to read and reproduce them.

    Args:
        scores: ``[n_units]`` or ``[n_rows, n_units]``.
        units: label columns, each of length ``n_units``.
        unit_kind: ``"tokens"``, ``"heads"``, ``"sources"``, ``"train"`` …
        method: method name.
        target: description of the target.
        params: the method's parameters (JSON-able).
        model_id: the model's name or path.
        diagnostics: method diagnostics (completeness error, bounds, timings …).
        rows: optional labels of the rows, e.g. ``{"token": [...]}`` for generated tokens.
        meta: anything else worth keeping (prompt text, tokens …), JSON-able.
        extra: additional named tensors saved with the result.
    """

    def __init__(
        self,
        scores: Tensor,
        units: Mapping[str, Sequence[Any]],
        unit_kind: str,
        method: str,
        target: str = "",
        params: Mapping[str, Any] | None = None,
        model_id: str = "",
        diagnostics: Mapping[str, Any] | None = None,
        rows: Mapping[str, Sequence[Any]] | None = None,
        meta: Mapping[str, Any] | None = None,
        extra: Mapping[str, Tensor] | None = None,
    ):
        scores = torch.as_tensor(scores).detach().cpu()
        if scores.dim() not in (1, 2):
            raise InputError(
                f"scores must be [n_units] or [n_rows, n_units], got {tuple(scores.shape)}"
            )
        n = scores.shape[-1]
        cols = {k: list(v) for k, v in units.items()}
        for k, v in cols.items():
            if len(v) != n:
                raise InputError(f"unit label column {k!r} has {len(v)} entries for {n} units")
        self.scores = scores
        self.units = cols
        self.unit_kind = unit_kind
        self.method = method
        self.target = target
        self.params = dict(params or {})
        self.model_id = model_id
        self.diagnostics = dict(diagnostics or {})
        self.rows = {k: list(v) for k, v in (rows or {}).items()}
        self.meta = dict(meta or {})
        self.extra = {k: torch.as_tensor(v).detach().cpu() for k, v in (extra or {}).items()}

    # ------------------------------------------------------------- basics
    def __len__(self) -> int:
        return int(self.scores.shape[-1])

    def __repr__(self) -> str:
        return (
            f"Attribution(method={self.method!r}, units={self.unit_kind!r} x{len(self)}, "
            f"target={self.target!r}, shape={tuple(self.scores.shape)})"
        )

    def labels(self, i: int) -> str:
        """A short text label for unit ``i`` (``"L3H2"``, ``"pos 4 ' Mary'"`` …)."""
        parts = []
        for k, v in self.units.items():
            x = v[i]
            if k == "layer":
                parts.append(f"L{x}")
            elif k == "head":
                parts.append(f"H{x}")
            elif k == "position":
                parts.append(f"@{x}")
            else:
                parts.append(repr(x) if isinstance(x, str) else f"{k}={x}")
        return " ".join(parts)

    def to_numpy(self) -> np.ndarray:
        """Scores as a float64 numpy array (same shape as :attr:`scores`)."""
        return self.scores.double().numpy()

    def to_pandas(self, row: int | None = None) -> Any:
        """One row per unit: label columns, then ``score``.

        For 2-D scores, pass ``row`` to pick one target row; without it the
        frame is long-form with a ``row`` column.
        """
        import pandas as pd

        df = pd.DataFrame(self.units)
        if self.scores.dim() == 1:
            df["score"] = self.scores.double().numpy()
            return df
        if row is not None:
            df["score"] = self.scores[row].double().numpy()
            return df
        frames = []
        for r in range(self.scores.shape[0]):
            f = df.copy()
            f.insert(0, "row", r)
            for k, v in self.rows.items():
                f.insert(1, f"row_{k}", v[r])
            f["score"] = self.scores[r].double().numpy()
            frames.append(f)
        return pd.concat(frames, ignore_index=True)

    def top(self, k: int = 10, by: str = "abs", row: int | None = None) -> Any:
        """The ``k`` units with the largest scores, as a DataFrame.

        Args:
            by: ``"abs"`` (largest magnitude), ``"pos"`` (most positive) or ``"neg"``.
            row: for 2-D scores, which row (default: the sum over rows).
        """
        if by not in ("abs", "pos", "neg"):
            raise InputError("by must be 'abs', 'pos' or 'neg'")
        s = (
            self.scores
            if self.scores.dim() == 1
            else (self.scores[row] if row is not None else self.scores.sum(0))
        )
        key = s.abs() if by == "abs" else (s if by == "pos" else -s)
        order = torch.argsort(key.double(), descending=True, stable=True)[: max(0, k)]
        import pandas as pd

        df = pd.DataFrame({c: [v[i] for i in order.tolist()] for c, v in self.units.items()})
        df["score"] = s[order].double().numpy()
        return df

    # ------------------------------------------------------------ file io
    def _metadata(self) -> dict[str, Any]:
        return _jsonable(
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                # lists of [name, values] pairs: JSON objects are saved with
                # sorted keys, and the column order is part of the result
                "units": [[k, v] for k, v in self.units.items()],
                "unit_kind": self.unit_kind,
                "method": self.method,
                "target": self.target,
                "params": self.params,
                "model_id": self.model_id,
                "diagnostics": self.diagnostics,
                "rows": [[k, v] for k, v in self.rows.items()],
                "meta": self.meta,
            }
        )

    def save(self, path: str | Path) -> Path:
        """Write a ``.attr`` file (safetensors; metadata as checked JSON). Returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"scores": self.scores.contiguous()}
        for k, v in self.extra.items():
            tensors[f"extra.{k}"] = v.contiguous()
        body = json.dumps(self._metadata(), sort_keys=True, allow_nan=False)
        digest = _digest(body, tensors)
        save_file(tensors, str(path), metadata={"attrlab": body, "sha256": digest})
        return path

    @classmethod
    def load(cls, path: str | Path) -> Attribution:
        """Read a file written by :meth:`save`.

        Raises:
            FileFormatError: not an attrlab file, corrupt, or tampered with.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileFormatError(f"no such file: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types on bad headers
            raise FileFormatError(f"{path} is not a readable attrlab file: {e}") from e
        body, digest = meta.get("attrlab"), meta.get("sha256")
        if body is None or digest is None or "scores" not in tensors:
            raise FileFormatError(f"{path} is a safetensors file but not an attrlab result")
        if _digest(body, tensors) != digest:
            raise FileFormatError(
                f"{path}: the header or data does not match its checksum (edited or corrupted)"
            )
        try:
            m = json.loads(body)
        except json.JSONDecodeError as e:
            raise FileFormatError(f"{path}: bad metadata JSON: {e}") from e
        if m.get("format") != FORMAT or int(m.get("version", 0)) > FORMAT_VERSION:
            raise FileFormatError(
                f"{path}: unsupported format {m.get('format')} v{m.get('version')}"
            )
        extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
        return cls(
            tensors["scores"],
            units=_columns(m["units"]),
            unit_kind=m["unit_kind"],
            method=m["method"],
            target=m["target"],
            params=m["params"],
            model_id=m["model_id"],
            diagnostics=m["diagnostics"],
            rows=_columns(m["rows"]),
            meta=m["meta"],
            extra=extra,
        )

    def equals(self, other: Attribution) -> bool:
        """Exact equality of scores, labels and metadata."""
        return (
            torch.equal(self.scores, other.scores)
            and self._metadata() == other._metadata()
            and self.extra.keys() == other.extra.keys()
            and all(torch.equal(v, other.extra[k]) for k, v in self.extra.items())
        )

    # ------------------------------------------------------------ display
    def _repr_html_(self) -> str:
        from .viz.html import render_attribution

        return render_attribution(self)

    def to_html(self) -> str:
        """A self-contained HTML fragment (every string escaped)."""
        return self._repr_html_()

    def plot(self, ax: Any = None, k: int = 20) -> Any:
        """A matplotlib view: layer x head heatmap for heads, a heatmap for 2-D
        scores, bars in text order for tokens, else the top ``k`` units as bars."""
        from .viz.plots import plot

        return plot(self, ax=ax, k=k)

    def _top_indices(self, k: int) -> list[int]:
        s = self.scores if self.scores.dim() == 1 else self.scores.sum(0)
        return torch.argsort(s.abs().double(), descending=True, stable=True)[:k].tolist()


def _columns(saved: Any) -> dict[str, list[Any]]:
    """Label columns from a file: ``[[name, values], ...]`` (or a plain mapping)."""
    if isinstance(saved, Mapping):
        return {str(k): list(v) for k, v in saved.items()}
    return {str(k): list(v) for k, v in saved}


def _digest(body: str, tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256(body.encode())
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
