"""One evaluation over the bound question, on every unit kind.

``al.evaluate.lds`` / curves / ERASER / ``agreement`` read the question a result
answers (inputs, target, units, ablation) and measure ``units.bind(...).f``.
Oracles, each independent of the code under test:

* a registered toy kind whose ``f`` is additive with known weights: occlusion
  recovers the weights, LDS is exactly 1 (and -1 for the sign-flipped result),
  the deletion curve of the true ranking is the hand-summed one and falls;
* component evaluations against runs built by hand with hooks
  (``lm.run(..., interventions=...)``): zero, mean and counterfactual ablations;
* alignment against a permutation done by hand; ``agreement(r, "exact")``
  against occlusion run by hand with the same ablation.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import attrlab as al
from attrlab.ablations import Zero
from attrlab.errors import (
    InputError,
    NonFiniteError,
    QuestionMismatchError,
    UnitMismatchError,
    UnsupportedAblationError,
)
from attrlab.result import Attribution
from attrlab.units.base import _KINDS, Bound, Units, register_units

pytestmark = pytest.mark.usefixtures("one_thread")

P = "When Mary and John went to the store, John gave a drink to"
CF = "When Mary and John went to the store, Mary gave a drink to"
T = (" Mary", " John")

components = pytest.mark.skipif(
    "f" not in al.units.Heads().provides, reason="component kinds do not provide f yet"
)


@pytest.fixture(scope="module")
def lm():
    return al.wrap(*al.testing.tiny_model("gpt2", dtype=torch.float64))


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


# ------------------------------------------------------------ the toy kind
W = torch.tensor([2.0, -1.0, 0.5, 3.0, -0.25, 1.5], dtype=torch.float64)
C = 0.75  # f(no unit)


class Additive(Units):
    """A toy unit kind: ``f(S) = C + sum_{i in S} W_i`` (``n`` units)."""

    provides = frozenset({"f", "gates"})
    ablations = (Zero,)

    def __init__(self, n: int = len(W)):
        self.n = n

    def bind(self, lm, inputs, target, ablation=None, **options):
        return AdditiveBound(self, self.check_ablation(ablation))


class AdditiveBound(Bound):
    def __init__(self, units, ablation):
        self.units, self.ablation = units, ablation
        self.n, self.n_rows, self.target_name = units.n, 1, "toy"
        self.calls = 0

    def labels(self):
        return {"unit": [f"u{i}" for i in range(self.n)]}

    def f(self, keep):
        return C + self.check_keep(keep).double() @ W[: self.n, None]

    def f_gated(self, g):
        return C + self.check_gates(g).double() @ W[: self.n, None]


@pytest.fixture
def toy():
    """The toy kind registered as ``units="toy-additive"`` for one test."""
    register_units("toy-additive")(Additive)
    yield "toy-additive"
    del _KINDS["toy-additive"]


def _flipped(r: Attribution) -> Attribution:
    return Attribution(-r.scores, r.units, r.unit_kind, "flipped", meta=r.meta)


def test_additive_toy_gives_lds_one_and_the_flipped_result_minus_one(lm, toy):
    r = al.attribute(lm, "x y", target=" a", units=toy, method="occlusion")
    torch.testing.assert_close(r.scores.double(), W)  # occlusion of an additive f
    s = al.evaluate.lds(lm, r, n_masks=40)  # units rebuilt from the result
    assert s.lds == pytest.approx(1.0)
    masks = s.masks.double()
    torch.testing.assert_close(s.values, C + masks @ W)  # f measured on the toy kind
    assert al.evaluate.lds(lm, _flipped(r), n_masks=40).lds == pytest.approx(-1.0)


def test_deletion_curve_of_the_true_ranking_is_the_hand_sum_and_falls(lm, toy):
    r = al.attribute(lm, "x y", target=" a", units=toy, method="occlusion")
    d = al.evaluate.deletion_curve(lm, r)
    order = torch.argsort(W, descending=True)
    want = [C + float(W.sum() - W[order[:k]].sum()) for k in range(len(W) + 1)]
    assert d.values == pytest.approx(want)
    assert (d.full, d.empty) == (pytest.approx(C + float(W.sum())), pytest.approx(C))
    n_pos = int((W > 0).sum())
    assert all(a > b for a, b in zip(d.values[: n_pos + 1], d.values[1 : n_pos + 1]))
    # removing the largest first makes every prefix smallest: no ranking beats it
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        other = Attribution(torch.randn(len(W), generator=gen), r.units, toy, "x", meta=r.meta)
        assert d.area <= al.evaluate.deletion_curve(lm, other).area + 1e-12
    i = al.evaluate.insertion_curve(lm, r)
    assert i.values == pytest.approx([C + float(W[order[:k]].sum()) for k in range(len(W) + 1)])
    comp = al.evaluate.comprehensiveness(lm, r, bins=(1 / len(W),))
    assert comp == pytest.approx(float(W.max()))
    assert al.evaluate.sufficiency(lm, r, bins=(1.0,)) == pytest.approx(0.0)


def test_toy_kind_refuses_an_ablation_it_does_not_declare(lm, toy):
    r = al.attribute(lm, "x y", target=" a", units=toy, method="occlusion")
    with pytest.raises(UnsupportedAblationError, match="toy-additive"):
        al.evaluate.lds(lm, r, ablation="pad", n_masks=4)


# ------------------------------------------------------- component kinds
def _logit_diff(lm, interventions=()):
    logits, _ = lm.run(P, interventions=list(interventions))
    a, b = lm.token_id(T[0]), lm.token_id(T[1])
    return float(logits[0, -1, a] - logits[0, -1, b])


def _hand_ablated(lm, site_of, units, value_of):
    """The target with ``units`` ((layer, index) pairs) set to ``value_of(layer)``
    (a tensor of the site's shape, or a number), by hand with interventions."""
    ivs = []
    for layer, index in units:
        v = value_of(layer)
        if index is None:
            ivs.append(al.Intervention(site_of(layer), v))
        else:
            v = v[:, :, index : index + 1] if isinstance(v, torch.Tensor) else v
            ivs.append(al.Intervention(site_of(layer), v, heads=[index]))
    return _logit_diff(lm, ivs)


def _cached(lm, prompt, sites):
    _, cache = lm.run(prompt, cache=sites)
    return {s: cache[s].detach() for s in sites}


@components
@pytest.mark.parametrize("ablation", ["zero", "counterfactual"])
def test_heads_curves_match_hand_built_runs(lm, ablation):
    kw = {"counterfactual": CF} if ablation == "counterfactual" else {"ablation": ablation}
    r = _quiet(al.attribute, lm, P, target=T, units="heads", method="kernelshap", **kw)
    d = al.evaluate.deletion_curve(lm, r, steps=None)
    L, H = lm.cfg.n_layers, lm.cfg.n_heads
    z = [f"blocks.{layer}.attn.z" for layer in range(L)]
    cf = _cached(lm, CF, z)
    value = (lambda layer: 0.0) if ablation == "zero" else (lambda layer: cf[z[layer]])
    units = [(layer, h) for layer in range(L) for h in range(H)]
    assert d.full == pytest.approx(_logit_diff(lm), rel=1e-6)
    assert d.empty == pytest.approx(_hand_ablated(lm, z.__getitem__, units, value), rel=1e-6)
    top = units[d.order[0]]
    assert d.values[1] == pytest.approx(_hand_ablated(lm, z.__getitem__, [top], value), rel=1e-6)


@components
def test_mlp_mean_ablation_matches_a_hand_built_mean(lm):
    ref = [CF, "When John and Mary went to the store, Mary gave a drink to"]
    n = lm.tokenize(P).input_ids.shape[1]
    assert all(lm.tokenize(x).input_ids.shape[1] == n for x in ref)
    r = al.attribute(lm, P, target=T, units="mlp", method="occlusion", ablation="mean",
                     reference=ref)  # fmt: skip
    out = [f"blocks.{layer}.mlp.out" for layer in range(lm.cfg.n_layers)]
    caches = [_cached(lm, x, out) for x in ref]
    mean = {s: torch.stack([c[s] for c in caches]).mean(0) for s in out}
    c = al.evaluate.insertion_curve(lm, r)  # the mean recorded with the result
    units = [(layer, None) for layer in range(lm.cfg.n_layers)]
    want = _hand_ablated(lm, out.__getitem__, units, lambda layer: mean[out[layer]])
    assert c.empty == pytest.approx(want, rel=1e-6)
    # occlusion's own scores are the first deletion step, by hand
    for u, (layer, _) in enumerate(units):
        one = _hand_ablated(lm, out.__getitem__, [(layer, None)], lambda lay: mean[out[lay]])
        assert float(r.scores[u]) == pytest.approx(_logit_diff(lm) - one, abs=1e-6)


SETUPS = [
    ("tokens", {}),
    ("tokens", {"counterfactual": CF}),
    ("heads", {"ablation": "zero"}),
    ("heads", {"counterfactual": CF}),
    ("mlp", {"ablation": "zero"}),
    ("neurons", {"ablation": "zero"}),
    ("layers", {"counterfactual": CF}),
    ("resid", {"ablation": "zero"}),
]


def _units(name):
    return al.units.Neurons(neurons=list(range(6))) if name == "neurons" else name


@pytest.mark.parametrize(
    "kind,kw", SETUPS, ids=[f"{k}-{list(v.values()) or 'default'}" for k, v in SETUPS]
)
def test_faithful_estimator_has_positive_lds_and_its_sign_flip_negative(lm, kind, kw):
    if kind != "tokens" and "f" not in al.units.resolve(kind).provides:
        pytest.skip(f"{kind} does not provide f yet")
    r = _quiet(al.attribute, lm, P, target=T, units=_units(kind), method="kernelshap", **kw)
    good = al.evaluate.lds(lm, r, n_masks=24)
    bad = al.evaluate.lds(lm, _flipped(r), n_masks=24)
    assert good.lds > 0.5 and bad.lds < -0.5, (good.lds, bad.lds)
    # the same masks, the same f: only the sign of the prediction changed
    torch.testing.assert_close(good.values, bad.values)
    d, d_rev = (
        al.evaluate.deletion_curve(lm, r, steps=4),
        al.evaluate.deletion_curve(lm, _flipped(r), steps=4),
    )
    assert d.area < d_rev.area


@components
def test_another_ablation_than_the_recorded_one(lm):
    r_cf = al.attribute(lm, P, target=T, units="heads", method="occlusion", counterfactual=CF)
    r_zero = al.attribute(lm, P, target=T, units="heads", method="occlusion", ablation="zero")
    a = al.evaluate.lds(lm, r_cf, n_masks=8)
    b = al.evaluate.lds(lm, r_cf, n_masks=8, ablation="zero")
    c = al.evaluate.lds(lm, r_zero, n_masks=8)
    torch.testing.assert_close(b.values, c.values)
    assert not torch.allclose(a.values, b.values)
    with pytest.raises(InputError, match="either"):
        al.evaluate.lds(lm, r_cf, n_masks=8, ablation="zero", counterfactual=CF)
    with pytest.raises(InputError, match="reference"):
        al.evaluate.lds(lm, r_cf, n_masks=8, reference=[CF])


@components
def test_unsupported_ablation_and_unknown_options_fail_before_any_forward(lm):
    r = al.attribute(lm, P, target=T, method="occlusion")
    h = al.attribute(lm, P, target=T, units="heads", method="occlusion", ablation="zero")
    calls = []
    hook = lm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(UnsupportedAblationError, match="tokens"):
            al.evaluate.deletion_curve(lm, r, ablation="mean", reference=[CF])
        with pytest.raises(UnsupportedAblationError, match="heads"):
            al.evaluate.lds(lm, h, ablation="pad")
        with pytest.raises(InputError, match="ablaton"):
            al.evaluate.lds(lm, h, n_masks=4, ablaton="zero")
    finally:
        hook.remove()
    assert calls == []


def test_baseline_is_a_deprecated_alias_of_ablation(lm):
    r = al.attribute(lm, P, target=T, method="occlusion")
    with pytest.warns(DeprecationWarning, match="ablation="):
        old = al.evaluate.deletion_curve(lm, r, baseline="zero")
    assert old.values == al.evaluate.deletion_curve(lm, r, ablation="zero").values
    assert old.values != al.evaluate.deletion_curve(lm, r).values  # the default is pad


@components
def test_mismatched_questions_and_non_finite_scores_are_refused(lm):
    r = al.attribute(lm, P, target=T, units="heads", method="occlusion", counterfactual=CF)
    with pytest.raises(QuestionMismatchError):
        al.evaluate.lds(lm, r, "When John and Mary went to the store, Mary gave a drink to")
    with pytest.raises(QuestionMismatchError):
        al.evaluate.deletion_curve(lm, r, target=(" John", " Mary"))
    with pytest.raises(QuestionMismatchError, match="counterfactual"):
        al.evaluate.comprehensiveness(lm, r, counterfactual=P)
    with pytest.raises(QuestionMismatchError, match="units"):
        al.evaluate.lds(lm, r, units="mlp")
    bad = Attribution(r.scores.clone(), r.units, r.unit_kind, r.method, meta=r.meta)
    bad.scores[0] = float("nan")
    for fn in (al.evaluate.lds, al.evaluate.deletion_curve, al.evaluate.sufficiency):
        with pytest.raises(NonFiniteError):
            fn(lm, bad)
    with pytest.raises(NonFiniteError):
        al.evaluate.agreement(bad, r)


@components
def test_a_result_made_without_attribute_reads_its_ablation(lm):
    from attrlab.methods.perturbation import Occlusion

    direct = Occlusion().attribute(lm, P, al.targets.resolve(T, lm), al.units.Heads(),
                                   ablation=al.ablations.Zero())  # fmt: skip
    assert "question" not in direct.meta
    via = al.attribute(lm, P, target=T, units="heads", method="occlusion", ablation="zero")
    a = al.evaluate.lds(lm, direct, P, T, n_masks=8)
    torch.testing.assert_close(a.values, al.evaluate.lds(lm, via, n_masks=8).values)


@components
def test_randomization_check_reruns_with_the_recorded_ablation(lm):
    ref = [CF, "When John and Mary went to the store, Mary gave a drink to"]
    r = al.attribute(lm, P, target=T, units="mlp", method="occlusion", ablation="mean",
                     reference=ref)  # fmt: skip
    same = al.evaluate.randomization_check(lm, r, include=["nothing"])
    torch.testing.assert_close(same.randomized.scores, r.scores)  # zero would differ
    zero = al.attribute(lm, P, target=T, units="mlp", method="occlusion", ablation="zero")
    assert not torch.allclose(zero.scores, r.scores)


# ------------------------------------------------------ agreement and align
def _permuted(r: Attribution, seed: int = 0) -> Attribution:
    perm = torch.randperm(len(r), generator=torch.Generator().manual_seed(seed))
    idx = perm.tolist()
    units = {k: [v[i] for i in idx] for k, v in r.units.items()}
    return Attribution(r.scores[..., perm], units, r.unit_kind, "permuted", meta=r.meta)


def test_agreement_of_a_result_with_itself(lm):
    r = al.attribute(lm, P, target=T, method="kernelshap")
    a = al.evaluate.agreement(r, r, k=5)
    assert a.pearson == pytest.approx(1.0) and a.spearman == pytest.approx(1.0)
    assert a.recall == 1.0 and a.false_negatives == [] and a.n_units == len(r)


def test_agreement_false_negatives_by_hand():
    units = {"layer": [0, 1, 2, 3, 4]}
    ref = Attribution(torch.tensor([5.0, -4.0, 3.0, 0.1, 0.2]), units, "mlp", "ref")
    mine = Attribution(torch.tensor([5.0, 0.0, 3.0, -4.0, 0.2]), units, "mlp", "mine")
    a = al.evaluate.agreement(mine, ref, k=3)
    assert a.recall == pytest.approx(2 / 3)
    assert [(f["layer"], f["reference"], f["score"]) for f in a.false_negatives] == [(1, -4.0, 0.0)]
    x, y = mine.scores.double().numpy(), ref.scores.double().numpy()
    assert a.pearson == pytest.approx(float(np.corrcoef(x, y)[0, 1]))
    with pytest.raises(InputError, match="k must"):
        al.evaluate.agreement(mine, ref, k=0)
    with pytest.raises(InputError, match="Attribution or 'exact'"):
        al.evaluate.agreement(mine, "exactly")
    with pytest.raises(InputError, match="lm="):
        al.evaluate.agreement(mine, "exact")


@components
def test_alignment_of_a_shuffled_result_recovers_pearson_one(lm):
    hp = al.units.Heads(per_position=True)
    r = al.attribute(lm, P, target=T, units=hp, method="atp", counterfactual=CF)
    s = _permuted(r)
    raw = float(np.corrcoef(r.scores.numpy(), s.scores.numpy())[0, 1])
    assert abs(raw) < 0.5  # comparing .scores directly is meaningless
    assert al.evaluate.agreement(r, s).pearson == pytest.approx(1.0)
    a, b = r.align(s)
    assert torch.equal(b.scores, r.scores) and b.units == r.units and a.units == r.units
    # two methods over the same units, listed in different orders
    exact = al.attribute(lm, P, target=T, units=hp, method="patch", counterfactual=CF)
    shuffled_exact = _permuted(exact, seed=1)
    raw = float(np.corrcoef(r.scores.numpy(), shuffled_exact.scores.numpy())[0, 1])
    aligned = al.evaluate.agreement(r, shuffled_exact)
    assert aligned.pearson > 0.9 and abs(raw) < 0.5, (aligned, raw)


@components
def test_align_refuses_labels_that_do_not_match(lm):
    whole = al.attribute(lm, P, target=T, units="heads", method="occlusion", ablation="zero")
    per_pos = al.attribute(lm, P, target=T, units=al.units.Heads(per_position=True),
                           method="occlusion", ablation="zero")  # fmt: skip
    mlp = al.attribute(lm, P, target=T, units="mlp", method="occlusion", ablation="zero")
    with pytest.raises(UnitMismatchError, match="per position"):
        whole.align(per_pos)
    with pytest.raises(UnitMismatchError, match="'heads' units with 'mlp'"):
        al.evaluate.agreement(whole, mlp)
    other = al.attribute(lm, CF, target=T, units=al.units.Heads(per_position=True),
                         method="occlusion", ablation="zero")  # fmt: skip
    with pytest.raises(UnitMismatchError, match="different inputs"):
        per_pos.align(other)
    layer0 = al.attribute(lm, P, target=T, units=al.units.Heads(layers=[0]),
                          method="occlusion", ablation="zero")  # fmt: skip
    layer1 = al.attribute(lm, P, target=T, units=al.units.Heads(layers=[1]),
                          method="occlusion", ablation="zero")  # fmt: skip
    with pytest.raises(UnitMismatchError, match="share no unit"):
        layer0.align(layer1)
    a, b = whole.align(layer0)  # a subset: the common units
    assert len(a) == len(b) == lm.cfg.n_heads and torch.equal(a.scores, b.scores)


CASES = [
    ("tokens", {}),
    ("heads", {"ablation": "zero"}),
    ("heads", {"counterfactual": CF}),
    ("mlp", {"ablation": "mean", "reference": [CF, P]}),
]


@pytest.mark.parametrize("kind,kw", CASES, ids=[f"{k}-{list(v)[:1]}" for k, v in CASES])
def test_agreement_exact_equals_hand_run_occlusion(lm, kind, kw):
    if kind != "tokens" and "f" not in al.units.resolve(kind).provides:
        pytest.skip(f"{kind} does not provide f yet")
    r = _quiet(al.attribute, lm, P, target=T, units=kind, method="kernelshap", **kw)
    hand = al.attribute(lm, P, target=T, units=kind, method="occlusion", **kw)
    got, want = al.evaluate.agreement(r, "exact", lm=lm, k=3), al.evaluate.agreement(r, hand, k=3)
    assert (got.pearson, got.spearman, got.recall) == pytest.approx(
        (want.pearson, want.spearman, want.recall), rel=1e-6
    )
    assert [f.get("layer", f.get("position")) for f in got.false_negatives] == [
        f.get("layer", f.get("position")) for f in want.false_negatives
    ]
    assert al.evaluate.agreement(hand, "exact", lm=lm).pearson == pytest.approx(1.0)


@components
def test_agreement_exact_follows_the_direction(lm):
    kw = dict(target=T, units="heads", method="occlusion", ablation="zero")
    den = al.attribute(lm, P, direction="denoising", **kw)
    noi = al.attribute(lm, P, **kw)
    assert not torch.allclose(den.scores, noi.scores)
    assert al.evaluate.agreement(den, "exact", lm=lm).pearson == pytest.approx(1.0)
