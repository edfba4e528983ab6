"""The perturbation and surrogate estimators, written once over the Bound
contract (``bound.f``, ``n``, ``n_rows``, ``clean()``, ``empty()``).

Oracles, each independent of the code under test:

* a toy bound question written here: an additive set function with known
  signs, a 3-unit game whose Shapley values and occlusions are computed by
  hand (literals below), and a random set function (a table over every
  subset) whose Shapley values come from this file's own enumeration of all
  permutations;
* tokens: runs built by hand from the HF model with pad ids in place of the
  removed tokens; Captum's FeatureAblation and ShapleyValues;
* heads / neurons / MLPs: runs built by hand with forward hooks on the HF
  modules (zeroing or replacing slices), brute-force Shapley over <= 8 units.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

import attrlab as al
from attrlab.errors import InputError
from attrlab.methods.perturbation import ExactShapley, KernelShap, Occlusion, ShapleySampling
from attrlab.methods.surrogate import (
    Coar,
    ContextCiteSurrogate,
    Datamodels,
    Lime,
    LinearSurrogate,
)
from attrlab.units.base import Bound, Units

pytestmark = pytest.mark.usefixtures("one_thread")


def test_doctests():
    import doctest

    from attrlab.methods import surrogate

    res = doctest.testmod(surrogate, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0


# --------------------------------------------------------------------- toy
class ToyUnits(Units):
    """A unit kind whose ``f`` is a given set function (not registered)."""

    kind = "toy-estimators"
    provides = frozenset({"f"})

    def __init__(self, fn=None, n: int = 0):
        self._fn, self._n = fn, n

    def bind(self, lm, inputs, target, ablation=None, **options):
        return ToyBound(self._fn, self._n, units=self)


class ToyBound(Bound):
    """``f(keep) = fn(keep)``; records every mask it is asked for."""

    def __init__(self, fn, n: int, rows: int = 1, units: Units | None = None):
        self.units = units or ToyUnits(fn, n)
        self.ablation = None
        self.n, self.n_rows = n, rows
        self.fn = fn
        self.asked: list[torch.Tensor] = []

    def labels(self):
        return {"unit": list(range(self.n))}

    def f(self, keep):
        keep = self.check_keep(keep)
        self.asked.append(keep.clone())
        out = self.fn(keep)
        return out[:, None] if out.dim() == 1 else out

    @property
    def n_masks(self) -> int:
        return sum(int(k.shape[0]) for k in self.asked)

    def masks(self) -> torch.Tensor:
        return torch.cat(self.asked, 0)


W = torch.tensor([2.0, -1.0, 0.5, 0.0, -3.0, 1.5], dtype=torch.float64)
BIAS = 0.7


def additive(keep: torch.Tensor) -> torch.Tensor:
    """f(S) = 0.7 + sum_{u in S} W_u: every estimator's answer is W."""
    return BIAS + keep.double() @ W


def game3(keep: torch.Tensor) -> torch.Tensor:
    """v(S) = 3 [0] - 5 [1] + 2 [0][1] + 6 [0][1][2] (a non-additive 3-unit game).

    By hand: Shapley phi = (3 + 1 + 2, -5 + 1 + 2, 2) = (6, -2, 2);
    v(all) = 6, v(none) = 0; v({1,2}) = -5, v({0,2}) = 3, v({0,1}) = 0, so
    noising occlusion = (6 + 5, 6 - 3, 6 - 0) = (11, 3, 6); v({0}) = 3,
    v({1}) = -5, v({2}) = 0, so denoising occlusion = (3, -5, 0).
    """
    k = keep.double()
    return 3 * k[:, 0] - 5 * k[:, 1] + 2 * k[:, 0] * k[:, 1] + 6 * k[:, 0] * k[:, 1] * k[:, 2]


GAME3_SHAPLEY = [6.0, -2.0, 2.0]
GAME3_NOISING = [11.0, 3.0, 6.0]
GAME3_DENOISING = [3.0, -5.0, 0.0]


