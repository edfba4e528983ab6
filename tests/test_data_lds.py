"""The LDS harness, TRAK's LDS on digits, and the comparison with the ``traker`` package."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

import attrlab as al
import attrlab.data as ad
from attrlab.data.digits import digits_harness, load_digits_data, train_mlp
from attrlab.data.lds import LDSHarness, lds, lds_score, subset_masks
from attrlab.errors import InputError
from attrlab.result import Attribution

N_TRAIN, N_QUERY, HIDDEN, EPOCHS, M, C, K = 300, 40, 16, 6, 24, 3, 128


def test_lds_is_one_for_linear_outputs_and_ci_brackets():
    rng = np.random.default_rng(0)
    tau = rng.normal(size=(5, 40))
    masks = subset_masks(40, 30, alpha=0.5, seed=1)
    assert (masks.sum(1) == 20).all()
    exact = lds_score(tau, masks, masks @ tau.T)
    assert exact.lds == pytest.approx(1.0) and exact.ci[0] == pytest.approx(1.0)
    noisy = lds_score(tau, masks, masks @ tau.T + rng.normal(scale=3.0, size=(30, 5)))
    assert 0 < noisy.lds < 1 and noisy.ci[0] <= noisy.lds <= noisy.ci[1]
    anti = lds_score(-tau, masks, masks @ tau.T)
    assert anti.lds == pytest.approx(-1.0)
    with pytest.raises(InputError, match="outputs"):
        lds_score(tau, masks, np.zeros((30, 4)))
    with pytest.raises(InputError, match="masks"):
        lds_score(tau[:, :39], masks, masks @ tau.T)
    with pytest.raises(InputError, match="alpha"):
        subset_masks(10, 5, alpha=1.5)


def test_harness_caches_retrained_outputs(tmp_path):
    w = np.random.default_rng(0).normal(size=(3, 16))
    calls = []

    def fn(idx, j):
        calls.append(j)
        return w[:, idx].sum(1)

    h = LDSHarness(fn, n_train=16, n_models=6, cache_dir=tmp_path, key="toy")
    assert h.score(w).lds == pytest.approx(1.0)
    assert len(calls) == 6
    h2 = LDSHarness(fn, n_train=16, n_models=6, cache_dir=tmp_path, key="toy")
    assert np.array_equal(h2.outputs(), h.outputs()) and len(calls) == 6  # all from the cache
    LDSHarness(fn, n_train=16, n_models=6, cache_dir=tmp_path, key="other").outputs()
    assert len(calls) == 12  # another setup is not confused with the first
    r = Attribution(
        torch.tensor(w), units={"index": list(range(16))}, unit_kind="train", method="x"
    )
    assert lds(r, harness=h).lds == pytest.approx(1.0)
    with pytest.raises(InputError, match="harness"):
        lds(r)
    # the generic evaluator dispatches training units here
    assert al.evaluate.lds(r, harness=h).lds == pytest.approx(1.0)
    assert al.evaluate.lds(r, harness=h, n_masks=6, alpha=0.5).lds == pytest.approx(1.0)
    with pytest.raises(InputError, match="n_masks"):
        al.evaluate.lds(r, harness=h, n_masks=7)


@pytest.fixture(scope="module")
def digits_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lds")
    xtr, ytr, xte, yte = load_digits_data()
    xtr, ytr, xq, yq = xtr[:N_TRAIN], ytr[:N_TRAIN], xte[:N_QUERY], yte[:N_QUERY]
    models = [train_mlp(xtr, ytr, hidden=HIDDEN, epochs=EPOCHS, seed=s) for s in range(C)]
    harness = digits_harness(
        xtr, ytr, xq, yq, n_models=M, hidden=HIDDEN, epochs=EPOCHS, cache_dir=tmp / "cache"
    )
    harness.outputs()
    stores = [
        ad.featurize(m, (xtr, ytr), tmp / f"store{i}", proj_dim=K, batch_size=100)
        for i, m in enumerate(models)
    ]
    return xtr, ytr, xq, yq, models, stores, harness


def test_trak_lds_on_digits_beats_chance(digits_setup):
    xtr, ytr, xq, yq, models, stores, harness = digits_setup
    r = ad.TRAK(stores).attribute(models, (xq, yq))
    res = harness.score(r)
    assert res.ci[0] > 0.0, res  # clearly positive
    rnd = harness.score(np.random.default_rng(0).normal(size=r.scores.shape))
    assert res.lds > rnd.lds + 0.05
    # ensembling over models helps (or at least does not hurt much)
    single = harness.score(ad.TRAK(stores[:1]).attribute(models[:1], (xq, yq)))
    assert res.lds >= single.lds - 0.02


def _traker_scores(models, xtr, ytr, xq, yq, k, save_dir):
    trak = pytest.importorskip("trak")
    from trak.projectors import BasicProjector, ProjectionType

    d = sum(p.numel() for p in models[0].parameters())
    proj = BasicProjector(d, k, 0, ProjectionType.rademacher, "cpu", dtype=torch.float32)
    tr = trak.TRAKer(
        model=copy.deepcopy(models[0]), task="image_classification", train_set_size=len(ytr), save_dir=str(save_dir),
        device="cpu", projector=proj, proj_dim=k, use_half_precision=False, logging_level=logging.ERROR,
    )  # fmt: skip
    # (traker loads each checkpoint into its own copy of the model)
    for i, m in enumerate(models):
        tr.load_checkpoint(m.state_dict(), model_id=i)
        for s in range(0, len(ytr), 100):
            tr.featurize(
                batch=(xtr[s : s + 100], ytr[s : s + 100]), num_samples=len(ytr[s : s + 100])
            )
    tr.finalize_features()
    for i, m in enumerate(models):
        tr.start_scoring_checkpoint(
            exp_name="q", checkpoint=m.state_dict(), model_id=i, num_targets=len(yq)
        )
        tr.score(batch=(xq, yq), num_samples=len(yq))
    return np.asarray(tr.finalize_scores(exp_name="q"), np.float64).T  # [queries, train]


def test_lds_at_least_traker(digits_setup, tmp_path):
    xtr, ytr, xq, yq, models, stores, harness = digits_setup
    peer = harness.score(_traker_scores(models, xtr, ytr, xq, yq, K, tmp_path / "traker"))
    ours = harness.score(ad.TRAK(stores).attribute(models, (xq, yq)))
    # same models, checkpoints, projection dimension and subsets
    assert ours.lds >= peer.lds, (ours, peer)
    # with traker's kernel (no ridge) the two agree up to projection noise
    same_kernel = harness.score(ad.TRAK(stores, reg=0.0).attribute(models, (xq, yq)))
    assert abs(same_kernel.lds - peer.lds) < 0.05, (same_kernel, peer)
