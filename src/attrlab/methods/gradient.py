"""Gradient family. Over gates, on every unit kind that provides them
(written once): input x gradient, attribution patching (``atp``, its preset
for components), Integrated Gradients, expected gradients. Token-specific:
saliency and SmoothGrad (gradient norms per embedding dimension are not gate
derivatives).

On input units the gate of a token mixes its ablated embedding (pad, zero,
a counterfactual token's) and its actual embedding (the output of the
``embed`` site), so gate gradients are ``(x - x0) . df/dx`` summed over the
hidden dimension; word / sentence / span gates cover their tokens.

Many points (interpolation steps, noise samples) go through the model in one
batched forward (``batch_size`` per chunk; by default all of them when they
fit the memory budget, else the fewest equal chunks that fit). For a
multi-token continuation (``ContinuationLogProb(..., reduce="none")`` or
``max_new_tokens``), every row shares the same forwards: one forward per chunk
of points, then one backward per continuation token through the retained
graph, instead of a whole IG per token.

Integrated Gradients (Sundararajan et al., "Axiomatic Attribution for Deep
Networks") integrates the gradient along the straight line from a baseline
``x0`` to the input ``x``: ``attr_i = (x_i - x0_i) * int_0^1 df/dx_i(x0 +
a (x - x0)) da``. Rules: ``gausslegendre`` (default), ``riemann_left``,
``riemann_right``, ``riemann_middle``, ``riemann_trapezoid``. Note: our
trapezoid rule has weights ``1/(n-1)`` (halved at both ends), which integrates
exactly; Captum's uses ``1/n`` (so it sums to ``(n-1)/n``). The completeness
error ``sum(attr) - (f(x) - f(x0))`` is reported per row in ``diagnostics``.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> r = al.attribute(lm, "When Mary and John went", target=" to", method="ig", steps=16)
    >>> abs(r.diagnostics["completeness_error"]) < 0.05 * abs(r.diagnostics["delta"]) + 1e-3
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..units.token_grads import grad_products
from ..units.tokens import EmbedForward, InputUnits, input_result, make_forward
from .base import Estimator, Method, check_float, check_int, deprecated_baseline, register

INPUT_KINDS = ("tokens", "words", "sentences", "spans")
RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def quadrature(rule: str, steps: int) -> tuple[Tensor, Tensor]:
    """Points ``alphas`` in [0, 1] and weights (float64, ``[steps]``) of a rule.

    Example:
        >>> a, w = quadrature("riemann_trapezoid", 3)
        >>> a.tolist(), w.tolist()
        ([0.0, 0.5, 1.0], [0.25, 0.5, 0.25])
    """
    if rule not in RULES:
        raise InputError(f"unknown rule {rule!r}; choose from {', '.join(RULES)}")
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    n = steps
    if rule == "gausslegendre":
        nodes, wts = np.polynomial.legendre.leggauss(n)
        return torch.from_numpy(0.5 * (nodes + 1.0)), torch.from_numpy(0.5 * wts)
    if rule == "riemann_trapezoid":
        if n < 2:
            raise InputError("the trapezoid rule needs steps >= 2")
        w = torch.full((n,), 1.0 / (n - 1), dtype=torch.float64)
        w[0] /= 2
        w[-1] /= 2
        return torch.linspace(0, 1, n, dtype=torch.float64), w
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    i = torch.arange(n, dtype=torch.float64)
    shift = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[rule]
    return (i + shift) / n, w


def _reduce(attr: Tensor, how: str) -> Tensor:
    """``[rows, pos, d]`` -> ``[rows, pos]``."""
    if how == "sum":
        return attr.sum(-1)
    if how == "l2":
        return attr.norm(dim=-1)
    raise InputError(f"reduce must be 'sum' or 'l2', got {how!r}")


def _to_units(token_scores: Tensor, groups: list[list[int]]) -> Tensor:
    """``[rows, pos]`` -> ``[rows, n_units]`` by summing each unit's positions."""
    return torch.stack([token_scores[:, g].sum(-1) for g in groups], -1)