def table_game(n: int, seed: int = 0, rows: int = 1):
    """A random set function: an independent value for each of the 2^n subsets."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(2**n, rows, generator=g, dtype=torch.float64)
    bits = 2 ** torch.arange(n)

    def v(keep: torch.Tensor) -> torch.Tensor:
        return table[(keep.long() * bits).sum(-1)]

    return v, table


def shapley_by_permutations(v, n: int) -> torch.Tensor:
    """The definition: average over all n! orders of each unit's marginal
    contribution, ``[rows, n]`` (independent of the subset-weight formula)."""
    acc = None
    count = 0
    for order in itertools.permutations(range(n)):
        keep = torch.zeros(n + 1, n, dtype=torch.bool)
        for j, u in enumerate(order):
            keep[j + 1 :, u] = True
        vals = v(keep)  # [n+1, rows]
        vals = vals[:, None] if vals.dim() == 1 else vals
        phi = torch.zeros(vals.shape[1], n, dtype=torch.float64)
        for j, u in enumerate(order):
            phi[:, u] = vals[j + 1] - vals[j]
        acc = phi if acc is None else acc + phi
        count += 1
    return acc / count


def shapley_by_subsets(v, n: int) -> torch.Tensor:
    """Shapley's formula over subsets, ``[rows, n]``: for each unit ``i`` and
    each subset ``S`` of the others, ``|S|! (n - |S| - 1)! / n!`` times
    ``v(S + i) - v(S)`` (for n too large to list every order)."""
    out = None
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for k in range(n):
            w = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            for subset in itertools.combinations(others, k):
                keep = torch.zeros(2, n, dtype=torch.bool)
                keep[:, list(subset)] = True
                keep[1, i] = True
                vals = v(keep)
                vals = vals[:, None] if vals.dim() == 1 else vals  # [2, rows]
                if out is None:
                    out = torch.zeros(vals.shape[1], n, dtype=torch.float64)
                out[:, i] += w * (vals[1] - vals[0]).double()
    return out


def test_the_two_brute_force_oracles_agree():
    v, _ = table_game(5, seed=1, rows=2)
    torch.testing.assert_close(shapley_by_permutations(v, 5), shapley_by_subsets(v, 5))


ALL_ESTIMATORS = [
    Occlusion(),
    Occlusion(direction="denoising"),
    ShapleySampling(permutations=4),
    ShapleySampling(permutations=3, antithetic=False, seed=2),
    ExactShapley(),
    KernelShap(),
    KernelShap(samples=40),
    LinearSurrogate(samples=64),
    Lime(samples=128),
    ContextCiteSurrogate(samples=128, alpha=1e-4),
    Coar(samples=256, keep_prob=0.8),
    Datamodels(samples=128, alpha=1e-5),
]
#: estimators that are exact on an additive function (the rest regularize)
EXACT_ON_ADDITIVE = ("occlusion", "shapley", "shapley-exact", "kernelshap", "surrogate", "coar")


def _id(est) -> str:
    return f"{est.name}-{sorted(est.params().items())}"


@pytest.mark.parametrize("est", ALL_ESTIMATORS, ids=_id)
def test_every_estimator_gets_the_signs_of_an_additive_toy(est):
    bound = ToyBound(additive, len(W))
    scores, diag = est.estimate(bound)
    s = torch.as_tensor(scores, dtype=torch.float64)[0]
    nz = W != 0
    assert torch.equal(torch.sign(s[nz]), torch.sign(W[nz])), (s, W)
    tol = 1e-9 if est.name in EXACT_ON_ADDITIVE else 0.05
    torch.testing.assert_close(s, W, atol=tol, rtol=0)
    # diagnostics: the clean and empty values (estimators that evaluate them)
    # and the number of evaluations
    if getattr(est, "needs_ends", True):
        assert diag["value"] == pytest.approx(BIAS + float(W.sum()))
        assert diag["empty_value"] == pytest.approx(BIAS)
    else:  # a surrogate evaluates its design masks only
        assert "value" not in diag and diag["n_evaluations"] == est.samples
    assert diag["n_evaluations"] == bound.n_masks


@pytest.mark.parametrize("est", ALL_ESTIMATORS, ids=_id)
def test_every_estimator_runs_through_attribute_and_builds_one_result(est):
    lm = al.wrap(*al.testing.tiny_model("gpt2"))
    r = est.attribute(lm, "x", None, ToyUnits(additive, len(W)))
    assert r.method == est.name and r.unit_kind == "toy-estimators"
    assert r.units["unit"] == list(range(len(W)))
    assert torch.equal(torch.sign(r.scores.double()[W != 0]), torch.sign(W[W != 0]))


# --------------------------------------------------------- hand computations
def test_game3_by_hand():
    bound = lambda: ToyBound(game3, 3)  # noqa: E731
    for est in (ExactShapley(), KernelShap()):
        got = est.estimate(bound())[0][0].tolist()
        assert got == pytest.approx(GAME3_SHAPLEY, abs=1e-12), est.name
    assert Occlusion().estimate(bound())[0][0].tolist() == pytest.approx(GAME3_NOISING)
    den = Occlusion(direction="denoising").estimate(bound())[0][0].tolist()
    assert den == pytest.approx(GAME3_DENOISING)
    # 3 units have 6 orders; antithetic sampling of 400 orders is close, and
    # efficiency (sum = v(all) - v(none) = 6) holds exactly for any sample
    s, diag = ShapleySampling(permutations=400, seed=3).estimate(bound())
    assert s[0].tolist() == pytest.approx(GAME3_SHAPLEY, abs=0.35)
    assert float(s.sum()) == pytest.approx(6.0, abs=1e-12)
    assert len(diag["stderr"][0]) == 3


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_exact_shapley_and_kernelshap_with_every_coalition_equal_brute_force(n):
    v, _ = table_game(n, seed=n, rows=2)
    want = shapley_by_subsets(v, n)  # [2, n]
    for est in (ExactShapley(), KernelShap()):
        got, diag = est.estimate(ToyBound(v, n, rows=2))
        torch.testing.assert_close(torch.as_tensor(got).double(), want, atol=1e-9, rtol=0)
    assert KernelShap().estimate(ToyBound(v, n, rows=2))[1]["exact"] is True


def test_occlusion_both_directions_equal_table_lookups():
    n = 6
    v, table = table_game(n, seed=11)
    full, empty = table[2**n - 1, 0], table[0, 0]
    noising = [float(full - table[(2**n - 1) - 2**u, 0]) for u in range(n)]
    denoising = [float(table[2**u, 0] - empty) for u in range(n)]
    bound = ToyBound(v, n)
    s, _ = Occlusion().estimate(bound)
    assert s[0].tolist() == pytest.approx(noising, abs=1e-12)
    assert bound.n_masks == n + 2  # all-but-one masks, plus full and empty
    s, _ = Occlusion(direction="denoising").estimate(ToyBound(v, n))
    assert s[0].tolist() == pytest.approx(denoising, abs=1e-12)
    with pytest.raises(InputError, match="direction"):
        Occlusion(direction="sideways")


def test_shapley_sampling_is_efficient_seeded_and_converges():
    n = 6
    v, table = table_game(n, seed=4)
    want = shapley_by_permutations(v, n)[0]
    total = float(table[2**n - 1, 0] - table[0, 0])
    errs = []
    for k in (2, 64, 4096):
        s, diag = ShapleySampling(permutations=k, seed=1).estimate(ToyBound(v, n))
        assert float(s.sum()) == pytest.approx(total, abs=1e-10)  # efficiency, any k
        assert diag["n_permutations"] == 2 * k  # antithetic: each order and its reverse
        errs.append(float((s[0] - want).abs().max()))
    assert errs[-1] < 0.5 * min(errs[:2])
    # the reported standard errors are honest: every unit within 4 of them
    stderr = torch.tensor(diag["stderr"][0], dtype=torch.float64)
    assert bool(((s[0] - want).abs() <= 4 * stderr).all()), (s[0] - want, stderr)
    a, _ = ShapleySampling(permutations=5, seed=7).estimate(ToyBound(v, n))
    b, _ = ShapleySampling(permutations=5, seed=7).estimate(ToyBound(v, n))
    c, _ = ShapleySampling(permutations=5, seed=8).estimate(ToyBound(v, n))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # evaluations: full and empty once, n - 1 prefixes per order
    bound = ToyBound(v, n)
    ShapleySampling(permutations=5, antithetic=False).estimate(bound)
    assert bound.n_masks == 2 + 5 * (n - 1)


def test_antithetic_stderr_treats_an_order_and_its_reverse_as_one_sample():
    """For n = 2 an order and its reverse give both marginal contributions of
    each unit, so each antithetic pair is the exact Shapley value: no error."""
    v, _ = table_game(2, seed=5)
    s, diag = ShapleySampling(permutations=6, seed=0).estimate(ToyBound(v, 2))
    torch.testing.assert_close(s.double(), shapley_by_permutations(v, 2), atol=1e-12, rtol=0)
    assert max(diag["stderr"][0]) == pytest.approx(0.0, abs=1e-12)


def test_sampled_kernelshap_is_efficient_and_close():
    n = 10
    v, table = table_game(n, seed=6)
    v_lin = lambda k: additive(k[:, :6]) + v(k)[:, 0] * 0.05  # noqa: E731
    want = shapley_by_subsets(v_lin, n)[0]
    s, diag = KernelShap(samples=800, seed=1).estimate(ToyBound(v_lin, n))
    assert diag["exact"] is False and diag["n_coalitions"] == 800
    total = float(v_lin(torch.ones(1, n, dtype=torch.bool)) - v_lin(torch.zeros(1, n).bool()))
    assert float(s.sum()) == pytest.approx(total, abs=1e-10)
    assert float((s[0] - want).abs().max()) < 0.05
    b1, b2, b3 = ToyBound(v_lin, n), ToyBound(v_lin, n), ToyBound(v_lin, n)
    a, _ = KernelShap(samples=64, seed=3).estimate(b1)
    b, _ = KernelShap(samples=64, seed=3).estimate(b2)
    KernelShap(samples=64, seed=4).estimate(b3)
    assert torch.equal(b1.masks(), b2.masks()) and not torch.equal(b1.masks(), b3.masks())
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)  # LAPACK: equal to rounding


@pytest.mark.parametrize("n", [1, 2, 3])
def test_shapley_family_on_one_two_three_units(n):
    """Degenerate sizes: one unit gets everything; sampling with any seed is
    exact for two units (an order and its reverse; a coalition and its
    complement); asking for as many coalitions as exist enumerates them."""
    v, _ = table_game(n, seed=20 + n)
    want = shapley_by_permutations(v, n)
    ests = [ShapleySampling(permutations=3, seed=1), KernelShap(samples=2, seed=4)]
    if n == 3:
        ests = [KernelShap(samples=6), KernelShap(samples=50, paired=False)]
    for est in ests:
        s, diag = est.estimate(ToyBound(v, n))
        torch.testing.assert_close(s.double(), want, atol=1e-12, rtol=0, msg=est.name)
    if n == 3:
        assert KernelShap(samples=6).estimate(ToyBound(v, n))[1]["exact"] is True
        s, diag = KernelShap(samples=5).estimate(ToyBound(v, n))
        assert diag["exact"] is False and diag["n_coalitions"] == 5


def test_paired_kernelshap_draws_complements():
    bound = ToyBound(additive, len(W))
    KernelShap(samples=30, seed=2).estimate(bound)
    m = bound.masks()[2:]  # after the full and empty masks
    assert m.shape[0] == 30 and torch.equal(m[1::2], ~m[0::2])
    assert bool((m.sum(1) > 0).all() and (m.sum(1) < len(W)).all())  # proper coalitions


def test_exact_shapley_refuses_too_many_units_before_any_evaluation():
    bound = ToyBound(lambda k: k.double().sum(-1), 17)
    with pytest.raises(InputError, match="kernelshap"):
        ExactShapley().estimate(bound)
    assert bound.n_masks == 0
    lm = al.wrap(*al.testing.tiny_model("gpt2"))
    calls = {"n": 0}
    orig = lm.model.forward

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    lm.model.forward = counting
    try:
        with pytest.raises(InputError, match="16"):
            al.attribute(lm, "a b c d e f g h i j k l m n o p q", target=" a",
                         method="shapley-exact")  # fmt: skip
    finally:
        lm.model.forward = orig
    assert calls["n"] <= 1  # at most the clean run of binding; no enumeration


# --------------------------------------------------------------- surrogates
def _recorded_masks(bound: ToyBound, est) -> torch.Tensor:
    """The random masks the surrogate drew (all it evaluates)."""
    return bound.masks()


@pytest.mark.parametrize(
    "est", [LinearSurrogate(samples=48), Coar(samples=200), Datamodels(samples=64, alpha=1e-9)],
    ids=_id,
)  # fmt: skip
def test_surrogates_recover_an_additive_toy(est):
    s, diag = est.estimate(ToyBound(additive, len(W)))
    torch.testing.assert_close(torch.as_tensor(s).double()[0], W, atol=1e-5, rtol=0)
    assert diag["r2"] == pytest.approx(1.0, abs=1e-6)
    assert diag["intercept"] == pytest.approx(BIAS, abs=1e-5)


def test_surrogate_fit_equals_a_hand_fit_on_the_same_masks():
    """On a non-additive function each preset's scores equal the regression
    written here on the masks the estimator asked for (the fit is the oracle)."""
    from sklearn.linear_model import Lasso, Ridge

    n = 6
    v, _ = table_game(n, seed=9)

    # plain least squares with an intercept
    bound = ToyBound(v, n)
    s, _ = LinearSurrogate(samples=80, seed=1).estimate(bound)
    x = _recorded_masks(bound, None).double().numpy()
    y = v(torch.from_numpy(x).bool())[:, 0].numpy()
    sol = np.linalg.lstsq(np.c_[np.ones(len(x)), x], y, rcond=None)[0]
    np.testing.assert_allclose(s[0].numpy(), sol[1:], atol=1e-9)

    # LIME: ridge weighted by exp(-d^2 / 0.25^2), d = 1 - cosine(mask, all ones)
    bound = ToyBound(v, n)
    s, _ = Lime(samples=100, seed=2).estimate(bound)
    x = _recorded_masks(bound, None).double().numpy()
    y = v(torch.from_numpy(x).bool())[:, 0].numpy()
    cos = x.sum(1) / (np.linalg.norm(x, axis=1) * math.sqrt(n))
    wts = np.exp(-((1 - cos) ** 2) / 0.25**2)
    ridge = Ridge(alpha=1e-3).fit(x, y, sample_weight=wts)
    np.testing.assert_allclose(s[0].numpy(), ridge.coef_, atol=1e-8)
    assert x.sum(1).min() >= 1  # LIME never draws the empty mask

    # ContextCite: keep-probability 1/2, Lasso(0.01) on standardized masks
    bound = ToyBound(v, n)
    s, _ = ContextCiteSurrogate(samples=300, seed=3).estimate(bound)
    x = _recorded_masks(bound, None).double().numpy()
    assert abs(x.mean() - 0.5) < 0.05
    y = v(torch.from_numpy(x).bool())[:, 0].numpy()
    mu, sd = x.mean(0), x.std(0)
    lasso = Lasso(alpha=0.01).fit((x - mu) / sd, y)
    np.testing.assert_allclose(s[0].numpy(), lasso.coef_ / sd, atol=1e-6)

    # COAR: each unit ablated with probability ~5 %, least squares
    bound = ToyBound(v, n)
    s, _ = Coar(samples=600, seed=4).estimate(bound)
    x = _recorded_masks(bound, None).double().numpy()
    assert abs((1 - x).mean() - 0.05) < 0.015
    y = v(torch.from_numpy(x).bool())[:, 0].numpy()
    sol = np.linalg.lstsq(np.c_[np.ones(len(x)), x], y, rcond=None)[0]
    np.testing.assert_allclose(s[0].numpy(), sol[1:], atol=1e-8)


def test_surrogate_diagnostics_seeds_and_holdout():
    n = 6
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(10_000, generator=g, dtype=torch.float64) * 0.3
    calls = {"i": 0}

    def noisy(keep):
        i = calls["i"]
        calls["i"] += keep.shape[0]
        return additive(keep) + noise[i : i + keep.shape[0]]

    bound = ToyBound(noisy, n)
    s, diag = LinearSurrogate(samples=400, holdout=0.25).estimate(bound)
    assert 0.5 < diag["r2_holdout"] < 1.0 and 0.5 < diag["r2"] < 1.0
    assert diag["n_evaluations"] == 400 and diag["n_masks"] == 400
    assert torch.equal(torch.sign(s[0][W != 0]), torch.sign(W[W != 0]))
    a = Coar(samples=64, seed=5).estimate(ToyBound(additive, n))[0]
    b1 = ToyBound(additive, n)
    b2 = ToyBound(additive, n)
    Coar(samples=64, seed=5).estimate(b1)
    Coar(samples=64, seed=5).estimate(b2)
    Coar(samples=64, seed=6).estimate(b3 := ToyBound(additive, n))
    assert torch.equal(b1.masks(), b2.masks()) and not torch.equal(b1.masks(), b3.masks())
    assert torch.equal(a, Coar(samples=64, seed=5).estimate(ToyBound(additive, n))[0])


def test_a_unit_never_ablated_gets_zero_and_is_reported():
    """With few COAR masks some units are never ablated: their weight is not
    identified, so it is 0 (not half the intercept) and the count is reported."""
    n = 40
    w = torch.linspace(-1, 1, n, dtype=torch.float64)
    bound = ToyBound(lambda k: k.double() @ w + 5.0, n)
    with pytest.warns(UserWarning, match="never ablated"):
        s, diag = Coar(samples=8, seed=0).estimate(bound)
    x = _recorded_masks(bound, None)
    never = x.all(0)
    assert int(never.sum()) > 0 and diag["n_unvaried"] == int(never.sum())
    assert float(s[0][never].abs().max()) == 0.0


def test_surrogate_options_are_checked_at_construction():
    for bad in (
        dict(samples=0),
        dict(samples=1),
        dict(keep_prob=1.0),
        dict(keep_prob=0.0),
        dict(regressor="forest"),
        dict(how="sobol"),
        dict(holdout=0.95),
    ):
        with pytest.raises(InputError):
            LinearSurrogate(**bad)


def test_contextcite_on_sources_is_the_shared_preset():
    """ContextCite over sources draws the preset's masks and fits the preset's
    Lasso (keep-probability 1/2, alpha 0.01, standardized masks) to the
    response's log-odds; the oracle is scikit-learn's Lasso written here."""
    from sklearn.linear_model import Lasso

    lm = al.wrap(*al.testing.tiny_model("llama"))
    ctx = "Paris is in France. Rome is in Italy. Bob likes tea. The cat sat."
    r = al.attribute(lm, ctx, units="sources", method="contextcite", target=" France",
                     samples=40, seed=3)  # fmt: skip
    masks = r.extra["masks"]
    assert torch.equal(masks, ContextCiteSurrogate(samples=40, seed=3).draw_masks(4))
    lp = r.extra["logprobs"].double()  # [40, n_response_tokens]
    total = lp.sum(-1).numpy()
    y = total - np.log(-np.expm1(total))  # log-odds of the whole response
    k = lp.shape[1]
    x = masks.double().numpy()
    mu, sd = x.mean(0), x.std(0)
    lasso = Lasso(alpha=0.01).fit((x - mu) / sd, y / k)
    np.testing.assert_allclose(r.scores.numpy(), lasso.coef_ / sd * k, atol=1e-6)
    assert {"r2", "n_unvaried", "intercept"} <= set(r.diagnostics)


def test_progress_is_silent_by_default(capsys):
    v, _ = table_game(5)
    for est in (
        ShapleySampling(permutations=3),
        KernelShap(),
        Lime(samples=16),
        Coar(samples=64, keep_prob=0.7),
    ):
        est.estimate(ToyBound(v, 5))
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


# ------------------------------------------------------------------ tokens
PROMPT = "When Mary and John went"


@pytest.fixture(scope="module")
def lm64():
    return al.wrap(*al.testing.tiny_model("gpt2", dtype=torch.float64))


def _pad_runs(lm, prompt: str, answer: str):
    """f over tokens built by hand: removed tokens' ids become the pad id."""
    ids = lm.tokenize(prompt).input_ids[0]
    tid = lm.token_id(answer)

    def v(keep: torch.Tensor) -> torch.Tensor:
        rows = ids.repeat(keep.shape[0], 1)
        rows[~keep] = lm.pad_token_id
        with torch.no_grad():
            return lm.model(input_ids=rows).logits[:, -1, tid].double()

    return v, len(ids)


