"""Benchmark: ``f(keep)`` over edge masks — many masks per forward vs one forward per mask.

Model: the seeded random 12-layer GPT-2-architecture model of ``bench_atp.py``
(d_model 768, 12 heads, vocab 50257, random LayerNorm weights), float32, eager
attention. Prompt: 16 random tokens; counterfactual: the same with 3 tokens
changed; target: the logit difference of two fixed tokens at the last position.
Units: all edges with separate q/k/v inputs (32,491). Masks: ``--masks`` random
keep-masks (each edge kept with probability ``--keep``, seeded).

The same script runs against the code before the change (``units.mask_values``:
one forward per mask) and after (``units.bind(...).f``: many masks per forward);
it saves the values under ``benchmarks/_out/bench_edges/`` and compares them with
the other side's when both exist::

    PYTHONPATH=/path/to/old/src python benchmarks/bench_edges.py --threads 2   # before
    PYTHONPATH=src python benchmarks/bench_edges.py --threads 2                # after

Example:
    python benchmarks/bench_edges.py --masks 64 --keep 0.95
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "_out" / "bench_edges"


def main() -> None:
    import sys

    sys.path.insert(0, str(ROOT))
    from bench_atp import ANSWER, N_POS, VOCAB, WRONG, build

    import attrlab as al

    ap = argparse.ArgumentParser()
    ap.add_argument("--masks", type=int, default=256)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lm = build()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, N_POS), generator=g)
    cf = ids.clone()
    cf[0, [3, 7, 11]] = torch.randint(0, VOCAB, (3,), generator=g)
    target = al.targets.LogitDiff(ANSWER, WRONG)
    units = al.units.Edges()
    n = units.graph(lm).n_edges
    masks = torch.rand(args.masks, n, generator=torch.Generator().manual_seed(2)) < args.keep

    try:  # the code before has no bound edges (one forward per mask in mask_values)
        units.bind(lm, ids, al.targets.resolve(target, lm), al.ablations.Counterfactual(cf))
        side = "after"
    except NotImplementedError:
        side = "before"
    t0, c0 = time.perf_counter(), time.process_time()
    if side == "before":
        vals = units.mask_values(lm, ids, target, masks, counterfactual=cf).double()
    else:
        t = al.targets.resolve(target, lm)
        b = units.bind(lm, ids, t, al.ablations.Counterfactual(cf), batch_size=args.batch_size)
        t1, c1 = time.perf_counter(), time.process_time()
        vals = b.f(masks)[:, 0].double()
        print(f"bind: {t1 - t0:.2f} s")
        t0, c0 = t1, c1
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(
        f"{side}: f over {args.masks} masks (keep {args.keep}, {n} edges): {secs:.2f} s wall "
        f"({1000 * secs / args.masks:.1f} ms per mask), {cpu:.2f} s CPU "
        f"({1000 * cpu / args.masks:.1f} ms per mask)"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    tag = f"{args.masks}_{args.keep}"
    torch.save(vals, OUT / f"{side}_{tag}.pt")
    other = OUT / f"{'after' if side == 'before' else 'before'}_{tag}.pt"
    if not other.exists():  # the other side measured fewer masks: compare those (same seed)
        found = sorted(OUT.glob(f"{'after' if side == 'before' else 'before'}_*_{args.keep}.pt"))
        other = found[0] if found else other
    if other.exists():
        o = torch.load(other)
        m = min(len(o), len(vals))
        vals, o = vals[:m], o[:m]
        print(f"compared on {m} masks: ", end="")
        print(
            f"max |after - before| = {float((vals - o).abs().max()):.3g} "
            f"(values span {float(o.min()):.3g} .. {float(o.max()):.3g})"
        )


if __name__ == "__main__":
    main()
