"""The timing harness every peer benchmark uses: interleaved repeats, load
averages, a concurrent CPU load on request, and the one row format that
``benchmarks/run_all.py`` collects.

Interleaving: repeat ``r`` runs the sides in the order given when ``r`` is
even and reversed when it is odd (A B, B A, A B, …), so a change in the
machine's load hits every side alike; ratios are of medians.

Example::

    from _interleave import interleaved, row, loadavg
    times = interleaved({"attrlab": run_ours, "captum": run_theirs}, repeats=3)
    print(row("ig", "12x768 gpt2, 16+8 tokens", times, ours="attrlab", peer="captum"))
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable
from typing import Any


def loadavg() -> list[float]:
    """The 1-, 5- and 15-minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def interleaved(
    sides: dict[str, Callable[[], Any]],
    repeats: int = 3,
    warmup: bool = True,
    verbose: bool = True,
) -> dict[str, list[float]]:
    """Wall seconds of every side over ``repeats`` interleaved rounds (A B, B A, …).

    ``warmup`` runs each side once first, untimed (imports, allocator, caches).
    Returns ``{name: [seconds per repeat]}``.
    """
    names = list(sides)
    if warmup:
        for name in names:
            sides[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - t0)
        if verbose:
            print(
                f"  repeat {r}: "
                + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names)
                + f"  (load {loadavg()})",
                flush=True,
            )
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def row(
    benchmark: str,
    setup: str,
    times: dict[str, list[float]],
    ours: str,
    peer: str,
    agreement: float | None = None,
    metric: str = "max |diff|",
    **extra: Any,
) -> dict[str, Any]:
    """One result row: medians of ``ours`` and ``peer``, the ratio peer / ours
    (> 1: attrlab faster), the value agreement and the load averages now."""
    a, p = median(times[ours]), median(times[peer])
    return {
        "benchmark": benchmark,
        "setup": setup,
        "ours": ours,
        "peer": peer,
        "ours_s": round(a, 4),
        "peer_s": round(p, 4),
        "ratio": round(p / a, 3) if a > 0 else None,
        "repeats": len(times[ours]),
        "agreement": agreement,
        "agreement_metric": metric,
        "load": loadavg(),
        **extra,
    }


def print_rows(rows: list[dict[str, Any]]) -> None:
    """A plain table of result rows."""
    for r in rows:
        agree = (
            "" if r.get("agreement") is None else f"  {r['agreement_metric']} {r['agreement']:.2e}"
        )
        print(
            f"{r['benchmark']:10s} {r['setup'][:48]:48s} {r['ours'][:22]:22s} {r['ours_s']:8.3f}s  "
            f"{r['peer'][:26]:26s} {r['peer_s']:8.3f}s  {r['ratio']:6.2f}x{agree}",
            flush=True,
        )


def _spin(stop: Any) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 1103515245 + 12345) & 0xFFFFFFFF


class ConcurrentLoad:
    """A second CPU-bound process (``procs`` busy loops) while the block runs:
    the "under load" condition of the acceptance numbers.

    Example::

        with ConcurrentLoad():
            times = interleaved(sides)
    """

    def __init__(self, procs: int = 1):
        self.procs = procs
        self._stop: Any = None
        self._ps: list[Any] = []

    def __enter__(self) -> ConcurrentLoad:
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._ps = [
            ctx.Process(target=_spin, args=(self._stop,), daemon=True) for _ in range(self.procs)
        ]
        for p in self._ps:
            p.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for p in self._ps:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
