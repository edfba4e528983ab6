"""EK-FAC / K-FAC influence on the digits MLP: attrlab vs ``kronfluence`` (PyPI), CPU.

The peer runs in its own venv (``benchmarks/_envs/kronfluence``) as a long-lived
process (``_peer.PeerProcess``), so its timed units interleave with attrlab's
(``_interleave.interleaved``). Build it with::

    python -m venv benchmarks/_envs/kronfluence
    benchmarks/_envs/kronfluence/bin/pip install torch==2.13.0 kronfluence

Same model (``DigitsMLP`` 64-H-10 trained by ``attrlab.data.digits.train_mlp``),
same training set, same queries, same loss (summed cross-entropy) and
measurement (the query's margin; kronfluence's ``compute_measurement`` returns
``-margin`` so that both score ``grad margin^T H^-1 (-grad loss)``).

Parity (``--parity``, float64 everywhere, ``fisher="empirical"`` so that no
label sampling is involved): per module the covariance matrices ``A`` and ``S``
(max |diff| / max |value|), and the scores (Spearman over all query x train
pairs, and the mean per-query Spearman), K-FAC and EK-FAC, at kronfluence's
default damping (``1e-8``) and at the heuristic (``damping=None``). With the
true Fisher (sampled labels) the two libraries draw different labels: the
factors then agree only up to sampling noise; the scores are compared too.

Throughput (``--timing``, float32 models, kronfluence's default dtypes): factor
fitting and pairwise scoring, examples/s, interleaved,.

    python benchmarks/bench_influence.py --parity
    python benchmarks/bench_influence.py --timing --repeats 3
    python benchmarks/bench_influence.py            # both
    python benchmarks/bench_influence.py --lm       # parity on the zoo facts GPT-2

``--lm`` (the peer venv also needs ``transformers``): the zoo facts model in
float64, ``Conv1D`` layers turned into ``nn.Linear`` on kronfluence's side (it
tracks ``nn.Linear`` only), the first 64 corpus documents (loss on every
token), 8 held-out queries (measurement: the answer's log-probability), the
empirical Fisher, attention masks as kronfluence's ``get_attention_mask``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
PEER_PY = HERE / "_envs" / "kronfluence" / "bin" / "python"
INSTALL = "python -m venv benchmarks/_envs/kronfluence && benchmarks/_envs/kronfluence/bin/pip install torch==2.13.0 kronfluence"
DTYPE = {"float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------- the peer (kronfluence venv)
class _MLP(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, hidden)
        self.fc2 = torch.nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def serve_peer(setup_file: str, threads: int) -> None:
    """Kronfluence side: fit factors / score the digits setup saved by the parent."""
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    sys.path.insert(0, str(HERE))
    from _peer import serve

    logging.disable(logging.WARNING)
    torch.set_num_threads(threads)
    d = torch.load(setup_file)

    class DigitsTask(Task):
        def compute_train_loss(self, batch: Any, model: Any, sample: bool = False) -> Any:
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return torch.nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: Any) -> Any:
            x, y = batch
            logits = model(x)
            bindex = torch.arange(logits.shape[0])
            correct = logits[bindex, y]
            cloned = logits.clone()
            cloned[bindex, y] = float("-inf")
            margin = correct - cloned.logsumexp(dim=-1)
            return -margin.sum()

    state: dict[str, Any] = {}

    def build(dtype: str) -> Any:
        model = _MLP(d["hidden"])
        model.load_state_dict(d["state"])
        model = model.to(DTYPE[dtype]).eval()
        task = DigitsTask()
        model = prepare_model(model, task)
        out = tempfile.mkdtemp(prefix="kronfluence-")
        an = Analyzer("digits", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=out)
        train = torch.utils.data.TensorDataset(d["xtr"].to(DTYPE[dtype]), d["ytr"])
        query = torch.utils.data.TensorDataset(d["xq"].to(DTYPE[dtype]), d["yq"])
        return an, train, query

    def f_args(a: dict[str, Any]) -> Any:
        kw: dict[str, Any] = {
            "strategy": a["strategy"],
            "use_empirical_fisher": a["fisher"] == "empirical",
        }
        if a["dtype"] == "float64":
            for k in (
                "activation_covariance_dtype",
                "gradient_covariance_dtype",
                "per_sample_gradient_dtype",
                "lambda_dtype",
            ):
                kw[k] = torch.float64
        return FactorArguments(**kw)

    def s_args(a: dict[str, Any]) -> Any:
        kw: dict[str, Any] = {"damping_factor": a["damping"]}
        if a["dtype"] == "float64":
            for k in ("per_sample_gradient_dtype", "precondition_dtype", "score_dtype"):
                kw[k] = torch.float64
        return ScoreArguments(**kw)

    def fit(a: dict[str, Any]) -> dict[str, Any]:
        an, train, _ = build(a["dtype"])
        t = time.perf_counter()
        an.fit_all_factors(
            factors_name="f",
            dataset=train,
            per_device_batch_size=a["batch"],
            factor_args=f_args(a),
            overwrite_output_dir=True,
        )
        secs = time.perf_counter() - t
        state.update(an=an, args=a)
        out: dict[str, Any] = {"seconds": secs}
        if a.get("save"):
            cov = an.load_covariance_matrices("f")
            lam = an.load_lambda_matrices("f") if a["strategy"] == "ekfac" else None
            arrays = {}
            for name, mats in cov.items():
                for mod, t_ in mats.items():
                    arrays[f"{name}|{mod}"] = t_.double().numpy()
            if lam:
                for name, mats in lam.items():
                    for mod, t_ in mats.items():
                        arrays[f"{name}|{mod}"] = t_.double().numpy()
            np.savez(a["save"], **arrays)
        return out

    def score(a: dict[str, Any]) -> dict[str, Any]:
        an = state["an"]
        _, train, query = build(a["dtype"])
        t = time.perf_counter()
        an.compute_pairwise_scores(
            scores_name="s",
            factors_name="f",
            query_dataset=query,
            train_dataset=train,
            per_device_query_batch_size=len(query),
            per_device_train_batch_size=a["batch"],
            score_args=s_args(a),
            overwrite_output_dir=True,
        )
        secs = time.perf_counter() - t
        if a.get("save"):
            np.save(a["save"], an.load_pairwise_scores("s")["all_modules"].double().numpy())
        return {"seconds": secs}

    import kronfluence

    def rss(a: dict[str, Any]) -> dict[str, Any]:
        import resource

        return {"peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}

    serve({"fit": fit, "score": score, "rss": rss}, ready={"kronfluence": kronfluence.__version__})


def serve_peer_lm(setup_file: str, threads: int) -> None:
    """Kronfluence side on a zoo LM (GPT-2: its ``Conv1D`` layers become ``nn.Linear``)."""
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    sys.path.insert(0, str(HERE))
    from _peer import serve

    logging.disable(logging.WARNING)
    torch.set_num_threads(threads)
    d = torch.load(setup_file)
    model = GPT2LMHeadModel.from_pretrained(d["path"], attn_implementation="eager").double()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Conv1D):
            lin = torch.nn.Linear(mod.weight.shape[0], mod.weight.shape[1]).double()
            lin.weight.data = mod.weight.data.T.contiguous()
            lin.bias.data = mod.bias.data.clone()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    model.eval()

    def token_ce(batch: Any, model: Any) -> Any:
        ids, mask, answer = batch
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        )
        return (ce.reshape(ids.shape[0], -1) * answer[:, 1:].to(ce.dtype)).sum()

    class LMTask(Task):
        def compute_train_loss(self, batch: Any, model: Any, sample: bool = False) -> Any:
            assert not sample  # the parity run uses the empirical Fisher
            return token_ce(batch, model)

        def compute_measurement(self, batch: Any, model: Any) -> Any:
            return token_ce(batch, model)  # minus the answer log-probability

        def get_influence_tracked_modules(self) -> Any:
            return d["modules"]

        def get_attention_mask(self, batch: Any) -> Any:
            return batch[1]

    task = LMTask()
    model = prepare_model(model, task)
    an = Analyzer("lm", model=model, task=task, cpu=True, disable_tqdm=True,
                  output_dir=tempfile.mkdtemp(prefix="kronfluence-lm-"))  # fmt: skip
    train = torch.utils.data.TensorDataset(*d["train"])
    query = torch.utils.data.TensorDataset(*d["query"])
    f64 = torch.float64

    def run(a: dict[str, Any]) -> dict[str, Any]:
        fa = FactorArguments(
            strategy=a["strategy"], use_empirical_fisher=True, activation_covariance_dtype=f64,
            gradient_covariance_dtype=f64, per_sample_gradient_dtype=f64, lambda_dtype=f64,
        )  # fmt: skip
        an.fit_all_factors("f", dataset=train, per_device_batch_size=8, factor_args=fa,
                           overwrite_output_dir=True)  # fmt: skip
        cov = an.load_covariance_matrices("f")
        arrays = {f"{k}|{m}": t.double().numpy() for k, v in cov.items() for m, t in v.items()}
        np.savez(a["save"] + ".npz", **arrays)
        sa = ScoreArguments(damping_factor=a["damping"], per_sample_gradient_dtype=f64,
                            precondition_dtype=f64, score_dtype=f64)  # fmt: skip
        an.compute_pairwise_scores("s", "f", query_dataset=query, train_dataset=train,
                                   per_device_query_batch_size=len(query),
                                   per_device_train_batch_size=8, score_args=sa,
                                   overwrite_output_dir=True)  # fmt: skip
        np.save(a["save"] + ".npy", an.load_pairwise_scores("s")["all_modules"].double().numpy())
        return {}

    serve({"run": run}, ready={"modules": d["modules"]})


def parity_lm(n_docs: int, n_queries: int, modules: str) -> list[dict[str, Any]]:
    """attrlab vs kronfluence on the zoo facts model (float64, empirical Fisher)."""
    from _peer import PeerProcess

    import attrlab as al
    import attrlab.data as ad
    from attrlab.data.influence import covariances_of

    lm = al.zoo.load("facts")
    lm.model.double()
    task = al.zoo.task("facts")
    corpus = task.corpus()[:n_docs]
    qs = task.examples(n_queries, seed=0, split="test")
    docs = ad.Examples.from_texts(lm, [t for _, t in corpus])
    queries = ad.Examples.from_texts(lm, [q.prompt for q in qs], [q.answer for q in qs])
    mods = ad.linear_modules(lm, modules.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="bench-influence-lm-"))
    setup = tmp / "lm.pt"
    torch.save({"path": str(al.zoo.model_path("facts")), "modules": mods,
                "train": docs.batch(0, len(docs)), "query": queries.batch(0, len(queries))},
               setup)  # fmt: skip
    print(f"zoo facts GPT-2 (Conv1D -> Linear for kronfluence), {n_docs} documents, "
          f"{n_queries} queries, modules {mods}", flush=True)  # fmt: skip
    rows = []
    with PeerProcess([str(PEER_PY), __file__, "--serve-lm", str(setup)]) as peer:
        for strategy in ("ekfac", "kfac"):
            store = ad.fit_factors(lm, docs, tmp / "store", fisher="empirical", modules=mods,
                                   strategy=strategy, batch_size=8)  # fmt: skip
            for damping in (1e-8, None):
                inf = ad.Influence(store, strategy, damping=damping)
                ours = inf.scores(lm, queries, output=ad.AnswerLogProb()).numpy()
                peer.call("run", strategy=strategy, damping=damping, save=str(tmp / "k"))
                theirs = np.load(tmp / "k.npy")
                if damping is None and strategy == "ekfac":
                    k = np.load(tmp / "k.npz")
                    for m, (A, S) in zip(inf.blocks, covariances_of(store, inf.blocks, inf.root)):
                        for nm, o in (("activation_covariance", A), ("gradient_covariance", S)):
                            t = k[f"{nm}|{m.name}"] / k[f"num_{nm}_processed|{m.name}"]
                            t = 0.5 * (t + t.T)
                            rel = float(np.abs(o - t).max() / np.abs(t).max())
                            rows.append({"what": f"LM {nm} {m.name}", "max_rel_diff": rel})
                            print(f"  LM {nm:22s} {m.name}: max rel diff {rel:.2e}", flush=True)
                sp, sp_rows = spearman_all(ours, theirs)
                rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
                rows.append({"what": f"LM scores {strategy} damping={damping}", "spearman": sp,
                             "spearman_per_query": sp_rows, "max_rel_diff": rel})  # fmt: skip
                print(f"  LM scores {strategy} damping={damping}: Spearman {sp:.6f} (per query "
                      f"{sp_rows:.6f}), max rel diff {rel:.2e}", flush=True)  # fmt: skip
    return rows


# ----------------------------------------------------------------- the parent (attrlab venv)
def build_setup(hidden: int, epochs: int, n_queries: int, path: Path) -> dict[str, Any]:
    from attrlab.data.digits import load_digits_data, train_mlp

    xtr, ytr, xte, yte = load_digits_data()
    model = train_mlp(xtr, ytr, hidden=hidden, epochs=epochs, seed=0)
    d = {
        "hidden": hidden,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "xtr": xtr,
        "ytr": ytr,
        "xq": xte[:n_queries],
        "yq": yte[:n_queries],
    }
    torch.save(d, path)
    return {**d, "model": model}


def spearman_all(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Spearman over all pairs, and the mean over rows."""
    from scipy.stats import spearmanr

    overall = float(spearmanr(a.ravel(), b.ravel())[0])
    rows = float(np.mean([spearmanr(x, y)[0] for x, y in zip(a, b)]))
    return overall, rows


