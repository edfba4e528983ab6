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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import FileFormatError, InputError, UnitMismatchError

#: label columns that describe a unit but do not identify it (ignored when aligning)
TEXT_COLUMNS = ("token", "text", "special", "segment")

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
    def unit_keys(self, columns: Sequence[str] | None = None) -> list[tuple[Any, ...]]:
        """One hashable key per unit from its label columns (default: every
        column but the free-text ones, :data:`TEXT_COLUMNS`): the key results
        align on.

        Example:
            >>> import torch
            >>> Attribution(torch.zeros(2), {"layer": [0, 1], "head": [3, 3]}, "heads", "x").unit_keys()
            [(0, 3), (1, 3)]
        """
        cols = list(columns) if columns is not None else self.key_columns()
        return (
            list(zip(*(self.units[c] for c in cols))) if cols else [(i,) for i in range(len(self))]
        )

    def key_columns(self) -> list[str]:
        """The label columns that identify a unit (all but :data:`TEXT_COLUMNS`).

        Example:
            >>> import torch
            >>> cols = {"position": [0, 1], "token": ["a", "b"]}
            >>> Attribution(torch.zeros(2), cols, "tokens", "x").key_columns()
            ['position']
        """
        return [c for c in self.units if c not in TEXT_COLUMNS]

    def align(self, other: Attribution) -> tuple[Attribution, Attribution]:
        """Both results reordered and restricted to their common units, in this
        result's order, matched by label: two methods that list the same heads
        in different orders then compare unit by unit. Rows (2-D scores) are
        kept; the free-text columns (``token`` …) of matched units must agree.

        Raises:
            UnitMismatchError: other unit kinds, other identifying label columns
                (e.g. heads per position against whole heads), a label that
                names two units, a matched unit whose text differs (another
                prompt), or no unit in common.

        Example:
            >>> import torch
            >>> a = Attribution(torch.tensor([1.0, 2.0]), {"layer": [0, 1]}, "mlp", "x")
            >>> b = Attribution(torch.tensor([20.0, 10.0]), {"layer": [1, 0]}, "mlp", "y")
            >>> [r.scores.tolist() for r in a.align(b)]
            [[1.0, 2.0], [10.0, 20.0]]
        """
        if not isinstance(other, Attribution):
            raise InputError(f"align() needs another Attribution, got {type(other).__name__}")
        if other.unit_kind != self.unit_kind:
            raise UnitMismatchError(
                f"cannot align {self.unit_kind!r} units with {other.unit_kind!r} units; "
                "compare results over the same unit kind"
            )
        cols, theirs_cols = self.key_columns(), other.key_columns()
        if sorted(cols) != sorted(theirs_cols):
            raise UnitMismatchError(
                f"the results label their {self.unit_kind!r} units by {cols} and {theirs_cols}: "
                "they are different units (e.g. per position or not); attribute the same units"
            )
        mine, theirs = self.unit_keys(cols), other.unit_keys(cols)
        for res, keys in ((self, mine), (other, theirs)):
            if len(set(keys)) != len(keys):
                dup = next(k for i, k in enumerate(keys) if k in keys[:i])
                raise UnitMismatchError(
                    f"the labels {cols} of the {res.method!r} result name two units "
                    f"({dict(zip(cols, dup))}); they cannot be matched by label"
                )
        where = {k: i for i, k in enumerate(theirs)}
        pairs = [(i, where[k]) for i, k in enumerate(mine) if k in where]
        if not pairs:
            raise UnitMismatchError(
                f"the two results share no unit (labels {cols}); attribute the same units"
            )
        for c in TEXT_COLUMNS:
            if c in self.units and c in other.units:
                bad = [(i, j) for i, j in pairs if self.units[c][i] != other.units[c][j]]
                if bad:
                    i, j = bad[0]
                    raise UnitMismatchError(
                        f"unit {dict(zip(cols, mine[i]))} is {c}={self.units[c][i]!r} in one "
                        f"result and {other.units[c][j]!r} in the other: they explain different "
                        "inputs"
                    )
        return self._select([i for i, _ in pairs]), other._select([j for _, j in pairs])

    def _select(self, idx: list[int]) -> Attribution:
        out = Attribution.__new__(Attribution)
        out.__dict__.update(self.__dict__)
        out.scores = self.scores[..., idx]
        out.units = {k: [v[i] for i in idx] for k, v in self.units.items()}
        return out

    def effect_of_patching(self) -> Attribution:
        """The "effect of patching" view: the target change when the unit is
        patched (ablated in the noising direction, restored when denoising), as
        the AtP paper writes ``c(n)``. Scores are contributions (one sign for
        every method: ``f(all) - f(all without u)`` when noising), so the view
        is ``-scores`` for noising results and ``scores`` for denoising ones.

        Example:
            >>> import torch
            >>> r = Attribution(torch.tensor([0.5, -2.0]), {"layer": [0, 1]}, "mlp", "patch")
            >>> r.effect_of_patching().scores.tolist()
            [-0.5, 2.0]
        """
        direction = self.meta.get("direction", self.params.get("direction", "noising"))
        sign = 1.0 if direction == "denoising" else -1.0
        out = Attribution.__new__(Attribution)
        out.__dict__.update(self.__dict__)
        out.scores = sign * self.scores
        out.meta = {**self.meta, "view": "effect_of_patching"}
        return out

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
        """Write a ``.attr`` file (safetensors; metadata as checked JSON). Returns the path.

        The write is atomic: the file is complete or not written (an existing
        file stays as it was when writing fails). Non-finite scores are refused
        (:class:`InputError`), so every saved file can be loaded.

        Example:
            >>> import tempfile, os
            >>> r = Attribution(torch.tensor([1.0, 2.0]), {"token": ["a", "b"]}, "tokens", "ig")
            >>> p = r.save(os.path.join(tempfile.mkdtemp(), "r.attr"))
            >>> Attribution.load(p).equals(r)
            True
        """
        from safetensors.torch import save

        from ._files import write_atomically

        if self.scores.is_floating_point() and not bool(torch.isfinite(self.scores).all()):
            n_bad = int((~torch.isfinite(self.scores)).sum())
            raise InputError(
                f"cannot save a result with non-finite scores ({n_bad} of "
                f"{self.scores.numel()} are NaN or infinite); find where they come from first"
            )
        tensors = {"scores": self.scores.contiguous()}
        for k, v in self.extra.items():
            tensors[f"extra.{k}"] = v.contiguous()
        body = json.dumps(self._metadata(), sort_keys=True, allow_nan=False)
        digest = _digest(body, tensors)
        data = save(tensors, metadata={"attrlab": body, "sha256": digest})
        # plain Python file io: OSError subclasses (not SafetensorError) on a bad path
        return write_atomically(path, lambda tmp: tmp.write_bytes(data))

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
        except (json.JSONDecodeError, RecursionError) as e:
            raise FileFormatError(f"{path}: bad metadata JSON: {e}") from e
        return cls(**_checked_fields(path, m, tensors))

    def equals(self, other: Attribution) -> bool:
        """Exact equality of scores, labels and metadata."""
        return (
            torch.equal(self.scores, other.scores)
            and self._metadata() == other._metadata()
            and self.extra.keys() == other.extra.keys()
            and all(torch.equal(v, other.extra[k]) for k, v in self.extra.items())
        )

    # ------------------------------------------------------------ display
    # Views live in attrlab.viz and register themselves (register_view); a result
    # computes and renders nothing itself, and imports no view.
    def _repr_html_(self) -> str:
        return _view("html")(self)

    def to_html(self) -> str:
        """A self-contained HTML fragment (every string escaped), rendered by the
        view :mod:`attrlab.viz` registers."""
        return self._repr_html_()

    def plot(self, ax: Any = None, k: int = 20) -> Any:
        """A matplotlib view: layer x head heatmap for heads, a heatmap for 2-D
        scores, bars in text order for tokens, else the top ``k`` units as bars
        (drawn by the view :mod:`attrlab.viz` registers)."""
        return _view("plot")(self, ax=ax, k=k)

    def _top_indices(self, k: int) -> list[int]:
        s = self.scores if self.scores.dim() == 1 else self.scores.sum(0)
        return torch.argsort(s.abs().double(), descending=True, stable=True)[:k].tolist()


