"""TRAK on the digits MLP: attrlab vs the ``traker`` package (BasicProjector, CPU).

Two setups (``--setup``): ``digits64`` (MLP 64-64-10, 1497 train / 300
queries, batch 128, the original one) and ``digits128`` (MLP 64-128-10, the
80/20 split 1437 train / 360 queries, batch 100). Same models (C independently
trained MLPs), same checkpoints, same projection dimension in one process.

Timings are interleaved (A B C …, then reversed; ``_interleave.interleaved``)
with load averages printed. Sides:

- ``attrlab defaults``: ``ad.featurize(m, data, path, proj_dim=k)`` and
  ``ad.TRAK(stores).scores(models, queries)``, no tuning arguments (a fresh
  ``TRAK`` per call: the kernel solve and projection blocks are cold).
- ``attrlab tuned``: the setup's batch size forced (``batch_size=``), shard 4096.
- ``traker defaults``: ``TRAKer(..., proj_dim=k)`` with nothing else (on CPU:
  BasicProjector, normal projection, float16, block 100), the setup's batch loop.
- ``traker tuned``: the original comparison (BasicProjector Rademacher, float32,
  default block 100).
- ``traker best``: BasicProjector with ``block_size=k`` (the whole matrix, made
  once per checkpoint), float32.

Values: attrlab vs traker *on the same projection* (traker given attrlab's
projection through a small ``AbstractProjector`` subclass below) and the same
ridge: max |diff| / max |score| of the scores, and of the training features.

The full run (``main``) adds LDS with bootstrap CI for both libraries and the
peak RSS of featurizing 10k vs 100k examples (fresh child processes).

    python benchmarks/bench_trak.py                      # full run, digits64
    python benchmarks/bench_trak.py --setup digits128    # full run, second setup
    python benchmarks/bench_trak.py --timing-only --setup both --repeats 3
    python benchmarks/bench_trak.py --quick              # small smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import attrlab.data as ad
from attrlab.data.digits import digits_harness, load_digits_data, train_mlp
from attrlab.data.project import Projector

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interleave import interleaved, loadavg, median, print_rows, row  # noqa: E402

OUT = Path(__file__).resolve().parent / "_out"
SWEEP = (0.0, 0.01, 0.1, 1.0, 10.0)
#: the two digits setups: hidden width, held-out queries (the rest trains), batch
SETUPS: dict[str, dict[str, int]] = {
    "digits64": {"hidden": 64, "n_test": 300, "batch": 128},
    "digits128": {"hidden": 128, "n_test": 360, "batch": 100},
}


def attrlab_projector_for_traker(store: ad.FeatureStore) -> Any:
    """A traker ``AbstractProjector`` applying attrlab's projection of ``store``
    (so both libraries score on the same random matrix)."""
    from trak.projectors import AbstractProjector, ProjectionType

    class AttrlabProjection(AbstractProjector):
        def __init__(self, grad_dim: int, spec: dict[str, Any]):
            super().__init__(grad_dim, spec["dim"], spec["seed"], ProjectionType.rademacher, "cpu")
            self.proj = Projector.from_spec(spec)

        def project(self, grads: Any, model_id: int) -> torch.Tensor:
            parts = list(grads.values()) if isinstance(grads, dict) else [grads]
            return self.proj.project(parts)

        def free_memory(self) -> None:
            pass

    return AttrlabProjection(int(store.manifest["n_params"]), store.manifest["projection"])


class TrakerSide:
    """One traker configuration: featurize (+ finalize) and score with its batch loop."""

    def __init__(self, kind: str, models, xtr, ytr, k: int, batch: int, lambda_reg: float = 0.0,
                 projector: Any = None):  # fmt: skip
        self.kind, self.models, self.xtr, self.ytr = kind, models, xtr, ytr
        self.k, self.batch, self.lambda_reg, self.projector = k, batch, lambda_reg, projector
        self.tr: Any = None

    def _make(self, save_dir: str) -> Any:
        from trak import TRAKer
        from trak.projectors import BasicProjector, ProjectionType

        d = sum(p.numel() for p in self.models[0].parameters())
        kw: dict[str, Any] = {"proj_dim": self.k}
        if self.kind == "tuned":
            kw["projector"] = BasicProjector(d, self.k, 0, ProjectionType.rademacher, "cpu",
                                             dtype=torch.float32)  # fmt: skip
            kw["use_half_precision"] = False
        elif self.kind == "best":
            kw["projector"] = BasicProjector(d, self.k, 0, ProjectionType.rademacher, "cpu",
                                             dtype=torch.float32, block_size=self.k)  # fmt: skip
            kw["use_half_precision"] = False
        elif self.kind == "same-projection":
            kw["projector"] = self.projector
            kw["use_half_precision"] = False
            kw["lambda_reg"] = self.lambda_reg
        return TRAKer(model=copy.deepcopy(self.models[0]), task="image_classification",
                      train_set_size=len(self.ytr), save_dir=save_dir, device="cpu",
                      logging_level=logging.ERROR, **kw)  # fmt: skip

    def featurize(self, save_dir: str) -> None:
        tr = self._make(save_dir)
        b = self.batch
        for i, m in enumerate(self.models):
            tr.load_checkpoint(m.state_dict(), model_id=i)
            for s in range(0, len(self.ytr), b):
                tr.featurize(batch=(self.xtr[s : s + b], self.ytr[s : s + b]),
                             num_samples=len(self.ytr[s : s + b]))  # fmt: skip
        tr.finalize_features()
        self.tr = tr

    def score(self, xq: torch.Tensor, yq: torch.Tensor) -> np.ndarray:
        tr, b = self.tr, self.batch
        for i, m in enumerate(self.models):
            tr.start_scoring_checkpoint(exp_name="q", checkpoint=m.state_dict(), model_id=i,
                                        num_targets=len(yq))  # fmt: skip
            for s in range(0, len(yq), b):
                tr.score(batch=(xq[s : s + b], yq[s : s + b]), num_samples=len(yq[s : s + b]))
        return np.asarray(tr.finalize_scores(exp_name="q"), np.float64).T


def _quiet_tqdm() -> None:
    """traker prints a tqdm bar per finalize; keep the benchmark output readable."""
    import functools

    import trak.traker as tt

    if not getattr(tt, "_attrlab_quiet", False):
        tt.tqdm = functools.partial(tt.tqdm, disable=True)
        tt._attrlab_quiet = True


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def build(setup: str, n_models: int, epochs: int, k: int) -> dict[str, Any]:
    """Data and trained models of one setup."""
    cfg = SETUPS[setup]
    xtr, ytr, xq, yq = load_digits_data(n_test=cfg["n_test"])
    models = [train_mlp(xtr, ytr, hidden=cfg["hidden"], epochs=epochs, seed=s)
              for s in range(n_models)]  # fmt: skip
    d = sum(p.numel() for p in models[0].parameters())
    desc = (f"{setup}: MLP 64-{cfg['hidden']}-10 ({d} params), {len(ytr)} train / {len(yq)} "
            f"queries, {n_models} models, k={k}, batch {cfg['batch']}")  # fmt: skip
    return {"xtr": xtr, "ytr": ytr, "xq": xq, "yq": yq, "models": models, "d": d,
            "batch": cfg["batch"], "hidden": cfg["hidden"], "k": k, "desc": desc}  # fmt: skip


def agreement(b: dict[str, Any], stores: list[ad.FeatureStore], tmp: str) -> dict[str, float]:
    """attrlab vs traker on attrlab's projection and the same ridge: relative max |diff|
    of the training features and of the scores, and the scores' Spearman correlation.

    traker divides each checkpoint's ``(Phi^T Phi + lambda I)^-1`` by its mean
    absolute entry before scoring (``BasicScoreComputer``), which reweights the
    checkpoints of an ensemble; the max |diff| compares attrlab's per-checkpoint
    scores combined with that same weighting, the Spearman correlation uses
    attrlab's own ensemble scores.
    """
    from scipy.stats import spearmanr

    d, q = b["d"], (b["xq"], b["yq"])
    lam = 0.1 * float(np.diag(stores[0].gram()).mean())  # attrlab's default ridge on store 0
    side = TrakerSide("same-projection", b["models"], b["xtr"], b["ytr"], b["k"], b["batch"],
                      lambda_reg=lam / d, projector=attrlab_projector_for_traker(stores[0]))  # fmt: skip
    side.featurize(tmp)
    theirs = side.score(*q)
    trak = ad.TRAK(stores, lambda_=lam)
    ours = trak.scores(b["models"], q).numpy().astype(np.float64)
    q_mean = trak.mean_out_to_loss().astype(np.float64)
    like_theirs = np.zeros_like(ours)
    for c, (m, st) in enumerate(zip(b["models"], stores)):
        s_c = ad.TRAK(st, lambda_=lam, out_to_loss=False).scores(m, q).numpy().astype(np.float64)
        like_theirs += s_c / (d * float(trak.kernel(c).abs().mean()))  # traker's kernel scale
    like_theirs *= q_mean[None, :] / len(stores)
    side.tr.saver.load_current_store(0)
    feats_t = np.asarray(side.tr.saver.current_store["grads"], np.float64) * np.sqrt(d)
    return {
        "features": rel_diff(stores[0].features().astype(np.float64), feats_t),
        "scores": rel_diff(like_theirs, theirs),
        "spearman": float(spearmanr(ours.ravel(), theirs.ravel())[0]),
    }


def compare(setup: str, n_models: int = 5, epochs: int = 20, k: int = 512, repeats: int = 3,
            featurize: bool = True, reg: float | None = None, built: dict[str, Any] | None = None,
            ) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """Interleaved featurize and scoring timings of one setup; rows for run_all, and state
    (stores, traker scores) for the LDS part of ``main``."""
    _quiet_tqdm()
    b = built or build(setup, n_models, epochs, k)
    print(b["desc"], f"(load {loadavg()})", flush=True)
    models, xtr, ytr, xq, yq, batch = (b[n] for n in ("models", "xtr", "ytr", "xq", "yq", "batch"))
    tmp = tempfile.mkdtemp(prefix="bench_trak_")
    reg = ad.TRAK.__init__.__defaults__[1] if reg is None else reg  # type: ignore[index]
    sides = {n: TrakerSide(n, models, xtr, ytr, k, batch) for n in ("defaults", "tuned", "best")}
    state: dict[str, Any] = {"build": b}
    counter = iter(range(10**6))

    def fresh() -> str:
        return f"{tmp}/{next(counter)}"

    def ours_feat(**kw: Any) -> Callable[[], None]:
        def run() -> None:
            d = fresh()
            state[f"stores_{bool(kw)}"] = [
                ad.featurize(m, (xtr, ytr), f"{d}/m{i}", proj_dim=k, **kw)
                for i, m in enumerate(models)
            ]

        return run

    rows: list[dict[str, Any]] = []
    feat_sides = {
        "attrlab defaults": ours_feat(),
        "attrlab tuned": ours_feat(batch_size=batch, shard_size=4096),
        **{f"traker {n}": (lambda s=s: s.featurize(fresh())) for n, s in sides.items()},
    }
    if featurize:
        print("featurize (s per run):")
        ft = interleaved(feat_sides, repeats)
    else:  # states for scoring only, untimed (both attrlab rows score the same stores)
        for name, fn in feat_sides.items():
            if name != "attrlab tuned":
                fn()
        state["stores_True"] = state["stores_False"]
    stores = state["stores_False"]
    agree = agreement(b, stores, fresh())
    print(f"same projection & ridge vs traker: features max|diff|/max {agree['features']:.2e}, "
          f"scores max|diff|/max {agree['scores']:.2e}, Spearman {agree['spearman']:.6f}")  # fmt: skip
    extra = {
        "n_train": len(ytr),
        "n_queries": len(yq),
        "models": len(models),
        "k": k,
        "batch": batch,
    }
    if featurize:
        n_ex = len(models) * len(ytr)
        for ours, peer in (("attrlab defaults", "traker defaults"), ("attrlab tuned", "traker tuned"),
                           ("attrlab defaults", "traker best")):  # fmt: skip
            rows.append(row("trak-featurize", b["desc"], ft, ours=ours, peer=peer,
                            agreement=agree["features"], metric="max |diff| / max (same projection)",
                            throughput_ex_s={"ours": n_ex / median(ft[ours]),
                                             "peer": n_ex / median(ft[peer])}, **extra))  # fmt: skip

    score_sides: dict[str, Callable[[], Any]] = {
        "attrlab defaults": lambda: state.__setitem__(
            "s_ours", ad.TRAK(state["stores_False"]).scores(models, (xq, yq))
        ),
        "attrlab tuned": lambda: ad.TRAK(state["stores_True"], reg=reg).scores(
            models, (xq, yq), batch_size=batch
        ),
        **{
            f"traker {n}": (lambda s=s: state.__setitem__(f"s_{s.kind}", s.score(xq, yq)))
            for n, s in sides.items()
        },  # fmt: skip
    }
    print("scoring (s per run):")
    st = interleaved(score_sides, repeats)
    for ours, peer in (("attrlab defaults", "traker defaults"), ("attrlab tuned", "traker tuned"),
                       ("attrlab defaults", "traker best")):  # fmt: skip
        rows.append(row("trak-score", b["desc"], st, ours=ours, peer=peer, agreement=agree["scores"],
                        metric="max |diff| / max (same projection & ridge)",
                        spearman=agree["spearman"], **extra))  # fmt: skip
    state.update(stores=stores, tmp=tmp, agreement=agree)
    return rows, state


def summary(quick: bool = False) -> list[dict[str, Any]]:
    """Rows for ``benchmarks/run_all.py``: scoring (and, unless ``quick``, featurize)
    on both digits setups. ``quick``: 2 models, 8 training epochs, no featurize
    timing, 3 repeats (well under a minute and a half on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows: list[dict[str, Any]] = []
        for setup in SETUPS:
            r, state = compare(setup, n_models=2 if quick else 5, epochs=8 if quick else 20,
                               repeats=3, featurize=not quick)  # fmt: skip
            shutil.rmtree(state["tmp"], ignore_errors=True)
            rows += r
        return rows
    finally:
        torch.set_num_threads(threads)


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


def lds_report(state: dict[str, Any], retrain: int, epochs: int, reg: float) -> dict[str, Any]:
    """LDS of both libraries on one setup (the same retrained models and subsets)."""
    b, stores = state["build"], state["stores"]
    models, xtr, ytr, xq, yq = (b[n] for n in ("models", "xtr", "ytr", "xq", "yq"))
    harness = digits_harness(xtr, ytr, xq, yq, n_models=retrain, hidden=b["hidden"], epochs=epochs,
                             cache_dir=str(OUT / "lds_cache"), progress=True)  # fmt: skip
    t = time.perf_counter()
    harness.outputs()
    print(f"LDS harness: {retrain} retrained models ready ({time.perf_counter() - t:.1f}s, cached)")
    s_peer = state["s_tuned"]
    s_ours = ad.TRAK(stores, reg=reg).scores(models, (xq, yq)).numpy()
    s_ours0 = ad.TRAK(stores, reg=0.0).scores(models, (xq, yq)).numpy()
    tr = harness.score(ad.tracin(stores, models, (xq, yq)))
    sweep = {r: harness.score(ad.TRAK(stores, reg=r).scores(models, (xq, yq))).lds for r in SWEEP}
    l_peer, l_ours, l_ours0 = harness.score(s_peer), harness.score(s_ours), harness.score(s_ours0)
    corr = float(np.corrcoef(s_peer.ravel(), s_ours0.ravel())[0, 1])
    print(f"LDS        traker {l_peer}")
    print(f"LDS        attrlab (reg={reg}) {l_ours}")
    print(f"LDS        attrlab (reg=0, traker's kernel) {l_ours0}")
    print("LDS vs relative ridge reg: " + ", ".join(f"{r:g}: {v:.4f}" for r, v in sweep.items()))
    print(f"LDS        attrlab TracIn-CP (final checkpoints) {tr}")
    print(f"score correlation attrlab(reg=0) vs traker (different random projections): {corr:.3f}")
    return {
        "traker": [l_peer.lds, *l_peer.ci],
        "attrlab": [l_ours.lds, *l_ours.ci],
        "attrlab_reg0": [l_ours0.lds, *l_ours0.ci],
        "reg": reg,
        "sweep": sweep,
        "tracin": [tr.lds, *tr.ci],
        "corr_reg0_other_projection": corr,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small smoke run (2 models, 1 repeat)")
    ap.add_argument("--setup", choices=[*SETUPS, "both"], default="digits64")
    ap.add_argument("--timing-only", action="store_true", help="skip the LDS and RSS parts")
    ap.add_argument("--no-featurize", action="store_true", help="time scoring only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both libraries)")
    ap.add_argument("--facts", action="store_true", help="only the zoo facts top-10 benchmark")
    ap.add_argument("--facts-queries", type=int, default=100)
    ap.add_argument("--facts-modules", default=None, help="comma-separated parameter prefixes")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--retrain", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--reg",
        type=float,
        default=None,
        help="attrlab TRAK relative ridge (default: library default)",
    )
    a = ap.parse_args()
    if a.quick:
        a.models, a.retrain, a.epochs, a.repeats = 2, 16, 8, 1
    torch.set_num_threads(a.threads)
    if a.facts:
        mods = a.facts_modules.split(",") if a.facts_modules else None
        facts_benchmark(a.facts_queries, 256 if a.dim == 512 else a.dim, mods, 32)
        return
    OUT.mkdir(exist_ok=True)
    reg = ad.TRAK.__init__.__defaults__[1] if a.reg is None else a.reg  # type: ignore[index]
    rows: list[dict[str, Any]] = []
    res: dict[str, Any] = {"args": vars(a), "setups": {}}
    for setup in SETUPS if a.setup == "both" else [a.setup]:
        r, state = compare(setup, a.models, a.epochs, a.dim, a.repeats,
                           featurize=not a.no_featurize, reg=reg)  # fmt: skip
        rows += r
        out: dict[str, Any] = {"rows": r, "agreement": state["agreement"]}
        if not a.timing_only:
            out["lds"] = lds_report(state, a.retrain, a.epochs, reg)
            cfg = SETUPS[setup]
            n_small, n_big = (2000, 20000) if a.quick else (10000, 100000)
            b_small, p_small, m_small = peak_rss(n_small, cfg["hidden"], a.dim, cfg["batch"])
            b_big, p_big, m_big = peak_rss(n_big, cfg["hidden"], a.dim, cfg["batch"])
            print(f"peak RSS while featurizing  {n_small} ex: {p_small / 1024:.0f} MiB | {n_big} ex: "
                  f"{p_big / 1024:.0f} MiB | ratio {p_big / p_small:.3f}; growth over the RSS before "
                  f"featurizing: {(p_small - b_small) / 1024:.1f} / {(p_big - b_big) / 1024:.1f} MiB; "
                  f"process peak {m_small / 1024:.0f} / {m_big / 1024:.0f} MiB")  # fmt: skip
            out["peak_rss_kib"] = {str(n_small): [b_small, p_small, m_small],
                                   str(n_big): [b_big, p_big, m_big]}  # fmt: skip
        shutil.rmtree(state["tmp"], ignore_errors=True)
        res["setups"][setup] = out
    print_rows(rows)
    print(f"load averages {loadavg()}, torch threads {torch.get_num_threads()}")
    (OUT / "bench_trak.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
