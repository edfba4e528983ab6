"""Perturbation estimators, on every unit kind that can be ablated: occlusion
(both directions), Shapley value sampling, KernelSHAP, and exact Shapley values
by enumeration.

Every estimator evaluates ``f(S)`` — the target with only the units in ``S``
kept — through the bound question (:class:`attrlab.units.base.Bound`): tokens
get the ablated embedding (default: the pad token's), components their
ablated activation (zero, mean, counterfactual …), many masks per batched
forward. See "Feature Removal Is a Unifying Principle for Model Explanation
Methods" (Covert et al.) for the common frame.

* ``occlusion`` (leave-one-out): ``f(all) - f(all without u)``.
* ``shapley``: Shapley value sampling over random permutations (seeded;
  ``antithetic=True`` adds each permutation's reverse). Efficiency holds
  exactly: the scores sum to ``f(all) - f(none)``.
* ``kernelshap``: weighted least squares with the Shapley kernel and the
  efficiency constraint; with every coalition (``samples=None`` and at most
  ``max_exact_units`` units) it equals the exact Shapley values.
* linear surrogates (LIME, ContextCite, COAR, datamodels) live in
  :mod:`attrlab.methods.surrogate`.
* ``shapley-exact``: enumerates all ``2^n`` coalitions (n <= 16).

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> r = al.attribute(lm, "When Mary and John", target=" went", method="shapley-exact")
    >>> d = r.diagnostics
    >>> abs(float(r.scores.sum()) - (d["value"] - d["empty_value"])) < 1e-4
    True
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError
from .base import Estimator, check_int, deprecated_baseline, register

ValueFn = Callable[[Tensor], Tensor]


def _row_list(v: Tensor) -> Any:
    vals = [float(t) for t in v.reshape(-1)]
    return vals[0] if len(vals) == 1 else vals


def exact_shapley(value_fn: ValueFn, n_units: int, batch: int = 256) -> Tensor:
    """Exact Shapley values ``[rows, n_units]`` by enumerating every coalition.

    ``value_fn(masks [m, n_units] bool) -> [m]`` or ``[m, rows]``.

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0, -3.0])
        >>> exact_shapley(lambda m: m.double() @ w.double(), 3)[0].tolist()
        [1.0, 2.0, -3.0]
    """
    _check_enumerable(n_units)
    codes = torch.arange(2**n_units)
    masks = ((codes[:, None] >> torch.arange(n_units)) & 1).bool()  # [2^n, n]
    vals = torch.cat([_as_2d(value_fn(masks[i : i + batch])) for i in range(0, len(masks), batch)])
    vals = vals.double()  # [2^n, rows]
    sizes = masks.sum(-1)
    n = n_units
    fact = [math.factorial(k) for k in range(n + 1)]
    phi = torch.zeros(vals.shape[1], n, dtype=torch.float64)
    for i in range(n):
        without = ~masks[:, i]
        s = sizes[without]
        w = torch.tensor(
            [fact[k] * fact[n - k - 1] / fact[n] for k in s.tolist()], dtype=torch.float64
        )
        with_i = codes[without] | (1 << i)
        phi[:, i] = (w[:, None] * (vals[with_i] - vals[without])).sum(0)
    return phi


#: exact Shapley enumerates 2^n coalitions: at most this many units
MAX_EXACT_UNITS = 16


def _check_enumerable(n: int) -> None:
    if n > MAX_EXACT_UNITS:
        raise InputError(
            f"exact Shapley values enumerate 2^{n} coalitions; they take at most "
            f"{MAX_EXACT_UNITS} units. Use method='kernelshap' or 'shapley' (sampling), or "
            "select fewer units (e.g. al.units.Heads(layers=[...]), units='words')"
        )


def _as_2d(v: Tensor) -> Tensor:
    return v[:, None] if v.dim() == 1 else v


def kernelshap_weights(n: int) -> tuple[Tensor, Tensor]:
    """Every proper coalition of ``n`` units ``[2^n - 2, n]`` and its Shapley-kernel
    weight ``(n - 1) / (C(n, s) s (n - s))``.

    Example:
        >>> m, w = kernelshap_weights(3)
        >>> m.shape[0], round(float(w[0]), 4)
        (6, 0.3333)
    """
    codes = torch.arange(1, 2**n - 1)
    masks = ((codes[:, None] >> torch.arange(n)) & 1).bool()
    s = masks.sum(-1).double()
    comb = torch.tensor([math.comb(n, int(k)) for k in s.tolist()], dtype=torch.float64)
    return masks, (n - 1) / (comb * s * (n - s))


def solve_kernelshap(
    masks: Tensor, values: Tensor, weights: Tensor, v_empty: Tensor, v_full: Tensor
) -> Tensor:
    """Weighted least squares ``values ~ v_empty + masks @ phi`` with
    ``sum(phi) = v_full - v_empty`` exactly. Shapes: masks ``[m, n]``, values
    ``[m, rows]``, weights ``[m]``, v_empty/v_full ``[rows]``; returns ``[rows, n]``.

    Example:
        >>> import torch
        >>> m, w = kernelshap_weights(3)
        >>> phi = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
        >>> vals = (m.double() @ phi)[:, None]
        >>> solve_kernelshap(m, vals, w, torch.zeros(1), torch.zeros(1)).round(decimals=6).tolist()
        [[1.0, 2.0, -3.0]]
    """
    z = masks.double()
    n = z.shape[1]
    v0, v1 = v_empty.double(), v_full.double()
    total = v1 - v0  # [rows]
    if n == 1:
        return total[:, None]
    y = values.double() - v0[None] - z[:, -1:] * total[None]  # [m, rows]
    x = z[:, :-1] - z[:, -1:]  # [m, n-1]
    sw = weights.double().sqrt()[:, None]
    sol = torch.linalg.lstsq(x * sw, y * sw).solution  # [n-1, rows]
    last = total - sol.sum(0)
    return torch.cat([sol, last[None]], 0).T


class _PerturbationMethod(Estimator):
    """Shared part of the perturbation estimators: ``f`` at chosen masks.

    Options common to all: ``batch_size`` (masked inputs per forward),
    ``memory_budget``, ``progress`` (tqdm), ``max_new_tokens`` (input units with
    a generated continuation). ``baseline=`` is a deprecated alias of
    ``ablation=`` on :func:`attrlab.attribute` (``"pad"``, ``"zero"``, a token id).
    """

    needs = frozenset({"f"})
    #: whether ``_scores`` reads ``f(all)`` and ``f(none)`` (evaluated first)
    needs_ends = True
    #: whether the estimator scores one target row only (a search over one value)
    single_row = False
    batch_size: int | None = None
    max_new_tokens: int | None = None
    progress: bool = False
    memory_budget: int | str | None = None

    def __init__(
        self,
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
        progress: bool = False,
        memory_budget: int | str | None = None,
        baseline: Any = None,
    ):
        name = self.name or type(self).__name__
        if batch_size == "auto":  # the memory budget's choice, as None
            batch_size = None
        self.batch_size = check_int(name, "batch_size", batch_size, optional=True)
        self.max_new_tokens = check_int(name, "max_new_tokens", max_new_tokens, 0, optional=True)
        self.progress = progress
        self.memory_budget = memory_budget
        self._baseline = deprecated_baseline(name, baseline)

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in super().params().items() if v is not None}

    def bind_options(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
            "progress": self.progress,
            "memory_budget": self.memory_budget,
            "ablation_default": self._baseline,
        }

    def estimate(self, bound: Any) -> tuple[Tensor, dict[str, Any]]:
        n = bound.n
        if n == 0:
            raise InputError("no units to attribute (every token excluded?)")
        if self.single_row and bound.n_rows != 1:
            raise InputError(
                f"{self.name} searches over one target value, but this question has "
                f"{bound.n_rows} rows (one per continuation token): sum them "
                "(reduce='sum', per_token=False) or attribute one token at a time"
            )
        self.check_units(n)
        calls = {"masks": 0}

        def value_fn(masks: Tensor) -> Tensor:
            calls["masks"] += int(masks.shape[0])
            return _as_2d(bound.f(masks)).double()

        if not self.needs_ends:  # e.g. a surrogate: its design masks are all it evaluates
            scores, diag = self._scores(value_fn, n, None, None)
            diag["n_evaluations"] = calls["masks"]
            return scores, diag
        ends = value_fn(
            torch.stack([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
        )
        v_full, v_empty = ends[0], ends[1]
        scores, diag = self._scores(value_fn, n, v_full, v_empty)
        diag.update(
            value=_row_list(v_full), empty_value=_row_list(v_empty), n_evaluations=calls["masks"]
        )
        return scores, diag

    def check_units(self, n: int) -> None:
        """Refuse a question with ``n`` units before any evaluation (the default
        accepts any number)."""

    def _scores(
        self, value_fn: ValueFn, n: int, v_full: Any, v_empty: Any
    ) -> tuple[Tensor, dict[str, Any]]:
        raise NotImplementedError

    def _eval(self, value_fn: ValueFn, masks: Tensor, chunk: int = 512) -> Tensor:
        out = []
        for i in tqdm(
            range(0, masks.shape[0], chunk), disable=not self.progress, desc=self.name, leave=False
        ):
            out.append(value_fn(masks[i : i + chunk]))
        return torch.cat(out, 0)


class _Search(_PerturbationMethod):
    """A search over one target value (TracLLM, the hierarchical baseline): it
    picks its own masks as it goes (no ``f(all)`` / ``f(none)`` first) and
    refuses questions with several target rows."""

    needs_ends = False
    single_row = True

    def estimate(self, bound: Any) -> tuple[Tensor, dict[str, Any]]:
        """The search's scores; ``diagnostics["seconds"]`` is its wall time."""
        t0 = time.perf_counter()
        scores, diag = super().estimate(bound)
        diag["seconds"] = time.perf_counter() - t0
        return scores, diag