_VIEWS: dict[str, Callable[..., Any]] = {}


def register_view(name: str, fn: Callable[..., Any]) -> None:
    """Make ``fn(result, **kw)`` the ``name`` view of every :class:`Attribution`
    (``"html"``: ``_repr_html_`` / ``to_html``; ``"plot"``: ``plot``). Views
    live above results (:mod:`attrlab.viz` registers its own on import), so
    this module imports none.

    Example:
        >>> import torch
        >>> old = _VIEWS.get("html")
        >>> register_view("html", lambda r: f"<b>{r.method}</b>")
        >>> Attribution(torch.zeros(1), {"i": [0]}, "tokens", "ig").to_html()
        '<b>ig</b>'
        >>> register_view("html", old)
    """
    if not callable(fn):
        raise InputError(f"a view must be callable, got {fn!r}")
    _VIEWS[name] = fn


def _view(name: str) -> Callable[..., Any]:
    fn = _VIEWS.get(name)
    if fn is None:
        raise InputError(
            f"no {name!r} view is registered: import attrlab (or attrlab.viz), which "
            "registers the HTML and plot views"
        )
    return fn


# metadata keys every file written by Attribution.save has, with their JSON type
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "units": (list, dict),
    "unit_kind": str,
    "method": str,
    "target": str,
    "params": dict,
    "model_id": str,
    "diagnostics": dict,
    "rows": (list, dict),
    "meta": dict,
}
_JSON_TYPE = {list: "a list", str: "a string", dict: "an object", (list, dict): "a list"}


