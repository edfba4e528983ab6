"""Wrapper overhead: a forward through attrlab vs the plain Hugging Face forward.

12-layer, 768-wide GPT-2-architecture random model, 64-token prompt, 2 threads.
The sides interleave (A B C, C B A, ...; ``benchmarks/_interleave.py``) and
the ratios are of medians (ratio = hf / attrlab, so 1.0 is no overhead):

  - attrlab with its defaults, ``lm.run(batch)``, no cache (target: ratio >= 0.95)
  - a cache of every head_out and mlp.out site (target: ratio >= 0.8)

Values: the logits of ``lm.run`` equal the plain forward's exactly.
Process CPU seconds are printed too (steadier than wall time on a busy box).

Run:  python benchmarks/bench_wrapper.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

SITES_NOTE = "cache head_out+mlp.out"


def measure(repeats: int, threads: int = 2, n_pos: int = 64) -> list[dict[str, Any]]:
    """The wrapper's forward vs the plain one, interleaved; returns result rows."""
    from _interleave import interleaved, loadavg, print_rows, row
    from transformers import GPT2Config, GPT2LMHeadModel

    import attrlab as al

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    hf = GPT2LMHeadModel(cfg).eval()
    lm = al.wrap(hf, None, name="gpt2-12x768-random")
    ids = torch.randint(0, cfg.vocab_size, (1, n_pos))
    batch = lm.tokenize(ids)
    n = cfg.n_layer
    sites = [f"blocks.{l}.attn.head_out" for l in range(n)] + [
        f"blocks.{l}.mlp.out" for l in range(n)
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

    diff = float((plain() - wrapped()).abs().max())
    diff_cached = float((plain() - cached()).abs().max())
    cpu: dict[str, list[float]] = {}

    def with_cpu(name: str, f: Any) -> Any:
        def run() -> None:
            c0 = time.process_time()
            f()
            cpu.setdefault(name, []).append(time.process_time() - c0)

        return run

    fns = {"hf": plain, "attrlab defaults (no cache)": wrapped, f"attrlab ({SITES_NOTE})": cached}
    print(f"wrapper overhead, 12x768 gpt2, {n_pos} tokens, {threads} threads; load {loadavg()}")
    times = interleaved({k: with_cpu(k, f) for k, f in fns.items()}, repeats)
    setup = f"12x768 gpt2 forward, {n_pos} tokens"
    rows = []
    for name, d in ((list(fns)[1], diff), (list(fns)[2], diff_cached)):
        c_ratio = statistics.median(cpu["hf"][1:]) / statistics.median(cpu[name][1:])
        rows.append(
            row(
                "wrapper",
                setup,
                times,
                ours=name,
                peer="hf",
                agreement=d,
                metric="max |logit diff|",
                cpu_ratio=round(c_ratio, 3),
            )  # fmt: skip
        )
    print_rows(rows)
    for r in rows:
        print(f"  {r['ours']}: wall ratio {r['ratio']:.3f}, cpu ratio {r['cpu_ratio']:.3f}")
    return rows


def summary(quick: bool = False) -> list[dict[str, Any]]:
    """Rows for ``benchmarks/run_all.py`` (no peer venv: plain transformers is the peer;
    quick: 32 tokens, 5 repeats)."""
    return measure(repeats=5, n_pos=32) if quick else measure(repeats=15)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    measure(args.repeats, args.threads)


if __name__ == "__main__":
    main()
