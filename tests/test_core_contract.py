"""The core contract: estimators written once over the Bound interface, one
sign, one evaluation, derived method x unit availability. Oracles: toy bound
questions with known additive / hand-computed values, brute-force Shapley
enumeration, exact patching on the zoo IOI model."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

import attrlab as al
from attrlab.methods.base import all_methods, methods_for
from attrlab.methods.context_baselines import HierarchicalSearch
from attrlab.methods.context_traceback import TracLLM
from attrlab.methods.gradient import ExpectedGradients, InputXGradient, IntegratedGradients
from attrlab.methods.perturbation import ExactShapley, KernelShap, Occlusion, ShapleySampling
from attrlab.methods.surrogate import Coar, Datamodels, Lime, LinearSurrogate
from attrlab.result import Attribution
from attrlab.units.base import Bound, Units

W = torch.tensor([2.0, -1.0, 0.5, 0.0, -3.0], dtype=torch.float64)


class Toy(Units):
    """A toy unit kind whose f is a known function of the keep-mask (not registered)."""

    kind = "toy"
    provides = frozenset({"f", "gates"})

    def __init__(self, fn=None):
        self._fn = fn

    def bind(self, lm, inputs, target, ablation=None, **options):
        return ToyBound(self, self._fn)


class ToyBound(Bound):
    def __init__(self, units, fn=None):
        self.units, self.ablation, self.n, self.n_rows = units, None, len(W), 1
        self.fn = fn or (lambda g: 1.0 + g.double() @ W)  # additive by default

    def labels(self):
        return {"unit": list(range(self.n))}

    def f(self, keep):
        return self.fn(self.check_keep(keep).double())[:, None]

    def f_gated(self, g):
        return self.fn(self.check_gates(g).double())[:, None]


def _interaction(g):
    """Non-additive: 1 + sum(W g) + 4 g0 g1 (Shapley splits the interaction evenly)."""
    return 1.0 + g @ W + 4.0 * g[:, 0] * g[:, 1]


ESTIMATORS = [
    Occlusion(),
    Occlusion(direction="denoising"),
    ExactShapley(),
    KernelShap(),
    ShapleySampling(permutations=8),
    LinearSurrogate(samples=64),
    Lime(samples=128),
    Coar(samples=256, keep_prob=0.6),
    Datamodels(samples=128, alpha=1e-6),
    InputXGradient(),
    IntegratedGradients(steps=8),
    ExpectedGradients(samples=64),
    HierarchicalSearch(branching=2, keep=8),  # every group refined: leave-one-out
    TracLLM(score_funcs=("loo",), loo_weight=1.0),  # n <= top_k: leave-one-out
]


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: f"{e.name}")
def test_every_estimator_recovers_an_additive_function_with_its_sign(est):
    scores, _ = est.estimate(ToyBound(Toy()))
    torch.testing.assert_close(scores[0].double(), W, atol=0.05, rtol=0.05)


def test_shapley_estimators_equal_brute_force_on_an_interaction():
    bound = ToyBound(Toy(), _interaction)
    n = bound.n
    phi = torch.zeros(n, dtype=torch.float64)
    for i in range(n):  # Shapley's formula by hand
        others = [j for j in range(n) if j != i]
        for k in range(n):
            for s in itertools.combinations(others, k):
                m = torch.zeros(1, n, dtype=torch.float64)
                m[0, list(s)] = 1
                with_i = m.clone()
                with_i[0, i] = 1
                w = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
                phi[i] += w * float(_interaction(with_i) - _interaction(m))
    assert float(phi[0]) == pytest.approx(2.0 + 2.0)  # W0 + half the interaction
    for est in (ExactShapley(), KernelShap()):
        torch.testing.assert_close(est.estimate(bound)[0][0].double(), phi, atol=1e-9, rtol=0)
    # occlusion sees the whole interaction twice (noising) or never (denoising)
    occ = Occlusion().estimate(bound)[0][0]
    assert float(occ[0]) == pytest.approx(2.0 + 4.0)
    den = Occlusion(direction="denoising").estimate(bound)[0][0]
    assert float(den[0]) == pytest.approx(2.0)


def test_ig_over_gates_is_complete_and_input_x_gradient_is_the_slope_at_one():
    bound = ToyBound(Toy(), _interaction)
    ig, diag = IntegratedGradients(steps=16).estimate(bound)
    assert abs(diag["completeness_error"]) < 1e-9
    ixg, _ = InputXGradient().estimate(bound)
    want = W.clone()
    want[0] += 4.0
    want[1] += 4.0  # d/dg0 of 4 g0 g1 at g = 1
    torch.testing.assert_close(ixg[0].double(), want)


def test_lds_of_an_additive_target_is_one_and_sign_matters():
    lm = al.wrap(*al.testing.tiny_model("gpt2"))
    toy = Toy()
    r = Attribution(W.clone(), {"unit": list(range(len(W)))}, "toy", "oracle")
    assert float(al.evaluate.lds(lm, r, "x", " a", units=toy, n_masks=32)) == pytest.approx(1.0)
    flipped = Attribution(-W, {"unit": list(range(len(W)))}, "toy", "oracle")
    assert float(al.evaluate.lds(lm, flipped, "x", " a", units=toy, n_masks=32)) < -0.9


def test_availability_is_derived_from_needs_and_provides():
    table = all_methods()
    components = ("heads", "attn", "mlp", "neurons", "experts", "resid", "layers", "features")
    for kind in (*components, "tokens", "words", "sentences", "spans"):
        for m in ("occlusion", "shapley", "shapley-exact", "kernelshap", "lime", "coar",
                  "datamodels", "contextcite", "surrogate", "tracllm", "hierarchical"):  # fmt: skip
            assert kind in table[m], (m, kind)
        for m in ("ig", "input-x-gradient", "expected-gradients"):
            assert kind in table[m], (m, kind)
    assert set(table["atp"]) == set(components)
    assert "tokens" not in methods_for("heads") and "kernelshap" in methods_for("heads")
    with pytest.raises(al.errors.UnknownMethodError, match="works on"):
        al.attribute(al.wrap(*al.testing.tiny_model("gpt2")), "a b", " a", units="tokens",
                     method="atp")  # fmt: skip


def test_the_readme_table_is_the_generated_one():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert al.methods.base.method_table() in readme, (
        "README's method table is stale: paste the output of "
        "python -c 'import attrlab as al; print(al.methods.base.method_table())'"
    )


# ---------------------------------------------------------------- zoo IOI
@pytest.fixture(scope="module")
def ioi():
    lm = al.zoo.load("ioi")
    exs = al.zoo.task("ioi").examples(3, seed=0)
    return lm, exs


@pytest.mark.parametrize("i", [0, 1, 2])
def test_zoo_ioi_estimators_over_heads_agree_with_exact_patching(ioi, i):
    """Issue floor: COAR, KernelSHAP and occlusion over heads agree with exact
    patching (Spearman >= 0.8, counterfactual ablation); LDS over heads > 0.5 for
    COAR and KernelSHAP; reported (finite) for DLA, AtP*, IG."""
    lm, exs = ioi
    ex = exs[i]
    kw = dict(target=(ex.answer, ex.wrong), units="heads", counterfactual=ex.counterfactual)
    exact = al.attribute(lm, ex.prompt, method="patch", **kw)
    results = {
        "occlusion": al.attribute(lm, ex.prompt, method="occlusion", **kw),
        "kernelshap": al.attribute(lm, ex.prompt, method="kernelshap", **kw),
        "coar": al.attribute(lm, ex.prompt, method="coar", samples=256, **kw),
    }
    for name, r in results.items():
        a = al.evaluate.agreement(r, exact, k=3)
        assert a.spearman >= 0.8, (name, a)
    for name in ("coar", "kernelshap"):
        assert float(al.evaluate.lds(lm, results[name], n_masks=64)) > 0.5, name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        others = {
            "atp*": al.attribute(lm, ex.prompt, method="atp*", **kw),
            "ig": al.attribute(lm, ex.prompt, method="ig", steps=16, **kw),
        }
    for r in others.values():
        assert math.isfinite(float(al.evaluate.lds(lm, r, n_masks=32)))
    dla = al.attribute(lm, ex.prompt, target=(ex.answer, ex.wrong), units="heads", method="dla")
    lds_dla = al.evaluate.lds(lm, dla, n_masks=32, counterfactual=ex.counterfactual)
    assert math.isfinite(float(lds_dla))
    # agreement with "exact" recomputes occlusion with the same ablation
    assert al.evaluate.agreement(results["occlusion"], "exact", lm=lm).pearson == pytest.approx(1.0)
