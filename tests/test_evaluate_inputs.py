"""Evaluation of input attributions: LDS, deletion/insertion, ERASER, randomization."""

from __future__ import annotations

import doctest
import importlib
import math

import numpy as np
import pytest
import torch

import attrlab as al
from attrlab.errors import InputError
from attrlab.evaluate.lds import random_subsets, spearman, units_of

PROMPT = "When Mary and John went to the"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread


@pytest.fixture(scope="module")
def lm():
    return al.wrap(*al.testing.tiny_model("gpt2", dtype=torch.float64))


@pytest.mark.parametrize("name", ["lds", "curves", "sanity", "agreement"])
def test_doctests(name):
    mod = importlib.import_module(f"attrlab.evaluate.{name}")
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0


def test_exports():
    for name in (
        "lds",
        "deletion_curve",
        "insertion_curve",
        "comprehensiveness",
        "sufficiency",
        "randomization_check",
        "agreement",
    ):
        assert name in al.evaluate.__all__ and callable(getattr(al.evaluate, name))


def test_spearman_and_subsets():
    assert spearman([1, 2, 3], [2, 4, 8]) == pytest.approx(1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    m = random_subsets(9, 50, alpha=0.3, seed=3)
    assert m.shape == (50, 9) and bool((m.sum(-1) == 3).all())
    assert torch.equal(m, random_subsets(9, 50, alpha=0.3, seed=3))
    with pytest.raises(InputError):
        random_subsets(9, 5, alpha=1.5)


def test_lds_prediction_is_sum_of_kept_scores(lm):
    r = al.attribute(lm, PROMPT, target=" store", method="kernelshap")
    s = al.evaluate.lds(lm, r, PROMPT, target=" store", n_masks=40, seed=2)
    assert s.masks.shape == (40, len(r))
    torch.testing.assert_close(s.predicted, s.masks.double() @ r.scores.double())
    # the measured values are f(S) from the units' own ablation
    bound = al.units.resolve("tokens").bind(lm, PROMPT, al.targets.resolve(" store", lm))
    torch.testing.assert_close(s.values, bound.f(s.masks)[:, 0].double())
    assert s.lds == pytest.approx(spearman(s.predicted, s.values))


def test_lds_ranks_methods(lm):
    """Exact Shapley predicts ablations better than a shuffled copy of itself."""
    r = al.attribute(lm, PROMPT, target=" store", method="shapley-exact")
    good = al.evaluate.lds(lm, r, PROMPT, " store", n_masks=48)
    shuffled = al.Attribution(
        r.scores[torch.randperm(len(r), generator=torch.Generator().manual_seed(0))],
        units=r.units,
        unit_kind="tokens",
        method="x",
        meta=r.meta,
    )
    bad = al.evaluate.lds(lm, shuffled, PROMPT, " store", n_masks=48)
    assert good.lds > 0.8 and good.lds > bad.lds


def test_lds_rows_words_spans(lm):
    tgt = al.targets.ContinuationLogProb(" store and", reduce="none")
    r = al.attribute(lm, PROMPT, target=tgt, method="occlusion")
    s = al.evaluate.lds(lm, r, PROMPT, tgt, n_masks=16)
    assert len(s.per_row) == 2 and s.values.shape == (16, 2)
    w = al.attribute(
        lm, PROMPT, target=" store", units=[(0, 4), (5, 9), (14, 18)], method="occlusion"
    )
    assert units_of(w).spans_list == [(0, 4), (5, 9), (14, 18)]
    s2 = al.evaluate.lds(lm, w, PROMPT, " store", n_masks=8)
    assert s2.masks.shape == (8, 3)
    with pytest.raises(InputError):
        al.evaluate.lds(lm, "not a result", PROMPT, " store")


def test_lds_dispatches_training_results():
    from attrlab.data.lds import subset_masks

    tau = np.random.default_rng(0).normal(size=(2, 12))
    r = al.Attribution(
        torch.tensor(tau), units={"index": list(range(12))}, unit_kind="train", method="x"
    )
    m = subset_masks(12, 16)
    out = al.evaluate.lds(r, masks=m, outputs=m @ tau.T)
    assert out.lds == pytest.approx(1.0)


def test_deletion_insertion_curves(lm):
    r = al.attribute(lm, PROMPT, target=" store", method="occlusion")
    d = al.evaluate.deletion_curve(lm, r, PROMPT, " store")
    i = al.evaluate.insertion_curve(lm, r, PROMPT, " store")
    n = len(r)
    assert d.fractions[0] == 0.0 and d.fractions[-1] == 1.0 and len(d.values) == n + 1
    assert d.values[0] == pytest.approx(d.full) and d.values[-1] == pytest.approx(d.empty)
    assert i.values[0] == pytest.approx(i.empty) and i.values[-1] == pytest.approx(i.full)
    # the first deletion step removes the top unit: its drop is its occlusion score
    assert d.full - d.values[1] == pytest.approx(float(r.scores.max()))
    assert d.order[0] == int(r.scores.argmax())
    # a good ranking deletes faster than the reverse ranking
    rev = al.Attribution(-r.scores, units=r.units, unit_kind="tokens", method="x", meta=r.meta)
    d_rev = al.evaluate.deletion_curve(lm, rev, PROMPT, " store")
    assert d.area < d_rev.area and d.aopc > d_rev.aopc
    few = al.evaluate.deletion_curve(lm, r, PROMPT, " store", steps=3)
    assert len(few.values) == 4


def test_eraser(lm):
    r = al.attribute(lm, PROMPT, target=" store", method="occlusion")
    comp = al.evaluate.comprehensiveness(lm, r, PROMPT, " store", bins=(0.1,))
    # one unit removed (ceil(0.1 * 7) = 1): the occlusion score of the top unit
    assert comp == pytest.approx(float(r.scores.max()))
    suff = al.evaluate.sufficiency(lm, r, PROMPT, " store", bins=(1.0,))
    assert suff == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(InputError):
        al.evaluate.comprehensiveness(lm, r, PROMPT, " store", bins=(0.0,))


def test_randomization_check(lm):
    r = al.attribute(lm, PROMPT, target=" store", method="ig", steps=8)
    c = al.evaluate.randomization_check(lm, r, PROMPT, target=" store", seed=0)
    assert c.randomized.method == "ig" and c.randomized.params["steps"] == 8
    assert not torch.equal(c.randomized.scores, r.scores)
    assert -1 <= c.spearman <= 1
    # randomizing nothing reproduces the attribution exactly
    same = al.evaluate.randomization_check(lm, r, PROMPT, target=" store", include=["nothing"])
    assert same.spearman == pytest.approx(1.0)
    torch.testing.assert_close(same.randomized.scores, r.scores)
