"""Training examples as attribution units (``units="train"``).

``al.units.TrainingExamples(store, texts=...)`` points the training-data
methods (``trak``, ``tracin``, ``grad-dot``, ``grad-cos``) at one or more
feature stores written by :func:`attrlab.data.featurize` (one per checkpoint
or independently trained model). Scores come back with one unit per training
example, labelled by ``index``, ``id`` and ``text``.

Example:
    >>> import attrlab as al
    >>> u = al.units.TrainingExamples("path/to/store", texts=["doc one", "doc two"])
    >>> u.kind, u.stores
    ('train', ['path/to/store'])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from .base import Units, register_units

__all__ = ["TrainingExamples"]


@register_units("train", "training_examples")
class TrainingExamples(Units):
    """Training examples featurized into feature stores.

    Args:
        store: a store path or :class:`attrlab.data.FeatureStore`, or a list of them
            (one per checkpoint / model, for TRAK ensembles and TracIn-CP).
        texts: the training examples' texts (default: ``texts.json`` saved in the store).
        models: the checkpoint (model or ``attrlab.LM``) of each store; default:
            the model passed to ``al.attribute`` for every store.

    Example:
        >>> TrainingExamples(["a", "b"]).stores
        ['a', 'b']
    """

    def __init__(
        self,
        store: Any = None,
        texts: Sequence[str] | None = None,
        models: Sequence[Any] | None = None,
    ):
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

    def mask_values(self, lm: Any, inputs: Any, target: Any, masks: Any, **context: Any) -> Any:
        """Training units are removed by retraining: use :class:`attrlab.data.lds.LDSHarness`."""
        raise NotImplementedError(
            "training examples cannot be ablated in one forward pass; evaluate with "
            "attrlab.data.lds.LDSHarness (retraining on subsets)"
        )
