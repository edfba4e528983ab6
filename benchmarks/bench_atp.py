"""Benchmark: cost of AtP, AtP*, EAP and EAP-IG relative to one forward+backward.

Model: a seeded random 12-layer GPT-2-architecture model (d_model 768, 12
heads, vocab 50257, random LayerNorm weights; the same configuration as
``bench_patching.py``), eager attention, float32, 2 threads. Prompt: 16 random
tokens, counterfactual: the same with 3 tokens changed; metric: logit
difference of two fixed tokens at the last position.

Timed (median of ``--runs``):

* ``fwd+bwd``: one forward with the graph kept and one backward of the metric
  to the attention outputs (the unit of cost);
* ``atp``: AtP over all heads x positions (2 forwards + 1 backward);
* ``atp*``: AtP* over all heads x positions (QK fix off for ``z`` units, as it
  only applies to query/key units; GradDrop on), and ``atp* (k)``: AtP* over all
  key units with the QK fix;
* ``exact``: exact patching of heads x positions with
  ``attrlab.methods.patching.patch_sweep``, extrapolated from a timed chunk of
  128 patches (one batched forward; 12 x 12 x 16 = 2304 patches in all);
* ``eap``: EAP over all edges (separate q/k/v inputs), and ``eap-ig``
  (8 steps, inputs variant).

Run::

    python benchmarks/bench_atp.py             # prints a table and the ratios
    python benchmarks/bench_atp.py --runs 1    # quicker

Example:
    python benchmarks/bench_atp.py --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import attrlab as al
from attrlab.methods.atp import NodeSet, exact_node_effects, prepare_pair

N_LAYERS, D_MODEL, N_HEADS, VOCAB, N_POS = 12, 768, 12, 50257, 16
ANSWER, WRONG = 1000, 2000


def build() -> al.LM:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=N_LAYERS,
        n_embd=D_MODEL,
        n_head=N_HEADS,
        vocab_size=VOCAB,
        n_positions=1024,
        initializer_range=0.05,
        activation_function="gelu_new",
        attn_implementation="eager",
    )
    hf = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    hf.eval()
    return al.wrap(hf, None, name="random-gpt2-12l")


def timed(fn, runs: int) -> float:
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = build()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(100, VOCAB, (1, N_POS), generator=g)
    cf = ids.clone()
    cf[0, [3, 7, 11]] = torch.randint(100, VOCAB, (3,), generator=g)
    target = al.targets.LogitDiff(ANSWER, WRONG)
    heads = al.units.Heads(per_position=True)

    def fwd_bwd() -> None:
        t = target.bind(lm)
        logits, cache = lm.run(
            ids, cache=[f"blocks.{i}.attn.out" for i in range(N_LAYERS)], grad=True, last_only=True
        )
        torch.autograd.grad(t(logits, cache.batch).sum(), list(cache.values()))

    def run(method: str, units, **kw):
        return lambda: al.attribute(
            lm, ids, target=target, units=units, method=method, counterfactual=cf, **kw
        )

    t_fb = timed(fwd_bwd, args.runs)
    rows = {"fwd+bwd": t_fb}
    rows["atp"] = timed(run("atp", heads), args.runs)
    rows["atp*"] = timed(run("atp*", heads), args.runs)
    rows["atp* (k, QK fix)"] = timed(run("atp*", heads, head_site="k"), args.runs)
    rows["eap"] = timed(run("eap", "edges"), args.runs)
    rows["eap-ig (8 steps)"] = timed(run("eap-ig", "edges", steps=8), max(1, args.runs // 2))

    t = target.bind(lm)
    clean, cfb = prepare_pair(lm, ids, t, cf)
    ns = NodeSet.build(lm, heads, N_POS)
    with torch.no_grad():
        _, src = lm.run(cfb, cache=ns.sites())
    from attrlab.methods.patching import PatchUnit, patch_sweep

    chunk = 128  # one batched forward of patch_sweep (its default batch size)
    plist = [
        PatchUnit(layer, "attn.z", position=p, index=h)
        for layer in range(N_LAYERS)
        for h in range(N_HEADS)
        for p in range(N_POS)
    ]
    t_chunk = timed(lambda: patch_sweep(lm, ids, cf, target, plist[:chunk]), 2)
    rows["exact (extrapolated)"] = t_chunk * len(plist) / chunk

    # agreement of AtP / AtP* with exact patching on a sample of units
    r_atp = run("atp*", heads)()
    sample = torch.randperm(ns.n_units, generator=g)[:96].tolist()
    top = torch.argsort(r_atp.scores.abs(), descending=True)[:32].tolist()
    idx = sorted(set(sample + top))
    ex = exact_node_effects(lm, clean, src, t, ns, indices=idx, chunk=48)

    def corr(a: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a[idx].double(), ex]))[0, 1])

    print(f"{'what':<24}{'seconds':>10}{'x fwd+bwd':>12}")
    for k, v in rows.items():
        print(f"{k:<24}{v:>10.3f}{v / t_fb:>12.2f}")
    print(f"exact / atp*: {rows['exact (extrapolated)'] / rows['atp*']:.0f}x")
    print(
        f"Pearson with exact on {len(idx)} units: atp {corr(r_atp.extra['atp']):.4f}, "
        f"atp* {corr(r_atp.scores):.4f}"
    )


if __name__ == "__main__":
    main()
