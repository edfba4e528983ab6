"""Wrapper overhead: a forward through attrlab vs the plain Hugging Face forward.

12-layer, 768-wide GPT-2-architecture random model, 64-token prompt, 2 threads.
The sides are interleaved (A B C / C B A, ``_interleave.interleaved``) and
load averages printed. Reports the medians and the overhead ratios (wall and
this process's CPU time, which other load on a shared machine disturbs less):
  - no cache requested (target <= 5%)
  - cache of every head_out and mlp.out site (target <= 25%)

Run:  python benchmarks/bench_wrapper.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _interleave import interleaved, print_rows, row
from transformers import GPT2Config, GPT2LMHeadModel

import attrlab as al


def measure(repeats: int = 15, threads: int = 2) -> list[dict[str, Any]]:
    """Rows: attrlab without / with a cache vs the plain forward (ratio = hf / attrlab)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    hf = GPT2LMHeadModel(cfg).eval()
    lm = al.wrap(hf, None, name="gpt2-12x768-random")
    ids = torch.randint(0, cfg.vocab_size, (1, 64))
    batch = lm.tokenize(ids)
    sites = [f"blocks.{l}.attn.head_out" for l in range(12)] + [
        f"blocks.{l}.mlp.out" for l in range(12)
    ]

    def plain() -> torch.Tensor:
        with torch.no_grad():
            return hf(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).logits

    def wrapped() -> torch.Tensor:
        return lm.run(batch)[0]

    def cached() -> torch.Tensor:
        return lm.run(batch, cache=sites)[0]

    cpu: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            c0 = time.process_time()
            out = fn()
            cpu.setdefault(name, []).append(time.process_time() - c0)
            return out

        return run

    fns = {"hf": plain, "attrlab (no cache)": wrapped, "attrlab (cache head_out+mlp.out)": cached}
    diff = float((plain() - wrapped()).abs().max())
    wall = interleaved({k: timed(k, f) for k, f in fns.items()}, repeats=repeats)
    cpu = {k: v[-repeats:] for k, v in cpu.items()}  # without the warm-up
    c0 = statistics.median(cpu["hf"])
    setup = "12x768 gpt2, 64 tokens, one forward"
    return [
        row(
            "wrapper", setup, wall, ours=k, peer="hf", agreement=diff,
            metric="max |logit diff| vs hf",
            cpu_overhead=round(statistics.median(cpu[k]) / c0 - 1, 4),
        )
        for k in ("attrlab (no cache)", "attrlab (cache head_out+mlp.out)")
    ]  # fmt: skip


def summary(quick: bool = False) -> list[dict[str, Any]]:
    """Rows for ``benchmarks/run_all.py`` (``quick``: 5 repeats instead of 15).

    Example::

        summary(quick=True)[0]["ratio"]  # hf seconds / attrlab seconds, ~0.95-1
    """
    return measure(repeats=5 if quick else 15)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rows = measure(args.repeats, args.threads)
    print_rows(rows)
    for r in rows:
        print(f"{r['ours']}: wall overhead {100 * (1 / r['ratio'] - 1):.1f}%, "
              f"cpu overhead {100 * r['cpu_overhead']:.1f}%")  # fmt: skip


if __name__ == "__main__":
    main()
