"""Gradient family over input units: saliency, input x gradient, Integrated
Gradients, SmoothGrad, expected gradients.

All methods differentiate the target with respect to the token embeddings (the
output of the ``embed`` site, i.e. the token-embedding module, before any
position embedding or scaling the model adds), then reduce over the hidden
dimension — by sum (default; keeps IG's completeness) or by L2 norm. Token
scores are summed into words / sentences / spans for those unit kinds.

Many points (interpolation steps, noise samples) go through the model in one
batched forward (``batch_size`` per chunk). For a multi-token continuation
(``ContinuationLogProb(..., reduce="none")`` or ``max_new_tokens``), every row
shares the same forwards: one forward per chunk of points, then one backward
per continuation token through the retained graph, instead of a whole IG per
token.

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

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from tqdm.auto import tqdm

from ..errors import InputError
from ..model.adapters.base import linear_layout
from ..model.budget import batch_size_for
from ..model.lock import model_lock
from ..units.tokens import EmbedForward, InputUnits, input_result, make_forward
from .base import Method, check_baseline, check_float, check_int, register

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


class _SharedDerivative(torch.autograd.Function):
    """``y = fn(x)`` for an elementwise ``fn``; the backward multiplies by
    ``fn'(x)``, computed once (on the first backward) and kept for the next ones."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.fn = fn
        ctx.deriv = None
        ctx.save_for_backward(x)
        return fn(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        if ctx.deriv is None:
            (x,) = ctx.saved_tensors
            with torch.enable_grad():
                xd = x.detach().requires_grad_(True)
                y = ctx.fn(xd)
                (ctx.deriv,) = torch.autograd.grad(y, xd, torch.ones_like(y))
        return grad * ctx.deriv, None


def _elementwise_types() -> tuple[type, ...]:
    """Parameter-free elementwise activation module types (PyTorch and Hugging Face)."""
    types: list[type] = [
        nn.GELU, nn.SiLU, nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.Hardswish,
        nn.LeakyReLU, nn.Mish, nn.Softplus,
    ]  # fmt: skip
    try:
        from transformers import activations as hf_act
    except ImportError:  # pragma: no cover - transformers is a dependency
        return tuple(types)
    for name in (
        "AccurateGELUActivation", "ClippedGELUActivation", "FastGELUActivation",
        "GELUActivation", "GELUTanh", "LaplaceActivation", "MishActivation",
        "NewGELUActivation", "PytorchGELUTanh", "QuickGELUActivation",
        "ReLUSquaredActivation", "SiLUActivation", "SqrtSoftplusActivation",
    ):  # fmt: skip
        t = getattr(hf_act, name, None)
        if isinstance(t, type):
            types.append(t)
    return tuple(types)


@contextlib.contextmanager
def shared_activation_derivatives(model: nn.Module) -> Iterator[int]:
    """While active, every parameter-free elementwise activation module of
    ``model`` (GELU, SiLU, ReLU, ...) records one autograd node whose backward
    multiplies by the activation's derivative, computed on the first backward and
    reused by every later backward through the same (retained) graph.

    Values are unchanged (the module's own forward computes them). With several
    target rows sharing one forward, each row's backward then costs one multiply
    per activation instead of the backward of its whole elementwise formula (for
    GPT-2's tanh-GELU, about a fifth of a backward pass). Gradients agree with plain
    autograd to float round-off. Yields the number of modules patched.

    Example:
        >>> import torch, attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> with shared_activation_derivatives(lm.model) as n:
        ...     e = lm.model.transformer.wte(ids).detach().requires_grad_(True)
        ...     out = lm.model(inputs_embeds=e).logits[0, -1]
        >>> g1, = torch.autograd.grad(out[0], e, retain_graph=True)
        >>> g2, = torch.autograd.grad(out[1], e)
        >>> n == lm.cfg.n_layers, g1.shape == e.shape
        (True, True)
    """
    types = _elementwise_types()

    def wrap(m: nn.Module) -> Callable[..., Tensor] | None:
        if not isinstance(m, types) or any(True for _ in m.parameters(recurse=False)):
            return None
        return _shared_forward(m.forward)

    with _swapped_forwards(model, wrap) as n:
        yield n


@contextlib.contextmanager
def _swapped_forwards(
    model: nn.Module, wrap: Callable[[nn.Module], Callable[..., Tensor] | None]
) -> Iterator[int]:
    """Replace ``forward`` of every module for which ``wrap`` returns a new one
    (holding the model's lock, :func:`attrlab.model.lock.model_lock`); restore them
    on exit. Yields how many were replaced. The new forwards act only in the
    calling thread (other threads get the original)."""
    patched: list[tuple[nn.Module, Any]] = []
    with model_lock(model), contextlib.ExitStack() as stack:
        stack.callback(_restore_forwards, patched)
        for m in model.modules():
            new = wrap(m)
            if new is None:
                continue
            patched.append((m, m.__dict__.get("forward")))
            m.forward = new  # type: ignore[method-assign]
        yield len(patched)


def _restore_forwards(patched: list[tuple[nn.Module, Any]]) -> None:
    for m, fwd in patched:
        if fwd is None:
            del m.forward
        else:
            m.forward = fwd  # type: ignore[method-assign]


def _shared_forward(orig: Callable[..., Tensor]) -> Callable[..., Tensor]:
    owner = threading.get_ident()

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        mine = threading.get_ident() == owner
        if args or kwargs or not mine or not (torch.is_grad_enabled() and x.requires_grad):
            return orig(x, *args, **kwargs)
        out: Tensor = _SharedDerivative.apply(x, orig)
        return out

    return forward


class _PrefixLinear(torch.autograd.Function):
    """``y = fn(x)`` for a linear layer ``fn``; the backward (input gradient only)
    multiplies only the positions of ``[batch, pos, out]`` gradients before
    ``cut[0]`` and from the first nonzero one on by the weight, and fills the
    rest with zeros. ``cut`` is a one-element list owned by the caller
    (:func:`grad_products`), set before each row's backward (None: no cut)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        fn: Callable[[Tensor], Tensor],
        weight: Tensor,
        w_in_out: bool,
        cut: list[int | None],
    ) -> Tensor:
        ctx.cut = cut
        ctx.weight = weight
        ctx.w_in_out = w_in_out
        ctx.x_shape = x.shape
        return fn(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        w = ctx.weight.t() if ctx.w_in_out else ctx.weight  # [out, in]
        k = ctx.cut[0]
        if k is None or grad.dim() != 3:
            return grad @ w, None, None, None, None
        k = min(k, grad.shape[1])
        lo = 0  # leading positions with no gradient (e.g. the last block: one position)
        while lo < k and not bool(grad[:, lo].any()):
            lo += 1
        if lo == 0 and k == grad.shape[1]:
            return grad @ w, None, None, None, None
        gx = grad.new_zeros(ctx.x_shape) if lo == k else grad.new_empty(ctx.x_shape)
        if lo < k:
            gx[:, :lo] = 0
            gx[:, k:] = 0
            gx[:, lo:k] = grad[:, lo:k] @ w
        return gx, None, None, None, None


@contextlib.contextmanager
def _prefix_linears(
    model: nn.Module, lead: Callable[[Tensor], bool], cut: list[int | None]
) -> Iterator[int]:
    """While active, plain linear layers (``nn.Linear``, GPT-2's ``Conv1D``) of
    ``model`` record a node whose input-gradient backward skips the positions
    at and after ``cut[0]`` (exact when those positions carry no gradient,
    as the later positions of a causal LM for a target read at an earlier one).
    Only inputs ``[batch, pos, d]`` for which ``lead(x)`` holds (the run's batch
    and positions) get such nodes. No gradient reaches the weights through them."""

    def wrap(m: nn.Module) -> Callable[..., Tensor] | None:
        w_in_out = linear_layout(m)
        weight = getattr(m, "weight", None)
        if w_in_out is None or not isinstance(weight, Tensor) or weight.device.type == "meta":
            return None  # not a plain linear map, or weights accelerate loads per forward
        return _prefix_forward(m.forward, weight, w_in_out, lead, cut)

    with _swapped_forwards(model, wrap) as n:
        yield n


def _prefix_forward(
    orig: Callable[..., Tensor],
    weight: Tensor,
    w_in_out: bool,
    lead: Callable[[Tensor], bool],
    cut: list[int | None],
) -> Callable[..., Tensor]:
    owner = threading.get_ident()

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        plain = args or kwargs or x.dim() != 3 or threading.get_ident() != owner or not lead(x)
        if plain or not (torch.is_grad_enabled() and x.requires_grad):
            return orig(x, *args, **kwargs)
        out: Tensor = _PrefixLinear.apply(x, orig, weight, w_in_out, cut)
        return out

    return forward


def _run_shape(e: Tensor) -> Callable[[Tensor], bool]:
    """True for a ``[batch, pos, ...]`` activation of the run fed with ``e``
    (``pos``: all positions, or all but the last, which continuation rows skip)."""
    n, width = e.shape[0], e.shape[1]
    return lambda x: x.shape[0] == n and x.shape[1] in (width - 1, width)


def _live_prefixes(fwd: EmbedForward, rows: int) -> list[int] | None:
    """For continuation rows of a causal LM: row ``r`` reads the position before
    its token's, so every position from its token's on has no gradient."""
    from ..units.tokens import LMEmbedForward

    if not isinstance(fwd, LMEmbedForward) or not fwd._per_token_path():
        return None
    pos = fwd.row_labels.get("position") if fwd.row_labels else None
    if pos is None or len(pos) != rows:
        return None
    return [int(p) for p in pos]


def _model_of(fwd: EmbedForward) -> nn.Module | None:
    """The torch module behind an :class:`EmbedForward` (None if unknown)."""
    model = getattr(getattr(fwd, "lm", None), "model", None)
    return model if isinstance(model, nn.Module) else None


def grad_products(
    fwd: EmbedForward,
    points: Tensor,
    mult: Tensor,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """``sum_k mult_k * grad f_r(points_k)`` for every target row ``r``.

    Args:
        points: ``[n, pos, d]`` embeddings where gradients are taken.
        mult: ``[n, pos, d]`` (or broadcastable) multipliers of each point's gradient.

    Returns:
        ``([rows, pos, d], values [n, rows])``. One forward per chunk of points,
        one backward per row through the retained graph. With several rows, the
        activations' derivatives are computed once per forward and shared by the
        rows' backwards (:func:`shared_activation_derivatives`); for the
        continuation rows of a causal LM, the linear layers' backwards also skip
        the positions from the row's own token on (they carry no gradient).

    Example:
        >>> import torch, attrlab as al
        >>> from attrlab.units.tokens import make_forward
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> f = make_forward(lm, "a b c", " a")
        >>> x = f.inputs_embeds()[None]
        >>> g, v = grad_products(f, x, torch.ones_like(x))
        >>> tuple(g.shape) == (1, *x.shape[1:])
        True
    """
    n = points.shape[0]
    mult = mult.expand(n, *points.shape[1:]) if mult.shape[0] == 1 else mult
    acc: Tensor | None = None
    values = []
    chunks = range(0, n, batch_size)
    n_rows = getattr(fwd, "n_rows", 1)
    model = _model_of(fwd) if n_rows > 1 else None
    prefixes = _live_prefixes(fwd, n_rows) if model is not None else None
    cut: list[int | None] = [None]  # positions from cut[0] on carry no gradient
    for i in tqdm(chunks, disable=not progress, desc="gradients", leave=False):
        e = points[i : i + batch_size].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            with contextlib.ExitStack() as stack:
                if model is not None:
                    stack.enter_context(shared_activation_derivatives(model))
                if prefixes is not None and model is not None:
                    stack.enter_context(_prefix_linears(model, _run_shape(e), cut))
                outs = fwd.rows(e)  # rows x [c]
            rows = len(outs)
            if acc is None:
                acc = torch.zeros(rows, *points.shape[1:], dtype=points.dtype, device=points.device)
            m = mult[i : i + batch_size]
            for r, out in enumerate(outs):
                cut[0] = prefixes[r] if prefixes is not None else None
                (g,) = torch.autograd.grad(out.sum(), e, retain_graph=r < rows - 1)
                acc[r] += (m * g).sum(0)
        values.append(torch.stack([o.detach() for o in outs], 1))
    assert acc is not None
    return acc, torch.cat(values, 0)


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
        self.batch_size = check_int(name, "batch_size", batch_size, optional=True)
        self.max_new_tokens = check_int(name, "max_new_tokens", max_new_tokens, 0, optional=True)
        self.progress = progress
        self.memory_budget = memory_budget

    def _rows_per_forward(self, fwd: EmbedForward) -> int:
        """Points per forward: ``batch_size``, or as many (at most 32) as fit the
        memory budget (:mod:`attrlab.model.budget`) for this prompt length."""
        return batch_size_for(
            getattr(fwd, "lm", None),
            fwd.view.n_pos,
            cap=32,
            grad=True,
            batch_size=self.batch_size,
            memory_budget=self.memory_budget,
            logit_positions=1 if getattr(fwd, "next_token", False) else None,
        )

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
        if counterfactual is not None and not isinstance(self, IntegratedGradients):
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
        g, v = grad_products(fwd, x, torch.ones_like(x), self._rows_per_forward(fwd), self.progress)
        return g, {"value": _row_list(v[0])}, {}


@register("input-x-gradient", INPUT_KINDS)
class InputXGradient(_GradientMethod):
    """``x * df/dx`` at the input embeddings, summed (default) or L2-normed over
    the hidden dimension.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> al.attribute(lm, "a b c", target=" a", method="input-x-gradient").scores.shape[0]
        3
    """

    def _token_attr(
        self, fwd: EmbedForward, unit_pos: Tensor, counterfactual: Any
    ) -> tuple[Tensor, dict[str, Any], dict[str, Tensor]]:
        x = fwd.inputs_embeds()[None]
        g, v = grad_products(fwd, x, x, self._rows_per_forward(fwd), self.progress)
        return g, {"value": _row_list(v[0])}, {}


def _row_list(v: Tensor) -> Any:
    """A per-row tensor ``[rows]`` as a float (one row) or a list."""
    vals = [float(t) for t in v.reshape(-1)]
    return vals[0] if len(vals) == 1 else vals


def _resolve_baseline(fwd: EmbedForward, baseline: Any, unit_pos: Tensor, cf: Any) -> Tensor:
    """Baseline ``[pos, d]``; equals the input outside the units (never interpolated)."""
    x = fwd.inputs_embeds()
    if cf is not None:
        if baseline not in (None, "pad"):
            raise InputError("give either a counterfactual or a baseline, not both")
        ids = _counterfactual_ids(fwd, cf)
        x0 = fwd.embed_ids(torch.tensor(ids, dtype=torch.long))
    else:
        x0 = fwd.baseline(baseline)
    return torch.where(unit_pos.to(x.device)[:, None], x0, x)


def _counterfactual_ids(fwd: EmbedForward, cf: Any) -> list[int]:
    """Counterfactual prompt token ids + the continuation of the prepared input."""
    lm = getattr(fwd, "lm", None)
    if lm is None:
        raise InputError("a counterfactual baseline needs a causal LM")
    b = lm.tokenize(cf)
    ids = b.input_ids[0].tolist()
    if len(ids) != fwd.view.n_prompt:
        raise InputError(
            f"the counterfactual has {len(ids)} tokens, the prompt {fwd.view.n_prompt}; "
            "they must match position by position"
        )
    return ids + fwd.view.ids[fwd.view.n_prompt :]


@register("ig", INPUT_KINDS)
class IntegratedGradients(_GradientMethod):
    """Integrated Gradients at the token embeddings.

    Args:
        steps: number of quadrature points.
        rule: ``gausslegendre`` (default) or ``riemann_left|right|middle|trapezoid``.
        baseline: ``"pad"`` (pad-token embedding, default), ``"zero"``, ``"mask"``,
            a token id, or a tensor ``[pos, d_model]``. A ``counterfactual`` prompt
            (same token length) can serve as the baseline instead.
        reduce: ``"sum"`` (completeness-preserving) or ``"l2"``.
        batch_size: points per forward; None (default): as many as fit the memory
            budget, at most 32 (:mod:`attrlab.model.budget`).
        max_new_tokens: with no target, generate this many tokens greedily and
            attribute each of them (one row per token).
        memory_budget: bytes (or ``"2GB"``) one forward may use when ``batch_size``
            is None; default: :func:`attrlab.model.budget.memory_budget`.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "When Mary", target=None, method="ig", max_new_tokens=2)
        >>> r.scores.shape[0]
        2
    """

    def __init__(
        self,
        steps: int = 32,
        rule: str = "gausslegendre",
        baseline: Any = "pad",
        reduce: str = "sum",
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
        progress: bool = False,
        memory_budget: int | str | None = None,
    ):
        steps = check_int("ig", "steps", steps)
        quadrature(rule, steps)  # validates the rule
        self.steps = steps
        self.rule = rule
        self.baseline = check_baseline("ig", baseline)
        super().__init__(reduce, batch_size, max_new_tokens, progress, memory_budget)

    def params(self) -> dict[str, Any]:
        p = super().params()
        if isinstance(p["baseline"], Tensor):
            p["baseline"] = f"tensor{tuple(p['baseline'].shape)}"
        return p

    def _token_attr(
        self, fwd: EmbedForward, unit_pos: Tensor, counterfactual: Any
    ) -> tuple[Tensor, dict[str, Any], dict[str, Tensor]]:
        x = fwd.inputs_embeds()
        x0 = _resolve_baseline(fwd, self.baseline, unit_pos, counterfactual)
        alphas, weights = quadrature(self.rule, self.steps)
        a = alphas.to(device=x.device, dtype=x.dtype)[:, None, None]
        w = weights.to(device=x.device, dtype=x.dtype)[:, None, None]
        delta = x - x0
        points = x0[None] + a * delta[None]  # [steps, pos, d]
        g, _ = grad_products(
            fwd, points, w * delta[None], self._rows_per_forward(fwd), self.progress
        )
        ends = fwd.evaluate(torch.stack([x, x0]), 2)  # [2, rows]
        change = ends[0] - ends[1]
        err = g.sum((-1, -2)) - change.to(g.dtype)
        rel = err.abs() / change.abs().clamp_min(1e-12).to(g.dtype)
        diag = {
            "completeness_error": _row_list(err),
            "relative_completeness_error": _row_list(rel),
            "delta": _row_list(change),
            "value": _row_list(ends[0]),
            "baseline_value": _row_list(ends[1]),
        }
        return g, diag, {}


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
        g, _ = grad_products(fwd, points, mult, self._rows_per_forward(fwd), self.progress)
        return g, {"sigma": sigma}, {}


@register("expected-gradients", INPUT_KINDS)
class ExpectedGradients(_GradientMethod):
    """Expected gradients: IG averaged over baselines drawn from a reference
    distribution, one random point on each path (Erion et al.). References:
    ``"random_tokens"`` (embeddings of uniformly random vocabulary tokens at
    each unit position, default) or a tensor ``[k, pos, d_model]``.
    Seeded; ``samples`` (baseline, alpha) pairs.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", method="expected-gradients", samples=8)
        >>> len(r)
        3
    """

    def __init__(
        self,
        samples: int = 32,
        references: Any = "random_tokens",
        seed: int = 0,
        reduce: str = "sum",
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
        progress: bool = False,
        memory_budget: int | str | None = None,
    ):
        self.samples = check_int("expected-gradients", "samples", samples)
        self.references = check_baseline("expected-gradients", references, "references")
        self.seed = check_int("expected-gradients", "seed", seed, minimum=0)
        super().__init__(reduce, batch_size, max_new_tokens, progress, memory_budget)

    def params(self) -> dict[str, Any]:
        p = super().params()
        if isinstance(p["references"], Tensor):
            p["references"] = f"tensor{tuple(p['references'].shape)}"
        return p

    def _token_attr(
        self, fwd: EmbedForward, unit_pos: Tensor, counterfactual: Any
    ) -> tuple[Tensor, dict[str, Any], dict[str, Tensor]]:
        x = fwd.inputs_embeds()
        gen = torch.Generator().manual_seed(self.seed)
        k, p = self.samples, x.shape[0]
        if isinstance(self.references, Tensor):
            ref = self.references.to(device=x.device, dtype=x.dtype)
            if ref.dim() != 3 or tuple(ref.shape[1:]) != tuple(x.shape):
                raise InputError(
                    f"references must be [k, pos, d_model] = [k, {p}, {x.shape[1]}], "
                    f"got {tuple(ref.shape)}"
                )
            idx = torch.randint(ref.shape[0], (k,), generator=gen)
            x0 = ref[idx]
        elif self.references == "random_tokens":
            vocab = _vocab(fwd)
            ids = torch.randint(vocab, (k, p), generator=gen)
            x0 = torch.stack([fwd.embed_ids(row) for row in ids])
        else:
            raise InputError("references must be 'random_tokens' or a tensor [k, pos, d_model]")
        x0 = torch.where(unit_pos.to(x.device)[None, :, None], x0, x[None])
        alpha = torch.rand(k, generator=gen, dtype=torch.float64).to(x.dtype).to(x.device)
        delta = x[None] - x0
        points = x0 + alpha[:, None, None] * delta
        g, _ = grad_products(fwd, points, delta / k, self._rows_per_forward(fwd), self.progress)
        return g, {}, {}


def _vocab(fwd: EmbedForward) -> int:
    lm = getattr(fwd, "lm", None)
    cfg = getattr(lm, "cfg", None)
    if cfg is not None and getattr(cfg, "d_vocab", None):
        return int(cfg.d_vocab)
    vocab = getattr(fwd, "vocab_size", None)
    if vocab is None:
        raise InputError("cannot draw random tokens: unknown vocabulary size; pass references=")
    return int(vocab)
