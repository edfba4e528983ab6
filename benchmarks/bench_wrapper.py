"""Wrapper overhead: a forward through attrlab vs the plain Hugging Face forward.

12-layer, 768-wide GPT-2-architecture random model, 64-token prompt, 2 threads.
Reports the median of interleaved repeats and the overhead ratios:
  - no cache requested (target <= 5%)
  - cache of every head_out and mlp.out site (target <= 25%)

Run:  python benchmarks/bench_wrapper.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import attrlab as al


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    hf = GPT2LMHeadModel(cfg).eval()
    lm = al.wrap(hf, None, name="gpt2-12x768-random")
    ids = torch.randint(0, cfg.vocab_size, (1, 64))
    batch = lm.tokenize(ids)
    sites = [f"blocks.{l}.attn.head_out" for l in range(12)] + [
        f"blocks.{l}.mlp.out" for l in range(12)
    ]

    def plain():
        with torch.no_grad():
            return hf(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).logits

    def wrapped():
        return lm.run(batch)[0]

    def cached():
        return lm.run(batch, cache=sites)[0]

    fns = {"hf": plain, "attrlab (no cache)": wrapped, "attrlab (cache head_out+mlp.out)": cached}
    for f in fns.values():  # warm up
        f()
    assert torch.equal(plain(), wrapped())
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, f in fns.items():  # interleaved, so drift hits all alike
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    # CPU time of this process is far less sensitive to other load on a shared machine
    print(f"{'run':36s} {'wall s':>8s} {'overhead':>9s} {'cpu s':>8s} {'overhead':>9s}")
    w0, c0 = statistics.median(wall["hf"]), statistics.median(cpu["hf"])
    for k in fns:
        w, c = statistics.median(wall[k]), statistics.median(cpu[k])
        print(f"{k:36s} {w:8.4f} {100 * (w / w0 - 1):8.1f}% {c:8.4f} {100 * (c / c0 - 1):8.1f}%")
    print(f"max |logit diff| attrlab vs hf: {(plain() - wrapped()).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
