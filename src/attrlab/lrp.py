"""Layer-wise relevance propagation for transformers, as a modified backward.

Relevance is propagated by the model's own forward with a changed backward:
while :func:`propagation` is active, some module forwards are swapped (under
the model's lock, as the gradient speed-ups do) for wrappers that compute the
same values but record autograd nodes whose backward follows an LRP rule. The
relevance of any activation ``a`` is then ``a * grad(a)`` ("gradient x input"
framework: every rule below is written so that this product is the rule's
relevance), so the relevance of the input tokens is ``x . grad`` at the
embeddings, and attribution patching with these gradients is RelP.

*What* gets which rule is data: a :class:`Composite` maps the op kinds of a
transformer to rules (Zennit's idea). *Where* the op kinds are (which modules
are norms, attention, MLPs, position embeddings) comes from the model's adapter
(:meth:`attrlab.model.adapters.base.Adapter.relevance_roles`). Rules act on ops
inside those modules through a ``TorchFunctionMode`` scoped to the module's
call, so no model forward is copied.

The rules of AttnLRP (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise
Relevance Propagation for Transformers", ICML 2024), the default:

====================  =================  ===============================================
op kind               rule               backward
====================  =================  ===============================================
linear layers         ``Epsilon(0)``     the plain gradient (eps > 0: scaled by z/(z+eps))
normalisation         ``Identity()``     the scale (1/std, 1/rms) held constant
elementwise act.      ``Identity()``     relevance passes unchanged: grad * act(x) / x
softmax               ``Gradient()``     gradient x input (the paper's softmax rule)
attention matmuls     ``Uniform()``      each of the two factors gets half
gated products        ``Uniform()``      act(gate) * up: each factor gets half
MoE routing weights   held constant      a mixture of experts' routing weights (and a
                                         shared expert's gate) get no relevance: the
                                         experts' outputs carry it all
====================  =================  ===============================================

``CP_LRP`` (Ali et al., "XAI for Transformers: Better Explanations through
Conservative Propagation") differs in one entry: ``softmax=Stop()``, no
relevance through the attention weights.

Where this deviates from the paper: linear layers use ``eps = 0`` by default
(the paper's experiments use a small epsilon only for stability; ``lxt``, the
reference implementation, does the same); the identity rule's ratio
``act(x) / x`` is taken as 0 where ``x == 0`` (``lxt`` divides by
``x + 1e-10``: equal to float round-off); with ``attn_implementation="sdpa"``
the attention rules act at the inputs of the fused call (q, k: 1/4, v: 1/2, as
``lxt`` does), which is exact, but the softmax's share cannot be reported.

Conservation. Relevance is conserved by every rule except where a term adds a
constant (biases, a learned position embedding), at the softmax (whose rule
leaks), and at the target when it is not linear in the logits (a log-prob).
With a :class:`Ledger`, :func:`propagation` records each of these shares per
target row, so that ``target = sum(input relevance) + bias + position +
softmax + output`` up to float round-off (tested on every family).

Example:
    >>> import torch, attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> ledger = Ledger()
    >>> with propagation(lm, ATTNLRP, ledger):
    ...     e = lm.model.transformer.wte(ids).detach().requires_grad_(True)
    ...     logit = lm.model(inputs_embeds=e).logits[0, -1, 5]
    ...     (g,) = torch.autograd.grad(logit, e)
    >>> r = float((e * g).sum().detach())
    >>> ledger.close_rows([float(logit.detach())], inputs=[r])
    >>> abs(r + ledger.rows[0].total() - float(logit.detach())) < 1e-4
    True
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from .errors import InputError
from .model.offload import materialised
from .model.swap import RULE_MARK, elementwise_types, swapped_forwards

__all__ = [
    "Rule",
    "Gradient",
    "Epsilon",
    "Identity",
    "Uniform",
    "Stop",
    "Composite",
    "ATTNLRP",
    "CP_LRP",
    "GRADIENT",
    "Ledger",
    "propagation",
    "resolve_composite",
]


# ------------------------------------------------------------------ the rules
@dataclass(frozen=True)
class Rule:
    """A relevance rule (data). Which op kinds accept which rule is checked by
    :class:`Composite`."""

    name = "rule"


@dataclass(frozen=True)
class Gradient(Rule):
    """The plain gradient: gradient x input at the op's input (the softmax rule of
    AttnLRP; for a linear layer, the epsilon rule with ``eps = 0``).

    Example:
        >>> Gradient().name
        'gradient'
    """

    name = "gradient"


@dataclass(frozen=True)
class Epsilon(Rule):
    """Epsilon rule for linear layers: ``R_in = x W (R_out / (z + eps sign(z)))``.

    Example:
        >>> Epsilon(1e-6).eps
        1e-06
    """

    eps: float = 0.0
    name = "epsilon"

    def __post_init__(self) -> None:
        if not isinstance(self.eps, (int, float)) or not self.eps >= 0:
            raise InputError(f"Epsilon(eps=...) must be a number >= 0, got {self.eps!r}")


@dataclass(frozen=True)
class Identity(Rule):
    """Identity rule: relevance passes unchanged (elementwise activations), or the
    normaliser is held constant (norms: the op is then linear).

    Example:
        >>> Identity().name
        'identity'
    """

    name = "identity"


@dataclass(frozen=True)
class Uniform(Rule):
    """Uniform rule for a product of ``k`` factors that all carry relevance: each
    factor gets ``1/k`` of it (the two attention matmuls, gated MLP products).

    Example:
        >>> Uniform().name
        'uniform'
    """

    name = "uniform"


@dataclass(frozen=True)
class Stop(Rule):
    """No relevance flows through the op (CP-LRP's softmax).

    Example:
        >>> Stop().name
        'stop'
    """

    name = "stop"


_ALLOWED: dict[str, tuple[type[Rule], ...]] = {
    "linear": (Epsilon, Gradient),
    "norm": (Identity, Gradient),
    "activation": (Identity, Gradient),
    "softmax": (Gradient, Stop),
    "attention_matmul": (Uniform, Gradient),
    "gated_product": (Uniform, Gradient),
}


@dataclass(frozen=True)
class Composite:
    """Which rule each op kind of a transformer gets (data, not code).

    Example:
        >>> c = Composite(softmax=Stop())
        >>> c.softmax.name, c.norm.name
        ('stop', 'identity')
        >>> Composite(norm=Stop())
        Traceback (most recent call last):
        ...
        attrlab.errors.InputError: norm takes Identity or Gradient rules, not Stop()
    """

    linear: Rule = field(default_factory=Epsilon)
    norm: Rule = field(default_factory=Identity)
    activation: Rule = field(default_factory=Identity)
    softmax: Rule = field(default_factory=Gradient)
    attention_matmul: Rule = field(default_factory=Uniform)
    gated_product: Rule = field(default_factory=Uniform)

    def __post_init__(self) -> None:
        for f in fields(self):
            rule = getattr(self, f.name)
            ok = _ALLOWED[f.name]
            if not isinstance(rule, ok):
                names = " or ".join(t.__name__ for t in ok)
                raise InputError(f"{f.name} takes {names} rules, not {rule!r}")

    @property
    def is_gradient(self) -> bool:
        """True if every rule is the plain gradient (nothing to swap)."""
        lin = self.linear
        plain_linear = isinstance(lin, Gradient) or (isinstance(lin, Epsilon) and lin.eps == 0)
        others = (self.norm, self.activation, self.softmax, self.attention_matmul,
                  self.gated_product)  # fmt: skip
        return plain_linear and all(isinstance(r, Gradient) for r in others)

    def describe(self) -> dict[str, str]:
        """``{op kind: rule}`` as strings, for a result's parameters.

        Example:
            >>> CP_LRP.describe()["softmax"]
            'stop'
        """
        out = {}
        for f in fields(self):
            rule = getattr(self, f.name)
            out[f.name] = f"epsilon({rule.eps:g})" if isinstance(rule, Epsilon) else rule.name
        return out


#: AttnLRP (the default)
ATTNLRP = Composite()
#: CP-LRP: AttnLRP with no relevance through the attention weights
CP_LRP = Composite(softmax=Stop())
#: every rule the plain gradient: relevance = input x gradient
GRADIENT = Composite(
    linear=Gradient(), norm=Gradient(), activation=Gradient(), softmax=Gradient(),
    attention_matmul=Gradient(), gated_product=Gradient(),
)  # fmt: skip

_NAMED = {"attnlrp": ATTNLRP, "cp-lrp": CP_LRP, "gradient": GRADIENT}


def resolve_composite(c: Any) -> Composite:
    """A :class:`Composite` from itself or a name (``"attnlrp"``, ``"cp-lrp"``,
    ``"gradient"``).

    Example:
        >>> resolve_composite("cp-lrp") == CP_LRP
        True
    """
    if isinstance(c, Composite):
        return c
    if isinstance(c, str) and c.lower() in _NAMED:
        return _NAMED[c.lower()]
    raise InputError(f"rules must be a Composite or one of {', '.join(_NAMED)}; got {c!r}")


# ------------------------------------------------------------------ the ledger
class Shares(dict):  # type: ignore[type-arg]
    """Relevance absorbed outside the inputs during one backward, by source
    (``bias``, ``position``, ``softmax``, ``output``), and two reference points:
    ``logits`` (the relevance that entered at the logits) and ``embedding`` (the
    relevance that reached the first block's input: token plus position
    embeddings)."""

    REFERENCES = ("logits", "embedding")

    def total(self) -> float:
        """The absorbed shares summed (the reference points excluded)."""
        return float(sum(v for k, v in self.items() if k not in self.REFERENCES))


class Ledger:
    """Where relevance went, one :class:`Shares` per backward (per target row).

    A backward starts at the logits: the unembedding's node opens a new row.
    ``output`` is filled in by :meth:`close_row` with the target value (the
    target minus the relevance at the logits: nonzero for targets that are not
    linear in the logits, e.g. a log-prob).

    Example:
        >>> led = Ledger(); led.add("bias", 0.5, new_row=True); led.rows[0]["bias"]
        0.5
    """

    def __init__(self) -> None:
        self.rows: list[Shares] = []
        self._lock = threading.Lock()

    def add(self, key: str, value: float, new_row: bool = False) -> None:
        with self._lock:
            if new_row or not self.rows:
                self.rows.append(Shares(bias=0.0, position=0.0, softmax=0.0, output=0.0))
            row = self.rows[-1]
            row[key] = row.get(key, 0.0) + value

    def close_rows(self, values: list[float], inputs: list[float] | None = None) -> None:
        """Set ``output = value - logits`` for each row, given the target values,
        and, given each row's total input relevance (token embeddings, zero
        baseline) and a learned position embedding in the model,
        ``position = embedding - inputs``."""
        for r, (row, v) in enumerate(zip(self.rows, values)):
            row["output"] = v - row.get("logits", 0.0)
            if inputs is not None and self.has_position:
                row["position"] = row.get("embedding", 0.0) - inputs[r]

    #: whether the model adds a learned position embedding (set by :func:`propagation`)
    has_position = False
    #: set when a fused attention call hid the softmax (its share is then unrecorded)
    softmax_unrecorded = False


# ------------------------------------------------------------ autograd nodes
class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: Any) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        return g * ctx.factor, None


def _scale(x: Tensor, factor: Any) -> Tensor:
    out: Tensor = _ScaleGrad.apply(x, factor)
    return out


class _Record(torch.autograd.Function):
    """Identity forward; the backward adds ``sum(weight * grad)`` to a ledger
    (``weight``: the activation itself, or a bias broadcast over it)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, ledger: Ledger, key: str, new: bool) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.ledger, ctx.key, ctx.new = ledger, key, new
        return x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None, None]:
        (w,) = ctx.saved_tensors
        ctx.ledger.add(ctx.key, float((g.double() * w.double()).sum()), new_row=ctx.new)
        return g, None, None, None, None


