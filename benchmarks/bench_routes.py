"""Benchmark: information-flow routes, cost and what they find.

``time``: wall time of ``al.routes`` (one forward with the cached sites, then
the top-down decomposition) over a plain forward of the same model, on the
12-layer, 768-wide random GPT-2 of ``bench_atp.py`` with a 64-token prompt (2
threads, interleaved, medians), for ``tau`` 0.04 (default) and 0.01 and per
head / per block.

``zoo``: on the zoo IOI and induction models, the attention edges into the
final position's nodes (weight, layer, head, source token) next to the heads
that exact patching (``occlusion`` over heads with the counterfactual, mean over
8 prompts) ranks top.

Run::

    python benchmarks/bench_routes.py time
    python benchmarks/bench_routes.py zoo
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "_out" / "bench_routes"


def timing(runs: int) -> dict:
    import attrlab as al

    sys.path.insert(0, str(ROOT))
    from bench_atp import build

    torch.set_num_threads(2)
    lm = build()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(100, 50257, (1, 64), generator=g)
    configs = {"tau=0.04 per head": {}, "tau=0.01 per head": {"tau": 0.01},
               "tau=0.04 per block": {"per_head": False}}  # fmt: skip
    times: dict[str, list[float]] = {"forward": [], **{k: [] for k in configs}}
    sizes = {}
    with torch.no_grad():
        lm.model(ids)
    for _ in range(runs):
        t0 = time.perf_counter()
        with torch.no_grad():
            lm.model(ids)
        times["forward"].append(time.perf_counter() - t0)
        for name, kw in configs.items():
            t0 = time.perf_counter()
            r = al.routes(lm, ids, **kw)
            times[name].append(time.perf_counter() - t0)
            sizes[name] = (r.n_nodes, r.n_edges)
    fwd = statistics.median(times["forward"])
    res = {"forward_s": fwd}
    for name in configs:
        t = statistics.median(times[name])
        res[name] = {"s": round(t, 4), "x_forward": round(t / fwd, 2), "nodes_edges": sizes[name]}
    print(json.dumps(res, indent=1))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "time.json").write_text(json.dumps(res, indent=1))
    return res


def zoo() -> list:
    import attrlab as al

    rows = []
    for task in ("ioi", "induction"):
        lm = al.zoo.load(task)
        exs = al.zoo.task(task).examples(8, seed=0)
        prompts, cfs = [e.prompt for e in exs], [e.counterfactual for e in exs]
        target = al.targets.LogitDiff([e.answer for e in exs], [e.wrong for e in exs])
        ex = al.attribute(lm, prompts, target=target, units="heads", method="occlusion",
                          counterfactual=cfs)  # fmt: skip
        df = ex.to_pandas().sort_values("score", key=abs, ascending=False)
        top = [(int(a), int(b), round(float(c), 3)) for a, b, c in
               zip(df["layer"][:4], df["head"][:4], df["score"][:4])]  # fmt: skip
        g = al.routes(lm, exs[0].prompt)
        e = g.to_pandas("edges")
        last = len(g.meta["tokens"]) - 1
        into = e[(e.kind == "attention") & e.target.str.endswith(f".{last}")]
        found = [(int(r.layer), int(r.head), r.source, round(float(r.weight), 3))
                 for r in into.sort_values("weight", ascending=False).itertuples()]  # fmt: skip
        row = {"task": task, "prompt": exs[0].prompt, "patching_top_heads (layer, head, score)": top,
               "route_attention_edges_into_last (layer, head, source, weight)": found}  # fmt: skip
        print(json.dumps(row, indent=1))
        rows.append(row)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "zoo.json").write_text(json.dumps(rows, indent=1))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("task", choices=["time", "zoo"])
    ap.add_argument("--runs", type=int, default=7)
    a = ap.parse_args()
    timing(a.runs) if a.task == "time" else zoo()


if __name__ == "__main__":
    main()
