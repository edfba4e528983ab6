"""Benchmark: transcoders trained on the zoo IOI and induction models.

For each model and layer, a TopK transcoder (``blocks.l.mlp.in`` ->
``blocks.l.mlp.out``, width 512, k 16) is trained on the task's training split
and evaluated on 256 held-out test texts: fraction of variance explained,
L0, and the next-token KL when the model runs with the transcoder's output in
place of the MLP's. Training time is reported; the transcoders are saved in
the SAELens layout under ``benchmarks/_out/bench_dictionaries/``.

Run::

    python benchmarks/bench_dictionaries.py [--steps 1500]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "_out" / "bench_dictionaries"


def main() -> None:
    import attrlab as al

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    a = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for task in ("ioi", "induction"):
        lm = al.zoo.load(task)
        held = [e.prompt + e.answer for e in al.zoo.task(task).examples(256, seed=1)]
        for layer in range(lm.cfg.n_layers):
            t0 = time.perf_counter()
            d = al.dictionaries.train(lm, f"blocks.{layer}.mlp.in", out_site=f"blocks.{layer}.mlp.out",
                                      width=512, activation="topk", k=16, steps=a.steps,
                                      progress=False)  # fmt: skip
            dt = time.perf_counter() - t0
            al.dictionaries.save_saelens(d, OUT / f"{task}_L{layer}")
            ev = al.dictionaries.evaluate(lm, d, held)
            row = {"task": task, "layer": layer, "train_s": round(dt, 1),
                   **{k: round(v, 4) for k, v in ev.items()}}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "transcoders.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
