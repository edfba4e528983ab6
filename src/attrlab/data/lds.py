"""Linear datamodeling score (LDS) for training-data attributions.

Train ``M`` models on random ``alpha``-subsets ``S_j`` of the training set,
measure every query's output ``f_j(q)`` (e.g. its margin), and for each query
take the Spearman correlation over ``j`` between the attribution's prediction
``sum_{i in S_j} tau_i(q)`` and ``f_j(q)``; the LDS is the mean over queries
("TRAK: Attributing Model Behavior at Scale"). The confidence interval is a
percentile bootstrap over queries. Retrained models' outputs are cached on
disk (one atomic ``.npy`` per model), so an interrupted harness resumes and a
second method is evaluated against the same retrained models for free.

``al.evaluate.lds(result, ...)`` dispatches here for ``unit_kind == "train"``.

Example:
    >>> import numpy as np
    >>> masks = subset_masks(n_train=20, n_models=30, alpha=0.5, seed=0)
    >>> tau = np.random.default_rng(0).normal(size=(3, 20))
    >>> outputs = masks @ tau.T          # outputs that are exactly linear in the subset
    >>> round(lds_score(tau, masks, outputs).lds, 6)
    1.0
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata
from tqdm.auto import tqdm

from ..errors import InputError
from .store import atomic_save_npy


@dataclass
class LDSResult:
    """LDS with a bootstrap confidence interval.

    Attributes:
        lds: mean Spearman correlation over queries.
        ci: ``(low, high)`` percentile bootstrap interval over queries.
        per_query: ``[n_queries]`` correlations.
        n_models, alpha: the retraining setup.

    Example:
        >>> LDSResult(0.5, (0.4, 0.6), np.array([0.5]), 10, 0.5).lds
        0.5
    """

    lds: float
    ci: tuple[float, float]
    per_query: np.ndarray
    n_models: int
    alpha: float
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"LDSResult(lds={self.lds:.4f}, ci=({self.ci[0]:.4f}, {self.ci[1]:.4f}), "
            f"queries={len(self.per_query)}, models={self.n_models}, alpha={self.alpha})"
        )


def subset_masks(n_train: int, n_models: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """``[n_models, n_train]`` bool masks, each keeping exactly ``round(alpha * n_train)`` examples.

    Example:
        >>> subset_masks(10, 2, 0.5).sum(1).tolist()
        [5, 5]
    """
    if not 0 < alpha < 1:
        raise InputError(f"alpha must be in (0, 1), got {alpha}")
    if n_models < 2:
        raise InputError("LDS needs at least 2 retrained models")
    rng = np.random.default_rng(seed)
    k = int(round(alpha * n_train))
    masks = np.zeros((n_models, n_train), bool)
    for j in range(n_models):
        masks[j, rng.choice(n_train, size=k, replace=False)] = True
    return masks


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column pair: ``a, b`` are ``[M, q]`` → ``[q]``."""
    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    den = np.sqrt((ra**2).sum(0) * (rb**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(0) / den, 0.0)


def lds_score(
    scores: np.ndarray,
    masks: np.ndarray,
    outputs: np.ndarray,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> LDSResult:
    """LDS from attribution ``scores [q, N]``, subset ``masks [M, N]`` and measured ``outputs [M, q]``.

    Raises:
        InputError: shapes that do not fit together.

    Example:
        >>> m = subset_masks(4, 5)
        >>> lds_score(np.ones((1, 4)), m, np.zeros((5, 1))).per_query.shape
        (1,)
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim == 1:
        scores = scores[None]
    masks = np.asarray(masks, bool)
    outputs = np.asarray(outputs, np.float64)
    if outputs.ndim == 1:
        outputs = outputs[:, None]
    if masks.shape[1] != scores.shape[1]:
        raise InputError(
            f"masks cover {masks.shape[1]} training examples, scores {scores.shape[1]}"
        )
    if outputs.shape != (masks.shape[0], scores.shape[0]):
        raise InputError(
            f"outputs must be [n_models={masks.shape[0]}, n_queries={scores.shape[0]}], got {outputs.shape}"
        )
    pred = masks.astype(np.float64) @ scores.T  # [M, q]
    per = _spearman_rows(pred, outputs)
    rng = np.random.default_rng(seed)
    boots = per[rng.integers(0, len(per), size=(n_boot, len(per)))].mean(1)
    lo, hi = np.quantile(boots, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    alpha = float(masks.sum(1).mean() / masks.shape[1])
    return LDSResult(float(per.mean()), (float(lo), float(hi)), per, masks.shape[0], alpha)


class LDSHarness:
    """Retrain on random subsets, measure the queries, cache the outputs, score attributions.

    Args:
        train_and_measure: ``f(train_indices: np.ndarray, model_index: int) -> outputs [n_queries]``
            trains a model on those examples and returns the query outputs.
        n_train: training-set size; n_models: ``M``; alpha: subset fraction; seed: subset seed.
        cache_dir: where retrained outputs are kept (None: memory only).
        key: anything that identifies the setup (model, data, hyper-parameters), JSON-able;
            it is hashed into the cache folder name.

    Example:
        >>> import numpy as np
        >>> w = np.random.default_rng(0).normal(size=(2, 12))
        >>> h = LDSHarness(lambda idx, j: w[:, idx].sum(1), n_train=12, n_models=8)
        >>> round(h.score(w).lds, 3)
        1.0
    """

    def __init__(
        self,
        train_and_measure: Callable[[np.ndarray, int], np.ndarray],
        n_train: int,
        n_models: int = 32,
        alpha: float = 0.5,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        key: Any = None,
        progress: bool = False,
    ):
        self.fn = train_and_measure
        self.n_train, self.n_models, self.alpha, self.seed = n_train, n_models, alpha, seed
        self.masks = subset_masks(n_train, n_models, alpha, seed)
        self.progress = progress
        self.cache: Path | None = None
        if cache_dir is not None:
            desc = json.dumps(
                {"key": key, "n": n_train, "M": n_models, "alpha": alpha, "seed": seed},
                sort_keys=True,
                default=str,
            )
            self.cache = Path(cache_dir) / hashlib.sha256(desc.encode()).hexdigest()[:16]
            self.cache.mkdir(parents=True, exist_ok=True)
            (self.cache / "setup.json").write_text(desc)
        self._outputs: np.ndarray | None = None

    def outputs(self) -> np.ndarray:
        """Measured query outputs ``[M, n_queries]`` (trains what is not cached yet)."""
        if self._outputs is not None:
            return self._outputs
        rows = []
        for j in tqdm(range(self.n_models), disable=not self.progress, desc="LDS retrain"):
            p = self.cache / f"model_{j:05d}.npy" if self.cache is not None else None
            if p is not None and p.exists():
                rows.append(np.load(p))
                continue
            out = np.asarray(self.fn(np.flatnonzero(self.masks[j]), j), np.float64).reshape(-1)
            if p is not None:
                atomic_save_npy(p, out)
            rows.append(out)
        self._outputs = np.stack(rows)
        return self._outputs

    def score(self, scores: Any, **kwargs: Any) -> LDSResult:
        """LDS of ``scores`` (``[q, N]`` array/tensor, or an ``Attribution``)."""
        s = (
            scores.to_numpy()
            if hasattr(scores, "to_numpy") and hasattr(scores, "unit_kind")
            else scores
        )
        s = np.asarray(s.detach().cpu() if hasattr(s, "detach") else s, np.float64)
        return lds_score(s, self.masks, self.outputs(), **kwargs)


def lds(
    result: Any,
    harness: LDSHarness | None = None,
    masks: np.ndarray | None = None,
    outputs: np.ndarray | None = None,
    **kwargs: Any,
) -> LDSResult:
    """LDS of a training-data :class:`~attrlab.result.Attribution` (``unit_kind="train"``).

    Give a :class:`LDSHarness`, or precomputed ``masks [M, N]`` and ``outputs [M, q]``.

    Example:
        >>> import numpy as np, torch
        >>> from attrlab.result import Attribution
        >>> tau = np.random.default_rng(1).normal(size=(2, 10))
        >>> r = Attribution(torch.tensor(tau), units={"index": list(range(10))}, unit_kind="train", method="x")
        >>> m = subset_masks(10, 12)
        >>> round(lds(r, masks=m, outputs=m @ tau.T).lds, 3)
        1.0
    """
    if getattr(result, "unit_kind", "train") != "train":
        raise InputError(
            f"attrlab.data.lds needs a training-data attribution, got units={result.unit_kind!r}"
        )
    # n_masks / alpha (as al.evaluate.lds passes them) must agree with the retraining setup
    n_masks, alpha = kwargs.pop("n_masks", None), kwargs.pop("alpha", None)
    if harness is not None:
        masks = harness.masks
    if masks is not None:
        m = np.asarray(masks, bool)
        have_alpha = float(m.sum(1).mean() / m.shape[1])
        if n_masks is not None and int(n_masks) != len(m):
            raise InputError(f"n_masks={n_masks}, but the retraining setup has {len(m)} models")
        if alpha is not None and abs(float(alpha) - have_alpha) > 0.01:
            raise InputError(f"alpha={alpha}, but the retraining subsets keep {have_alpha:.3f}")
    if harness is not None:
        return harness.score(result, **kwargs)
    if masks is None or outputs is None:
        raise InputError(
            "LDS of training examples needs retrained models: give harness=LDSHarness(...) "
            "(or attrlab.data.digits.digits_harness) or both masks=[M, N] and outputs=[M, n_queries]"
        )
    s = result.to_numpy() if hasattr(result, "to_numpy") else np.asarray(result)
    return lds_score(s, masks, outputs, **kwargs)