def test_tokens_exact_shapley_kernelshap_and_occlusion_equal_pad_runs(lm64):
    v, n = _pad_runs(lm64, PROMPT, " to")
    want = shapley_by_permutations(v, n)[0]
    for method in ("shapley-exact", "kernelshap"):
        r = al.attribute(lm64, PROMPT, target=" to", method=method)
        torch.testing.assert_close(r.scores.double(), want, atol=1e-9, rtol=0)
    eye = torch.eye(n, dtype=torch.bool)
    full = v(torch.ones(1, n, dtype=torch.bool))
    empty = v(torch.zeros(1, n, dtype=torch.bool))
    r = al.attribute(lm64, PROMPT, target=" to", method="occlusion", direction="denoising")
    torch.testing.assert_close(r.scores.double(), v(eye) - empty, atol=1e-9, rtol=0)
    r = al.attribute(lm64, PROMPT, target=" to", method="occlusion")
    torch.testing.assert_close(r.scores.double(), full - v(~eye), atol=1e-9, rtol=0)
    assert r.meta["ablation"] == {"type": "token", "token": "pad"} or "pad" in str(
        r.meta["ablation"]
    )


def test_tokens_surrogates_equal_least_squares_on_pad_runs(lm64):
    """COAR / the plain surrogate over tokens: least squares of pad runs on the
    same masks (drawn with the same seed by the shared sampler)."""
    from attrlab.methods.surrogate import sample_masks

    v, n = _pad_runs(lm64, PROMPT, " to")
    r = al.attribute(lm64, PROMPT, target=" to", method="surrogate", samples=40, seed=2)
    x = sample_masks(40, n, 0.5, 2, "bernoulli")
    y = v(x).numpy()
    sol = np.linalg.lstsq(np.c_[np.ones(len(x)), x.double().numpy()], y, rcond=None)[0]
    np.testing.assert_allclose(r.scores.numpy(), sol[1:], atol=1e-8)
    assert r.diagnostics["n_evaluations"] == 40 and torch.equal(r.extra["masks"], x)


