"""Benchmark: attribution-graph build time and peak memory against prompt length.

The 12-layer, 768-wide random GPT-2 of ``bench_atp.py`` with random TopK
transcoders of width 4 x d_model (k 16) on every layer; prompts of 16, 64 and
256 random tokens; ``max_feature_nodes`` 512 (the rows computed), batch 32.
One fresh process per length: wall time, the peak resident memory the build
adds (the process's peak is reset after the model is built and freed memory
handed back, so the model's own construction peak does not hide the build's),
and the pre-flight estimate the build prints.

Run::

    python benchmarks/bench_graphs.py [--lengths 16,64,256] [--max-feature-nodes 512]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "_out" / "bench_graphs"


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> float:
    """Hand freed heap memory back, reset the peak (Linux), return resident MB."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def one(n_pos: int, budget: int) -> None:
    import attrlab as al

    sys.path.insert(0, str(ROOT))
    from bench_atp import build

    torch.set_num_threads(2)
    lm = build()
    d = lm.cfg.d_model
    tcs = [al.dictionaries.Dictionary.random(d, 4 * d, f"blocks.{layer}.mlp.in",
                                             f"blocks.{layer}.mlp.out", activation="topk", k=16,
                                             seed=layer) for layer in range(lm.cfg.n_layers)]  # fmt: skip
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(100, 50257, (1, n_pos), generator=g)
    base = _reset_peak()
    t0 = time.perf_counter()
    gr = al.attribution_graph(lm, ids, tcs, target=1000, max_feature_nodes=budget)
    dt = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    print(json.dumps({"n_pos": n_pos, "time_s": round(dt, 2), "peak_rss_mb": round(peak - base, 1),
                      "estimate_mb": round(gr.diagnostics["memory_estimate_bytes"] / 2**20, 1),
                      "features": gr.diagnostics["n_features"],
                      "rows": gr.diagnostics["n_feature_rows"],
                      "replacement": round(gr.diagnostics["replacement_score"], 3)}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="16,64,256")
    ap.add_argument("--max-feature-nodes", type=int, default=512)
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        one(a.one, a.max_feature_nodes)
        return
    rows = []
    for n in [int(x) for x in a.lengths.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--max-feature-nodes",
                              str(a.max_feature_nodes)], check=True, capture_output=True, text=True)  # fmt: skip
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "graphs.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
