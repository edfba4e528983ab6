"""TRAK on the digits MLP: attrlab vs the ``traker`` package (BasicProjector, CPU).

Same models (C independently trained MLPs), same checkpoints, same projection
dimension, same batch size, same LDS subsets and retrained models, in one run.
Reports featurization throughput (examples/s, median of repeats), scoring time,
LDS with bootstrap CI for both libraries, and the peak RSS of featurizing 10k
vs 100k examples with attrlab (fresh child processes).

    python benchmarks/bench_trak.py            # full run (~10 min on a busy 2-core machine)
    python benchmarks/bench_trak.py --quick    # small smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import attrlab.data as ad
from attrlab.data.digits import digits_harness, load_digits_data, train_mlp

OUT = Path(__file__).resolve().parent / "_out"
SWEEP = (0.0, 0.01, 0.1, 1.0, 10.0)


def traker_run(models, xtr, ytr, xq, yq, k, batch, save_dir):
    """Featurize with traker (BasicProjector on CPU) and score; returns (scores [q, N], feat_s, score_s)."""
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    d = sum(p.numel() for p in models[0].parameters())
    proj = BasicProjector(d, k, 0, ProjectionType.rademacher, "cpu", dtype=torch.float32)
    t0 = time.perf_counter()
    tr = TRAKer(
        model=copy.deepcopy(models[0]), task="image_classification", train_set_size=len(ytr),
        save_dir=str(save_dir), device="cpu", projector=proj, proj_dim=k, use_half_precision=False,
        logging_level=logging.ERROR,
    )  # fmt: skip
    for i, m in enumerate(models):
        tr.load_checkpoint(m.state_dict(), model_id=i)
        for s in range(0, len(ytr), batch):
            tr.featurize(
                batch=(xtr[s : s + batch], ytr[s : s + batch]), num_samples=len(ytr[s : s + batch])
            )
    tr.finalize_features()
    t1 = time.perf_counter()
    for i, m in enumerate(models):
        tr.start_scoring_checkpoint(
            exp_name="q", checkpoint=m.state_dict(), model_id=i, num_targets=len(yq)
        )
        for s in range(0, len(yq), batch):
            tr.score(
                batch=(xq[s : s + batch], yq[s : s + batch]), num_samples=len(yq[s : s + batch])
            )
    scores = np.asarray(tr.finalize_scores(exp_name="q"), np.float64).T
    t2 = time.perf_counter()
    return scores, t1 - t0, t2 - t1


def attrlab_run(models, xtr, ytr, xq, yq, k, batch, save_dir, reg):
    t0 = time.perf_counter()
    stores = [
        ad.featurize(
            m, (xtr, ytr), Path(save_dir) / f"m{i}", proj_dim=k, batch_size=batch, shard_size=4096
        )
        for i, m in enumerate(models)
    ]
    t1 = time.perf_counter()
    scores = ad.TRAK(stores, reg=reg).scores(models, (xq, yq), batch_size=batch).numpy()
    t2 = time.perf_counter()
    return scores, stores, t1 - t0, t2 - t1


_RSS_CHILD = """
import resource, sys, tempfile, threading, time, torch
torch.set_num_threads(1)
import attrlab.data as ad
from attrlab.data.digits import DigitsMLP, load_digits_data, tiled_examples
n, hidden, k, batch = map(int, sys.argv[1:5])
xtr, ytr, _, _ = load_digits_data()
model = DigitsMLP(hidden)
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
base, top, done = rss(), [0], []
def watch():
    while not done:
        top[0] = max(top[0], rss())
        time.sleep(0.005)
