"""Peak memory of Integrated Gradients on a long prompt: default batch (follows the
memory budget, attrlab.model.budget) vs the old fixed 32 points per forward.

    python benchmarks/bench_memory.py --tokens 1024            # default (budget)
    python benchmarks/bench_memory.py --tokens 1024 --batch-size 32   # the old default

Each run is one process; the peak RSS (``ru_maxrss``) is for the whole process.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import attrlab as al


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--memory-budget", default=None)
    args = ap.parse_args()
    lm = al.wrap(*al.testing.tiny_model("gpt2", n_positions=args.tokens + 8))
    ids = torch.randint(
        5, lm.cfg.d_vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0)
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    r = al.attribute(
        lm,
        ids,
        target=7,
        method="ig",
        steps=args.steps,
        batch_size=args.batch_size,
        memory_budget=args.memory_budget,
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    from attrlab.model.budget import batch_size_for, memory_budget

    rows = batch_size_for(
        lm,
        args.tokens,
        cap=32,
        grad=True,
        batch_size=args.batch_size,
        memory_budget=args.memory_budget,
        logit_positions=1,
    )
    print(
        f"tokens {args.tokens}, steps {args.steps}, points per forward {rows} "
        f"(budget {memory_budget(args.memory_budget) / 2**20:.0f} MB): "
        f"peak RSS {peak:.0f} MB (before the call {before:.0f} MB), "
        f"{time.perf_counter() - t:.1f} s, completeness error "
        f"{r.diagnostics['completeness_error']:.2e}"
    )


if __name__ == "__main__":
    main()
