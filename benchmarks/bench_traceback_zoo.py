"""Held-out LDS of AttnTrace and TracLLM beside ContextCite on the zoo context task.

50 prompts of ``al.zoo.task("context_qa").examples(50, seed=0)`` (5 documents each,
response = the gold answer); ``al.evaluate.lds`` with 64 random subsets (seed 1).

Run::

    python benchmarks/bench_traceback_zoo.py
"""

from __future__ import annotations

import time

import numpy as np
import torch

import attrlab as al
from attrlab.units import Sources

RUNS = {
    "contextcite (64 ablations)": ("contextcite", {"samples": 64}),
    "attntrace (paper defaults)": ("attntrace", {}),
    "tracllm (K=2)": ("tracllm", {"top_k": 2}),
    "tracllm (K=5, paper default)": ("tracllm", {"top_k": 5}),
}


def main() -> None:
    torch.set_num_threads(1)
    lm = al.zoo.load("context_qa")
    examples = al.zoo.task("context_qa").examples(50, seed=0)
    print("| method | mean held-out LDS | prompts per attribution | seconds (50 prompts) |")
    print("|---|---|---|---|")
    for name, (method, kw) in RUNS.items():
        lds, prompts = [], []
        t0 = time.perf_counter()
        for ex in examples:
            units = Sources(sources=ex.sources)
            r = al.attribute(lm, ex.prompt, ex.answer, units=units, method=method,
                             batch_size=64, **kw)  # fmt: skip
            prompts.append(r.diagnostics["n_prompts"])
            s = al.evaluate.lds(lm, r, ex.prompt, ex.answer, n_masks=64, seed=1)
            if not np.isnan(s.lds):
                lds.append(s.lds)
        secs = time.perf_counter() - t0
        print(f"| {name} | {np.mean(lds):.3f} ({len(lds)} prompts) | {np.mean(prompts):.1f} | "
              f"{secs:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
