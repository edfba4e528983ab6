"""Run every peer comparison and write one JSON of time ratios and value agreements.

Each benchmark module exposes ``summary(quick: bool) -> list[dict]`` (rows made
by ``_interleave.row``: attrlab with its defaults, the peer with its documented
defaults and with its best batch setting, timed interleaved, with the value
agreement and the load averages). This script runs them one after the other in
fresh processes (so one benchmark's memory and threads do not leak into the
next), prints the table and writes ``benchmarks/_out/run_all.json``.

A benchmark whose peer is not installed (or whose peer venv under
``benchmarks/_envs`` is missing) reports an ``error`` row instead of failing
the whole run.

Run::

    python benchmarks/run_all.py --quick          # a few minutes
    python benchmarks/run_all.py                  # the full comparisons
    python benchmarks/run_all.py --only ig,trak   # some of them

Example:
    python benchmarks/run_all.py --quick --out /tmp/ratios.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
#: benchmark name -> module under benchmarks/
BENCHMARKS = {
    "contextcite": "bench_contextcite",
    "ig": "bench_ig",
    "trak": "bench_trak",
    "patching": "bench_patching",
    "atp": "bench_atp",
    "coar": "bench_coar",
    "lenses": "bench_lenses",
    "lrp": "bench_lrp",
    "wrapper": "bench_wrapper",
    "graph": "bench_graph_parity",
}


def _run_one(name: str, module: str, quick: bool, timeout: float) -> list[dict[str, Any]]:
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); import {module} as m; "
        f"rows = m.summary(quick={quick}); print('@@ROWS@@' + json.dumps(rows))"
    )
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    except subprocess.TimeoutExpired:
        return [{"benchmark": name, "error": f"timed out after {timeout:.0f} s"}]
    took = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("@@ROWS@@"):
            rows: list[dict[str, Any]] = json.loads(line[len("@@ROWS@@") :])
            for r in rows:
                r.setdefault("seconds_total", round(took, 1))
            return rows
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return [{"benchmark": name, "error": " | ".join(tail) or f"exit code {proc.returncode}"}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small settings: a few minutes in all")
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(BENCHMARKS))
    ap.add_argument("--out", default=str(ROOT / "_out" / "run_all.json"))
    ap.add_argument("--timeout", type=float, default=None, help="seconds per benchmark")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)  # fail on a bad path before any work
    timeout = args.timeout or (900.0 if args.quick else 5400.0)
    rows: list[dict[str, Any]] = []
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for name in names:
        print(f"== {name} (load {os.getloadavg()})", flush=True)
        got = _run_one(name, BENCHMARKS[name], args.quick, timeout)
        rows.extend(got)
        for r in got:
            if "error" in r:
                print(f"   {name}: ERROR {r['error']}", flush=True)
            else:
                agree = (
                    ""
                    if r.get("agreement") is None
                    else f"  {r['agreement_metric']} {r['agreement']:.2e}"
                )
                print(
                    f"   {r['setup'][:50]:50s} {r['ours']} {r['ours_s']:.3f}s vs {r['peer']} "
                    f"{r['peer_s']:.3f}s: {r['ratio']:.2f}x{agree}",
                    flush=True,
                )
        # written after every benchmark: nothing computed is lost to a later failure
        out.write_text(
            json.dumps(
                {
                    "started": started,
                    "quick": args.quick,
                    "python": sys.version.split()[0],
                    "rows": rows,
                },
                indent=1,
            )
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
