"""The method x architecture table: runs every cell of ``attrlab.architectures``
(each registered method on a tiny random model of each family in
``al.testing.FAMILIES``) and writes ``docs/architectures.md``.

The cells live in the package (``attrlab.architectures``), not here, so that
``tests/test_architectures.py`` runs exactly the same code and checks the file
is current. Prints the time per family and the counts; exits 1 if a cell
crashed (the table then shows ``crash`` in that cell).

Run::

    python benchmarks/architecture_table.py                 # writes docs/architectures.md
    python benchmarks/architecture_table.py --check         # exit 1 if the file is stale
    python benchmarks/architecture_table.py --families gpt2 llama --out /tmp/t.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from attrlab import architectures as A
from attrlab.testing import FAMILIES

DOC = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="*", default=None, help="default: every family")
    ap.add_argument("--out", default=str(DOC))
    ap.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny models: threads only add overhead
    outcomes: list[A.Outcome] = []
    t_all = time.perf_counter()
    for fam in args.families or FAMILIES:
        t0 = time.perf_counter()
        mine = A.run_all([fam])
        outcomes += mine
        n_pass = sum(o.status == "pass" for o in mine)
        n_refuse = sum(o.status == "refuse" for o in mine)
        print(f"{fam:22s} {time.perf_counter() - t0:6.2f} s  {n_pass} pass  {n_refuse} refuse")
        for o in mine:
            if o.status == "fail":
                print(f"    CRASH {o.method}: {o.reason}")
    total = time.perf_counter() - t_all
    n = {s: sum(o.status == s for o in outcomes) for s in ("pass", "refuse", "fail")}
    print(f"{len(outcomes)} cells in {total:.1f} s: {n['pass']} pass, {n['refuse']} refuse, "
          f"{n['fail']} crash")  # fmt: skip
    text = A.render(outcomes)
    out = Path(args.out)
    if args.check:
        stale = not out.exists() or out.read_text() != text
        print(f"{out}: {'stale' if stale else 'current'}")
        return int(stale or n["fail"] > 0)
    out.write_text(text)
    print(f"wrote {out}")
    return int(n["fail"] > 0)


if __name__ == "__main__":
    sys.exit(main())