def test_tokens_shapley_values_equal_captum(lm64):
    captum = pytest.importorskip("captum.attr")
    hf = lm64.model
    ids = lm64.tokenize(PROMPT).input_ids
    tid = lm64.token_id(" to")
    wte = hf.get_input_embeddings()
    emb = wte(ids).detach()
    pad = wte(torch.full_like(ids, lm64.pad_token_id)).detach()
    mask = torch.arange(ids.shape[1])[None, :, None].expand_as(emb).contiguous()

    def fwd(e):
        return hf(inputs_embeds=e).logits[:, -1, tid]

    with torch.no_grad():
        abl = captum.FeatureAblation(fwd).attribute(emb, baselines=pad, feature_mask=mask)
        shap = captum.ShapleyValues(fwd).attribute(emb, baselines=pad, feature_mask=mask)
    occ = al.attribute(lm64, PROMPT, target=" to", method="occlusion")
    torch.testing.assert_close(occ.scores.double(), abl[0, :, 0].double(), atol=1e-9, rtol=0)
    ex = al.attribute(lm64, PROMPT, target=" to", method="shapley-exact")
    # Captum's ShapleyValues returns float32 (even for a float64 model)
    torch.testing.assert_close(ex.scores.double(), shap[0, :, 0].double(), atol=1e-7, rtol=0)


