"""Datamodels beside TRAK on digits: the linear surrogate over training examples
(``method="datamodels"`` on ``al.units.TrainingExamples(retrain=...)``, each
mask a retraining on the kept half of the training set) and TRAK (5 models,
projection 512) scored by LDS on the same held-out retrained subsets.

The training set is the first ``--n-train`` digits; the queries are test
digits; the output is the query margin of a 64-32-10 MLP. The LDS subsets
(seed 1) are not among the datamodels' masks (seed 0). Both the datamodels'
retrainings and the LDS models are cached under ``benchmarks/_out/``.

    python benchmarks/bench_datamodels.py                 # ~10 min on 2 cores
    python benchmarks/bench_datamodels.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import attrlab as al
import attrlab.data as ad
from attrlab.data.digits import digits_harness, load_digits_data, train_mlp

OUT = Path(__file__).resolve().parent / "_out" / "bench_datamodels"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--samples", type=int, default=2000, help="datamodels retrainings")
    ap.add_argument("--lds-models", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=1e-3, help="datamodels Lasso penalty")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.n_train, a.queries, a.samples, a.lds_models, a.epochs = 100, 30, 200, 16, 8
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = load_digits_data()
    xtr, ytr = xtr[: a.n_train], ytr[: a.n_train]
    xq, yq = xte[: a.queries], yte[: a.queries]
    tag = f"n{a.n_train}_q{a.queries}_e{a.epochs}"
    # the held-out LDS subsets (seed 1) and, with the same training recipe, the
    # retraining function the datamodels' masks are evaluated with (seed 0 masks)
    lds = digits_harness(xtr, ytr, xq, yq, n_models=a.lds_models, epochs=a.epochs, seed=1,
                         cache_dir=str(OUT / f"lds_{tag}"))  # fmt: skip
    recipe = digits_harness(xtr, ytr, xq, yq, n_models=2, epochs=a.epochs, seed=0)
    t = time.perf_counter()
    lds.outputs()
    t_lds = time.perf_counter() - t

    units = al.units.TrainingExamples(
        retrain=recipe.fn, n_train=a.n_train, cache_dir=OUT / f"dm_{tag}"
    )
    method = al.methods.find_method("datamodels", "train")(
        samples=a.samples, alpha=a.alpha, seed=0, progress=True
    )
    t = time.perf_counter()
    dm = method.run(units.bind())
    t_dm = time.perf_counter() - t
    s_dm = lds.score(dm)

    models = [train_mlp(xtr, ytr, epochs=a.epochs, seed=s) for s in range(5)]
    with tempfile.TemporaryDirectory() as tmp:
        stores = [
            ad.featurize(m, (xtr, ytr), Path(tmp) / f"m{i}", proj_dim=min(512, 4 * a.n_train))
            for i, m in enumerate(models)
        ]
        trak = ad.TRAK(stores).scores(models, (xq, yq)).numpy()
    s_trak = lds.score(trak)
    summary = {
        "setup": f"digits MLP 64-32-10, {a.n_train} training examples, {a.queries} queries, "
        f"{a.epochs} epochs; LDS on {a.lds_models} held-out half subsets (seed 1)",
        "datamodels": {
            "retrainings": a.samples,
            "lasso_alpha": a.alpha,
            "seconds": t_dm,
            "r2_in_sample": dm.diagnostics.get("r2"),
            "lds": [s_dm.lds, *s_dm.ci],
        },
        "trak": {"models": 5, "lds": [s_trak.lds, *s_trak.ci]},
        "lds_harness_seconds": t_lds,
    }
    (OUT / f"summary_{tag}.json").write_text(json.dumps(summary, indent=2, default=float))
    print(json.dumps(summary, indent=2, default=float))
    assert np.isfinite(s_dm.lds) and np.isfinite(s_trak.lds)


if __name__ == "__main__":
    main()