@register("occlusion")
class Occlusion(_PerturbationMethod):
    """Occlusion, on any unit kind that can be ablated.

    ``direction="noising"`` (default, leave-one-out): ``f(all) - f(all without u)``
    — on components with a counterfactual ablation this is exact activation
    patching. ``direction="denoising"`` (restore one unit into the fully
    ablated input): ``f({u}) - f(none)``. Both are the unit's contribution:
    positive when the unit raises the target.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> len(al.attribute(lm, "When Mary and John", target=" went", method="occlusion"))
        4
        >>> r = al.attribute(lm, "When Mary and John", target=" went", units="heads",
        ...                  method="occlusion", ablation="zero", direction="denoising")
        >>> len(r) == lm.cfg.n_layers * lm.cfg.n_heads
        True
    """

    def __init__(self, direction: str = "noising", **options: Any):
        if direction not in ("noising", "denoising"):
            raise InputError(f"direction must be 'noising' or 'denoising', got {direction!r}")
        self.direction = direction
        super().__init__(**options)

    def _scores(
        self, value_fn: ValueFn, n: int, v_full: Tensor, v_empty: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        eye = torch.eye(n, dtype=torch.bool)
        if self.direction == "noising":
            vals = self._eval(value_fn, ~eye)  # [n, rows]: all but unit u
            return (v_full[None] - vals).T, {}
        vals = self._eval(value_fn, eye)  # [n, rows]: only unit u
        return (vals - v_empty[None]).T, {}


@register("shapley")
class ShapleySampling(_PerturbationMethod):
    """Shapley value sampling: average marginal contributions over random
    permutations of the units (seeded). Each permutation costs ``n - 1``
    evaluations (the empty and full coalitions are shared).

    Args:
        permutations: number of random permutations.
        antithetic: also use each permutation reversed (lower variance).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "When Mary and John", target=" went", method="shapley",
        ...                  permutations=4)
        >>> len(r)
        4
    """

    def __init__(
        self,
        permutations: int = 32,
        antithetic: bool = True,
        seed: int = 0,
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
        progress: bool = False,
        memory_budget: int | str | None = None,
        baseline: Any = None,
    ):
        self.permutations = check_int("shapley", "permutations", permutations)
        self.antithetic = antithetic
        self.seed = check_int("shapley", "seed", seed, minimum=0)
        super().__init__(batch_size, max_new_tokens, progress, memory_budget, baseline)

    def _scores(
        self, value_fn: ValueFn, n: int, v_full: Tensor, v_empty: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        if n == 1:  # one order: the unit's contribution is everything
            one = {"stderr": [[0.0]] * v_full.shape[0], "n_permutations": 1}
            return (v_full - v_empty)[:, None], one
        gen = torch.Generator().manual_seed(self.seed)
        perms = torch.stack([torch.randperm(n, generator=gen) for _ in range(self.permutations)])
        if self.antithetic:
            perms = torch.cat([perms, perms.flip(-1)], 0)
        k = perms.shape[0]
        # prefix masks: after adding the first j units of each permutation, j = 1..n-1
        rank = torch.empty_like(perms)
        rank.scatter_(1, perms, torch.arange(n).expand(k, n))  # rank[p, unit]
        j = torch.arange(1, n)
        masks = rank[:, None, :] < j[None, :, None]  # [k, n-1, n]
        vals = self._eval(value_fn, masks.reshape(-1, n)).reshape(k, n - 1, -1)
        rows = v_full.shape[0]
        chain = torch.cat(
            [v_empty.expand(k, 1, rows), vals, v_full.expand(k, 1, rows)], 1
        )  # [k, n+1, rows]
        contrib = chain[:, 1:] - chain[:, :-1]  # [k, n, rows]: unit perms[:, i]
        phi = torch.zeros(k, n, rows, dtype=torch.float64)
        phi.scatter_(1, perms[..., None].expand(k, n, rows), contrib)
        # independent samples: an order and its reverse are one (antithetic) sample
        samples = phi.reshape(2, -1, n, rows).mean(0) if self.antithetic else phi
        m = samples.shape[0]
        std = samples.std(0) / math.sqrt(m) if m > 1 else torch.zeros(n, rows)
        return phi.mean(0).T, {"stderr": std.T.tolist(), "n_permutations": k}


@register("kernelshap")
class KernelShap(_PerturbationMethod):
    """KernelSHAP (Lundberg & Lee): weighted linear regression with the Shapley
    kernel and the efficiency constraint. ``samples=None`` uses every
    coalition when there are at most ``max_exact_units`` units (then the result
    is the exact Shapley values), else 512 coalitions drawn from the kernel
    (seeded). ``samples`` at least the number of proper coalitions
    (``2^n - 2``) also enumerates them. ``paired=True`` (default) draws each
    coalition with its complement (the kernel is symmetric), which lowers the
    variance ("Improving KernelSHAP", Covert & Lee) and makes the estimate
    exact for two units.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "When Mary and John", target=" went", method="kernelshap")
        >>> r.diagnostics["exact"]
        True
    """

    def __init__(
        self,
        samples: int | None = None,
        max_exact_units: int = 12,
        seed: int = 0,
        paired: bool = True,
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
        progress: bool = False,
        memory_budget: int | str | None = None,
        baseline: Any = None,
    ):
        self.samples = check_int("kernelshap", "samples", samples, minimum=2, optional=True)
        self.paired = bool(paired)
        self.max_exact_units = check_int("kernelshap", "max_exact_units", max_exact_units)
        self.seed = check_int("kernelshap", "seed", seed, minimum=0)
        super().__init__(batch_size, max_new_tokens, progress, memory_budget, baseline)

    def _scores(
        self, value_fn: ValueFn, n: int, v_full: Tensor, v_empty: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        if n == 1:
            return (v_full - v_empty)[:, None], {"exact": True}
        if self.samples is None:
            exact = n <= self.max_exact_units
        else:  # asked for at least as many coalitions as there are: list them all
            exact = n < 63 and self.samples >= 2**n - 2
        if exact:
            masks, weights = kernelshap_weights(n)
        else:
            m = 512 if self.samples is None else self.samples
            gen = torch.Generator().manual_seed(self.seed)
            draw = (m + 1) // 2 if self.paired else m
            sizes = torch.arange(1, n, dtype=torch.float64)
            p = (n - 1) / (sizes * (n - sizes))  # kernel mass of each coalition size
            s = torch.multinomial(p / p.sum(), draw, replacement=True, generator=gen) + 1
            rank = torch.rand(draw, n, generator=gen).argsort(-1).argsort(-1)
            masks = rank < s[:, None]  # [draw, n]: s units, uniformly chosen
            if self.paired:
                masks = torch.stack([masks, ~masks], 1).reshape(-1, n)[:m]
            weights = torch.ones(masks.shape[0], dtype=torch.float64)
        vals = self._eval(value_fn, masks)
        phi = solve_kernelshap(masks, vals, weights, v_empty, v_full)
        return phi, {"exact": exact, "n_coalitions": int(masks.shape[0])}


@register("shapley-exact")
class ExactShapley(_PerturbationMethod):
    """Exact Shapley values by enumerating all ``2^n`` coalitions (n <= 16).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> len(al.attribute(lm, "a b c", target=" a", method="shapley-exact"))
        3
    """

    def check_units(self, n: int) -> None:
        _check_enumerable(n)

    def _scores(
        self, value_fn: ValueFn, n: int, v_full: Tensor, v_empty: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        return exact_shapley(value_fn, n), {"n_coalitions": 2**n}