def _record(x: Tensor, weight: Tensor, ledger: Ledger, key: str, new: bool = False) -> Tensor:
    out: Tensor = _Record.apply(x, weight.detach(), ledger, key, new)
    return out


class _IdentityAct(torch.autograd.Function):
    """``y = fn(x)`` elementwise; backward ``grad * y / x`` (0 where ``x == 0``),
    so that ``x * grad_x = y * grad_y``: the relevance passes unchanged."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        y = fn(x)
        ratio = torch.where(x == 0, torch.zeros_like(y), y / torch.where(x == 0, 1, x))
        ctx.save_for_backward(ratio)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        (ratio,) = ctx.saved_tensors
        return g * ratio, None


class _FrozenLayerNorm(torch.autograd.Function):
    """``F.layer_norm`` with the 1/std held constant in the backward:
    ``grad_x = center(grad * w) / std``; the bias's share goes to the ledger."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, shape: Any, w: Tensor | None, b: Tensor | None, eps: float,
        ledger: Ledger | None,
    ) -> Tensor:  # fmt: skip
        dims = tuple(range(-len(shape), 0))
        xc = x.to(torch.promote_types(x.dtype, torch.float32))
        inv = torch.rsqrt(xc.var(dims, unbiased=False, keepdim=True) + eps)
        ctx.save_for_backward(inv, w, b)
        ctx.dims, ctx.ledger = dims, ledger
        return F.layer_norm(x, shape, w, b, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        inv, w, b = ctx.saved_tensors
        if ctx.ledger is not None and b is not None:
            ctx.ledger.add("bias", float((g.double() * b.double()).sum()))
        gc = g.to(inv.dtype)
        gw = gc * w.to(inv.dtype) if w is not None else gc
        gx = (gw - gw.mean(ctx.dims, keepdim=True)) * inv
        return gx.to(g.dtype), None, None, None, None, None


class _FrozenRMSNorm(torch.autograd.Function):
    """``F.rms_norm`` with 1/rms held constant: ``grad_x = grad * w / rms``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, shape: Any, w: Tensor | None, eps: float | None) -> Tensor:
        dims = tuple(range(-len(shape), 0))
        e = torch.finfo(x.dtype).eps if eps is None else eps
        xc = x.to(torch.promote_types(x.dtype, torch.float32))
        inv = torch.rsqrt(xc.pow(2).mean(dims, keepdim=True) + e)
        ctx.save_for_backward(inv, w)
        return F.rms_norm(x, shape, w, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        inv, w = ctx.saved_tensors
        gc = g.to(inv.dtype)
        gx = (gc * w.to(inv.dtype) if w is not None else gc) * inv
        return gx.to(g.dtype), None, None, None


class _LeakySoftmax(torch.autograd.Function):
    """``softmax`` with its plain backward (AttnLRP's softmax rule in the
    gradient x input framework), recording the relevance it does not pass on:
    ``sum(s * g) - sum(x * grad_x)`` (masked entries, where ``s == 0``, excluded)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, dtype: Any, ledger: Ledger) -> Tensor:
        s = F.softmax(x, dim=dim, dtype=dtype)
        ctx.save_for_backward(x, s)
        ctx.dim, ctx.ledger = dim, ledger
        return s

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, s = ctx.saved_tensors
        sg = s * g
        gx = sg - s * sg.sum(ctx.dim, keepdim=True)
        live = s > 0
        r_in = torch.where(live, x.double() * gx.double(), 0).sum()
        ctx.ledger.add("softmax", float(sg.double().sum() - r_in))
        return gx.to(x.dtype), None, None, None


