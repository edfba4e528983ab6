"""Unit kinds: what an attribution assigns scores to, and the contract every
method sits on.

A unit kind is a small object (``al.units.Heads(layers=[9, 10])``) or its
string name (``"heads"``). Binding it to a question —
``units.bind(lm, inputs, target, ablation)`` — gives a :class:`Bound`:

* ``n`` units and their ``labels()`` (one labelling path per kind);
* ``f(keep [m, n] bool) -> [m, rows]``: the target with only the kept units
  (the others ablated), exact, many masks per forward;
* ``f_gated(g [m, n] float) -> [m, rows]`` (kinds that ``provide`` ``"gates"``)
  with ``unit = ablated + g * (actual - ablated)``, computed as
  ``g * actual + (1 - g) * ablated`` so that ``f_gated(keep.float())`` equals
  ``f(keep)`` and gradients with respect to ``g`` exist;
* ``result(scores, method, ...)``: the one place an
  :class:`~attrlab.result.Attribution` is built.

Estimators (:mod:`attrlab.methods`) are written once against this contract;
which estimator runs on which kind follows from what it ``needs`` and what the
kind ``provides``.

Example:
    >>> import attrlab as al
    >>> al.units.resolve("heads").kind
    'heads'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..ablations import Ablation, check_supported
from ..errors import InputError, NonFiniteError, UnknownUnitsError

if TYPE_CHECKING:
    from ..result import Attribution

_KINDS: dict[str, Callable[[], Units]] = {}


class Units:
    """Base class of unit kinds. ``kind`` is the canonical string name.

    Class attributes a kind sets:

    * ``provides``: what its bound form offers estimators — ``"f"`` (exact
      masked evaluation) and/or ``"gates"`` (``f_gated`` and its gradient);
    * ``ablations``: the :mod:`attrlab.ablations` classes it can apply (the
      first is the default when none is given).
    """

    kind: ClassVar[str] = ""
    provides: ClassVar[frozenset[str]] = frozenset()
    ablations: ClassVar[tuple[type[Ablation], ...]] = ()
    #: ``"lm"``: the target is a model output (:func:`attrlab.targets.resolve`);
    #: ``"raw"``: the kind reads the target itself (:meth:`resolve_target`)
    target_kind: ClassVar[str] = "lm"

    def resolve_target(self, target: Any, lm: Any) -> Any:
        """The target as this kind's bound form takes it: a resolved
        :class:`~attrlab.targets.Target` (kinds reading something else, such as
        a response for sources, override this)."""
        from ..targets import resolve

        return resolve(target, lm)

    def params(self) -> dict[str, Any]:
        """JSON-able description, stored with results."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def default_ablation(self) -> Ablation | None:
        """The ablation used when none is given (the first supported one)."""
        return self.ablations[0]() if self.ablations else None

    def check_ablation(self, ablation: Ablation | None) -> Ablation | None:
        """``ablation`` (or the default), refused with
        :class:`~attrlab.errors.UnsupportedAblationError` if this kind cannot apply it."""
        if ablation is None:
            return self.default_ablation()
        if not self.ablations:  # a kind that has not declared its ablations (plugins)
            return ablation
        check_supported(ablation, self.kind, self.ablations)
        return ablation

    def bind(
        self, lm: Any, inputs: Any, target: Any, ablation: Ablation | None = None, **options: Any
    ) -> Bound:
        """This kind bound to a question: the :class:`Bound` every estimator uses.

        ``target`` is a resolved :class:`~attrlab.targets.Target` for model kinds.
        ``options`` are kind-specific (``batch_size``, ``sources`` …).
        """
        raise NotImplementedError(f"units {self.kind!r} cannot be bound to a question yet")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class Bound:
    """A unit kind bound to a question (model, inputs, target, ablation).

    Subclasses set ``n``, ``n_rows`` and implement :meth:`labels`, :meth:`f`
    and, for kinds that provide gates, :meth:`f_gated` (optionally a faster
    :meth:`gate_grad`). Everything else is shared.

    Example:
        >>> import attrlab as al, torch
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> b = al.units.resolve("tokens").bind(lm, "a b c", al.targets.resolve(" a", lm))
        >>> keep = torch.ones(1, b.n, dtype=torch.bool)
        >>> bool(torch.allclose(b.f(keep)[0], b.clean()))
        True
    """

    units: Units
    ablation: Ablation | None
    #: number of units
    n: int = 0
    #: target values per example (1, or one per continuation token)
    n_rows: int = 1
    #: the model (None for kinds that retrain one)
    lm: Any = None
    #: a description of the target (``"logit(' Mary')"``)
    target_name: str = ""

    @property
    def kind(self) -> str:
        return self.units.kind

    @property
    def provides(self) -> frozenset[str]:
        return self.units.provides

    # ------------------------------------------------------------ the contract
    def labels(self) -> dict[str, list[Any]]:
        """Label columns, one entry per unit (``layer``, ``head``, ``position`` …)."""
        raise NotImplementedError

    def f(self, keep: Tensor) -> Tensor:
        """``f(S)`` for each row of ``keep [m, n]`` (True = kept): ``[m, n_rows]``."""
        raise NotImplementedError

    def f_gated(self, g: Tensor) -> Tensor:
        """The target with gates ``g [m, n]`` in [0, 1]: ``[m, n_rows]``, differentiable in ``g``."""
        raise NotImplementedError(f"units {self.kind!r} have no gates")

    def gate_grad(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """``(f_gated(g) [m, rows], d f_gated / d g [m, rows, n])``; by autograd
        unless a kind has a faster path (checked against this one in tests)."""
        g = g.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            vals = self.f_gated(g)  # [m, rows]
            grads = []
            for r in range(vals.shape[1]):
                (d,) = torch.autograd.grad(
                    vals[:, r].sum(), g, retain_graph=r + 1 < vals.shape[1], allow_unused=True
                )
                grads.append(torch.zeros_like(g) if d is None else d)
        return vals.detach(), torch.stack(grads, 1)

    def gate_grad_sum(self, g: Tensor, weights: Tensor, chunk: int = 32) -> tuple[Tensor, Tensor]:
        """``sum_k weights_k * d f_gated / d g`` at the gates ``g [k, n]``:
        ``([n_rows, n], values [k, n_rows])`` — what gradient estimators need
        (one point for input x gradient, quadrature points for IG). By autograd
        over :meth:`gate_grad` in chunks unless a kind has a faster path."""
        acc = torch.zeros(self.n_rows, self.n, dtype=torch.float64)
        vals = []
        for s in range(0, g.shape[0], chunk):
            v, d = self.gate_grad(g[s : s + chunk])  # [c, rows], [c, rows, n]
            w = weights[s : s + chunk].to(torch.float64)
            acc += (w[:, None, None] * d.detach().double().cpu()).sum(0)
            vals.append(v.detach().cpu())
        return acc, torch.cat(vals, 0)

    # ------------------------------------------------------------------ shared
    def check_keep(self, keep: Any) -> Tensor:
        """``keep`` as a bool ``[m, n]`` tensor, or a typed error."""
        k = torch.as_tensor(keep)
        if k.dim() == 1:
            k = k[None]
        if k.dim() != 2 or k.shape[1] != self.n:
            raise InputError(f"masks must be [n_masks, n_units={self.n}], got {tuple(k.shape)}")
        return k.to(torch.bool)

    def check_gates(self, g: Any) -> Tensor:
        """``g`` as a float ``[m, n]`` tensor, or a typed error."""
        t = torch.as_tensor(g)
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.shape[1] != self.n:
            raise InputError(f"gates must be [n_masks, n_units={self.n}], got {tuple(t.shape)}")
        if not bool(torch.isfinite(t.detach()).all()):
            raise NonFiniteError("gates must be finite numbers in [0, 1]")
        return t if t.is_floating_point() else t.float()

    def clean(self) -> Tensor:
        """``f(all units)`` ``[n_rows]`` (cached)."""
        if getattr(self, "_clean", None) is None:
            self._clean = self.f(torch.ones(1, self.n, dtype=torch.bool))[0]
        return self._clean

    def empty(self) -> Tensor:
        """``f(no unit)`` ``[n_rows]`` (cached)."""
        if getattr(self, "_empty", None) is None:
            self._empty = self.f(torch.zeros(1, self.n, dtype=torch.bool))[0]
        return self._empty

    def meta(self) -> dict[str, Any]:
        """JSON-able facts for ``result.meta`` (prompt, tokens …)."""
        return {}

    def row_labels(self) -> dict[str, list[Any]]:
        """Labels of the rows when ``n_rows > 1`` (e.g. the continuation tokens)."""
        return {}

    def run_stats(self) -> dict[str, Any]:
        """Cost counters of the evaluations so far (forwards, tokens …), added to
        the result's diagnostics."""
        return {}

    def result_extra(self, extra: dict[str, Tensor]) -> dict[str, Tensor]:
        """The tensors stored with a result (``extra``), completed by the kind."""
        return extra

    def result(
        self,
        scores: Tensor,
        method: Any,
        diagnostics: Mapping[str, Any] | None = None,
        extra: Mapping[str, Tensor] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Attribution:
        """The :class:`~attrlab.result.Attribution` for ``scores [n_rows, n]`` (or
        ``[n]``) from ``method`` (an object with ``name`` and ``params()``).
        The one place results are built."""
        from ..ablations import to_json
        from ..result import Attribution

        s = torch.as_tensor(scores).detach()
        if s.dim() == 2 and s.shape[0] == 1:
            s = s[0]
        s = s.double().cpu() if s.dtype == torch.float64 else s.float().cpu()
        m = {
            **self.meta(),
            "units_params": self.units.params(),
            "ablation": to_json(self.ablation),
            **dict(meta or {}),
        }
        return Attribution(
            s,
            units=self.labels(),
            unit_kind=self.kind,
            method=method.name,
            target=self.target_name,
            params=method.params(),
            model_id=str(getattr(self.lm, "name", "") or ""),
            diagnostics={**self.run_stats(), **dict(diagnostics or {})},
            rows=self.row_labels() if s.dim() == 2 else {},
            meta=m,
            extra=self.result_extra(dict(extra or {})),
        )


def all_masks(n: int) -> Tensor:
    """Every subset of ``n`` units as keep-masks ``[2**n, n]`` (bit ``i`` of row
    ``j`` keeps unit ``i``).

    Example:
        >>> all_masks(2).int().tolist()
        [[0, 0], [1, 0], [0, 1], [1, 1]]
    """
    j = torch.arange(2**n)[:, None]
    return ((j >> torch.arange(n)[None]) & 1).bool()


def kinds_providing(needs: Sequence[str] | frozenset[str]) -> list[str]:
    """Canonical names of the unit kinds whose bound form provides all of ``needs``.

    Example:
        >>> "heads" in kinds_providing({"f"})
        True
    """
    seen = {cls.kind: cls for cls in _KINDS.values()}  # type: ignore[attr-defined]
    return sorted(k for k, c in seen.items() if set(needs) <= set(c.provides))  # type: ignore[attr-defined]


def register_units(name: str, *aliases: str) -> Callable[[type[Units]], type[Units]]:
    """Class decorator: make ``units=name`` build this kind with default arguments."""

    def deco(cls: type[Units]) -> type[Units]:
        cls.kind = name
        for n in (name, *aliases):
            _KINDS[n] = cls
        return cls

    return deco


def unit_kinds() -> list[str]:
    """Every registered unit kind name (including aliases)."""
    return sorted(_KINDS)


def resolve(spec: Any) -> Units:
    """A :class:`Units` object from a name or an object.

    Raises:
        UnknownUnitsError: no kind of that name.
    """
    if isinstance(spec, Units):
        return spec
    if isinstance(spec, str):
        if spec not in _KINDS:
            raise UnknownUnitsError(
                f"unknown units {spec!r}; choose from {', '.join(unit_kinds())} "
                "or pass an al.units object"
            )
        return _KINDS[spec]()
    if (
        isinstance(spec, (list, tuple))
        and spec
        and all(isinstance(s, (list, tuple)) and len(s) == 2 for s in spec)
        and "spans" in _KINDS
    ):
        return _KINDS["spans"](spec)  # type: ignore[call-arg]
    raise UnknownUnitsError(f"cannot read units {spec!r}: give a name like 'tokens' or an object")
