"""Targets: what scalar per example an attribution explains.

A target is bound to a model with :func:`resolve`, may extend the inputs
(:meth:`Target.prepare`, e.g. to append a continuation), and maps logits to
one value per example (:meth:`Target.__call__`). Inputs are left-padded, so
the next-token prediction of every row is at position ``-1``.

Shorthands accepted wherever a target is expected:

==================================  ==========================================
``" Mary"`` or a token id           :class:`Logit` of that token
``(" Mary", " John")``              :class:`LogitDiff` (first minus second)
``None``                            :class:`Logit` of the model's top prediction
a callable ``f(logits, batch)``     :class:`FnTarget`
==================================  ==========================================

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> t = al.targets.resolve((" Mary", " John"), lm)
    >>> batch = t.prepare(lm, lm.tokenize("When Mary and John went"))
    >>> logits, _ = lm.run(batch)
    >>> t(logits, batch).shape
    torch.Size([1])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor

from .errors import EmptyPromptError, InputError, NonFiniteError

if TYPE_CHECKING:
    from .model.wrapper import LM, Batch

TokenSpec = Union[str, int, Sequence[str | int]]


class Target:
    """Base class. Subclasses implement :meth:`value` and :meth:`describe`."""

    #: True when the target is defined at the last position only
    next_token: bool = True

    def bind(self, lm: LM) -> Target:
        """Resolve token strings to ids for ``lm``; returns self."""
        return self

    def prepare(self, lm: LM, batch: Batch) -> Batch:
        """Inputs the target needs (default: unchanged)."""
        return batch

    def __call__(self, logits: Tensor, batch: Batch) -> Tensor:
        """``[batch]`` target values from logits ``[batch, pos, vocab]``.

        Raises:
            NonFiniteError: a value is NaN or infinite (naming the target), so
                that no method ranks or integrates a non-finite number.
        """
        out = self.value(logits, batch)
        check_finite_values(self, out)
        return out

    def value(self, logits: Tensor, batch: Batch) -> Tensor:
        raise NotImplementedError

    def logit_columns(self) -> Tensor | None:
        """The vocabulary columns :meth:`value` reads, or None when it reads the
        whole distribution (a softmax). Runs may then compute only these logits
        (``lm.run(logit_columns=...)``); the others are zero there.

        Example:
            >>> import attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
            >>> t = LogitDiff(5, 7).bind(lm)
            >>> t.logit_columns().tolist(), LogProb(5).bind(lm).logit_columns()
            ([5, 7], None)
        """
        return None

    def describe(self) -> str:
        return type(self).__name__

    def to_json(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, "description": self.describe()}

    def __repr__(self) -> str:
        return self.describe()


def check_finite_values(target: Target, values: Tensor) -> None:
    """Raise :class:`NonFiniteError` naming ``target`` if ``values`` has a NaN or inf.

    Example:
        >>> import torch
        >>> try:
        ...     check_finite_values(FnTarget(lambda l, b: l, "f"), torch.tensor([1.0, float("nan")]))
        ... except NonFiniteError as e:
        ...     print(str(e).split(":")[0])
        the target fn(f) evaluated to nan for row(s) [1]
    """
    if not values.is_floating_point() and not values.is_complex():
        return
    v = values.detach()
    ok = torch.isfinite(v)
    if bool(ok.all()):
        return
    bad = (~ok).reshape(v.shape[0], -1).any(-1).nonzero()[:, 0].tolist() if v.dim() else [0]
    first = v[~ok].reshape(-1)[0].item()
    raise NonFiniteError(
        f"the target {target.describe()} evaluated to {first} for row(s) {bad[:8]}: "
        "attrlab cannot attribute or rank a NaN or infinite value. Check the target "
        "(a callable must return finite numbers), the baseline and the model's outputs"
    )


def upcast(x: Tensor) -> Tensor:
    """At least float32 for softmax-type reductions; float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def _ids(lm: LM, spec: TokenSpec) -> Tensor | int:
    if isinstance(spec, (str, int)):
        return lm.token_id(spec)
    return torch.tensor([lm.token_id(s) for s in spec], dtype=torch.long)