def _checked_fields(path: Path, m: Any, tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """The constructor arguments of a loaded file, after checking the metadata schema.

    A file can carry a valid checksum and still be malformed (written by a
    buggy or hostile writer, or by hand). Every way it can be malformed raises
    :class:`FileFormatError` naming the problem: not an object, wrong format or
    version, a missing key, a key of the wrong type, label columns that are not
    ``[name, values]`` pairs of scalars, columns whose length differs from the
    number of units (or of rows), and scores that are not a finite real
    ``[n_units]`` or ``[n_rows, n_units]`` tensor.

    Example:
        >>> import torch
        >>> _checked_fields(Path("r.attr"), {"format": "x"}, {"scores": torch.zeros(1)})
        Traceback (most recent call last):
        ...
        attrlab.errors.FileFormatError: r.attr: unsupported format x vNone
    """

    def bad(what: str) -> FileFormatError:
        return FileFormatError(
            f"{path}: malformed attrlab metadata: {what}. The checksum matches, so the file "
            "was written this way; re-create it with Attribution.save (or attrlab explain --out)"
        )

    if not isinstance(m, dict):
        raise bad(f"the metadata is a JSON {type(m).__name__}, not an object")
    if m.get("format") != FORMAT:
        raise FileFormatError(f"{path}: unsupported format {m.get('format')} v{m.get('version')}")
    version = m.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise bad(f"'version' must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"{path}: unsupported format {FORMAT} v{version} (this attrlab reads up to "
            f"v{FORMAT_VERSION}); upgrade attrlab to read it"
        )
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise bad("missing key" + ("s " if len(missing) > 1 else " ") + ", ".join(missing))
    for k, typ in _REQUIRED.items():
        if not isinstance(m[k], typ):
            raise bad(f"{k!r} must be {_JSON_TYPE[typ]}, got {type(m[k]).__name__}")

    scores = tensors["scores"]
    if scores.dtype == torch.bool or scores.is_complex():
        raise bad(f"scores must be real numbers, got dtype {scores.dtype}")
    if scores.dim() not in (1, 2) or (scores.dim() == 2 and scores.shape[0] == 0):
        raise bad(f"scores must be [n_units] or [n_rows, n_units], got {tuple(scores.shape)}")
    if scores.is_floating_point() and not bool(torch.isfinite(scores).all()):
        n_bad = int((~torch.isfinite(scores)).sum())
        raise bad(f"{n_bad} of {scores.numel()} scores are NaN or infinite")
    n_units = int(scores.shape[-1])
    units = _checked_columns(m["units"], "units", n_units, bad)
    # rows label the rows of 2-D scores (1-D results keep theirs as written)
    rows = _checked_columns(m["rows"], "rows", scores.shape[0] if scores.dim() == 2 else None, bad)
    extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
    return {
        "scores": scores,
        "units": units,
        "unit_kind": m["unit_kind"],
        "method": m["method"],
        "target": m["target"],
        "params": m["params"],
        "model_id": m["model_id"],
        "diagnostics": m["diagnostics"],
        "rows": rows,
        "meta": m["meta"],
        "extra": extra,
    }


def _checked_columns(saved: Any, key: str, n: int | None, bad: Any) -> dict[str, list[Any]]:
    """``[[name, values], ...]`` (or a plain mapping) -> columns, each a list of
    ``n`` JSON scalars."""
    if isinstance(saved, dict):
        saved = [[k, v] for k, v in saved.items()]
    cols: dict[str, list[Any]] = {}
    for i, pair in enumerate(saved):
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise bad(f"{key}[{i}] must be a [name, values] pair, got {_short(pair)}")
        name, values = pair
        if name in cols:
            raise bad(f"{key} has the column {name!r} twice")
        if not isinstance(values, list):
            raise bad(f"{key} column {name!r} must be a list, got {type(values).__name__}")
        if n is not None and len(values) != n:
            raise bad(f"{key} column {name!r} has {len(values)} entries for {n} {key}")
        for v in values:
            if not (v is None or isinstance(v, (str, int, float))) or (
                isinstance(v, float) and not math.isfinite(v)
            ):
                raise bad(f"{key} column {name!r} holds {_short(v)}; labels are strings or numbers")
        cols[name] = values
    return cols


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _digest(body: str, tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256(body.encode())
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
