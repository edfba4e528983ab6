"""Benchmark: RelP against exact patching, next to AtP and AtP*; MIB circuit
curves (CPR, CMD) of EAP, EAP-IG, RelP and exact edge patching.

``accuracy``: Pearson correlation and top-10 recall (by |score|) of each
estimate with exact patching with the same ablation (``occlusion`` with the
counterfactual: every unit patched from the counterfactual run, one at a time;
all scores are contributions), and the median wall time of ``relp`` over
``atp``:

* zoo IOI model (GPT-2 architecture, 2 layers), 8 prompts, logit difference:
  heads x positions and MLP outputs x positions;
* a seeded random 12-layer, 768-wide GPT-2 (``bench_atp.build``, random
  LayerNorm weights, ``initializer_range`` 0.05, and the same with 0.2), 16
  random tokens with 3 changed in the counterfactual, logit difference of two
  fixed tokens: MLP outputs x positions (the RelP paper's GPT-2 Large
  comparison: RelP 0.956 vs AtP 0.006) and MLP outputs per layer.

``mib``: CPR and CMD (MIB's fractions, linear areas) of edge scores from EAP,
EAP-IG (8 steps), RelP (edges) and exact edge patching (occlusion over every
edge) on the zoo IOI and induction models, 8 prompts each.

Run::

    python benchmarks/bench_relp.py accuracy
    python benchmarks/bench_relp.py mib
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "_out" / "bench_relp"
sys.path.insert(0, str(ROOT))
from bench_atp import corr, recall, timed  # noqa: E402  (the same measures as the AtP benchmark)


def compare(lm, prompts, cfs, target, units, label: str, methods: dict) -> dict:
    import attrlab as al

    ex = al.attribute(lm, prompts, target=target, units=units, method="occlusion",
                      counterfactual=cfs).scores  # fmt: skip
    row = {"units": label, "n": int(ex.numel())}
    for name, (method, kw) in methods.items():
        try:
            s = al.attribute(lm, prompts, target=target, units=units, method=method,
                             counterfactual=cfs, **kw).scores  # fmt: skip
        except Exception as e:  # a method that does not take these units
            row[name] = f"n/a ({type(e).__name__})"
            continue
        s, e = s.reshape(-1), ex.reshape(-1)
        row[name] = f"{corr(s, e):.3f} / {recall(s, e):.1f}"
    t_atp = timed(lambda: al.attribute(lm, prompts, target=target, units=units, method="atp",
                                       counterfactual=cfs), 5)  # fmt: skip
    t_relp = timed(lambda: al.attribute(lm, prompts, target=target, units=units, method="relp",
                                        counterfactual=cfs), 5)  # fmt: skip
    row["relp / atp time"] = f"{t_relp / t_atp:.2f}"
    print(json.dumps(row), flush=True)
    return row


METHODS = {
    "atp": ("atp", {}),
    "atp*": ("atp*", {}),
    "relp (cp-lrp, default)": ("relp", {}),
    "relp (attnlrp)": ("relp", {"rules": "attnlrp"}),
}


def build_scaled(init: float):  # -> al.LM
    """``bench_atp.build`` with another ``initializer_range``: larger weights push
    GELU and LayerNorm out of their near-linear range, where AtP's first-order
    estimate degrades (as in trained models)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import attrlab as al

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                     initializer_range=init, activation_function="gelu_new",
                     attn_implementation="eager")  # fmt: skip
    hf = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return al.wrap(hf.eval(), None, name=f"random-gpt2-12l-init{init}")


def accuracy() -> list[dict]:
    from bench_atp import ANSWER, WRONG, _tokens, build

    import attrlab as al

    rows = []
    lm = al.zoo.load("ioi")
    exs = al.zoo.task("ioi").examples(8, seed=0)
    prompts, cfs = [e.prompt for e in exs], [e.counterfactual for e in exs]
    target = al.targets.LogitDiff([e.answer for e in exs], [e.wrong for e in exs])
    rows.append(compare(lm, prompts, cfs, target, al.units.Heads(per_position=True),
                        "zoo IOI: heads x positions", METHODS))  # fmt: skip
    rows.append(compare(lm, prompts, cfs, target, al.units.MlpOut(per_position=True),
                        "zoo IOI: MLP x positions", METHODS))  # fmt: skip
    ids, cf = _tokens()
    t = al.targets.LogitDiff(ANSWER, WRONG)
    for init in (0.05, 0.2):
        big = build() if init == 0.05 else build_scaled(init)
        for units, name in ((al.units.MlpOut(per_position=True), "MLP x positions"),
                            (al.units.MlpOut(), "MLP per layer")):  # fmt: skip
            rows.append(compare(big, ids, cf, t, units,
                                f"random GPT-2 12L (init {init}): {name}", METHODS))  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "accuracy.json").write_text(json.dumps(rows, indent=1))
    return rows


def mib() -> list[dict]:
    import attrlab as al

    rows = []
    for task in ("ioi", "induction"):
        lm = al.zoo.load(task)
        exs = al.zoo.task(task).examples(8, seed=0)
        prompts, cfs = [e.prompt for e in exs], [e.counterfactual for e in exs]
        target = al.targets.LogitDiff([e.answer for e in exs], [e.wrong for e in exs])
        units = al.units.Edges(qkv=True)
        for name, method, kw in (
            ("eap", "eap", {}), ("eap-ig", "eap-ig", {"steps": 8}), ("relp", "relp", {}),
            ("relp (attnlrp rules)", "relp", {"rules": "attnlrp"}),
            ("exact (occlusion)", "occlusion", {}),
        ):  # fmt: skip
            t0 = time.perf_counter()
            r = al.attribute(lm, prompts, target=target, units=units, method=method,
                             counterfactual=cfs, **kw)  # fmt: skip
            dt = time.perf_counter() - t0
            c = al.evaluate.circuit_curve(lm, r)
            row = {"task": task, "method": name, "cpr": round(c["cpr"], 4),
                   "cmd": round(c["cmd"], 4), "attribution_s": round(dt, 2), "n_edges": len(r)}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "mib.json").write_text(json.dumps(rows, indent=1))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("task", choices=["accuracy", "mib"])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    accuracy() if a.task == "accuracy" else mib()


if __name__ == "__main__":
    main()
