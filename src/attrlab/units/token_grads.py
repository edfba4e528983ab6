"""Fast gradients of a target with respect to token embeddings, for the
token unit kinds' gates (:meth:`attrlab.units.tokens.InputBound.gate_grad_sum`)
and the token-specific gradient methods (saliency, SmoothGrad).

One forward per chunk of points, one backward per target row through the
retained graph; with several rows (a continuation), activation derivatives are
computed once per forward and shared by the rows' backwards, and the linear
layers' backwards skip the positions after the row's own token.

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

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from tqdm.auto import tqdm

from ..model import linear_layout
from ..model.swap import elementwise_types, has_rule, swapped_forwards
from ..model.threads import has_module_hooks, intra_op_threads, parallel
from .tokens import EmbedForward

__all__: list[str] = []  # used by the token kinds and gradient methods, not public names


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
    types = elementwise_types()

    def wrap(m: nn.Module) -> Callable[..., Tensor] | None:
        if not isinstance(m, types) or any(True for _ in m.parameters(recurse=False)):
            return None
        if has_rule(m):  # a relevance rule defines this module's backward
            return None
        return _shared_forward(m.forward)

    with swapped_forwards(model, wrap) as n:
        yield n


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
    ``cut.value`` and from the first nonzero one on by the weight, and fills the
    rest with zeros, when that live span is at most half the positions (a
    longer one costs more in the slice's copies than the skipped rows save; the
    whole product is then exact too, as the dead positions' gradients are 0). ``cut`` (a :class:`_Cut`, per
    thread) is set by :func:`grad_products` before each row's backward (None: no cut)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        fn: Callable[[Tensor], Tensor],
        weight: Tensor,
        w_in_out: bool,
        cut: _Cut,
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
        k = ctx.cut.value
        if k is None or grad.dim() != 3:
            return grad @ w, None, None, None, None
        k = min(k, grad.shape[1])
        lo = _leading_dead(grad, k)  # e.g. the last block: one live position
        if 2 * (k - lo) > grad.shape[1]:  # slicing copies; it pays only for a short live span
            return grad @ w, None, None, None, None  # exact: the dead positions' gradients are 0
        gx = grad.new_zeros(ctx.x_shape) if lo == k else grad.new_empty(ctx.x_shape)
        if lo < k:
            gx[:, :lo] = 0
            gx[:, k:] = 0
            gx[:, lo:k] = grad[:, lo:k] @ w
        return gx, None, None, None, None


def _leading_dead(grad: Tensor, k: int) -> int:
    """How many leading positions of ``grad [batch, pos, d]`` (of the first ``k``)
    carry no gradient: one look at position 0 (live in every block but the
    last), else one pass over the first ``k`` positions.

    Example:
        >>> g = torch.zeros(2, 5, 3); g[:, 3] = 1.0
        >>> _leading_dead(g, 5), _leading_dead(g, 3), _leading_dead(torch.ones(2, 5, 3), 5)
        (3, 3, 0)
    """
    if k == 0 or bool(grad[:, 0].any()):
        return 0
    live = grad[:, :k].ne(0).any(-1).any(0)  # [k]
    idx = live.nonzero()
    return int(idx[0, 0]) if idx.numel() else k


@contextlib.contextmanager
def _prefix_linears(model: nn.Module, lead: Callable[[Tensor], bool], cut: _Cut) -> Iterator[int]:
    """While active, plain linear layers (``nn.Linear``, GPT-2's ``Conv1D``) of
    ``model`` record a node whose input-gradient backward skips the positions
    at and after ``cut.value`` (exact when those positions carry no gradient,
    as the later positions of a causal LM for a target read at an earlier one).
    Only inputs ``[batch, pos, d]`` for which ``lead(x)`` holds (the run's batch
    and positions) get such nodes. No gradient reaches the weights through them."""

    def wrap(m: nn.Module) -> Callable[..., Tensor] | None:
        w_in_out = linear_layout(m)
        weight = getattr(m, "weight", None)
        if w_in_out is None or not isinstance(weight, Tensor) or weight.device.type == "meta":
            return None  # not a plain linear map, or weights accelerate loads per forward
        if has_rule(m):  # a relevance rule defines this module's backward
            return None
        return _prefix_forward(m.forward, weight, w_in_out, lead, cut)

    with swapped_forwards(model, wrap) as n:
        yield n


def _prefix_forward(
    orig: Callable[..., Tensor],
    weight: Tensor,
    w_in_out: bool,
    lead: Callable[[Tensor], bool],
    cut: _Cut,
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


class _Cut(threading.local):
    """The position from which a row's gradients are known to be 0, per thread
    (a CPU backward runs on the thread that calls it)."""

    value: int | None = None


def _backward_workers(model: nn.Module | None, points: Tensor, rows: int) -> int:
    """Threads that share the rows' backwards: the process's intra-op threads on
    a CPU when there are rows to share and the model runs no hooks; else 1."""
    if model is None or rows < 2 or points.device.type != "cpu" or has_module_hooks(model):
        return 1
    return max(1, min(intra_op_threads(), rows))


def _row_groups(rows: int, workers: int) -> list[list[int]]:
    """Rows dealt to ``workers`` groups in snake order (later rows cost more:
    their gradients reach more positions).

    Example:
        >>> _row_groups(5, 2)
        [[0, 3, 4], [1, 2]]
    """
    groups: list[list[int]] = [[] for _ in range(max(1, min(workers, rows)))]
    k = len(groups)
    for r in range(rows):
        lap, j = divmod(r, k)
        groups[j if lap % 2 == 0 else k - 1 - j].append(r)
    return groups


def _backwards(
    outs: list[Tensor],
    e: Tensor,
    mult: Tensor,
    acc: Tensor,
    rows: list[int],
    prefixes: list[int] | None,
    cut: _Cut,
    free: bool,
) -> None:
    """``acc[r] += sum_k mult_k * d outs[r] / d e_k`` for ``r`` in ``rows``, one
    backward each through the retained graph (``free``: the last one frees it)."""
    for j, r in enumerate(rows):
        cut.value = prefixes[r] if prefixes is not None else None
        retain = not (free and j == len(rows) - 1)
        (g,) = torch.autograd.grad(outs[r].sum(), e, retain_graph=retain)
        acc[r] += (mult * g).sum(0)


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
        one backward per row through the retained graph (on a CPU with several
        intra-op threads, the rows are shared by that many threads at one
        intra-op thread each: :mod:`attrlab.model.threads`). With several rows, the
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
    cut = _Cut()  # per thread: positions from cut.value on carry no gradient
    workers = _backward_workers(model, points, n_rows)
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
            groups = _row_groups(rows, workers)
            if len(groups) == 1:
                _backwards(outs, e, m, acc, groups[0], prefixes, cut, free=True)
            else:  # each group's backwards in its own thread through the shared graph
                parallel(
                    [
                        partial(_backwards, outs, e, m, acc, g, prefixes, cut, free=False)
                        for g in groups
                    ]
                )
        values.append(torch.stack([o.detach() for o in outs], 1))
    assert acc is not None
    return acc, torch.cat(values, 0)
