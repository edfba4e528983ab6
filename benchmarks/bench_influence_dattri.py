"""EK-FAC influence: attrlab vs ``dattri`` (PyPI) on the digits64 LDS setup, CPU.

dattri runs in its own venv (``benchmarks/_envs/dattri``; ``python -m venv
benchmarks/_envs/dattri && benchmarks/_envs/dattri/bin/pip install torch==2.13.0
dattri``) as a one-shot subprocess. Setup: ``bench_trak.py``'s digits64 (MLP
64-64-10 trained with seed 0, 1,497 training digits, 300 queries) and its 64
retrained half subsets (``benchmarks/_out/lds_cache``, shared with
``bench_trak.py`` / ``bench_influence_eval.py``).

dattri's ``IFAttributorEKFAC`` fits the empirical Fisher of the mean
cross-entropy (the data's labels), adds an absolute damping (default 0) and
scores ``grad loss(test)^T H^-1 grad loss(train)``. attrlab is run the same
way: ``fisher="empirical"``, the query's log-likelihood as measurement (its
score is then the same quantity), equal damping. Both score matrices are put
through the same LDS harness (positive = the training example lowers the
query's loss, i.e. raises its margin).

    python benchmarks/bench_influence_dattri.py
    python benchmarks/bench_influence_dattri.py --nobias   # the same model without biases
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
PEER_PY = HERE / "_envs" / "dattri" / "bin" / "python"


class _MLP(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, hidden)
        self.fc2 = torch.nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def peer(setup_file: str, out: str, damping: float) -> None:
    """dattri side (its venv): EK-FAC scores [n_query, n_train] saved to ``out``."""
    from dattri.algorithm.influence_function import IFAttributorEKFAC
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(1)
    d = torch.load(setup_file)
    model = _MLP(d["hidden"])
    model.load_state_dict(d["state"])
    if d.get("nobias"):
        model.fc1.bias, model.fc2.bias = None, None
    if d.get("float64"):
        model.double()
        for k in ("xtr", "xq"):
            d[k] = d[k].double()
    model.eval()

    def f(params: Any, batch: Any) -> Any:
        x, y = batch
        yhat = torch.func.functional_call(model, params, (x,))
        return torch.nn.functional.cross_entropy(yhat, y.long())

    task = AttributionTask(loss_func=f, model=model, checkpoints=model.state_dict())
    att = IFAttributorEKFAC(task=task, device="cpu", damping=damping)
    train = DataLoader(TensorDataset(d["xtr"], d["ytr"]), batch_size=128)
    test = DataLoader(TensorDataset(d["xq"], d["yq"]), batch_size=len(d["yq"]))
    t = time.perf_counter()
    att.cache(train)
    t_fit = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        s = att.attribute(train, test)  # [n_train, n_test]
    t_score = time.perf_counter() - t
    np.save(out, s.T.double().numpy())
    print(json.dumps({"fit_s": t_fit, "score_s": t_score}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", nargs=3, default=None)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--retrain", type=int, default=64)
    ap.add_argument(
        "--nobias",
        action="store_true",
        help="drop both biases (a different model: agreement only, no LDS)",
    )
    ap.add_argument("--float64", action="store_true", help="both sides in float64")
    ap.add_argument(
        "--dattri-basis",
        action="store_true",
        help="attrlab fitted with dattri's rotation (a check of the cause)",
    )
    a = ap.parse_args()
    if a.peer:
        peer(a.peer[0], a.peer[1], float(a.peer[2]))
        return
    from scipy.stats import spearmanr

    import attrlab.data as ad
    from attrlab.data.digits import digits_harness, load_digits_data, train_mlp

    torch.set_num_threads(1)
    xtr, ytr, xq, yq = load_digits_data(n_test=300)
    harness = digits_harness(xtr, ytr, xq, yq, n_models=a.retrain, hidden=64, epochs=a.epochs,
                             cache_dir=str(HERE / "_out" / "lds_cache"))  # fmt: skip
    harness.outputs()
    model = train_mlp(xtr, ytr, hidden=64, epochs=a.epochs, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-dattri-"))
    setup = tmp / "digits.pt"
    torch.save({"hidden": 64, "state": model.state_dict(), "xtr": xtr, "ytr": ytr,
                "xq": xq, "yq": yq, "nobias": a.nobias, "float64": a.float64}, setup)  # fmt: skip
    if a.nobias:
        model.fc1.bias, model.fc2.bias = None, None
    if a.float64:
        model.double()
        xtr, xq = xtr.double(), xq.double()
    if a.dattri_basis:
        # dattri 0.3.0 rotates with Q_S G Q_A^T (eigh's eigenvectors are columns: the
        # EK-FAC basis is Q_S^T G Q_A); fitting with transposed eigenvectors emulates it
        real_eigh = torch.linalg.eigh

        def eigh_t(m: torch.Tensor) -> Any:
            e, q = real_eigh(m)
            return e, q.T.contiguous()

        torch.linalg.eigh = eigh_t  # type: ignore[assignment]
    store = ad.fit_factors(model, (xtr, ytr), tmp / "store", fisher="empirical", batch_size=128)
    if a.dattri_basis:
        torch.linalg.eigh = real_eigh
    rows = {}
    for damping in (0.0, 1e-3, 1e-1):
        ours = ad.Influence(store, damping=damping).scores(
            model, (xq, yq), output=ad.ClassLogProb()
        )
        ours = ours.numpy()
        r = subprocess.run([str(PEER_PY), __file__, "--peer", str(setup), str(tmp / "d.npy"),
                            str(damping)], capture_output=True, text=True)  # fmt: skip
        if r.returncode != 0:
            print(r.stderr[-3000:])
            raise SystemExit("dattri failed")
        times = json.loads(r.stdout.strip().splitlines()[-1])
        theirs = np.load(tmp / "d.npy")
        sp = float(spearmanr(ours.ravel(), theirs.ravel())[0])
        if a.nobias or a.float64 or a.dattri_basis:
            print(
                f"nobias={a.nobias} float64={a.float64} dattri_basis={a.dattri_basis}, "
                f"damping {damping:g}: Spearman(attrlab, dattri) {sp:.6f}, max rel "
                f"diff {np.abs(ours - theirs).max() / np.abs(theirs).max():.2e}",
                flush=True,
            )
            continue
        l_ours, l_theirs = harness.score(ours), harness.score(theirs)
        rows[str(damping)] = {
            "spearman_ours_vs_dattri": sp,
            "lds_attrlab": [l_ours.lds, *l_ours.ci],
            "lds_dattri": [l_theirs.lds, *l_theirs.ci],
            "dattri_seconds": times,
        }
        print(f"damping {damping:g}: Spearman(attrlab, dattri) {sp:.4f}; LDS attrlab {l_ours}, "
              f"dattri {l_theirs}; dattri fit {times['fit_s']:.1f}s score {times['score_s']:.1f}s",
              flush=True)  # fmt: skip
    print(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    main()