def parity(peer: Any, s: dict[str, Any], batch: int) -> list[dict[str, Any]]:
    import attrlab.data as ad
    from attrlab.data.influence import covariances_of

    model = s["model"].double()
    data = (s["xtr"].double(), s["ytr"])
    queries = (s["xq"].double(), s["yq"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fisher in ("empirical", "true"):
            store = ad.fit_factors(model, data, Path(tmp) / fisher, fisher=fisher, batch_size=batch)
            inf0 = ad.Influence(store)
            cov = covariances_of(store, inf0.blocks, inf0.root)
            kf = Path(tmp) / f"k-{fisher}.npz"
            peer.call(
                "fit", strategy="ekfac", fisher=fisher, dtype="float64", batch=batch, save=str(kf)
            )
            k = np.load(kf)
            for m, (A, S) in zip(inf0.blocks, cov):
                for nm, ours in (("activation_covariance", A), ("gradient_covariance", S)):
                    theirs = k[f"{nm}|{m.name}"] / k[f"num_{nm}_processed|{m.name}"]
                    theirs = 0.5 * (theirs + theirs.T)  # kronfluence symmetrizes before eigh too
                    rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
                    rows.append({"what": f"{nm} {m.name}", "fisher": fisher, "max_rel_diff": rel})
                    print(f"  {fisher:9s} {nm:22s} {m.name}: max rel diff {rel:.2e}", flush=True)
            lam = inf0._preconditioner()  # ours: 1 / (Λ + damping); compare Λ itself
            for m, (_, _, inv) in zip(inf0.blocks, lam):
                d = 0.1 * float((1.0 / inv).mean()) / 1.1  # undo the heuristic damping
                ours_l = (1.0 / inv).numpy() - d
                theirs = k[f"lambda_matrix|{m.name}"] / k[f"num_lambda_processed|{m.name}"]
                rel = float(np.abs(ours_l - theirs).max() / np.abs(theirs).max())
                rows.append({"what": f"lambda {m.name}", "fisher": fisher, "max_rel_diff": rel})
                print(f"  {fisher:9s} {'lambda (EK-FAC)':22s} {m.name}: max rel diff {rel:.2e}")
            for strategy in ("ekfac", "kfac"):
                if strategy == "kfac":
                    peer.call("fit", strategy="kfac", fisher=fisher, dtype="float64", batch=batch)
                for damping in (1e-8, None):
                    ours = (
                        ad.Influence(store, strategy, damping=damping)
                        .scores(model, queries)
                        .numpy()
                    )
                    sf = Path(tmp) / "s.npy"
                    peer.call("score", dtype="float64", damping=damping, batch=batch, save=str(sf))
                    theirs = np.load(sf)
                    sp, sp_rows = spearman_all(ours, theirs)
                    rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
                    rows.append(
                        {
                            "what": f"scores {strategy} damping={damping}",
                            "fisher": fisher,
                            "spearman": sp,
                            "spearman_per_query": sp_rows,
                            "max_rel_diff": rel,
                        }
                    )
                    print(
                        f"  {fisher:9s} scores {strategy} damping={damping}: Spearman {sp:.6f} "
                        f"(per query {sp_rows:.6f}), max rel diff {rel:.2e}",
                        flush=True,
                    )
                if strategy == "ekfac":
                    peer.call("fit", strategy="ekfac", fisher=fisher, dtype="float64", batch=batch)
    return rows


def timing(peer: Any, s: dict[str, Any], batch: int, repeats: int) -> list[dict[str, Any]]:
    from _interleave import interleaved, median

    import attrlab.data as ad

    model = s["model"].float()
    data = (s["xtr"], s["ytr"])
    queries = (s["xq"], s["yq"])
    n, m = len(s["ytr"]), len(s["yq"])
    root = Path(tempfile.mkdtemp(prefix="bench-influence-"))
    counter = {"i": 0}
    last: dict[str, Any] = {}

    def ours_fit() -> None:
        counter["i"] += 1
        last["store"] = ad.fit_factors(model, data, root / f"s{counter['i']}", batch_size=batch)

    def ours_score() -> None:
        ad.Influence(last["store"], damping=1e-8).scores(model, queries, batch_size=m)

    def peer_fit() -> None:
        peer.call("fit", strategy="ekfac", fisher="true", dtype="float32", batch=batch)

    def peer_score() -> None:
        peer.call("score", dtype="float32", damping=1e-8, batch=batch)

    print(f"fit (EK-FAC, true Fisher, {n} examples, batch {batch}):", flush=True)
    tf = interleaved({"attrlab": ours_fit, "kronfluence": peer_fit}, repeats=repeats)
    print(f"score ({m} queries x {n} train):", flush=True)
    ts = interleaved({"attrlab": ours_score, "kronfluence": peer_score}, repeats=repeats)
    rows = []
    for what, t, count in (("fit", tf, n), ("score", ts, n * m)):
        a, p = median(t["attrlab"]), median(t["kronfluence"])
        rows.append(
            {
                "what": what,
                "attrlab_s": round(a, 4),
                "kronfluence_s": round(p, 4),
                "attrlab_per_s": round(count / a, 1),
                "kronfluence_per_s": round(count / p, 1),
                "ratio": round(p / a, 3),
                "unit": "examples" if what == "fit" else "query x train pairs",
                "load": os.getloadavg(),
            }
        )
        print(
            f"{what}: attrlab {a:.3f}s ({count / a:.0f}/s), kronfluence {p:.3f}s "
            f"({count / p:.0f}/s): kronfluence/attrlab time {p / a:.2f}x  load {os.getloadavg()}",
            flush=True,
        )
    return rows


def _ours_once(setup_file: str, batch: int) -> None:
    """One fit + score in this process (for the peak-RSS child)."""
    import attrlab.data as ad
    from attrlab.data.digits import DigitsMLP

    torch.set_num_threads(1)
    d = torch.load(setup_file)
    model = DigitsMLP(d["hidden"])
    model.load_state_dict(d["state"])
    model.eval()
    store = ad.fit_factors(model, (d["xtr"], d["ytr"]), tempfile.mkdtemp(), batch_size=batch)
    ad.Influence(store, damping=1e-8).scores(model, (d["xq"], d["yq"]))
    import resource

    print("@@" + json.dumps({"peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def peak_rss(setup_file: Path, batch: int) -> dict[str, float]:
    """Peak RSS (MiB) of a fresh process that fits EK-FAC factors and scores once, per side
    (each process reports its own ``ru_maxrss``; the interpreter and imports included)."""
    import subprocess

    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_influence as b; "
            f"b._ours_once({str(setup_file)!r}, {batch})")  # fmt: skip
    args = json.dumps({"strategy": "ekfac", "fisher": "true", "dtype": "float32", "batch": batch})
    sargs = json.dumps({"dtype": "float32", "damping": 1e-8, "batch": batch})
    runs = {
        "attrlab": ([sys.executable, "-c", code], None),
        "kronfluence": (
            [str(PEER_PY), __file__, "--serve", str(setup_file)],
            f"fit {args}\nscore {sargs}\nrss\nquit\n",
        ),
    }
    out = {}
    for side, (argv, stdin) in runs.items():
        r = subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True)
        last = [ln for ln in r.stdout.splitlines() if ln.startswith("@@")][-1]
        out[side] = round(json.loads(last[2:])["peak_rss_kb"] / 1024, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", default=None, help="(peer side) the setup file")
    ap.add_argument("--serve-lm", default=None, help="(peer side) the LM setup file")
    ap.add_argument("--parity", action="store_true")
    ap.add_argument("--lm", action="store_true", help="parity on the zoo facts LM")
    ap.add_argument("--lm-docs", type=int, default=64)
    ap.add_argument("--lm-queries", type=int, default=8)
    ap.add_argument("--lm-modules", default="transformer.h.1.mlp")
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--memory", action="store_true", help="peak RSS of one fit + score, per side")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the rows here")
    a = ap.parse_args()
    if a.serve:
        serve_peer(a.serve, a.threads)
        return
    if a.serve_lm:
        serve_peer_lm(a.serve_lm, a.threads)
        return
    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(HERE))
    from _peer import PeerProcess

    if a.lm:
        rows = parity_lm(a.lm_docs, a.lm_queries, a.lm_modules)
        if a.json:
            Path(a.json).write_text(json.dumps({"lm": rows}, indent=1))
        return

    both = not (a.parity or a.timing)
    if not PEER_PY.exists():
        sys.exit(f"peer venv missing: {INSTALL}")
    setup_file = Path(tempfile.mkdtemp()) / "digits.pt"
    s = build_setup(a.hidden, a.epochs, a.queries, setup_file)
    print(
        f"digits MLP 64-{a.hidden}-10, {len(s['ytr'])} train, {len(s['yq'])} queries; "
        f"{a.threads} thread(s); load {os.getloadavg()}",
        flush=True,
    )
    out: dict[str, Any] = {}
    if a.memory:
        out["peak_rss_mib"] = peak_rss(setup_file, a.batch)
        print(f"peak RSS of one EK-FAC fit + score (MiB): {out['peak_rss_mib']}", flush=True)
        if not (a.parity or a.timing):
            if a.json:
                Path(a.json).write_text(json.dumps(out, indent=1))
            return
    with PeerProcess(
        [str(PEER_PY), __file__, "--serve", str(setup_file), "--threads", str(a.threads)]
    ) as peer:
        print(f"peer: {peer.ready}", flush=True)
        if a.parity or both:
            out["parity"] = parity(peer, s, a.batch)
        if a.timing or both:
            out["timing"] = timing(peer, s, a.batch, a.repeats)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