th = threading.Thread(target=watch); th.start()
ad.featurize(model, tiled_examples(xtr, ytr, n), tempfile.mkdtemp(), proj_dim=k, batch_size=batch, shard_size=4096)
done.append(1); th.join()
print(base, max(top[0], rss()), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss(n: int, hidden: int, k: int, batch: int) -> tuple[int, int, int]:
    """(RSS before featurizing, peak RSS while featurizing, process peak RSS) in KiB, in a fresh child."""
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(n), str(hidden), str(k), str(batch)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    before, peak, maxrss = map(int, out.stdout.split())
    return before, peak, maxrss


def facts_benchmark(n_queries: int, dim: int, modules: list[str] | None, batch: int) -> None:
    """Top-10 recall of the supporting documents on the zoo facts model, over the whole corpus."""
    import attrlab as al

    lm = al.zoo.load("facts")
    task = al.zoo.task("facts")
    queries = task.examples(n_queries, seed=0, split="test")
    corpus = task.corpus()
    ids = [d for d, _ in corpus]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        data = ad.Examples.from_texts(lm, [text for _, text in corpus], ids=ids)
        store = ad.featurize(lm, data, tmp, proj_dim=dim, batch_size=batch, modules=modules)
        feat_s = time.perf_counter() - t
        print(f"facts: {len(ids)} documents featurized in {feat_s:.1f}s ({len(ids) / feat_s:.1f} docs/s), "
              f"k={dim}, modules={modules}")  # fmt: skip
        units = al.units.TrainingExamples(store)
        for method, opts in (
            ("trak", {}),
            ("trak", {"reg": 1.0}),
            ("grad-dot", {}),
            ("grad-cos", {}),
        ):
            t = time.perf_counter()
            r = al.attribute(lm, [q.prompt for q in queries], target=[q.answer for q in queries],
                             units=units, method=method, **opts)  # fmt: skip
            all_in = any_in = 0
            for i, q in enumerate(queries):
                top = set(r.top(10, by="pos", row=i)["id"])
                all_in += all(d in top for d in q.supporting_docs)
                any_in += any(d in top for d in q.supporting_docs)
            print(f"facts {method:9s} {opts}: all supporting docs in top-10 for {all_in / len(queries):.1%} of "
                  f"{len(queries)} held-out queries (any: {any_in / len(queries):.1%}); "
                  f"{time.perf_counter() - t:.1f}s")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--facts", action="store_true", help="only the zoo facts top-10 benchmark")
    ap.add_argument("--facts-queries", type=int, default=100)
    ap.add_argument("--facts-modules", default=None, help="comma-separated parameter prefixes")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--retrain", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--reg",
        type=float,
        default=None,
        help="attrlab TRAK relative ridge (default: library default)",
    )
    a = ap.parse_args()
    if a.quick:
        a.models, a.retrain, a.epochs, a.queries, a.repeats = 2, 16, 8, 60, 1
    torch.set_num_threads(1)
    if a.facts:
        mods = a.facts_modules.split(",") if a.facts_modules else None
        facts_benchmark(a.facts_queries, 256 if a.dim == 512 else a.dim, mods, 32)
        return
    OUT.mkdir(exist_ok=True)
    xtr, ytr, xte, yte = load_digits_data()
    xq, yq = xte[: a.queries], yte[: a.queries]
    models = [
        train_mlp(xtr, ytr, hidden=a.hidden, epochs=a.epochs, seed=s) for s in range(a.models)
    ]
    acc = float(np.mean([(m(xte).argmax(1) == yte).float().mean() for m in models]))
    d = sum(p.numel() for p in models[0].parameters())
    print(f"digits: train {len(ytr)}, queries {len(yq)}, MLP 64-{a.hidden}-10 ({d} params, test acc {acc:.3f}), "
          f"{a.models} models, k={a.dim}, batch {a.batch}")  # fmt: skip
    harness = digits_harness(xtr, ytr, xq, yq, n_models=a.retrain, hidden=a.hidden, epochs=a.epochs,
                             cache_dir=str(OUT / "lds_cache"), progress=True)  # fmt: skip
    t = time.perf_counter()
    harness.outputs()
    print(
        f"LDS harness: {a.retrain} retrained models ready ({time.perf_counter() - t:.1f}s, cached)"
    )

    reg = ad.TRAK.__init__.__defaults__[1] if a.reg is None else a.reg  # type: ignore[index]
    tk, ours = [], []
    for _ in range(a.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            s_peer, f_peer, sc_peer = traker_run(
                models, xtr, ytr, xq, yq, a.dim, a.batch, Path(tmp) / "t"
            )
            s_ours, stores, f_ours, sc_ours = attrlab_run(
                models, xtr, ytr, xq, yq, a.dim, a.batch, tmp, reg
            )
            s_ours0 = ad.TRAK(stores, reg=0.0).scores(models, (xq, yq)).numpy()
            tr = harness.score(ad.tracin(stores, models, (xq, yq)))
            sweep = {
                r: harness.score(ad.TRAK(stores, reg=r).scores(models, (xq, yq))).lds for r in SWEEP
            }
        tk.append((f_peer, sc_peer))
        ours.append((f_ours, sc_ours))
    n_feat = a.models * len(ytr)
    thr_peer = n_feat / statistics.median(f for f, _ in tk)
    thr_ours = n_feat / statistics.median(f for f, _ in ours)
    sc_peer = statistics.median(s for _, s in tk)
    sc_ours = statistics.median(s for _, s in ours)
    l_peer, l_ours, l_ours0 = harness.score(s_peer), harness.score(s_ours), harness.score(s_ours0)
    corr = float(np.corrcoef(s_peer.ravel(), s_ours0.ravel())[0, 1])
    print(
        f"featurize  traker {thr_peer:8.0f} ex/s | attrlab {thr_ours:8.0f} ex/s | ratio {thr_ours / thr_peer:.2f}x"
    )
    print(
        f"scoring    traker {sc_peer:8.3f} s    | attrlab {sc_ours:8.3f} s    | ratio {sc_peer / sc_ours:.2f}x"
    )
    print(f"LDS        traker {l_peer}")
    print(f"LDS        attrlab (reg={reg}) {l_ours}")
    print(f"LDS        attrlab (reg=0, traker's kernel) {l_ours0}")
    print("LDS vs relative ridge reg: " + ", ".join(f"{r:g}: {v:.4f}" for r, v in sweep.items()))
    print(f"LDS        attrlab TracIn-CP (final checkpoints) {tr}")
    print(f"score correlation attrlab(reg=0) vs traker (different random projections): {corr:.3f}")

    n_small, n_big = (2000, 20000) if a.quick else (10000, 100000)
    b_small, p_small, m_small = peak_rss(n_small, a.hidden, a.dim, a.batch)
    b_big, p_big, m_big = peak_rss(n_big, a.hidden, a.dim, a.batch)
    print(f"peak RSS while featurizing  {n_small} ex: {p_small / 1024:.0f} MiB | {n_big} ex: {p_big / 1024:.0f} MiB"
          f" | ratio {p_big / p_small:.3f}; growth over the RSS before featurizing: "
          f"{(p_small - b_small) / 1024:.1f} / {(p_big - b_big) / 1024:.1f} MiB; "
          f"process peak {m_small / 1024:.0f} / {m_big / 1024:.0f} MiB")  # fmt: skip
    res = {
        "setup": vars(a) | {"n_train": len(ytr), "params": d, "test_acc": acc},
        "throughput_ex_s": {"traker": thr_peer, "attrlab": thr_ours},
        "scoring_s": {"traker": sc_peer, "attrlab": sc_ours},
        "lds": {
            "traker": [l_peer.lds, *l_peer.ci],
            "attrlab": [l_ours.lds, *l_ours.ci],
            "attrlab_reg0": [l_ours0.lds, *l_ours0.ci],
            "reg": reg,
            "sweep": sweep,
            "tracin": [tr.lds, *tr.ci],
        },
        "peak_rss_kib": {
            str(n_small): [b_small, p_small, m_small],
            str(n_big): [b_big, p_big, m_big],
        },
    }
    (OUT / "bench_trak.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