def test_deprecated_baseline_is_the_ablation_with_a_warning(lm64):
    with pytest.warns(DeprecationWarning, match="ablation="):
        old = al.attribute(lm64, PROMPT, target=" to", method="occlusion", baseline="zero")
    new = al.attribute(lm64, PROMPT, target=" to", method="occlusion", ablation="zero")
    torch.testing.assert_close(old.scores, new.scores, atol=0, rtol=0)


# -------------------------------------------------------------- components
def _needs_component_f(kind: str):
    if "f" not in al.units.resolve(kind).provides:
        pytest.skip(f"units {kind!r} do not provide f yet")


@pytest.fixture(scope="module")
def gpt2():
    return al.wrap(*al.testing.tiny_model("gpt2", dtype=torch.float64))


CF = "When Anna and Tom went"
#: the component kinds' f returns float32 values even for a float64 model (today)
ATOL_COMPONENTS = 1e-6


def _capture(hf, modules, ids):
    """Inputs of the given modules on a clean run of ``ids``: [{module: input}]."""
    got = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, i=i: got.__setitem__(i, args[0].detach()))
        for i, m in enumerate(modules)
    ]
    try:
        with torch.no_grad():
            hf(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return got


def _slice_runs(lm, prompt, answer, modules, slices, donor=None):
    """f(keep) built by hand: for every unit not kept, the slice ``slices[u]`` of
    the input of ``modules[u]`` is set to zero (``donor=None``), to a
    counterfactual run's value (``donor`` a prompt) or to the mean over
    reference prompts (``donor`` a list). ``modules``/``slices`` are per unit."""
    ids = lm.tokenize(prompt).input_ids
    tid = lm.token_id(answer)
    hf = lm.model
    uniq = list(dict.fromkeys(modules))
    donors = None
    if isinstance(donor, str):  # a counterfactual prompt: its run's values
        donors = _capture(hf, uniq, lm.tokenize(donor).input_ids)
    elif donor is not None:  # reference prompts (same length): their mean per position
        got = _capture(hf, uniq, lm.tokenize(list(donor)).input_ids)
        donors = {i: a.mean(0, keepdim=True) for i, a in got.items()}

    def run(keep_row):
        def pre(mod, args, mi):
            x = args[0].clone()
            for u, m in enumerate(modules):
                if m is mod and not keep_row[u]:
                    x[..., slices[u]] = 0.0 if donors is None else donors[mi][..., slices[u]]
            return (x,)

        hooks = [m.register_forward_pre_hook(lambda mod, a, i=i: pre(mod, a, i))
                 for i, m in enumerate(uniq)]  # fmt: skip
        try:
            with torch.no_grad():
                return float(hf(input_ids=ids).logits[0, -1, tid])
        finally:
            for h in hooks:
                h.remove()

    def v(keep):
        return torch.tensor([run(row.tolist()) for row in keep], dtype=torch.float64)

    return v


def _heads_oracle(lm, donor=None):
    hf = lm.model
    c = hf.config
    d_head = c.n_embd // c.n_head
    mods, slices = [], []
    for layer in range(c.n_layer):
        for h in range(c.n_head):
            mods.append(hf.transformer.h[layer].attn.c_proj)
            slices.append(slice(h * d_head, (h + 1) * d_head))
    return _slice_runs(lm, PROMPT, " to", mods, slices, donor)


def test_heads_exact_shapley_and_kernelshap_equal_brute_force(gpt2):
    _needs_component_f("heads")
    v = _heads_oracle(gpt2)
    n = 8  # 2 layers x 4 heads
    want = shapley_by_subsets(_memo(v, n), n)[0]
    for method in ("shapley-exact", "kernelshap"):
        r = al.attribute(gpt2, PROMPT, target=" to", units="heads", method=method,
                         ablation="zero")  # fmt: skip
        assert r.units["layer"] == [0, 0, 0, 0, 1, 1, 1, 1]
        torch.testing.assert_close(r.scores.double(), want, atol=ATOL_COMPONENTS, rtol=0)


REFS = ["When Tom and Anna went", "When Mary and Anna went", "When John and Tom went"]


@pytest.mark.parametrize("ablation", ["zero", "counterfactual", "mean"])
def test_heads_occlusion_both_directions_equal_hooks(gpt2, ablation):
    _needs_component_f("heads")
    donor = {"zero": None, "counterfactual": CF, "mean": REFS}[ablation]
    v = _heads_oracle(gpt2, donor)
    n = 8
    eye = torch.eye(n, dtype=torch.bool)
    full, empty = v(torch.ones(1, n).bool()), v(torch.zeros(1, n).bool())
    kw = {
        "zero": dict(ablation="zero"),
        "counterfactual": dict(counterfactual=CF),
        "mean": dict(ablation="mean", reference=REFS),
    }[ablation]
    r = al.attribute(gpt2, PROMPT, target=" to", units="heads", method="occlusion", **kw)
    torch.testing.assert_close(r.scores.double(), full - v(~eye), atol=ATOL_COMPONENTS, rtol=0)
    r = al.attribute(gpt2, PROMPT, target=" to", units="heads", method="occlusion",
                     direction="denoising", **kw)  # fmt: skip
    torch.testing.assert_close(r.scores.double(), v(eye) - empty, atol=ATOL_COMPONENTS, rtol=0)


def test_heads_surrogate_equals_least_squares_on_hook_runs(gpt2):
    _needs_component_f("heads")
    from attrlab.methods.surrogate import sample_masks

    v = _heads_oracle(gpt2)
    r = al.attribute(gpt2, PROMPT, target=" to", units="heads", method="coar", samples=48,
                     keep_prob=0.7, seed=1, ablation="zero")  # fmt: skip
    x = sample_masks(48, 8, 0.7, 1, "bernoulli")
    y = v(x).numpy()
    sol = np.linalg.lstsq(np.c_[np.ones(len(x)), x.double().numpy()], y, rcond=None)[0]
    np.testing.assert_allclose(r.scores.numpy(), sol[1:], atol=ATOL_COMPONENTS)
    assert "r2_holdout" in r.diagnostics


def test_neurons_exact_shapley_equals_brute_force(gpt2):
    _needs_component_f("neurons")
    hf = gpt2.model
    picked = [1, 5, 9, 13]
    mods, slices = [], []
    for layer in range(2):
        for nrn in picked:
            mods.append(hf.transformer.h[layer].mlp.c_proj)  # its input: post-activation
            slices.append(slice(nrn, nrn + 1))
    v = _slice_runs(gpt2, PROMPT, " to", mods, slices)
    want = shapley_by_subsets(_memo(v, 8), 8)[0]
    units = al.units.Neurons(neurons=picked)
    for method in ("shapley-exact", "kernelshap"):
        r = al.attribute(gpt2, PROMPT, target=" to", units=units, method=method, ablation="zero")
        assert r.units["neuron"] == picked * 2
        torch.testing.assert_close(r.scores.double(), want, atol=ATOL_COMPONENTS, rtol=0)


def test_mlps_exact_shapley_equals_brute_force():
    _needs_component_f("mlp")
    lm = al.wrap(*al.testing.tiny_model("llama", dtype=torch.float64, num_hidden_layers=4))
    hf = lm.model
    n = 4
    ids = lm.tokenize(PROMPT).input_ids
    tid = lm.token_id(" to")

    def v(keep):
        out = []
        for row in keep.tolist():
            hooks = [
                hf.model.layers[i].mlp.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
                for i in range(n)
                if not row[i]
            ]
            try:
                with torch.no_grad():
                    out.append(float(hf(input_ids=ids).logits[0, -1, tid]))
            finally:
                for h in hooks:
                    h.remove()
        return torch.tensor(out, dtype=torch.float64)

    want = shapley_by_permutations(_memo(v, n), n)[0]
    for method in ("shapley-exact", "kernelshap"):
        r = al.attribute(lm, PROMPT, target=" to", units="mlp", method=method, ablation="zero")
        torch.testing.assert_close(r.scores.double(), want, atol=ATOL_COMPONENTS, rtol=0)
    s = al.attribute(lm, PROMPT, target=" to", units="mlp", method="shapley", permutations=64)
    assert float(s.scores.sum()) == pytest.approx(float(want.sum()), abs=ATOL_COMPONENTS)


def _memo(v, n: int):
    """Evaluate ``v`` once on every subset (brute force), then look values up."""
    bits = 2 ** torch.arange(n)
    keep = ((torch.arange(2**n)[:, None] >> torch.arange(n)) & 1).bool()
    table = v(keep)

    def lookup(k):
        return table[(k.long() * bits).sum(-1)]

    return lookup


def test_estimator_warnings_are_not_raised_on_ordinary_use(gpt2):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        al.attribute(gpt2, PROMPT, target=" to", method="kernelshap", samples=32)
        al.attribute(gpt2, PROMPT, target=" to", method="lime", samples=32)
