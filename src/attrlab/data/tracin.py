"""Gradient-similarity baselines: gradient dot, gradient cosine, TracIn-CP.

All three compare *loss* gradients. A store holds output gradients ``Phi``
and out-to-loss weights ``Q`` with ``grad(loss) = -Q * grad(output)``, so the
loss-gradient features are ``Q * Phi`` (the sign cancels in every product):

- ``grad-dot``:  ``<g_query, g_train>``;
- ``grad-cos``:  ``<g_query, g_train> / (|g_query| |g_train|)``;
- ``tracin``:    ``sum_c lr_c <g_query^c, g_train^c>`` over checkpoints ``c``
  ("Estimating Training Data Influence by Tracing Gradient Descent", TracIn-CP).

With an identity projection these are the exact per-example gradient
products; with a random projection they are Johnson–Lindenstrauss estimates.

Example:
    >>> import tempfile, torch
    >>> import attrlab.data as ad
    >>> net = torch.nn.Linear(4, 3)
    >>> x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    >>> store = ad.featurize(net, (x, y), tempfile.mkdtemp(), proj_dim=None)
    >>> ad.grad_similarity(store, net, (x[:1], y[:1]), kind="cos").scores.shape
    torch.Size([1, 6])
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InputError
from ..result import Attribution
from .featurize import Examples, query_features
from .store import FeatureStore
from .trak import StoreLike, as_models, as_stores, block_scores, make_attribution


def _train_norms(store: FeatureStore, q: np.ndarray) -> np.ndarray:
    """``|Q_i Phi_i|`` ``[N]`` streamed over shards."""
    out = np.empty(store.n, np.float64)
    for a, feats, _ in store.iter_blocks():
        f = np.asarray(feats, dtype=np.float64)
        out[a : a + len(f)] = np.linalg.norm(f, axis=1) * np.abs(q[a : a + len(f)])
    return out


def similarity_scores(
    stores: Sequence[FeatureStore],
    query_feats: Sequence[tuple[Tensor, Tensor]],
    kind: str = "dot",
    weights: Sequence[float] | None = None,
) -> Tensor:
    """``sum_c w_c sim(g_query^c, g_train^c)`` ``[m, N]`` from query ``(features, out_to_loss)`` per store."""
    if kind not in ("dot", "cos"):
        raise InputError(f"kind must be 'dot' or 'cos', got {kind!r}")
    weights = list(weights) if weights is not None else [1.0] * len(stores)
    if len(weights) != len(stores) or len(query_feats) != len(stores):
        raise InputError(
            f"{len(weights)} weights / {len(query_feats)} query sets for {len(stores)} stores"
        )
    total: Tensor | None = None
    for store, (phi, qq), w in zip(stores, query_feats, weights):
        if phi.dim() != 2 or phi.shape[1] != store.dim:
            raise InputError(
                f"query features of shape {tuple(phi.shape)} for a store of dim {store.dim}"
            )
        q_train = store.out_to_loss()
        g_query = phi.double() * qq.double()[:, None]  # [m, k]
        s = block_scores(store, g_query.float(), weight=q_train)
        if kind == "cos":
            qn = g_query.norm(dim=1).clamp_min(1e-30).float()
            tn = torch.from_numpy(_train_norms(store, q_train)).clamp_min(1e-30).float()
            s = s / qn[:, None] / tn[None, :]
        s = s * float(w)
        total = s if total is None else total.add_(s)
    assert total is not None
    return total


def grad_similarity(
    stores: StoreLike | Sequence[StoreLike],
    models: nn.Module | Sequence[nn.Module],
    queries: Examples | Sequence[Tensor],
    kind: str = "dot",
    weights: Sequence[float] | None = None,
    texts: Sequence[str] | None = None,
    batch_size: int | None = None,
    method: str | None = None,
) -> Attribution:
    """Gradient dot (``kind="dot"``) or cosine (``"cos"``) of loss gradients, summed over stores with ``weights``.

    Example:
        >>> grad_similarity.__name__
        'grad_similarity'
    """
    t0 = time.perf_counter()
    st = as_stores(stores)
    ms = as_models(models, len(st))
    q = queries if isinstance(queries, Examples) else Examples(queries)
    feats = [query_features(m, q, s, batch_size=batch_size) for m, s in zip(ms, st)]
    scores = similarity_scores(st, feats, kind, weights)
    name = method or f"grad-{kind}"
    return make_attribution(
        scores,
        st,
        name,
        {"kind": kind, "weights": weights, "n_checkpoints": len(st)},
        texts=texts,
        query_texts=q.texts,
        diagnostics={"seconds": time.perf_counter() - t0},
    )


def tracin(
    stores: StoreLike | Sequence[StoreLike],
    models: nn.Module | Sequence[nn.Module],
    queries: Examples | Sequence[Tensor],
    lrs: float | Sequence[float] = 1.0,
    texts: Sequence[str] | None = None,
    batch_size: int | None = None,
) -> Attribution:
    """TracIn-CP: learning-rate-weighted sum of loss-gradient dot products over checkpoints.

    Example:
        >>> tracin.__name__
        'tracin'
    """
    st = as_stores(stores)
    w = [float(lrs)] * len(st) if isinstance(lrs, (int, float)) else list(lrs)
    return grad_similarity(st, models, queries, "dot", w, texts, batch_size, method="tracin")


__all__ = ["grad_similarity", "similarity_scores", "tracin"]
