"""TRAK: attribute a model output to training examples with projected gradient features.

For one checkpoint with training features ``Phi [N, k]`` and query features
``phi [m, k]`` the TRAK scores are ``phi (Phi^T Phi + lambda I)^-1 Phi^T``
(``[m, N]``). Over ``C`` checkpoints or independently trained models the
scores are averaged, then every training example's column is multiplied by
its out-to-loss weight averaged over the checkpoints (``1 - p`` of the true
class for classifiers), as in "TRAK: Attributing Model Behavior at Scale".

Scoring streams the store shard by shard: ``phi M`` (``[m, k]``, a Cholesky
solve, never the explicit inverse) times each block ``Phi_s^T``; the ``N x k``
matrix is never loaded whole. Query gradients come in batches the memory model
sizes (all queries at once for a small model), and checkpoints that share a
projection generate its random blocks once.

Example:
    >>> import tempfile, torch
    >>> import attrlab.data as ad
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    >>> store = ad.featurize(net, (x, y), tempfile.mkdtemp(), proj_dim=8)
    >>> r = ad.TRAK(store).attribute(net, (x[:2], y[:2]))
    >>> r.scores.shape
    torch.Size([2, 20])
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InputError
from ..result import Attribution
from .featurize import Examples, query_features
from .project import Projector
from .store import FeatureStore

StoreLike = Union[FeatureStore, str, Path]


def as_stores(stores: StoreLike | Sequence[StoreLike]) -> list[FeatureStore]:
    """Open stores given as paths or :class:`FeatureStore` objects (one per checkpoint).

    Raises:
        InputError: no store, or stores of different sizes/datasets.
    """
    if isinstance(stores, (FeatureStore, str, Path)):
        stores = [stores]
    out = [s if isinstance(s, FeatureStore) else FeatureStore.open(s) for s in stores]
    if not out:
        raise InputError("give at least one feature store")
    base = out[0].manifest
    for s in out[1:]:
        if s.manifest["n"] != base["n"] or s.manifest["ids_hash"] != base["ids_hash"]:
            raise InputError(f"stores {out[0].path} and {s.path} hold different training sets")
    return out


def as_models(models: nn.Module | Sequence[nn.Module], n: int) -> list[nn.Module]:
    """One model per store (a single model is reused for every store)."""
    if isinstance(models, nn.Module) or hasattr(models, "adapter"):
        return [models] * n  # type: ignore[list-item]
    models = list(models)
    if len(models) != n:
        raise InputError(f"{len(models)} models for {n} feature stores (one checkpoint per store)")
    return models


def store_labels(store: FeatureStore, texts: Sequence[str] | None = None) -> dict[str, list[Any]]:
    """Unit labels of the training examples: ``index``, ``id`` and (if known) ``text``.

    Raises:
        StoreCorruptError: ``ids.json`` or ``texts.json`` fails its recorded checksum.
    """
    n = store.n
    raw_ids = store.read_file("ids.json")  # checked against its recorded checksum
    ids = json.loads(raw_ids) if raw_ids is not None else list(range(n))
    if len(ids) != n:
        raise InputError(f"{store.path / 'ids.json'} holds {len(ids)} ids for {n} examples")
    if texts is None:
        raw_texts = store.read_file("texts.json")
        texts = json.loads(raw_texts) if raw_texts is not None else None
    labels: dict[str, list[Any]] = {"index": list(range(n)), "id": list(ids)}
    if texts is not None:
        if len(texts) != n:
            raise InputError(f"{len(texts)} texts for {n} training examples")
        labels["text"] = list(texts)
    return labels


def block_scores(
    store: FeatureStore,
    left: Tensor,
    weight: np.ndarray | None = None,
    out: Tensor | None = None,
    q_into: np.ndarray | None = None,
) -> Tensor:
    """``left @ Phi^T`` ``[m, N]`` streamed over the store's shards (``left``: ``[m, k]``).

    ``weight`` (``[N]``) scales the training rows first (e.g. out-to-loss).
    ``out`` (``[m, N]`` float32): add the scores to it instead of a new tensor.
    ``q_into`` (``[N]``): filled with the store's out-to-loss weights in the
    same pass (every shard is read and checked once).
    """
    left = left.to(torch.float32)
    if out is None:
        out = torch.zeros(left.shape[0], store.n, dtype=torch.float32)
    for a, feats, q in store.iter_blocks(with_q=q_into is not None):
        block = torch.from_numpy(np.asarray(feats, dtype=np.float32))  # [n_s, k]
        b = a + block.shape[0]
        if weight is not None:
            block = block * torch.from_numpy(weight[a:b].astype(np.float32))[:, None]
        if q_into is not None:
            q_into[a:b] = q
        out[:, a:b].addmm_(left, block.T)
    return out


def make_attribution(
    scores: Tensor,
    stores: list[FeatureStore],
    method: str,
    params: dict[str, Any],
    texts: Sequence[str] | None = None,
    query_texts: Sequence[str] | None = None,
    target: str = "",
    diagnostics: dict[str, Any] | None = None,
) -> Attribution:
    """An :class:`~attrlab.result.Attribution` over training examples (``unit_kind="train"``)."""
    man = stores[0].manifest
    rows = {"query": list(query_texts)} if query_texts is not None and scores.dim() == 2 else None
    return Attribution(
        scores,
        units=store_labels(stores[0], texts),
        unit_kind="train",
        method=method,
        target=target or man["output"]["name"],
        params=params,
        model_id=str(man.get("model_id", "")),
        diagnostics=diagnostics,
        rows=rows,
        meta={
            "stores": [str(s.path) for s in stores],
            "checkpoints": [s.manifest["checkpoint"] for s in stores],
            "projection": man["projection"],
        },
    )


class TRAK:
    """TRAK scores from one feature store per checkpoint / independently trained model.

    Args:
        stores: feature stores (paths or objects), one per checkpoint.
        lambda_: ridge term added to ``Phi^T Phi``; ``None`` uses ``reg * mean(diag(Phi^T Phi))``.
        reg: relative ridge used when ``lambda_`` is None. The default 0.1 was
            chosen on the small digits setup of the tests (LDS rises steadily
            from ``reg=0``, the traker package's default); see ``docs/data.md``.
        out_to_loss: multiply by the averaged out-to-loss weights (TRAK's ``Q``).

    Example:
        >>> TRAK.__name__
        'TRAK'
    """

    def __init__(
        self,
        stores: StoreLike | Sequence[StoreLike],
        lambda_: float | None = None,
        reg: float = 0.1,
        out_to_loss: bool = True,
    ):
        self.stores = as_stores(stores)
        self.lambda_ = lambda_
        self.reg = reg
        self.out_to_loss = out_to_loss
        self._solvers: dict[int, tuple[str, Tensor]] = {}
        self._projectors: dict[str, Projector] = {}

    def params(self) -> dict[str, Any]:
        return {
            "lambda_": self.lambda_,
            "reg": self.reg,
            "out_to_loss": self.out_to_loss,
            "n_checkpoints": len(self.stores),
        }

    def _solver(self, c: int) -> tuple[str, Tensor]:
        """A factorization of ``Phi^T Phi + lambda I`` of checkpoint ``c`` (float64, cached):
        ``("cholesky", L)``, or ``("pinv", inverse)`` when it is not positive definite."""
        if c not in self._solvers:
            g = torch.from_numpy(self.stores[c].gram())
            lam = (
                self.lambda_ if self.lambda_ is not None else self.reg * float(g.diagonal().mean())
            )
            a = g + lam * torch.eye(g.shape[0], dtype=g.dtype)
            chol, info = torch.linalg.cholesky_ex(a)
            if int(info) == 0:
                self._solvers[c] = ("cholesky", chol)
            else:  # singular or indefinite without a ridge
                self._solvers[c] = ("pinv", torch.linalg.pinv(a, hermitian=True))
        return self._solvers[c]

    def apply_kernel(self, c: int, phi: Tensor) -> Tensor:
        """``phi (Phi^T Phi + lambda I)^-1`` ``[m, k]`` for checkpoint ``c`` (float64 solve).

        Solves with the cached Cholesky factor instead of forming the inverse.

        Example:
            >>> import tempfile, torch
            >>> import attrlab.data as ad
            >>> net = torch.nn.Linear(4, 3)
            >>> x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
            >>> t = ad.TRAK(ad.featurize(net, (x, y), tempfile.mkdtemp(), proj_dim=8))
            >>> phi = torch.randn(2, 8)
            >>> torch.allclose(t.apply_kernel(0, phi), phi @ t.kernel(0), atol=1e-4)
            True
        """
        kind, f = self._solver(c)
        x = phi.to(torch.float64).T  # [k, m]
        y = torch.cholesky_solve(x, f) if kind == "cholesky" else f @ x
        return y.T.to(torch.float32)

    def kernel(self, c: int) -> Tensor:
        """``(Phi^T Phi + lambda I)^-1`` ``[k, k]`` of checkpoint ``c`` (float32, from the cached factor)."""
        kind, f = self._solver(c)
        return (torch.cholesky_inverse(f) if kind == "cholesky" else f).to(torch.float32)

    def mean_out_to_loss(self) -> np.ndarray:
        """Out-to-loss weights ``[N]`` averaged over checkpoints."""
        return np.mean([s.out_to_loss() for s in self.stores], axis=0)

    def scores_from_features(self, query_feats: Sequence[Tensor]) -> Tensor:
        """Scores ``[m, N]`` from query features ``[m, k]``, one per checkpoint.

        Every store is read once: its shards give the scores and (for
        ``out_to_loss``) the out-to-loss weights in the same pass.
        """
        if len(query_feats) != len(self.stores):
            raise InputError(f"{len(query_feats)} query feature sets for {len(self.stores)} stores")
        for store, phi in zip(self.stores, query_feats):
            if phi.dim() != 2 or phi.shape[1] != store.dim:
                raise InputError(
                    f"query features of shape {tuple(phi.shape)} for a store of dim {store.dim}"
                )
        n = self.stores[0].n
        total = torch.zeros(query_feats[0].shape[0], n, dtype=torch.float32)
        q_sum = np.zeros(n, np.float64)
        q = np.empty(n, np.float32) if self.out_to_loss else None
        for c, (store, phi) in enumerate(zip(self.stores, query_feats)):
            block_scores(store, self.apply_kernel(c, phi), out=total, q_into=q)
            if q is not None:
                q_sum += q
        total /= len(self.stores)
        if self.out_to_loss:
            total *= torch.from_numpy((q_sum / len(self.stores)).astype(np.float32))[None, :]
        return total

    def projector(self, store: FeatureStore) -> Projector:
        """The projection of ``store``, one object per distinct projection (so the
        checkpoints that share a projection generate its blocks once)."""
        spec = store.manifest["projection"]
        key = json.dumps(spec, sort_keys=True)
        if key not in self._projectors:
            self._projectors[key] = Projector.from_spec(spec)
        return self._projectors[key]

    def scores(
        self,
        models: nn.Module | Sequence[nn.Module],
        queries: Examples | Sequence[Tensor],
        batch_size: int | None = None,
    ) -> Tensor:
        """Scores ``[m, N]`` of query examples, with ``models[c]`` the checkpoint of ``stores[c]``.

        ``batch_size``: queries per gradient batch; None lets the memory model
        choose (:func:`~attrlab.data.featurize.query_features`), e.g. all the
        queries of a small model in one batch. Scores do not depend on it
        beyond float round-off.

        Raises:
            StoreMismatchError: a model is not the checkpoint its store was written for.
            InputError: query shapes do not match the training examples.
        """
        ms = as_models(models, len(self.stores))
        feats = [
            query_features(m, queries, s, batch_size=batch_size, projector=self.projector(s))[0]
            for m, s in zip(ms, self.stores)
        ]
        return self.scores_from_features(feats)

    def attribute(
        self,
        models: nn.Module | Sequence[nn.Module],
        queries: Examples | Sequence[Tensor],
        texts: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> Attribution:
        """An :class:`~attrlab.result.Attribution` ``[m, N]`` (units: index, id, text)."""
        t0 = time.perf_counter()
        q = queries if isinstance(queries, Examples) else Examples(queries)
        s = self.scores(models, q, batch_size=batch_size)
        return make_attribution(
            s,
            self.stores,
            "trak",
            self.params(),
            texts=texts,
            query_texts=q.texts,
            diagnostics={"seconds": time.perf_counter() - t0},
        )
