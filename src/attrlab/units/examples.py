"""Training examples as attribution units (``units="train"``).

``al.units.TrainingExamples(store, texts=...)`` points the training-data
methods (``trak``, ``tracin``, ``grad-dot``, ``grad-cos``) at one or more
feature stores written by :func:`attrlab.data.featurize` (one per checkpoint
or independently trained model). Scores come back with one unit per training
example, labelled by ``index``, ``id`` and ``text``.

With ``retrain=`` (a function that trains a model on a subset of the
training set and measures the queries) the kind is bound to a question like
every other kind: ``f(keep)`` retrains on the kept examples (the ablation is
:class:`~attrlab.ablations.Remove`: an example left out of training), so the
estimators every kind shares run on training examples too — ``datamodels``
(the linear surrogate on random half subsets), ``occlusion`` (leave-one-out
retraining) … Retrained outputs are cached on disk by subset (``cache_dir``).

Example:
    >>> import attrlab as al
    >>> u = al.units.TrainingExamples("path/to/store", texts=["doc one", "doc two"])
    >>> u.kind, u.stores
    ('train', ['path/to/store'])
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..ablations import Ablation, Remove
from ..errors import InputError, NonFiniteError
from .base import Bound, Units, register_units

__all__ = ["TrainingExamples", "RetrainBound"]

#: ``retrain(train_indices [k], j) -> outputs [n_queries]``: train on those
#: examples (``j``: a running index, e.g. for seeding) and measure the queries
Retrain = Callable[[np.ndarray, int], Any]


@register_units("train", "training_examples")
class TrainingExamples(Units):
    """Training examples featurized into feature stores.

    Args:
        store: a store path or :class:`attrlab.data.FeatureStore`, or a list of them
            (one per checkpoint / model, for TRAK ensembles and TracIn-CP).
        texts: the training examples' texts (default: ``texts.json`` saved in the store).
        models: the checkpoint (model or ``attrlab.LM``) of each store; default:
            the model passed to ``al.attribute`` for every store.
        retrain: ``retrain(train_indices, j) -> outputs [n_queries]``, for the
            bound form (``f`` by retraining); e.g. an
            :class:`~attrlab.data.lds.LDSHarness`'s ``fn``.
        n_train: the training-set size (with ``retrain``).
        cache_dir: where retrained outputs are kept (one ``.npy`` per subset).

    Example:
        >>> TrainingExamples(["a", "b"]).stores
        ['a', 'b']
    """

    provides = frozenset({"f"})
    ablations = (Remove,)
    target_kind = "raw"

    def __init__(
        self,
        store: Any = None,
        texts: Sequence[str] | None = None,
        models: Sequence[Any] | None = None,
        retrain: Retrain | None = None,
        n_train: int | None = None,
        cache_dir: str | Path | None = None,
    ):
        if retrain is not None and not callable(retrain):
            raise InputError("retrain must be a function retrain(train_indices, j) -> outputs")
        if retrain is not None and (
            isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1
        ):
            raise InputError("retrain= needs n_train=<the training-set size> (a positive int)")
        self._retrain = retrain
        self.n_train = n_train
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        if store is None:
            self.stores: list[str] = []
        else:
            items = store if isinstance(store, (list, tuple)) else [store]
            self.stores = [str(getattr(s, "path", s)) for s in items]
        self._store_objs = (
            None if store is None else (store if isinstance(store, (list, tuple)) else [store])
        )
        self._texts = list(texts) if texts is not None else None
        self._models = list(models) if models is not None else None

    def open(self) -> list[Any]:
        """The feature stores, opened.

        Raises:
            InputError: no store was given.
        """
        from ..data.trak import as_stores

        if not self.stores:
            raise InputError(
                "units='train' needs feature stores: featurize the training set with "
                "attrlab.data.featurize(...) and pass al.units.TrainingExamples(store)"
            )
        objs = [
            s if not isinstance(s, (str, Path)) else s for s in (self._store_objs or self.stores)
        ]
        return as_stores(objs)

    @property
    def texts(self) -> list[str] | None:
        return self._texts

    def models(self, default: Any, n: int) -> list[Any]:
        """One model per store: the given checkpoints, or ``default`` for every store."""
        if self._models is None:
            return [default] * n
        if len(self._models) != n:
            raise InputError(f"{len(self._models)} models for {n} feature stores")
        return list(self._models)

    def resolve_target(self, target: Any, lm: Any) -> Any:
        """Training-data targets are the queries, read by the method as given."""
        return target

    def bind(  # type: ignore[override]  # a kind names the bind options it takes
        self,
        lm: Any = None,
        inputs: Any = None,
        target: Any = None,
        ablation: Ablation | None = None,
        progress: bool = False,
    ) -> RetrainBound:
        """Training examples bound to the retraining question: ``f(keep [m, n_train])
        -> [m, n_queries]`` trains one model per mask on the kept examples.
        ``lm``, ``inputs`` and ``target`` are unused (the retraining function
        owns the model and the queries).

        Raises:
            InputError: no ``retrain=`` was given.

        Example:
            >>> import numpy as np, torch
            >>> w = np.array([[1.0, 2.0, -1.0]])
            >>> u = TrainingExamples(retrain=lambda idx, j: w[:, idx].sum(1), n_train=3)
            >>> u.bind().f(torch.tensor([[True, False, True]])).tolist()
            [[0.0]]
        """
        if self._retrain is None:
            raise InputError(
                "training examples are removed by retraining: give al.units.TrainingExamples("
                "retrain=<function(train_indices, j) -> query outputs>, n_train=N) "
                "(e.g. an LDSHarness's fn), or evaluate with attrlab.data.lds"
            )
        return RetrainBound(self, self.check_ablation(ablation), self._retrain, progress)


class RetrainBound(Bound):
    """``f(keep)``: one model trained per keep-mask on the kept examples, its
    query outputs ``[m, n_queries]`` (cached by subset in memory and, with
    ``cache_dir``, on disk — an interrupted run resumes).

    Example:
        >>> import numpy as np, torch
        >>> u = TrainingExamples(retrain=lambda idx, j: np.array([len(idx)]), n_train=4)
        >>> b = u.bind()
        >>> b.clean().tolist(), b.empty().tolist()
        ([4.0], [0.0])
    """

    units: TrainingExamples

    def __init__(
        self, units: TrainingExamples, ablation: Ablation | None, retrain: Retrain, progress: bool
    ):
        assert units.n_train is not None
        self.units = units
        self.ablation = ablation
        self.retrain = retrain
        self.progress = progress
        self.n = units.n_train
        self.n_rows = 0  # known after the first retraining
        self.target_name = "retrained query outputs"
        self.n_retrained = 0
        self._memo: dict[bytes, np.ndarray] = {}
        self._dir = Path(units.cache_dir) if units.cache_dir is not None else None
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)

    def labels(self) -> dict[str, list[Any]]:
        texts = self.units.texts
        out: dict[str, list[Any]] = {"index": list(range(self.n))}
        if texts is not None and len(texts) == self.n:
            out["text"] = list(texts)
        return out

    def _one(self, keep: Tensor) -> np.ndarray:
        bits = np.packbits(keep.numpy()).tobytes()
        if bits in self._memo:
            return self._memo[bits]
        path = None
        if self._dir is not None:
            path = self._dir / f"{hashlib.sha256(bits + str(self.n).encode()).hexdigest()[:24]}.npy"
            if path.exists():
                self._memo[bits] = np.load(path)
                return self._memo[bits]
        out = np.asarray(self.retrain(np.flatnonzero(keep.numpy()), self.n_retrained), np.float64)
        out = out.reshape(-1)
        if not np.isfinite(out).all():
            raise NonFiniteError("the retraining function returned non-finite query outputs")
        self.n_retrained += 1
        if path is not None:
            from ..data.store import atomic_save_npy

            atomic_save_npy(path, out)
        self._memo[bits] = out
        return out

    def f(self, keep: Tensor) -> Tensor:
        k = self.check_keep(keep).cpu()
        rows = [self._one(row) for row in tqdm(k, disable=not self.progress, desc="retrain")]
        out = torch.from_numpy(np.stack(rows))  # [m, n_queries]
        if self.n_rows and out.shape[1] != self.n_rows:
            raise InputError(f"retrain returned {out.shape[1]} outputs, earlier {self.n_rows}")
        self.n_rows = int(out.shape[1])
        return out

    def row_labels(self) -> dict[str, list[Any]]:
        return {"query": list(range(self.n_rows))}

    def run_stats(self) -> dict[str, Any]:
        return {"n_retrained": self.n_retrained}
