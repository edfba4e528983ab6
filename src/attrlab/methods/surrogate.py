"""One linear-surrogate estimator, on every unit kind that can be ablated.

Draw random keep-masks, evaluate ``f`` on them (the bound question's ``f``:
many masks per forward), and fit a linear model ``f(S) ≈ b + sum_{u in S} w_u``;
the weights are the scores (the unit's contribution: positive when keeping it
raises the target). The presets differ only in how masks are drawn, how
samples are weighted and which regressor is fitted:

=============  ==========================================  ============================
preset         masks                                        regressor
=============  ==========================================  ============================
``lime``       number kept uniform in 1..n; cosine kernel   ridge (``alpha=1e-3``)
``contextcite`` each unit kept with probability 1/2         Lasso on standardized masks
``coar``       each unit ablated with probability 5 %      least squares
``datamodels`` each unit kept with probability 1/2          Lasso (``alpha=1e-3``)
=============  ==========================================  ============================

(LIME: Ribeiro et al.; ContextCite: Cohen-Wang et al.; COAR: Shah et al.,
"Decomposing and Editing Predictions by Modeling Model Computation";
datamodels: Ilyas et al.) ``method="surrogate"`` takes every option. The
diagnostics report the fit's R^2 in sample and on held-out masks.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> r = al.attribute(lm, "When Mary and John", target=" went", units="heads",
    ...                  method="coar", samples=64)
    >>> len(r) == lm.cfg.n_layers * lm.cfg.n_heads and "r2_holdout" in r.diagnostics
    True
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from .base import check_float, check_int, register
from .perturbation import ValueFn, _PerturbationMethod, _row_list

__all__ = ["LinearSurrogate", "Lime", "ContextCiteSurrogate", "Coar", "Datamodels",
           "sample_masks", "fit_linear", "fit_lasso"]  # fmt: skip

_REGRESSORS = ("ridge", "lasso", "lstsq")
_SAMPLING = ("bernoulli", "fixed", "lime")


def sample_masks(
    samples: int, n: int, keep_prob: float = 0.5, seed: int = 0, how: str = "bernoulli"
) -> Tensor:
    """Random keep-masks ``[samples, n]`` (seeded).

    ``how``: ``"bernoulli"`` (each unit kept with ``keep_prob``), ``"fixed"``
    (exactly ``round((1 - keep_prob) * n)`` units ablated, at least one), or
    ``"lime"`` (number kept uniform in ``1..n``; the first mask keeps all).

    Example:
        >>> sample_masks(3, 20, keep_prob=0.9, how="fixed").sum(1).tolist()
        [18, 18, 18]
    """
    if how == "bernoulli":
        if not 0.0 < keep_prob < 1.0:
            raise InputError(f"keep_prob must be in (0, 1), got {keep_prob}")
        rng = np.random.default_rng(seed)
        return torch.from_numpy(rng.random((samples, n)) < keep_prob)
    gen = torch.Generator().manual_seed(seed)
    rank = torch.rand(samples, n, generator=gen).argsort(-1).argsort(-1)
    if how == "fixed":
        k = max(1, round((1.0 - keep_prob) * n))
        return rank >= k
    if how == "lime":
        kept = torch.randint(1, n + 1, (samples,), generator=gen)
        masks = rank < kept[:, None]
        masks[0] = True  # the input itself
        return masks
    raise InputError(f"mask sampling must be 'bernoulli', 'fixed' or 'lime', got {how!r}")


def fit_lasso(
    masks: Any, y: Any, n_tokens: int = 1, alpha: float = 0.01, weights: Any = None
) -> tuple[np.ndarray, float]:
    """Weights and bias of a Lasso from masks to outputs, ContextCite's way.

    Masks are standardized (mean 0, variance 1 per unit), the outputs divided
    by ``n_tokens`` (so ``alpha`` means the same for long and short responses),
    ``sklearn.linear_model.Lasso(alpha)`` fitted with an intercept, and the
    weights mapped back to the unstandardized masks and rescaled by ``n_tokens``:
    ``y ≈ masks @ w + b``. ``weights``: optional sample weights.

    Example:
        >>> import numpy as np
        >>> m = np.random.default_rng(0).random((64, 3)) < 0.5
        >>> w, b = fit_lasso(m, 2.0 * m[:, 0] - 1.0, alpha=1e-6)
        >>> (np.round(w, 3) + 0.0).tolist(), round(b, 3)
        ([2.0, 0.0, 0.0], -1.0)
    """
    from sklearn.linear_model import Lasso

    X = np.asarray(masks, dtype=np.float64)
    Y = np.asarray(y, dtype=np.float64) / n_tokens
    mean = X.mean(0)
    scale = X.std(0)
    scale[scale < 10 * np.finfo(np.float64).eps] = 1.0
    lasso = Lasso(alpha=alpha, fit_intercept=True, random_state=0)
    lasso.fit((X - mean) / scale, Y, sample_weight=weights)
    w = lasso.coef_ / scale
    b = float(lasso.intercept_ - (mean / scale) @ lasso.coef_)
    return w * n_tokens, b * n_tokens


def fit_linear(
    masks: Tensor,
    y: Tensor,
    regressor: str = "lstsq",
    alpha: float = 0.0,
    weights: np.ndarray | None = None,
    n_tokens: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """``(weights [rows, n], intercepts [rows])`` of ``y [m, rows] ≈ b + masks @ w``:
    ``"lstsq"`` (weighted least squares), ``"ridge"`` (scikit-learn, penalty
    ``alpha``) or ``"lasso"`` (:func:`fit_lasso`, ``n_tokens`` its output scale).

    Example:
        >>> import torch
        >>> m = torch.rand(50, 3, generator=torch.Generator().manual_seed(0)) < 0.5
        >>> w, b = fit_linear(m, (m.double() @ torch.tensor([1.0, -2.0, 0.5]).double())[:, None] + 3)
        >>> np.round(w, 6).tolist(), np.round(b, 6).tolist()
        ([[1.0, -2.0, 0.5]], [3.0])
    """
    z = masks.double().numpy()
    yy = y.double().numpy()
    if regressor == "lasso":
        fits = [fit_lasso(z, yy[:, r], n_tokens, alpha, weights) for r in range(yy.shape[1])]
        return np.stack([w for w, _ in fits]), np.array([b for _, b in fits])
    if regressor == "ridge":
        from sklearn.linear_model import Ridge

        model = Ridge(alpha=alpha).fit(z, yy, sample_weight=weights)
        return np.atleast_2d(model.coef_), np.atleast_1d(model.intercept_)
    if regressor != "lstsq":
        raise InputError(f"regressor must be one of {_REGRESSORS}, got {regressor!r}")
    # weighted least squares with an intercept, on centred masks and outputs: a
    # unit that never varies is a zero column and gets weight 0 (minimum norm)
    sw = np.ones(z.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    z_mean = sw @ z / sw.sum()  # [n]
    y_mean = sw @ yy / sw.sum()  # [rows]
    root = np.sqrt(sw)[:, None]
    sol, *_ = np.linalg.lstsq((z - z_mean) * root, (yy - y_mean) * root, rcond=None)  # [n, rows]
    return sol.T, y_mean - z_mean @ sol


def _r2(masks: Tensor, y: Tensor, w: np.ndarray, b: np.ndarray, weights: Any = None) -> float:
    pred = masks.double().numpy() @ w.T + b[None]
    yy = y.double().numpy()
    sw = np.ones(len(yy)) if weights is None else np.asarray(weights)
    res = (sw[:, None] * (yy - pred) ** 2).sum()
    mean = (sw[:, None] * yy).sum(0) / sw.sum()
    tot = (sw[:, None] * (yy - mean[None]) ** 2).sum()
    return float(1.0 - res / tot) if tot > 0 else float("nan")


@register("surrogate")
class LinearSurrogate(_PerturbationMethod):
    """The linear surrogate with every option (the presets fix some).

    Args:
        samples: number of random masks (forwards' rows).
        keep_prob: probability of keeping a unit (``how="fixed"``: the kept fraction).
        how: mask sampling, see :func:`sample_masks`.
        regressor: ``"lstsq"``, ``"ridge"`` or ``"lasso"``; ``alpha`` its penalty.
        kernel_width: LIME's cosine-distance kernel (None: unweighted).
        holdout: fraction of masks held out to report ``r2_holdout`` (the
            scores are refitted on all masks).
        seed: mask sampling seed. Other options: see the perturbation estimators.

    Example:
        >>> LinearSurrogate(samples=32, regressor="ridge", alpha=0.1).regressor
        'ridge'
    """

    samples_default = 256
    keep_prob_default = 0.5
    needs_ends = False  # fitted on its random masks only
    how_default = "bernoulli"
    regressor_default = "lstsq"
    alpha_default = 0.0
    kernel_width_default: float | None = None
    holdout_default = 0.2
    #: the output a sources question measures when the units give none
    output_default: str | None = None

    def __init__(
        self,
        samples: int | None = None,
        keep_prob: float | None = None,
        how: str | None = None,
        regressor: str | None = None,
        alpha: float | None = None,
        kernel_width: float | None = None,
        holdout: float | None = None,
        seed: int = 0,
        masks: Any = None,
        **options: Any,
    ):
        name = self.name or "surrogate"
        n_samples = self.samples_default if samples is None else samples
        self.samples = check_int(name, "samples", n_samples, minimum=2)
        kp = self.keep_prob_default if keep_prob is None else keep_prob
        self.keep_prob = check_float(name, "keep_prob", kp, maximum=1.0)
        self.how = how or self.how_default
        if self.how not in _SAMPLING:
            raise InputError(f"{name}: how must be one of {_SAMPLING}, got {how!r}")
        if self.how != "lime" and not self.keep_prob < 1.0:
            raise InputError(
                f"{name}: keep_prob must be < 1 (a unit that is never ablated has no "
                f"weight), got {kp!r}"
            )
        self.regressor = regressor or self.regressor_default
        if self.regressor not in _REGRESSORS:
            raise InputError(f"{name}: regressor must be one of {_REGRESSORS}, got {regressor!r}")
        a = self.alpha_default if alpha is None else alpha
        self.alpha = check_float(name, "alpha", a, strict=False)
        kw = self.kernel_width_default if kernel_width is None else kernel_width
        self.kernel_width = check_float(name, "kernel_width", kw, optional=True)
        ho = self.holdout_default if holdout is None else holdout
        self.holdout = check_float(name, "holdout", ho, strict=False, maximum=0.9)
        self.seed = check_int(name, "seed", seed, minimum=0)
        self._masks = None
        if masks is not None:
            m = torch.as_tensor(np.asarray(masks.cpu() if isinstance(masks, Tensor) else masks))
            if m.dim() != 2 or m.shape[0] < 2:
                raise InputError(
                    f"{name}: masks must be [n_masks >= 2, n_units], got {tuple(m.shape)}"
                )
            self._masks = m.bool()
        super().__init__(**options)

    def params(self) -> dict[str, Any]:
        p = super().params()
        if self._masks is not None:
            p["masks"] = "given"
        return p

    def bind_options(self) -> dict[str, Any]:
        return {**super().bind_options(), "output": self.output_default}

    def draw_masks(self, n: int) -> Tensor:
        """This surrogate's random keep-masks ``[samples, n]`` for ``n`` units (seeded).

        Example:
            >>> Coar(samples=4, seed=1).draw_masks(20).shape
            torch.Size([4, 20])
        """
        if self._masks is not None:
            if self._masks.shape[1] != n:
                raise InputError(
                    f"{self.name}: the given masks have {self._masks.shape[1]} columns for {n} units"
                )
            return self._masks
        return sample_masks(self.samples, n, self.keep_prob, self.seed, self.how)

    def sample_weights(self, masks: Tensor) -> np.ndarray | None:
        """LIME's kernel ``exp(-d^2 / width^2)``, ``d`` the cosine distance of
        each mask to the all-kept mask (None without ``kernel_width``).

        Example:
            >>> import torch
            >>> Lime().sample_weights(torch.ones(1, 4, dtype=torch.bool)).tolist()
            [1.0]
        """
        if self.kernel_width is None:
            return None
        n = masks.shape[1]
        dist = 1.0 - np.sqrt(masks.double().numpy().sum(-1) / n)  # cosine distance to all-ones
        return np.exp(-(dist**2) / self.kernel_width**2)

    def fit(
        self, masks: Tensor, y: Tensor, n_tokens: int = 1
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Fit the surrogate to measured outputs: ``(weights [rows, n],
        intercepts [rows], diagnostics)`` for masks ``[m, n]`` and ``y [m, rows]``.
        The diagnostics hold ``r2`` (in sample), ``r2_holdout`` (fitted on the
        first masks, scored on the last ``holdout`` fraction), ``n_masks`` and
        ``n_unvaried`` (units never ablated or never kept: weight 0, with a
        warning). ``n_tokens`` scales the Lasso's outputs (ContextCite's
        per-token penalty).

        Example:
            >>> import torch
            >>> m = Coar(samples=64, seed=0).draw_masks(3)
            >>> w, b, d = Coar().fit(m, (m.double() @ torch.tensor([1.0, 2.0, -1.0]).double())[:, None])
            >>> np.round(w, 6).tolist(), round(d["r2"], 6)
            ([[1.0, 2.0, -1.0]], 1.0)
        """
        n = masks.shape[1]
        y = y[:, None] if y.dim() == 1 else y
        weights = self.sample_weights(masks)
        varied = masks.any(0) & ~masks.all(0)  # [n]: units both kept and ablated
        diag: dict[str, Any] = {
            "n_masks": int(masks.shape[0]),
            "n_unvaried": int((~varied).sum()),
        }
        opts = dict(regressor=self.regressor, alpha=self.alpha, n_tokens=n_tokens)
        n_out = int(self.holdout * masks.shape[0])
        if n_out >= 2 and masks.shape[0] - n_out >= 2:
            fit_w = None if weights is None else weights[:-n_out]
            w, b = fit_linear(masks[:-n_out], y[:-n_out], weights=fit_w, **opts)
            hw = None if weights is None else weights[-n_out:]
            diag["r2_holdout"] = _r2(masks[-n_out:], y[-n_out:], w, b, hw)
        w, b = fit_linear(masks, y, weights=weights, **opts)
        if not bool(varied.all()):
            w[:, ~varied.numpy()] = 0.0  # not identified: no evidence either way
            warnings.warn(
                f"{self.name}: {diag['n_unvaried']} of {n} units were never ablated (or never "
                f"kept) in {masks.shape[0]} masks; their score is 0. Use more samples "
                "or a keep_prob further from 0 and 1.",
                UserWarning,
                stacklevel=3,
            )
        diag["r2"] = _r2(masks, y, w, b, weights)
        return w, b, diag

    def estimate(self, bound: Any) -> tuple[Tensor, dict[str, Any]]:
        """Scores and diagnostics, with the design ``masks`` (a tensor: stored
        with the result, so the fit can be redone, e.g. for a span of a response)."""
        self._n_tokens = int(getattr(bound, "output_tokens", 1))
        return super().estimate(bound)

    def _scores(
        self, value_fn: ValueFn, n: int, v_full: Any, v_empty: Any
    ) -> tuple[Tensor, dict[str, Any]]:
        masks = self.draw_masks(n)
        y = self._eval(value_fn, masks)  # [samples, rows]
        w, b, diag = self.fit(masks, y, n_tokens=getattr(self, "_n_tokens", 1))
        diag["intercept"] = _row_list(torch.as_tensor(b))
        diag["masks"] = masks
        return torch.from_numpy(np.ascontiguousarray(w)), diag


@register("lime")
class Lime(LinearSurrogate):
    """LIME: ridge regression on random masks (number kept uniform in ``1..n``),
    weighted by ``exp(-d^2 / width^2)`` with ``d`` the cosine distance of the
    mask to the full input.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "When Mary and John", target=" went", method="lime", samples=64)
        >>> "r2" in r.diagnostics
        True
    """

    how_default = "lime"
    regressor_default = "ridge"
    alpha_default = 1e-3
    kernel_width_default = 0.25


@register("contextcite")
class ContextCiteSurrogate(LinearSurrogate):
    """ContextCite (Cohen-Wang et al.) on any unit kind: each unit kept with
    probability 1/2, a Lasso on standardized masks (``alpha=0.01``,
    :func:`fit_lasso`), no held-out refit (``r2`` is in sample). On
    ``units="sources"`` it predicts the response's log-odds (``output=
    "logit_prob"``) and a response span can be attributed again from the
    stored masks (:func:`attrlab.methods.contextcite.attribute_span`).
    ``n_ablations=`` is a deprecated alias of ``samples=``.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "A is red. B is blue.", " red", units="sources",
        ...                  method="contextcite", samples=8)
        >>> r.scores.shape, r.meta["output"]
        (torch.Size([2]), 'logit_prob')
    """

    samples_default = 64
    regressor_default = "lasso"
    alpha_default = 0.01
    holdout_default = 0.0
    output_default = "logit_prob"

    def __init__(self, n_ablations: int | None = None, **options: Any):
        if n_ablations is not None:
            warnings.warn(
                "contextcite: n_ablations= is deprecated; pass samples=",
                DeprecationWarning,
                stacklevel=3,
            )
            if options.get("samples") is not None:
                raise InputError("contextcite: give samples= only (n_ablations= is its old name)")
            options["samples"] = n_ablations
        super().__init__(**options)


@register("coar")
class Coar(LinearSurrogate):
    """COAR (Shah et al., "Decomposing and Editing Predictions by Modeling
    Model Computation"): ablate a small random subset of the units in each of
    many runs and fit a linear model from the keep-masks to the target. Meant
    for components (heads, neurons …). The paper describes random subsets of
    an ablation fraction ``alpha``; the authors' code draws each component's
    keep bit independently with probability ``1 - alpha`` (0.95 for their
    CIFAR ResNet, 0.975 for GPT-2 on TinyStories) and fits a sparse (L1) linear
    regression. Here: each unit ablated with probability ``1 - keep_prob`` (5 %
    by default) and least squares (``regressor="lasso"`` for the sparse fit).
    ``how="fixed"`` ablates exactly ``round((1 - keep_prob) n)`` units per run;
    every mask then has the same size, so the weights are only defined up to a
    common shift (the minimum-norm solution is reported).

    Example:
        >>> Coar().how, Coar().keep_prob
        ('bernoulli', 0.95)
    """

    samples_default = 1024
    keep_prob_default = 0.95


@register("datamodels")
class Datamodels(LinearSurrogate):
    """Datamodels (Ilyas et al.): each unit (training example) kept with
    probability ``keep_prob`` (the paper's subset fraction, 1/2 by default), a
    sparse linear fit (Lasso, ``alpha=1e-3``; ``regressor="ridge"`` also works)
    of the target on the keep-masks. Runs on any kind that can be ablated; on
    training examples ``f`` is a retraining.

    Example:
        >>> Datamodels().regressor
        'lasso'
    """

    regressor_default = "lasso"
    alpha_default = 1e-3