class _GradientMethod(Method):
    """Shared plumbing: build the forward, compute ``[rows, pos, d]``, reduce, group."""

    def __init__(
        self,
        reduce: str = "sum",
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
        progress: bool = False,
        memory_budget: int | str | None = None,
    ):
        name = self.name or type(self).__name__
        self.reduce = reduce
        if batch_size == "auto":  # the memory budget's choice, as None
            batch_size = None
        self.batch_size = check_int(name, "batch_size", batch_size, optional=True)
        self.max_new_tokens = check_int(name, "max_new_tokens", max_new_tokens, 0, optional=True)
        self.progress = progress
        self.memory_budget = memory_budget

    def _rows_per_forward(self, fwd: EmbedForward, points: int) -> int:
        """Points per forward: ``batch_size``, or all ``points`` in one forward
        when they fit the memory budget, else the fewest equal forwards that fit
        (:meth:`EmbedForward.points_per_forward`)."""
        return fwd.points_per_forward(points, True, self.batch_size, self.memory_budget)

    def _check(self) -> None:
        if self.reduce not in ("sum", "l2"):
            raise InputError(f"reduce must be 'sum' or 'l2', got {self.reduce!r}")

    def attribute(
        self, lm: Any, inputs: Any, target: Any, units: Any, counterfactual: Any = None
    ) -> Any:
        if not isinstance(units, InputUnits):
            raise InputError(f"{self.name} works on input units, not {units.kind!r}")
        fwd = make_forward(lm, inputs, target, max_new_tokens=self.max_new_tokens)
        return self.attribute_fwd(lm, fwd, units, counterfactual)

    def attribute_fwd(
        self, lm: Any, fwd: EmbedForward, units: InputUnits, counterfactual: Any = None
    ) -> Any:
        """Attribute with a ready :class:`EmbedForward` (classifiers, encoders, custom targets)."""
        self._check()
        if counterfactual is not None:
            raise InputError(f"{self.name} does not use a counterfactual; use method='ig'")
        groups, _ = units.groups(fwd.view)
        if not groups:
            raise InputError("no units to attribute (every token excluded?)")
        unit_pos = torch.zeros(fwd.view.n_pos, dtype=torch.bool)
        for g in groups:
            unit_pos[g] = True
        attr, diag, extra = self._token_attr(fwd, unit_pos, counterfactual)  # [rows, pos, d]
        attr = attr * unit_pos.to(attr.device)[None, :, None]
        token_scores = _reduce(attr, self.reduce)
        scores = _to_units(token_scores, groups)
        return input_result(lm, fwd, units, scores, self, diag, extra)

    def _token_attr(
        self, fwd: EmbedForward, unit_pos: Tensor, counterfactual: Any
    ) -> tuple[Tensor, dict[str, Any], dict[str, Tensor]]:
        raise NotImplementedError


@register("saliency", INPUT_KINDS)
class Saliency(_GradientMethod):
    """The gradient of the target at the input, reduced over the hidden
    dimension (``reduce="l2"``: its norm, the default; ``"sum"``: its sum).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", method="saliency")
        >>> bool((r.scores >= 0).all())
        True
    """

    def __init__(
        self,
        reduce: str = "l2",
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
        progress: bool = False,
        memory_budget: int | str | None = None,
    ):
        super().__init__(reduce, batch_size, max_new_tokens, progress, memory_budget)

    def _token_attr(
        self, fwd: EmbedForward, unit_pos: Tensor, counterfactual: Any
    ) -> tuple[Tensor, dict[str, Any], dict[str, Tensor]]:
        x = fwd.inputs_embeds()[None]
        bs = self._rows_per_forward(fwd, 1)
        g, v = grad_products(fwd, x, torch.ones_like(x), bs, self.progress)
        return g, {"value": _row_list(v[0])}, {}


