"""Live causal checks and comparisons behind the explorer's buttons.

:func:`ablate_selection` tests what a picture claims: it binds the question a
result answers (prompt, target, units, ablation, read from the result exactly
as every :mod:`attrlab.evaluate` function does) and runs the bound unit kind's
``f`` on four keep-masks in one batched call — every unit kept, the selection
ablated, only the selection kept, nothing kept. From them: the metric change
when the selection is ablated, the change the scores predict
(``-sum(selected scores)``: scores are contributions), and the faithfulness of
the selection as a circuit, ``(f(S) - f(none)) / (f(all) - f(none))``.

:func:`compare` puts two results over the same units side by side (aligned by
label, :meth:`attrlab.result.Attribution.align`): paired scores, rank and
linear correlation, and the overlap of their top-k units.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> r = al.attribute(lm, "a b c", target=" a", units="heads", method="occlusion",
    ...                  ablation="zero")
    >>> out = ablate_selection(lm, r, [0])
    >>> abs(out["change"] + float(r.scores[0])) < 1e-4  # occlusion: f(all) - f(all without u)
    True
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InputError, UnitMismatchError
from ..model.lock import holds_model_lock
from ..result import Attribution

__all__ = ["ablate_selection", "compare", "diff", "patch_selection", "recorded_counterfactual"]


def _indices(select: Sequence[Any], n: int) -> list[int]:
    if not isinstance(select, (list, tuple)) or not select:
        raise InputError("select at least one unit (a list of unit indices)")
    out = []
    for i in select:
        if isinstance(i, bool) or not isinstance(i, int):
            raise InputError(f"unit indices are whole numbers, got {i!r}")
        if not 0 <= i < n:
            raise InputError(f"unit index {i} is out of range: the result has {n} units")
        out.append(i)
    if len(set(out)) != len(out):
        raise InputError("a unit is selected twice")
    return out


@holds_model_lock
def ablate_selection(
    lm: Any,
    result: Attribution,
    select: Sequence[int],
    ablation: Any = None,
    reference: Any = None,
    row: int | None = None,
) -> dict[str, Any]:
    """Ablate the units ``select`` (indices into ``result``'s units) and measure.

    Args:
        lm: the model the result was computed on.
        result: an :class:`Attribution` whose unit kind provides ``f``
            (tokens, words, heads, mlp, neurons, edges, sources …).
        select: unit indices.
        ablation: override the result's ablation (``"zero"``, ``"mean"``, an
            :mod:`attrlab.ablations` object …); default: the one it was
            computed with.
        reference: prompts for ``"mean"`` / ``"resample"``.
        row: for several target rows, which one (default: their mean).

    Returns:
        ``metric_clean`` (every unit kept), ``metric_ablated`` (the selection
        ablated), ``change`` (their difference), ``predicted_change``
        (``-sum`` of the selected scores), ``metric_selection_only``,
        ``metric_none``, ``faithfulness`` (None when ablating everything does not
        change the metric), ``n_selected``, ``labels``, ``ablation``,
        ``elapsed_ms``.

    Raises:
        InputError: bad indices, units that cannot be ablated, or a model
            that does not match the result.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", units="mlp", method="occlusion",
        ...                  ablation="zero")
        >>> round(ablate_selection(lm, r, [0, 1])["faithfulness"], 6)  # every unit: the model
        1.0
    """
    from ..evaluate.lds import _bind, _question

    t0 = time.perf_counter()
    if not isinstance(result, Attribution):
        raise InputError("causal checks run on attribution results (.attr files)")
    idx = _indices(list(select), len(result))
    q, u, opts = _question(lm, result, None, None, None, "run a causal check on this result",
                           ablation=ablation, reference=reference)  # fmt: skip
    if "f" not in getattr(u, "provides", ()):
        raise InputError(f"units {u.kind!r} cannot be ablated (the kind has no f)")
    b = _bind(lm, q, u, **opts)
    if b.n != len(result):
        raise InputError(
            f"the model gives {b.n} {u.kind} units for this question, the result has "
            f"{len(result)}: was it computed on another model?"
        )
    masks = torch.ones(4, b.n, dtype=torch.bool)
    masks[1, idx] = False
    masks[2] = False
    masks[2, idx] = True
    masks[3] = False
    vals = torch.as_tensor(b.f(masks)).detach().double()
    vals = vals[:, None] if vals.dim() == 1 else vals
    if row is not None:
        if not 0 <= row < vals.shape[1]:
            raise InputError(f"row {row} is out of range: the result has {vals.shape[1]} rows")
        v = vals[:, row]
    else:
        v = vals.mean(1)
    m_all, m_abl, m_sel, m_none = (float(x) for x in v)
    scores = result.scores.double()
    s = scores if scores.dim() == 1 else (scores[row] if row is not None else scores.mean(0))
    predicted = -float(torch.nan_to_num(s[idx]).sum())
    gap = m_all - m_none
    faith = None if abs(gap) <= 1e-6 * max(1.0, abs(m_all)) else (m_sel - m_none) / gap
    abl = getattr(b, "ablation", None)
    return {
        "metric_clean": m_all,
        "metric_ablated": m_abl,
        "change": m_abl - m_all,
        "predicted_change": predicted,
        "metric_selection_only": m_sel,
        "metric_none": m_none,
        "faithfulness": faith,
        "n_selected": len(idx),
        "n_units": b.n,
        "labels": [result.labels(i) for i in idx],
        "ablation": getattr(abl, "name", None) if abl is not None else None,
        "elapsed_ms": (time.perf_counter() - t0) * 1000,
    }


def recorded_counterfactual(result: Any) -> str | None:
    """The counterfactual prompt a result was computed with, if it recorded one
    (``meta["question"]["counterfactual"]``, text only).

    Example:
        >>> import torch
        >>> r = Attribution(torch.zeros(1), {"layer": [0]}, "mlp", "x",
        ...                 meta={"question": {"counterfactual": "b"}})
        >>> recorded_counterfactual(r)
        'b'
    """
    q = (getattr(result, "meta", None) or {}).get("question") or {}
    cf = q.get("counterfactual") if isinstance(q, dict) else None
    return cf if isinstance(cf, str) and cf else None


def patch_selection(
    lm: Any,
    result: Attribution,
    select: Sequence[int],
    counterfactual: str | None = None,
    row: int | None = None,
) -> dict[str, Any]:
    """Patch the units ``select`` from a counterfactual run and measure: the
    :func:`ablate_selection` measures with the ablation
    :class:`attrlab.ablations.Counterfactual` (the units' values taken from the
    counterfactual prompt; ``metric_none``: every unit patched).

    Args:
        counterfactual: the prompt to patch from (default: the one the result
            recorded, :func:`recorded_counterfactual`).

    Raises:
        InputError: no counterfactual given or recorded, or one the unit kind
            cannot patch from (e.g. another token length for positional units).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", units="heads", method="patch",
        ...                  counterfactual="a b b")
        >>> out = patch_selection(lm, r, [1])
        >>> out["ablation"], abs(out["change"] + float(r.scores[1])) < 1e-4
        ('counterfactual', True)
    """
    from ..ablations import Counterfactual

    cf = counterfactual or recorded_counterfactual(result)
    if not cf:
        raise InputError("patching needs a counterfactual prompt: type one (the result "
                         "recorded none)")  # fmt: skip
    out = ablate_selection(lm, result, select, Counterfactual(cf), None, row)
    out["counterfactual"] = cf
    return out


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if len(a) < 2:
        return None
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return _pearson(ra, rb)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if len(a) < 2:
        return None
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return None if den == 0 or not math.isfinite(den) else float((a * b).sum()) / den


def compare(a: Attribution, b: Attribution, k: int = 10, row: int | None = None) -> dict[str, Any]:
    """Two results over the same units, aligned by label: paired ``scores_a`` /
    ``scores_b``, ``labels``, ``pearson``, ``spearman`` and the top-``k``
    overlap by ``|score|`` (``overlap`` counts units, ``jaccard`` its share).

    Raises:
        UnitMismatchError: the results score different units.

    Example:
        >>> import torch
        >>> a = Attribution(torch.tensor([3.0, 1.0, 2.0]), {"layer": [0, 1, 2]}, "mlp", "x")
        >>> b = Attribution(torch.tensor([1.0, 2.0, 3.0]), {"layer": [1, 2, 0]}, "mlp", "y")
        >>> c = compare(a, b, k=2)
        >>> round(c["spearman"], 6), c["overlap"]
        (1.0, 2)
    """
    if not isinstance(a, Attribution) or not isinstance(b, Attribution):
        raise UnitMismatchError("compare two attribution results (.attr files), not graphs")
    x, y = a.align(b)

    def flat(r: Attribution) -> torch.Tensor:
        s = r.scores.double()
        if s.dim() == 2:
            s = s[row] if row is not None else s.mean(0)
        return torch.nan_to_num(s)

    sa, sb = flat(x), flat(y)
    k = max(1, min(int(k), len(sa)))
    ta = set(sa.abs().argsort(descending=True, stable=True)[:k].tolist())
    tb = set(sb.abs().argsort(descending=True, stable=True)[:k].tolist())
    return {
        "labels": [x.labels(i) for i in range(len(x))],
        "scores_a": sa.tolist(),
        "scores_b": sb.tolist(),
        "method_a": a.method,
        "method_b": b.method,
        "pearson": _pearson(sa, sb),
        "spearman": _spearman(sa, sb),
        "k": k,
        "overlap": len(ta & tb),
        "jaccard": len(ta & tb) / len(ta | tb),
        "top_a": sorted(ta),
        "top_b": sorted(tb),
        "n_units": len(sa),
    }


_TEXT_KINDS = ("tokens", "words", "sentences", "spans")


def _prompt_of(r: Attribution) -> str | None:
    meta = r.meta or {}
    q = meta.get("question") or {}
    p = q.get("inputs") if isinstance(q, dict) else None
    p = p if isinstance(p, str) else meta.get("prompt")
    return p if isinstance(p, str) else None


def _flat(r: Attribution, row: int | None) -> torch.Tensor:
    s = r.scores.double()
    if s.dim() == 2:
        s = s[row] if row is not None else s.mean(0)
    return s


def diff(a: Attribution, b: Attribution, row: int | None = None) -> dict[str, Any]:
    """The difference of two results (two prompts, or two methods), ``b - a``.

    * Same units (``mode: "units"``): matched by label
      (:meth:`~attrlab.result.Attribution.align`), ``labels``, ``scores_a``,
      ``scores_b``, ``difference``.
    * Text units (tokens, words, sentences, spans) of two *different* prompts
      (``mode: "positions"``): unit ``i`` of A against unit ``i`` of B, up to the
      longer one (``null`` past the shorter), with ``text_a`` / ``text_b`` and a
      ``note`` saying that the alignment is by position, not by meaning, and
      how many positions hold different text.

    Non-finite scores become ``None`` (JSON ``null``); ``difference`` is
    ``None`` where either side is. ``largest`` lists the indices of the 10
    largest ``|difference|``.

    Raises:
        UnitMismatchError: different unit kinds, or units that match by
            neither label nor (for text units) position.

    Example:
        >>> import torch
        >>> a = Attribution(torch.tensor([1.0, 2.0]), {"position": [0, 1], "token": ["x", "y"]},
        ...                 "tokens", "ig")
        >>> b = Attribution(torch.tensor([0.5, 2.0, 3.0]),
        ...                 {"position": [0, 1, 2], "token": ["x", "z", "w"]}, "tokens", "ig")
        >>> d = diff(a, b)
        >>> d["mode"], d["difference"], d["n_differing_text"]
        ('positions', [-0.5, 0.0, None], 2)
    """
    if not isinstance(a, Attribution) or not isinstance(b, Attribution):
        raise UnitMismatchError("diff compares two attribution results (.attr files), not graphs")
    if a.unit_kind != b.unit_kind:
        raise UnitMismatchError(f"cannot diff {a.unit_kind!r} units with {b.unit_kind!r} units; "
                                "choose two results over the same unit kind")  # fmt: skip

    def num(x: float) -> float | None:
        return x if math.isfinite(x) else None

    def text(r: Attribution) -> list[str]:
        col = r.units.get("token") or r.units.get("text") or []
        return [str(t) for t in col]

    base = {"method_a": a.method, "method_b": b.method, "target_a": a.target,
            "target_b": b.target, "prompt_a": _prompt_of(a), "prompt_b": _prompt_of(b),
            "unit_kind": a.unit_kind}  # fmt: skip
    if a.unit_kind in _TEXT_KINDS and (text(a) != text(b) or len(a) != len(b)):
        ta, tb = text(a), text(b)
        sa, sb = _flat(a, row).tolist(), _flat(b, row).tolist()
        n = max(len(sa), len(sb))
        xa = [num(sa[i]) if i < len(sa) else None for i in range(n)]
        xb = [num(sb[i]) if i < len(sb) else None for i in range(n)]
        pa = [ta[i] if i < len(ta) else None for i in range(n)]
        pb = [tb[i] if i < len(tb) else None for i in range(n)]
        differing = sum(pa[i] != pb[i] for i in range(n))
        d = [None if x is None or y is None else y - x for x, y in zip(xa, xb)]
        note = (f"different prompts: aligned by position (unit i of A against unit i of B), "
                f"not by meaning; {differing} of {n} positions hold different text"
                + (f"; the prompts have {len(sa)} and {len(sb)} units" if len(sa) != len(sb)
                   else ""))  # fmt: skip
        out: dict[str, Any] = {**base, "mode": "positions", "labels": [f"@{i}" for i in range(n)],
               "text_a": pa, "text_b": pb, "scores_a": xa, "scores_b": xb, "difference": d,
               "n_differing_text": differing, "note": note}  # fmt: skip
    else:
        x, y = a.align(b)
        sa, sb = _flat(x, row).tolist(), _flat(y, row).tolist()
        xa, xb = [num(v) for v in sa], [num(v) for v in sb]
        d = [None if u is None or v is None else v - u for u, v in zip(xa, xb)]
        same = _prompt_of(a) == _prompt_of(b)
        note = ("same units, matched by label" + ("" if same else "; different prompts")
                + (f"; {len(a)} and {len(b)} units, {len(x)} in common"
                   if len(x) != max(len(a), len(b)) else ""))  # fmt: skip
        out = {**base, "mode": "units", "labels": [x.labels(i) for i in range(len(x))],
               "scores_a": xa, "scores_b": xb, "difference": d, "note": note}  # fmt: skip
    dd: list[float | None] = out["difference"]  # type: ignore[assignment]
    order = sorted((i for i, v in enumerate(dd) if v is not None), key=lambda i: -abs(dd[i] or 0.0))
    out["largest"] = order[:10]
    out["n_units"] = len(dd)
    return out
