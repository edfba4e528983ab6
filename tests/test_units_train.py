"""Training examples as a bound kind: f(keep) retrains on the kept examples, so
the shared estimators (datamodels, occlusion, KernelSHAP …) run on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attrlab as al
from attrlab.errors import InputError, NonFiniteError

W = np.array([[1.0, -2.0, 0.5, 3.0, 0.0], [0.0, 1.0, 1.0, -1.0, 2.0]])  # [queries, n_train]


def _linear(idx: np.ndarray, j: int) -> np.ndarray:
    """A 'retraining' whose query outputs are exactly additive in the kept examples."""
    return W[:, idx].sum(1) + 0.5


def _units(**kw):
    return al.units.TrainingExamples(retrain=_linear, n_train=W.shape[1], **kw)


def _method(name: str, **opts):
    return al.methods.find_method(name, "train")(**opts)


def test_f_is_the_retraining_function():
    b = _units().bind()
    keep = torch.tensor([[True, False, True, False, False], [False] * 5])
    out = b.f(keep)
    assert out.shape == (2, 2) and b.n_rows == 2
    np.testing.assert_allclose(out.numpy(), [_linear(np.array([0, 2]), 0), [0.5, 0.5]])
    assert b.n_retrained == 2
    b.f(keep)  # the same subsets again: no new retraining
    assert b.n_retrained == 2


def test_datamodels_recovers_an_additive_retraining():
    r = _method("datamodels", samples=64, regressor="lstsq").run(_units().bind())
    assert r.unit_kind == "train" and r.scores.shape == W.shape
    np.testing.assert_allclose(r.scores.numpy(), W, atol=1e-8)
    assert r.rows == {"query": [0, 1]} and r.units["index"] == list(range(5))
    assert r.extra["masks"].shape == (64, 5)


def test_occlusion_and_shapley_on_train_units_are_leave_one_out():
    occ = _method("occlusion").run(_units().bind())
    np.testing.assert_allclose(occ.scores.numpy(), W, atol=1e-12)
    shap = _method("shapley-exact").run(_units().bind())
    np.testing.assert_allclose(shap.scores.numpy(), W, atol=1e-12)


def test_retrained_outputs_are_cached_on_disk(tmp_path):
    calls = []

    def counted(idx, j):
        calls.append(j)
        return _linear(idx, j)

    u = al.units.TrainingExamples(retrain=counted, n_train=5, cache_dir=tmp_path)
    a = _method("datamodels", samples=16, regressor="lstsq").run(u.bind())
    n = len(calls)
    b = _method("datamodels", samples=16, regressor="lstsq").run(u.bind())  # a new bound
    assert len(calls) == n and torch.equal(a.scores, b.scores)
    assert len(list(tmp_path.glob("*.npy"))) == n


def test_bad_train_questions_fail_before_retraining():
    with pytest.raises(InputError, match="retrain"):
        al.units.TrainingExamples("some/store").bind()
    with pytest.raises(InputError, match="n_train"):
        al.units.TrainingExamples(retrain=_linear)
    with pytest.raises(al.errors.UnsupportedAblationError):
        _units().bind(ablation=al.ablations.Zero())
    u = al.units.TrainingExamples(retrain=lambda idx, j: np.array([np.nan]), n_train=3)
    with pytest.raises(NonFiniteError):
        u.bind().f(torch.ones(1, 3, dtype=torch.bool))


def test_datamodels_on_digits_reports_lds_beside_trak(tmp_path):
    """The issue's acceptance: datamodels (retrained subsets) and TRAK scored on
    the same held-out subsets. Floors measured once with these seeds
    (datamodels 0.41, TRAK 0.33; benchmarks/bench_datamodels.py --quick)."""
    import attrlab.data as ad
    from attrlab.data.digits import digits_harness, load_digits_data, train_mlp

    xtr, ytr, xte, yte = load_digits_data()
    xtr, ytr, xq, yq = xtr[:100], ytr[:100], xte[:30], yte[:30]
    lds = digits_harness(xtr, ytr, xq, yq, n_models=16, epochs=8, seed=1)
    recipe = digits_harness(xtr, ytr, xq, yq, n_models=2, epochs=8, seed=0)
    units = al.units.TrainingExamples(retrain=recipe.fn, n_train=100)
    dm = _method("datamodels", samples=200, seed=0).run(units.bind())
    models = [train_mlp(xtr, ytr, epochs=8, seed=s) for s in range(5)]
    stores = [
        ad.featurize(m, (xtr, ytr), tmp_path / f"m{i}", proj_dim=400) for i, m in enumerate(models)
    ]
    trak = ad.TRAK(stores).scores(models, (xq, yq)).numpy()
    s_dm, s_trak = lds.score(dm), lds.score(trak)
    print(f"\ndigits LDS: datamodels {s_dm.lds:.3f}, TRAK {s_trak.lds:.3f}")
    assert s_dm.lds > 0.3 and s_trak.lds > 0.2
