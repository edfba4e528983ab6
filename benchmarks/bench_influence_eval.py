"""EK-FAC / K-FAC influence evaluated on digits: LDS beside TRAK / TracIn, and mislabel detection.

``--lds``: the two existing digits LDS protocols, with the same retrained
subsets and models as the TRAK and datamodels benchmarks (cached under
``benchmarks/_out``):

- ``digits64`` (``bench_trak.py``): MLP 64-64-10, 1,497 training digits, 300
  query digits, 5 models (seeds 0-4), 64 retrained half subsets (seed 0);
- ``dm300`` (``bench_datamodels.py``): MLP 64-32-10, the first 300 training
  digits, 100 queries, 64 held-out half subsets (seed 1).

Scores: EK-FAC and K-FAC on the seed-0 model and averaged over the 5 models
(true Fisher, Kronfluence's heuristic damping, and ``damping=1e-8``,
Kronfluence's default), TRAK (5 models, k=512, attrlab's default ridge) and
TracIn-CP (the 5 final checkpoints).

``--mislabel``: 5% of the 1,497 training labels flipped to another class
(seed 0), an MLP 64-64-10 trained on them; the share of the flipped examples
among the top 10% by EK-FAC / K-FAC self-influence, by TRAK self-scores (the
diagonal of TRAK's train x train scores; 5 models), and by the training loss.

``--facts``: the zoo facts model (GPT-2, ``Conv1D`` layers), the whole corpus,
the last block's layers; the share of 100 held-out queries with every stating
document in the top 10 (TRAK's figure: 89% at k=2048, 77% at k=256).

    python benchmarks/bench_influence_eval.py --lds --mislabel
    python benchmarks/bench_influence_eval.py --facts
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import attrlab.data as ad
from attrlab.data.digits import digits_harness, load_digits_data, train_mlp

OUT = Path(__file__).resolve().parent / "_out"


def influence_scores(models, data, queries, tmp: Path, **kw: Any) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {}
    for i, m in enumerate(models):
        store = ad.fit_factors(m, data, tmp / f"f{i}", batch_size=128)
        for strategy in ("ekfac", "kfac"):
            for damping in (None, 1e-8):
                s = ad.Influence(store, strategy, damping=damping).scores(m, queries).numpy()
                out.setdefault(f"{strategy} damping={damping}", []).append(s)
    res = {}
    for k, v in out.items():
        res[f"{k} (seed-0 model)"] = v[0]
        res[f"{k} (mean of {len(v)} models)"] = np.mean(v, 0)
    return res


def lds_setup(name: str, epochs: int, retrain: int) -> dict[str, Any]:
    if name == "digits64":
        xtr, ytr, xq, yq = load_digits_data(n_test=300)
        hidden, seed, cache = 64, 0, OUT / "lds_cache"
    else:
        xtr, ytr, xq, yq = load_digits_data()
        xtr, ytr, xq, yq = xtr[:300], ytr[:300], xq[:100], yq[:100]
        hidden, seed = 32, 1
        cache = OUT / "bench_datamodels" / f"lds_n300_q100_e{epochs}"
    harness = digits_harness(
        xtr, ytr, xq, yq, n_models=retrain, hidden=hidden, epochs=epochs, seed=seed,
        cache_dir=str(cache), progress=True,
    )  # fmt: skip
    t = time.perf_counter()
    harness.outputs()
    print(f"{name}: {retrain} retrained models ready ({time.perf_counter() - t:.1f}s)", flush=True)
    models = [train_mlp(xtr, ytr, hidden=hidden, epochs=epochs, seed=s) for s in range(5)]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        scores = influence_scores(models, (xtr, ytr), (xq, yq), Path(tmp))
        t_inf = time.perf_counter() - t
        stores = [
            ad.featurize(m, (xtr, ytr), Path(tmp) / f"t{i}", proj_dim=512)
            for i, m in enumerate(models)
        ]
        scores["TRAK (5 models, k=512, reg 0.1)"] = ad.TRAK(stores).scores(models, (xq, yq)).numpy()
        scores["TracIn-CP (5 final checkpoints)"] = ad.tracin(
            stores, models, (xq, yq)
        ).scores.numpy()
    for k, s in scores.items():
        r = harness.score(s)
        rows[k] = [round(r.lds, 4), round(r.ci[0], 4), round(r.ci[1], 4)]
        print(f"  {name} LDS {k:45s} {r.lds:.3f} [{r.ci[0]:.3f}, {r.ci[1]:.3f}]", flush=True)
    return {"lds": rows, "influence_seconds_5_models": round(t_inf, 1)}


def mislabel(epochs: int, frac: float = 0.05, top: float = 0.10) -> dict[str, Any]:
    xtr, ytr, _, _ = load_digits_data()
    n = len(ytr)
    rng = np.random.default_rng(0)
    flip = rng.choice(n, int(round(frac * n)), replace=False)
    y = ytr.clone()
    y[flip] = torch.as_tensor((ytr[flip].numpy() + rng.integers(1, 10, len(flip))) % 10)
    is_flip = np.zeros(n, bool)
    is_flip[flip] = True
    k = int(round(top * n))
    models = [train_mlp(xtr, y, hidden=64, epochs=epochs, seed=s) for s in range(5)]
    ranks: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = ad.fit_factors(models[0], (xtr, y), Path(tmp) / "f", batch_size=128)
        for strategy in ("ekfac", "kfac"):
            for damping in (None, 1e-8):
                r = ad.self_influence(store, strategy, damping=damping)
                ranks[f"{strategy} self-influence damping={damping}"] = r.scores.numpy()
        stores = [
            ad.featurize(m, (xtr, y), Path(tmp) / f"t{i}", proj_dim=512)
            for i, m in enumerate(models)
        ]
        t = ad.TRAK(stores).scores(models, (xtr, y)).numpy()
        ranks["TRAK self-score (5 models, diagonal)"] = np.diag(t)
        t1 = ad.TRAK(stores[:1]).scores(models[:1], (xtr, y)).numpy()
        ranks["TRAK self-score (seed-0 model)"] = np.diag(t1)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(models[0](xtr), y, reduction="none")
    ranks["training loss (seed-0 model)"] = loss.numpy()
    out = {}
    for name, s in ranks.items():
        found = float(is_flip[np.argsort(-s)[:k]].sum() / is_flip.sum())
        out[name] = round(found, 4)
        print(
            f"  mislabel: {name:40s} finds {found:.1%} of {is_flip.sum()} flipped in the top {k}",
            flush=True,
        )
    return {"found_in_top10pct": out, "n_flipped": int(is_flip.sum()), "top_k": k}


def facts(n_queries: int, modules: list[str], batch: int, train_output: str) -> dict[str, Any]:
    """Share of held-out zoo-facts queries with every stating document in the top 10."""
    import attrlab as al

    lm = al.zoo.load("facts")
    task = al.zoo.task("facts")
    queries = task.examples(n_queries, seed=0, split="test")
    corpus = task.corpus()
    ids = [d for d, _ in corpus]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        data = ad.Examples.from_texts(lm, [text for _, text in corpus], ids=ids)
        store = ad.fit_factors(
            lm, data, tmp, modules=modules, batch_size=batch, shard_size=256, progress=True,
            output=ad.AnswerMargin() if train_output == "margin" else None,
        )  # fmt: skip
        fit_s = time.perf_counter() - t
        print(f"facts: {len(ids)} documents, factors fitted in {fit_s:.1f}s, modules={modules}, "
              f"training-side output {train_output}")  # fmt: skip
        out["fit_seconds"] = round(fit_s, 1)
        units = al.units.TrainingExamples(store)
        for method in ("ekfac", "kfac"):
            for measurement in ("logprob", "margin"):
                for damping in (None, 1e-8):
                    if train_output == "margin" and measurement == "logprob":
                        continue
                    t = time.perf_counter()
                    r = al.attribute(
                        lm, [q.prompt for q in queries], target=[q.answer for q in queries],
                        units=units, method=method, damping=damping, measurement=measurement,
                    )  # fmt: skip
                    all_in = any_in = 0
                    for i, q in enumerate(queries):
                        top = set(r.top(10, by="pos", row=i)["id"])
                        all_in += all(d in top for d in q.supporting_docs)
                        any_in += any(d in top for d in q.supporting_docs)
                    key = f"{method} {measurement} damping={damping}"
                    out[key] = {"every": all_in / len(queries), "any": any_in / len(queries)}
                    print(
                        f"  facts {key:32s}: every stating doc in top 10 for "
                        f"{all_in / len(queries):.0%}, any {any_in / len(queries):.0%} of "
                        f"{len(queries)} queries ({time.perf_counter() - t:.1f}s)",
                        flush=True,
                    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lds", action="store_true")
    ap.add_argument("--mislabel", action="store_true")
    ap.add_argument("--setups", default="dm300,digits64")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--retrain", type=int, default=64)
    ap.add_argument("--facts", action="store_true")
    ap.add_argument("--facts-queries", type=int, default=100)
    ap.add_argument("--facts-modules", default="transformer.h.1")
    ap.add_argument("--facts-train-output", choices=["logprob", "margin"], default="logprob")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    if a.lds:
        for s in a.setups.split(","):
            out[s] = lds_setup(s, a.epochs, a.retrain)
    if a.mislabel:
        out["mislabel"] = mislabel(a.epochs)
    if a.facts:
        out["facts"] = facts(a.facts_queries, a.facts_modules.split(","), 16, a.facts_train_output)
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