# ------------------------------------------------------------ op-level modes
_MATMULS = {torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm}
_SOFTMAXES = {F.softmax, torch.softmax, Tensor.softmax}
_DETACH_IN_NORM = {torch.rsqrt, Tensor.rsqrt, torch.sqrt, Tensor.sqrt, torch.std, Tensor.std,
                   torch.var, Tensor.var}  # fmt: skip
_TANH = {torch.tanh, Tensor.tanh}
_MULS = {torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__}
_ADDS = {torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__}
_BADDBMMS = {torch.baddbmm, Tensor.baddbmm}


def _score_bias(bias: Tensor) -> Tensor:
    """A constant added to attention scores (an ALiBi bias, a mask), its mask
    entries (``-inf`` or the dtype's minimum: probability 0) counted as 0."""
    floor = torch.finfo(bias.dtype).min / 2
    return torch.where(bias > floor, bias, torch.zeros_like(bias))


def _live(*ts: Any) -> list[bool]:
    """Which of ``ts`` are activations in the graph: tensors that require grad
    and are not a weight (a parameter or a view of one, such as the ``W.T`` of
    a linear map written as ``x @ W.T``, Falcon's ``FalconLinear``)."""
    return [isinstance(t, Tensor) and t.requires_grad and not _is_weight(t) for t in ts]