def _row_list(v: Tensor) -> Any:
    """A per-row tensor ``[rows]`` as a float (one row) or a list."""
    vals = [float(t) for t in v.reshape(-1)]
    return vals[0] if len(vals) == 1 else vals


@register("smoothgrad", INPUT_KINDS)
class SmoothGrad(_GradientMethod):
    """SmoothGrad: the gradient averaged over ``samples`` noisy copies of the
    input embeddings (Gaussian noise with std ``noise * (max - min)`` of the
    embeddings), multiplied by the input (``multiply_by_inputs=True``, default)
    and summed over the hidden dimension, or L2-normed (``reduce="l2"``).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r1 = al.attribute(lm, "a b c", target=" a", method="smoothgrad", seed=1)
        >>> r2 = al.attribute(lm, "a b c", target=" a", method="smoothgrad", seed=1)
        >>> bool((r1.scores == r2.scores).all())
        True
    """

    def __init__(
        self,
        samples: int = 16,
        noise: float = 0.1,
        multiply_by_inputs: bool = True,
        seed: int = 0,
        reduce: str = "sum",
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
        progress: bool = False,
        memory_budget: int | str | None = None,
    ):
        self.samples = check_int("smoothgrad", "samples", samples)
        self.noise = check_float("smoothgrad", "noise", noise, strict=False)
        self.multiply_by_inputs = multiply_by_inputs
        self.seed = check_int("smoothgrad", "seed", seed, minimum=0)
        super().__init__(reduce, batch_size, max_new_tokens, progress, memory_budget)

    def _token_attr(
        self, fwd: EmbedForward, unit_pos: Tensor, counterfactual: Any
    ) -> tuple[Tensor, dict[str, Any], dict[str, Tensor]]:
        x = fwd.inputs_embeds()
        gen = torch.Generator().manual_seed(self.seed)
        sigma = self.noise * float(x.max() - x.min())
        eps = torch.randn((self.samples, *x.shape), generator=gen, dtype=torch.float64)
        eps = (eps * sigma).to(device=x.device, dtype=x.dtype) * unit_pos.to(x.device)[:, None]
        points = x[None] + eps
        mult = (x if self.multiply_by_inputs else torch.ones_like(x))[None] / self.samples
        bs = self._rows_per_forward(fwd, points.shape[0])
        g, _ = grad_products(fwd, points, mult, bs, self.progress)
        return g, {"sigma": sigma}, {}


