"""Training-data attribution: per-example gradients, a resumable feature store, TRAK, TracIn, LDS.

Featurize a training set once (:func:`featurize` writes projected per-example
gradients to a sharded, memory-mapped, resumable :class:`FeatureStore`), then
score queries against it (:class:`TRAK`, :func:`tracin`,
:func:`grad_similarity`) and evaluate with the linear datamodeling score
(:mod:`attrlab.data.lds`).

Example:
    >>> import tempfile, torch
    >>> import attrlab.data as ad
    >>> from attrlab.data.digits import load_digits_data, train_mlp
    >>> xtr, ytr, xte, yte = load_digits_data()
    >>> model = train_mlp(xtr[:300], ytr[:300], epochs=3)
    >>> store = ad.featurize(model, (xtr[:300], ytr[:300]), tempfile.mkdtemp(), proj_dim=64)
    >>> r = ad.TRAK(store).attribute(model, (xte[:2], yte[:2]))
    >>> r.top(3, by="pos", row=0).shape[0]
    3
"""

from .featurize import (
    Examples,
    GradientFeaturizer,
    checkpoint_hash,
    featurize,
    query_features,
    select_params,
)
from .influence import Influence, fit_factors, linear_modules, self_influence
from .outputs import AnswerLogProb, AnswerMargin, ClassificationMargin, ClassLogProb, ModelOutput
from .project import Projector
from .store import FeatureStore
from .tracin import grad_similarity, tracin
from .trak import TRAK

__all__ = [
    "AnswerLogProb",
    "AnswerMargin",
    "ClassLogProb",
    "ClassificationMargin",
    "Examples",
    "FeatureStore",
    "GradientFeaturizer",
    "Influence",
    "ModelOutput",
    "Projector",
    "TRAK",
    "checkpoint_hash",
    "featurize",
    "fit_factors",
    "grad_similarity",
    "linear_modules",
    "query_features",
    "select_params",
    "self_influence",
    "tracin",
]