def _is_weight(t: Tensor) -> bool:
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)


class _AttentionMode(TorchFunctionMode):
    """Inside an attention module's call: the uniform rule on the two matmuls
    (and on a fused ``scaled_dot_product_attention``), the softmax rule, and the
    activation rule on a score soft-cap's ``tanh``."""

    def __init__(self, c: Composite, ledger: Ledger | None):
        super().__init__()
        self.c, self.ledger = c, ledger

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        uniform = isinstance(self.c.attention_matmul, Uniform)
        if func in _MATMULS and len(args) >= 2 and uniform and all(_live(args[0], args[1])):
            args = (_scale(args[0], 0.5), _scale(args[1], 0.5), *args[2:])
        elif func in _SOFTMAXES and args and isinstance(args[0], Tensor):
            if isinstance(self.c.softmax, Stop):
                return func(*args, **kwargs).detach()
            if self.ledger is not None and args[0].requires_grad:
                x = args[0]
                dim = kwargs.get("dim", args[1] if len(args) > 1 else -1)
                dtype = kwargs.get("dtype")
                at = 3 if func is F.softmax else 2  # F.softmax(input, dim, _stacklevel, dtype)
                if dtype is None and len(args) > at:
                    dtype = args[at]
                return _LeakySoftmax.apply(x, dim, dtype, self.ledger)
        elif func in _BADDBMMS:
            # input + alpha * batch1 @ batch2 (BLOOM: ALiBi bias + scaled q . k): the
            # uniform rule on the product, the constant input's share as position
            a = list(args)
            for name in ("batch1", "batch2"):
                if name in kwargs:
                    a.append(kwargs.pop(name))
            if len(a) == 3:
                inp, b1, b2 = a
                if uniform and all(_live(b1, b2)):
                    b1, b2 = _scale(b1, 0.5), _scale(b2, 0.5)
                out = func(inp, b1, b2, **kwargs)
                if self.ledger is not None and isinstance(inp, Tensor) and not _live(inp)[0]:
                    bias = _score_bias(inp * kwargs.get("beta", 1))
                    out = _record(out, bias, self.ledger, "position")
                return out
            args = tuple(a)
        elif (
            func in _ADDS
            and self.ledger is not None
            and len(args) == 2
            and all(isinstance(t, Tensor) and t.is_floating_point() for t in args)
            and sum(_live(*args)) == 1
            and not any(_is_weight(t) for t in args)
            and "alpha" not in kwargs
        ):
            # a constant added to live scores (an ALiBi bias folded into the mask,
            # Falcon-RW): its share of the relevance is a position share
            bias = args[1] if _live(*args)[0] else args[0]
            return _record(func(*args, **kwargs), _score_bias(bias), self.ledger, "position")
        elif func in _TANH and args and isinstance(args[0], Tensor) and args[0].requires_grad:
            # an elementwise nonlinearity (Gemma 2's score soft-cap): identity rule
            if isinstance(self.c.activation, Identity):
                return _IdentityAct.apply(args[0], torch.tanh)
        elif func is F.scaled_dot_product_attention and len(args) >= 3:
            q, k, v = args[:3]
            if self.ledger is not None:
                self.ledger.softmax_unrecorded = True
            if isinstance(self.c.softmax, Stop):
                q, k = q.detach(), k.detach()
            elif uniform and all(_live(q, k, v)):
                q, k, v = _scale(q, 0.25), _scale(k, 0.25), _scale(v, 0.5)
            args = (q, k, v, *args[3:])
        return func(*args, **kwargs)