# ------------------------------------------------------------ over gates
class _GateGradient(Estimator):
    """Gradient estimators over gates, on every unit kind that provides them.

    A unit's gate ``g`` mixes its ablated and actual values
    (``ablated + g * (actual - ablated)``), so ``df/dg`` at ``g`` is the
    directional derivative along ``actual - ablated``. Kinds compute weighted
    sums of gate gradients with :meth:`attrlab.units.base.Bound.gate_grad_sum`
    (input units through the token embeddings, with shared activation
    derivatives across continuation rows).

    ``baseline=`` is a deprecated alias of ``ablation=`` on :func:`attrlab.attribute`.
    """

    needs = frozenset({"gates"})
    default_ablation: Any = None

    def __init__(
        self,
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
        progress: bool = False,
        memory_budget: int | str | None = None,
        site: str | None = None,
        baseline: Any = None,
    ):
        name = self.name or type(self).__name__
        if batch_size == "auto":  # the memory budget's choice, as None
            batch_size = None
        self.batch_size = check_int(name, "batch_size", batch_size, optional=True)
        self.max_new_tokens = check_int(name, "max_new_tokens", max_new_tokens, 0, optional=True)
        self.progress = progress
        self.memory_budget = memory_budget
        self.site = site
        self._baseline = deprecated_baseline(name, baseline)

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in super().params().items() if v is not None}

    def bind_options(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
            "progress": self.progress,
            "memory_budget": self.memory_budget,
            "grad": True,
            "ablation_default": (
                self._baseline if self._baseline is not None else self.default_ablation
            ),
        }

    def _path(self, bound: Any, alphas: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """``sum_k weights_k df/dg (alphas_k * 1)`` ``[rows, n]`` and the values ``[k, rows]``."""
        g = alphas.double()[:, None].expand(len(alphas), bound.n)
        return bound.gate_grad_sum(g, weights.double())


@register("input-x-gradient")
class InputXGradient(_GateGradient):
    """The gradient over the units' gates at the input (``g = 1``): the first-order
    effect of each unit, ``(actual - ablated) . df/d(unit)``. With the zero
    ablation (the default for input units) this is ``x . df/dx`` per token; on
    components with a counterfactual it is attribution patching (``atp``).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> al.attribute(lm, "a b c", target=" a", method="input-x-gradient").scores.shape[0]
        3
    """

    @property
    def default_ablation(self) -> Any:  # type: ignore[override]
        from ..ablations import Zero

        return Zero()

    def estimate(self, bound: Any) -> tuple[Tensor, dict[str, Any]]:
        grads, vals = self._path(bound, torch.ones(1), torch.ones(1))
        return grads, {"value": _row_list(vals[0])}


@register("atp")
class AttributionPatching(InputXGradient):
    """Attribution patching (Nanda; Kramár et al., "AtP*"): the gradient over
    component gates at the clean run, ``(clean - ablated) . df/d(activation)`` —
    a first-order estimate of occlusion with the same ablation (a counterfactual
    prompt: of activation patching). One forward and one backward. Scores are
    contributions (``f(all) - f(all without u)`` to first order); the AtP
    paper's "effect of patching" is their negative (``r.effect_of_patching()``).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "When Mary and John went", target=(" Mary", " John"),
        ...                  units="heads", method="atp", counterfactual="When John and Mary went")
        >>> len(r) == lm.cfg.n_layers * lm.cfg.n_heads
        True
    """

    only_kinds = ("heads", "attn", "mlp", "neurons", "experts", "resid", "layers", "features")
    default_ablation = None  # the kind's: a counterfactual when given, else zero

    def __init__(self, direction: str = "noising", **options: Any):
        """``direction="denoising"``: the gradient at the counterfactual run of
        restoring each unit's clean value (needs ``counterfactual=``).
        ``site``: for heads, ``"z"`` (default), ``"q"``, ``"k"``, ``"v"``."""
        if direction not in ("noising", "denoising"):
            raise InputError(f"direction must be 'noising' or 'denoising', got {direction!r}")
        self.direction = direction
        super().__init__(**options)

    def attribute(  # type: ignore[override]
        self, lm: Any, inputs: Any, target: Any, units: Any, counterfactual: Any = None,
        ablation: Any = None,
    ) -> Any:  # fmt: skip
        if self.direction == "noising":
            return super().attribute(lm, inputs, target, units, counterfactual, ablation)
        from ..ablations import Counterfactual

        if counterfactual is None:
            raise InputError("atp with direction='denoising' needs counterfactual=")
        # the counterfactual run with each unit gated toward its clean value
        bound = self.bind(lm, counterfactual, target, units, None, Counterfactual(inputs))
        grads, vals = self._path(bound, torch.ones(1), torch.ones(1))
        # restoring a unit moves the target by -(gradient toward the counterfactual)
        return bound.result(-grads, self, {"value": _row_list(vals[0]), "direction": "denoising"},
                            meta={"direction": "denoising"})  # fmt: skip


@register("ig")
class IntegratedGradients(_GateGradient):
    """Integrated Gradients over gates: the gradient integrated along the straight
    line from the ablated (``g = 0``) to the actual values (``g = 1``); the
    scores sum to ``f(all) - f(none)`` up to the quadrature error, reported as
    ``completeness_error`` (and relative) in the diagnostics. On input units
    with the pad (or zero, or counterfactual) ablation this is IG at the token
    embeddings (Sundararajan et al.); on edges, EAP-IG.

    Args:
        steps: number of quadrature points.
        rule: ``gausslegendre`` (default) or ``riemann_left|right|middle|trapezoid``.
        batch_size: points per forward (None: all ``steps`` in one forward when
            they fit the memory budget, else the fewest equal forwards that fit).
        max_new_tokens: with no target, generate this many tokens greedily and
            attribute each of them (one row per token).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "When Mary", target=None, method="ig", max_new_tokens=2)
        >>> r.scores.shape[0]
        2
    """

    def __init__(self, steps: int = 32, rule: str = "gausslegendre", **options: Any):
        steps = check_int("ig", "steps", steps)
        quadrature(rule, steps)  # validates the rule
        self.steps = steps
        self.rule = rule
        super().__init__(**options)

    def estimate(self, bound: Any) -> tuple[Tensor, dict[str, Any]]:
        alphas, weights = quadrature(self.rule, self.steps)
        grads, _ = self._path(bound, alphas, weights)  # [rows, n]
        v1, v0 = bound.clean().double(), bound.empty().double()
        change = (v1 - v0).to(grads.device)
        err = grads.double().sum(-1) - change
        rel = err.abs() / change.abs().clamp_min(1e-12)
        return grads, {
            "completeness_error": _row_list(err),
            "relative_completeness_error": _row_list(rel),
            "delta": _row_list(change),
            "value": _row_list(v1),
            "baseline_value": _row_list(v0),
        }


@register("eap")
class EAP(InputXGradient):
    """Edge attribution patching (Syed et al., "Attribution Patching Outperforms
    Automated Circuit Discovery"): the gradient over edge gates at the clean run.
    An edge ``u -> v`` scores ``sum_pos (a_u - a_u(ablated)) . df/dx_v`` with the
    gradient flowing through ``v`` only (see :mod:`attrlab.units.edges`); one
    forward and one backward for every edge. Contributions; the paper's "effect
    of patching" is ``r.effect_of_patching()``.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", units="edges", method="eap",
        ...                  counterfactual="a c c")
        >>> len(r) == al.units.Edges().graph(lm).n_edges
        True
    """

    only_kinds = ("edges",)
    default_ablation = None  # edges have none: a counterfactual or an explicit ablation


@register("eap-ig")
class EAPIG(IntegratedGradients):
    """EAP-IG (Hanna et al., "Have Faith in Faithfulness"): Integrated Gradients
    over edge gates from every edge ablated (``g = 0``) to every edge kept
    (``g = 1``), Gauss-Legendre with ``steps`` points (several per forward); the
    scores sum to ``f(all) - f(none)`` up to ``completeness_error``.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", units="edges", method="eap-ig",
        ...                  counterfactual="a c c", steps=4)
        >>> r.params["steps"]
        4
    """

    only_kinds = ("edges",)

    def __init__(self, steps: int = 8, **options: Any):
        super().__init__(steps=steps, **options)


@register("expected-gradients")
class ExpectedGradients(_GateGradient):
    """Expected gradients over gates (Erion et al.): the gate gradient at
    ``samples`` random points of the path from the ablated to the actual values
    (``g = alpha``, alpha uniform; seeded), averaged — a Monte Carlo estimate of
    Integrated Gradients whose baseline is the ablation (use a ``Resample`` or
    ``Mean`` ablation for a reference distribution on components).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", method="expected-gradients", samples=8)
        >>> len(r)
        3
    """

    def __init__(self, samples: int = 32, seed: int = 0, **options: Any):
        self.samples = check_int("expected-gradients", "samples", samples)
        self.seed = check_int("expected-gradients", "seed", seed, minimum=0)
        super().__init__(**options)

    def estimate(self, bound: Any) -> tuple[Tensor, dict[str, Any]]:
        gen = torch.Generator().manual_seed(self.seed)
        alphas = torch.rand(self.samples, generator=gen, dtype=torch.float64)
        weights = torch.full((self.samples,), 1.0 / self.samples, dtype=torch.float64)
        grads, _ = self._path(bound, alphas, weights)
        return grads, {"n_samples": self.samples}
