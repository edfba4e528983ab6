"""A/B: the continuation rows' backwards in parallel threads (attrlab's default
on a CPU with several intra-op threads) vs one thread of rows, on the IG
benchmark's model (``bench_ig.build``: 12-layer 768-wide GPT-2, 16+8 tokens,
50 Gauss-Legendre steps), interleaved, 2 intra-op threads, wall seconds.

Run:  python benchmarks/ab_ig_row_threads.py [--vocab 2003] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_ig  # noqa: E402

import attrlab.units.token_grads as token_grads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=2003, choices=bench_ig.VOCABS)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    lm, prompt, cont = bench_ig.build("sdpa", args.vocab, 12)
    parallel = token_grads._backward_workers

    def run(mode: str) -> float:
        token_grads._backward_workers = parallel if mode == "parallel" else (lambda *a: 1)
        t = time.perf_counter()
        bench_ig.attrlab_run(lm, prompt, cont, 50)
        return time.perf_counter() - t

    run("parallel"), run("one")  # warm-up
    times: dict[str, list[float]] = {"parallel": [], "one": []}
    for i in range(args.repeats):
        for mode in ("parallel", "one") if i % 2 == 0 else ("one", "parallel"):
            times[mode].append(run(mode))
    token_grads._backward_workers = parallel
    print(f"load {os.getloadavg()}")
    for mode, ts in times.items():
        print(f"{mode:9s} median {statistics.median(ts):.2f}s  {[round(t, 2) for t in ts]}")


if __name__ == "__main__":
    main()