class _NormMode(TorchFunctionMode):
    """Inside a norm module's call: the normaliser (1/std, 1/rms) held constant."""

    def __init__(self, ledger: Ledger | None):
        super().__init__()
        self.ledger = ledger

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        if func is F.layer_norm:
            x, shape, *rest = args
            w = kwargs.get("weight", rest[0] if len(rest) > 0 else None)
            b = kwargs.get("bias", rest[1] if len(rest) > 1 else None)
            eps = kwargs.get("eps", rest[2] if len(rest) > 2 else 1e-5)
            return _FrozenLayerNorm.apply(x, tuple(shape), w, b, eps, self.ledger)
        if func is getattr(F, "rms_norm", None):
            x, shape, *rest = args
            w = kwargs.get("weight", rest[0] if len(rest) > 0 else None)
            eps = kwargs.get("eps", rest[1] if len(rest) > 1 else None)
            return _FrozenRMSNorm.apply(x, tuple(shape), w, eps)
        out = func(*args, **kwargs)
        if func in _DETACH_IN_NORM and isinstance(out, Tensor):
            return out.detach()
        return out


class _MLPMode(TorchFunctionMode):
    """Inside an MLP's call: the uniform rule on a product one of whose factors
    is an elementwise activation's output (a gated MLP's ``act(gate) * up``)."""

    def __init__(self, acts: list[Tensor]):
        super().__init__()
        self.acts = acts  # outputs of this call's activations

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _MULS and len(args) == 2 and torch.is_grad_enabled() and all(_live(*args)):
            a, b = args
            if any(t is a or t is b for t in self.acts):
                args = (_scale(a, 0.5), _scale(b, 0.5))
        return func(*args, **kwargs)