def _gather_last(values: Tensor, ids: Tensor | int) -> Tensor:
    """``values[:, -1, ids]`` with one id for all rows or one id per row."""
    last = values[:, -1]
    if isinstance(ids, int):
        return last[:, ids]
    ids = ids.to(last.device)
    if ids.numel() != last.shape[0]:
        if last.shape[0] % ids.numel():
            raise InputError(f"{ids.numel()} target tokens for a batch of {last.shape[0]} prompts")
        # a batch of repeated prompt variants: ids repeat per original prompt
        ids = ids.repeat_interleave(last.shape[0] // ids.numel())
    return last.gather(-1, ids[:, None])[:, 0]


class _TokenTarget(Target):
    def __init__(self, token: TokenSpec):
        self.token = token
        self.ids: Tensor | int | None = None

    def bind(self, lm: LM) -> Target:
        self.ids = _ids(lm, self.token)
        self._text = self.token if isinstance(self.token, str) else None
        return self

    def _require(self) -> Tensor | int:
        if self.ids is None:
            raise InputError(f"{type(self).__name__} is not bound to a model; use targets.resolve")
        return self.ids

    def describe(self) -> str:
        return f"{type(self).__name__.lower()}({self.token!r})"


class Logit(_TokenTarget):
    """The logit of ``token`` at the last position (one token, or one per prompt)."""

    def value(self, logits: Tensor, batch: Batch) -> Tensor:
        return _gather_last(logits, self._require())

    def logit_columns(self) -> Tensor | None:
        if self.ids is None:
            return None
        return torch.as_tensor(self.ids, dtype=torch.long).reshape(-1).unique()


class LogProb(_TokenTarget):
    """The log-probability of ``token`` at the last position."""

    def value(self, logits: Tensor, batch: Batch) -> Tensor:
        return _gather_last(upcast(logits).log_softmax(-1), self._require())


class Prob(_TokenTarget):
    """The probability of ``token`` at the last position."""

    def value(self, logits: Tensor, batch: Batch) -> Tensor:
        return _gather_last(upcast(logits).softmax(-1), self._require())


class LogitDiff(Target):
    """``logit(a) - logit(b)`` at the last position (e.g. correct minus wrong answer)."""

    def __init__(self, a: TokenSpec, b: TokenSpec):
        self.a, self.b = Logit(a), Logit(b)

    def bind(self, lm: LM) -> Target:
        self.a.bind(lm)
        self.b.bind(lm)
        return self

    def value(self, logits: Tensor, batch: Batch) -> Tensor:
        return self.a.value(logits, batch) - self.b.value(logits, batch)

    def logit_columns(self) -> Tensor | None:
        a, b = self.a.logit_columns(), self.b.logit_columns()
        return None if a is None or b is None else torch.cat([a, b]).unique()

    def describe(self) -> str:
        return f"logit_diff({self.a.token!r}, {self.b.token!r})"


class ContinuationLogProb(Target):
    """Log-probability of a given continuation (several tokens) after the prompt.

    :meth:`prepare` appends the continuation to every prompt. With
    ``reduce="sum"`` the value is the total log-probability ``[batch]``; with
    ``reduce="none"`` it is one value per continuation token ``[batch, n]``.
    """

    next_token = False

    def __init__(self, continuation: str | Sequence[int], reduce: str = "sum"):
        if reduce not in ("sum", "mean", "none"):
            raise InputError("reduce must be 'sum', 'mean' or 'none'")
        self.continuation = continuation
        self.reduce = reduce
        self.ids: list[int] | None = None

    def bind(self, lm: LM) -> Target:
        if isinstance(self.continuation, str):
            ids = lm.encode(self.continuation)
        else:
            ids = [lm.token_id(i) for i in self.continuation]
        if not ids:
            raise EmptyPromptError("the continuation is empty")
        self.ids = ids
        return self

    def prepare(self, lm: LM, batch: Batch) -> Batch:
        from .model.wrapper import Batch as B

        assert self.ids is not None
        n = len(self.ids)
        cont = torch.tensor(self.ids, device=batch.input_ids.device).expand(batch.shape[0], n)
        ids = torch.cat([batch.input_ids, cont], 1)
        mask = torch.cat([batch.attention_mask, torch.ones_like(cont)], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return B(ids, mask, pos)

    @property
    def n_tokens(self) -> int:
        assert self.ids is not None
        return len(self.ids)

    def value(self, logits: Tensor, batch: Batch) -> Tensor:
        n = self.n_tokens
        logp = upcast(logits[:, -n - 1 : -1]).log_softmax(-1)
        ids = batch.input_ids[:, -n:].to(logp.device)
        per_token = logp.gather(-1, ids[..., None])[..., 0]  # [batch, n]
        if self.reduce == "none":
            return per_token
        return per_token.sum(-1) if self.reduce == "sum" else per_token.mean(-1)

    def describe(self) -> str:
        return f"continuation_logprob({self.continuation!r}, reduce={self.reduce!r})"


class KL(Target):
    """``KL(p_clean || p)`` of the next-token distribution, where ``p_clean`` is the
    unmodified model on the same inputs (computed in :meth:`prepare`)."""

    def __init__(self, reference_logits: Tensor | None = None):
        self.reference = reference_logits

    def prepare(self, lm: LM, batch: Batch) -> Batch:
        if self.reference is None:
            logits, _ = lm.run(batch, last_only=True)
            self.reference = logits[:, -1].detach()
        return batch

    def value(self, logits: Tensor, batch: Batch) -> Tensor:
        if self.reference is None:
            raise InputError("KL target needs prepare() (or reference_logits) first")
        ref = upcast(self.reference.to(logits.device)).log_softmax(-1)
        if ref.shape[0] != logits.shape[0]:
            ref = ref.repeat_interleave(logits.shape[0] // ref.shape[0], 0)
        cur = upcast(logits[:, -1]).log_softmax(-1)
        return (ref.exp() * (ref - cur)).sum(-1)

    def describe(self) -> str:
        return "kl_to_clean"


class FnTarget(Target):
    """A user callable ``fn(logits [batch, pos, vocab], batch) -> [batch]``."""

    def __init__(self, fn: Callable[[Tensor, Any], Tensor], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "fn")

    def value(self, logits: Tensor, batch: Batch) -> Tensor:
        out = self.fn(logits, batch)
        if not isinstance(out, Tensor) or out.dim() != 1:
            raise InputError(
                f"the target callable {self.name!r} must return a 1-D tensor, one value per "
                f"prompt; got {type(out).__name__}"
                + (f" of shape {tuple(out.shape)}" if isinstance(out, Tensor) else "")
            )
        if out.shape[0] != logits.shape[0]:
            raise InputError(
                f"the target callable {self.name!r} returned {out.shape[0]} values for a batch "
                f"of {logits.shape[0]} rows; return one value per row of logits [batch, pos, vocab]"
            )
        return out

    def describe(self) -> str:
        return f"fn({self.name})"


class TopToken(Logit):
    """The logit of the model's top prediction on the clean inputs (per prompt)."""

    def __init__(self) -> None:
        super().__init__(token=0)

    def bind(self, lm: LM) -> Target:
        return self

    def prepare(self, lm: LM, batch: Batch) -> Batch:
        logits, _ = lm.run(batch, last_only=True)
        self.ids = logits[:, -1].argmax(-1).cpu()
        if lm.tokenizer is not None:
            self.token = lm.to_str_tokens(self.ids)
        return batch

    def describe(self) -> str:
        return f"logit(top={self.token!r})"


def resolve(spec: Any, lm: LM) -> Target:
    """Turn a target shorthand into a bound :class:`Target` (see module docs).

    Raises:
        MultiTokenTargetError: a single-token target given several tokens of text.
        InputError: a spec attrlab cannot read.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> al.targets.resolve(" Mary", lm).describe()
        "logit(' Mary')"
    """
    if isinstance(spec, Target):
        return spec.bind(lm)
    if spec is None:
        return TopToken()
    if isinstance(spec, (str, int)) and not isinstance(spec, bool):
        return Logit(spec).bind(lm)
    if isinstance(spec, tuple) and len(spec) == 2:
        return LogitDiff(spec[0], spec[1]).bind(lm)
    if isinstance(spec, list) and all(isinstance(s, (str, int)) for s in spec):
        return Logit(spec).bind(lm)
    if callable(spec):
        return FnTarget(spec)
    raise InputError(
        f"cannot read target {spec!r}: give a token (' Mary'), a pair for a logit "
        "difference ((' Mary', ' John')), an al.targets.Target, or a callable"
    )