# ------------------------------------------------------------- the swaps
def _mark(fn: Callable[..., Any]) -> Callable[..., Any]:
    setattr(fn, RULE_MARK, True)
    return fn


def _in_mode(orig: Callable[..., Any], make_mode: Callable[[], TorchFunctionMode], owner: int):
    def forward(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != owner or not torch.is_grad_enabled():
            return orig(*args, **kwargs)
        with make_mode():
            return orig(*args, **kwargs)

    return _mark(forward)


def _act_forward(orig: Callable[..., Tensor], sink: list[list[Tensor]], owner: int):
    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if (
            args
            or kwargs
            or threading.get_ident() != owner
            or not (torch.is_grad_enabled() and x.requires_grad)
        ):
            return orig(x, *args, **kwargs)
        y: Tensor = _IdentityAct.apply(x, orig)
        if sink:
            sink[-1].append(y)
        return y

    return _mark(forward)


def _mlp_forward(orig: Callable[..., Any], sink: list[list[Tensor]], gated: bool, owner: int):
    def forward(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != owner or not torch.is_grad_enabled():
            return orig(*args, **kwargs)
        sink.append([])
        try:
            if not gated:
                return orig(*args, **kwargs)
            with _MLPMode(sink[-1]):
                return orig(*args, **kwargs)
        finally:
            sink.pop()

    return _mark(forward)


def _linear_forward(module: nn.Module, eps: float, ledger: Ledger | None, owner: int):
    orig = module.forward

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out: Tensor = orig(x, *args, **kwargs)
        if threading.get_ident() != owner or not (torch.is_grad_enabled() and out.requires_grad):
            return out
        # read per call: an offloaded module's bias is real only inside its forward
        bias = materialised(module, "bias") if ledger is not None else None
        if ledger is not None and isinstance(bias, Tensor):
            out = _record(out, bias, ledger, "bias")
        if eps > 0:
            z = out.detach()
            sign = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
            out = _scale(out, z / (z + eps * sign))
        return out

    return _mark(forward)


def _output_forward(orig: Callable[..., Tensor], ledger: Ledger, key: str, owner: int):
    """Record ``sum(out * grad)`` of a module's output under ``key`` (the
    unembedding opens a new ledger row: each backward starts there)."""

    def forward(*args: Any, **kwargs: Any) -> Tensor:
        out: Tensor = orig(*args, **kwargs)
        if threading.get_ident() != owner or not (torch.is_grad_enabled() and out.requires_grad):
            return out
        return _record(out, out, ledger, key, new=key == "logits")

    return _mark(forward)


def _input_forward(orig: Callable[..., Any], ledger: Ledger, owner: int):
    """Record ``sum(h * grad)`` of the first block's input ``h`` as ``embedding``."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        key = "hidden_states" if "hidden_states" in kwargs else None
        h = kwargs[key] if key else (args[0] if args else None)
        mine = threading.get_ident() == owner and torch.is_grad_enabled()
        if mine and isinstance(h, Tensor) and h.requires_grad:
            h = _record(h, h, ledger, "embedding")
            if key:
                kwargs[key] = h
            else:
                args = (h, *args[1:])
        return orig(*args, **kwargs)

    return _mark(forward)


def _model_of(lm: Any) -> nn.Module:
    model = getattr(lm, "model", lm)
    if not isinstance(model, nn.Module):
        raise InputError("propagation needs a wrapped model (al.wrap / al.load) or an nn.Module")
    return model


def _router_forward(orig: Callable[..., Any], owner: int):
    """A mixture of experts' router (``(logits, weights, index)``) or a shared
    expert's gate (a tensor) whose weights are held constant in the backward."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = orig(*args, **kwargs)
        if threading.get_ident() != owner or not torch.is_grad_enabled():
            return out
        if isinstance(out, tuple):
            return (out[0], out[1].detach(), *out[2:])
        return out.detach()

    return _mark(forward)


@contextlib.contextmanager
def propagation(lm: Any, composite: Composite | str = ATTNLRP, ledger: Ledger | None = None
                ) -> Iterator[Composite]:  # fmt: skip
    """While active, gradients through ``lm``'s model follow the rules of
    ``composite`` (in the calling thread; values are unchanged): ``x * grad``
    at any activation is its relevance. With a :class:`Ledger`, the relevance
    absorbed by biases, position embeddings, the softmax and the target is
    recorded per backward.

    Holds the model's lock. Needs a wrapped model (its adapter says which
    modules are norms, attention and MLPs).

    Example:
        >>> import torch, attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("llama"))
        >>> with propagation(lm, "cp-lrp"):
        ...     e = lm.model.model.embed_tokens(torch.tensor([[1, 2]])).detach().requires_grad_(True)
        ...     out = lm.model(inputs_embeds=e).logits[0, -1, 3]
        ...     (g,) = torch.autograd.grad(out, e)
        >>> g.shape == e.shape
        True
    """
    c = resolve_composite(composite)
    model = _model_of(lm)
    adapter = getattr(lm, "adapter", None)
    if adapter is None or not hasattr(adapter, "relevance_roles"):
        raise InputError("relevance rules need a wrapped language model (al.wrap / al.load)")
    if c.is_gradient and ledger is None:
        yield c
        return
    roles = adapter.relevance_roles()
    owner = threading.get_ident()
    sink: list[list[Tensor]] = []
    act_types = elementwise_types()
    by_id: dict[int, Callable[[nn.Module], Callable[..., Any] | None]] = {}

    lin = c.linear
    eps = float(lin.eps) if isinstance(lin, Epsilon) else 0.0
    if eps > 0 or ledger is not None:
        for m in roles["linear"]:
            by_id[id(m)] = lambda m: _linear_forward(m, eps, ledger, owner)
    if ledger is not None:
        ledger.has_position = bool(roles["position"])
        by_id[id(roles["first_block"][0])] = lambda m: _input_forward(m.forward, ledger, owner)
        for m in roles["unembed"]:
            inner = by_id.get(id(m))

            def unembed(m: nn.Module, inner: Any = inner) -> Callable[..., Any]:
                fwd = inner(m) if inner is not None else m.forward
                return _output_forward(fwd, ledger, "logits", owner)

            by_id[id(m)] = unembed
    if isinstance(c.norm, Identity):
        for m in roles["norm"]:
            by_id[id(m)] = lambda m: _in_mode(m.forward, lambda: _NormMode(ledger), owner)
    needs_attention = not (
        isinstance(c.attention_matmul, Gradient) and isinstance(c.softmax, Gradient)
    )
    if needs_attention or ledger is not None:
        for m in roles["attention"]:
            by_id[id(m)] = lambda m: _in_mode(m.forward, lambda: _AttentionMode(c, ledger), owner)
    gated = isinstance(c.gated_product, Uniform)
    for m in roles["mlp"]:
        by_id[id(m)] = lambda m: _mlp_forward(m.forward, sink, gated, owner)
    for m in roles.get("router", []):  # mixture-of-experts routing: constant weights
        by_id[id(m)] = lambda m: _router_forward(m.forward, owner)
    identity_act = isinstance(c.activation, Identity)
    # elementwise activations an adapter names beyond the known types (BLOOM's GELU)
    extra_acts = {id(m) for m in roles.get("activation", [])}

    def wrap(m: nn.Module) -> Callable[..., Any] | None:
        make = by_id.get(id(m))
        if make is not None:
            return make(m)
        is_act = isinstance(m, act_types) or id(m) in extra_acts
        if identity_act and is_act and not any(True for _ in m.parameters(False)):
            return _act_forward(m.forward, sink, owner)
        return None

    with swapped_forwards(model, wrap):
        yield c
