"""Benchmark: what an attribution graph says about the zoo IOI model, checked
against exact patching and against ablations.

For a few IOI prompts, with per-layer transcoders on the zoo IOI model (the
bundled set when present, else trained here in about a minute):

1. the attribution graph of the logit difference IO - S (``head_loadings=True``);
2. its **top path** into the logit: from the logit, repeatedly the incoming
   edge with the largest weight x source influence, down to a token embedding;
   every edge of the path that crosses positions is split by head loadings;
3. the heads the graph credits: each head's loading summed over the graph's
   edges into the logit and into features, weighted by the target's influence;
4. exact activation patching of every head (the counterfactual prompt of the
   zoo task, logit difference IO - S): its top heads;
5. ablation: the graph's top features (by influence) zeroed in one forward
   (:func:`attrlab.dictionaries.intervene`): the change of the logit
   difference, next to the change the graph predicts to first order (their
   direct effects, plus one hop through the graph's other features).

Run::

    python benchmarks/bench_graph_ioi.py [--prompts 8] [--top-features 5]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "_out" / "bench_graph_ioi"


def transcoders(lm, al):
    """The bundled zoo transcoders, else ones trained by bench_dictionaries, else train."""
    zoo = getattr(al.dictionaries, "zoo_transcoders", None)
    if zoo is not None:
        try:
            return zoo("ioi")
        except Exception as e:  # noqa: BLE001 - fall back to training
            print(f"no bundled transcoders ({e}); training")
    saved = [
        ROOT / "_out" / "bench_dictionaries" / f"ioi_L{layer}" for layer in range(lm.cfg.n_layers)
    ]
    if all(p.exists() for p in saved):
        return [al.dictionaries.load(p) for p in saved]
    return [al.dictionaries.train(lm, f"blocks.{layer}.mlp.in", out_site=f"blocks.{layer}.mlp.out",
                                  width=512, activation="topk", k=16, steps=1500, progress=False)
            for layer in range(lm.cfg.n_layers)]  # fmt: skip


def top_path(g) -> list[tuple[str, str, float]]:
    """From the logit down: the incoming edge with the largest weight x influence."""
    inf = dict(zip(g.nodes["id"], g.nodes["influence"]))
    path, node, seen = [], "logit", set()
    while node not in seen:
        seen.add(node)
        into = g.incoming(node)
        if not into["source"]:
            break
        k = max(range(len(into["source"])),
                key=lambda i: into["weight"][i] * max(inf[into["source"][i]], 1e-12))  # fmt: skip
        path.append((into["source"][k], node, into["weight"][k]))
        node = into["source"][k]
    return path


def predicted_change(g, removed: list[str]) -> float:
    """First-order effect on the target of removing features, read off the graph:
    their direct effects, plus their effects on the graph's other features passed
    on by those features' edges per unit of activation (a linear model of one
    hop through a feature; 0 for a feature not in the graph)."""
    act = dict(zip(g.nodes["id"], g.nodes["activation"]))
    edges = list(zip(g.edges["source"], g.edges["target"], g.edges["weight"]))
    into_logit = {s: w for s, t, w in edges if t == "logit"}
    change = 0.0
    for s, t, w in edges:
        if s not in removed:
            continue
        if t == "logit":
            change -= w
        elif t.startswith("f") and t not in removed and act.get(t):
            change -= w * into_logit.get(t, 0.0) / act[t]
    return change


def main() -> None:
    import attrlab as al

    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--top-features", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(2)
    lm = al.zoo.load("ioi")
    tcs = transcoders(lm, al)
    H = lm.cfg.n_heads
    rows = []
    graph_heads_all: Counter = Counter()
    patch_top_all: Counter = Counter()
    for ex in al.zoo.task("ioi").examples(a.prompts, seed=3):
        g = al.attribution_graph(
            lm, ex.prompt, tcs, target=(ex.answer, ex.wrong), head_loadings=True
        )
        hl = g.to_pandas("head_loadings")
        pos = dict(zip(g.nodes["id"], g.nodes["position"]))
        inf = dict(zip(g.nodes["id"], g.nodes["influence"]))
        # heads credited by the graph: loadings weighted by the target's influence
        heads = hl[hl["head"] >= 0]
        credit = Counter()
        for t, layer, h, w in zip(heads.target, heads.layer, heads["head"], heads.weight):
            credit[f"L{layer}H{h}"] += abs(w) * inf.get(t, 1.0)
        path = top_path(g)
        path_heads = []
        for s, t, _w in path:
            if pos[s] != pos[t] and pos[s] >= 0:
                e = heads[(heads.source == s) & (heads.target == t)]
                best = e.loc[e.weight.abs().idxmax()]
                path_heads.append(f"L{int(best.layer)}H{int(best['head'])}")
        # exact patching of heads (output z), logit difference IO - S
        pr = al.attribute(lm, ex.prompt, method="patch", units="heads", target=(ex.answer, ex.wrong),
                          counterfactual=ex.counterfactual)  # fmt: skip
        scores = pr.scores.reshape(-1).abs()
        labels = [f"L{i // H}H{i % H}" for i in range(len(scores))]
        patch_rank = [labels[i] for i in torch.argsort(scores, descending=True).tolist()]
        graph_rank = [h for h, _ in credit.most_common()]
        # ablate the graph's top features: predicted sign = sign of their summed effect on the logit
        fnodes = sorted((n for n in g.nodes["id"] if n.startswith("f")), key=lambda n: -inf[n])
        top = fnodes[: a.top_features]
        feats_layer = []
        for n in top:
            layer, rest = n[1:].split(".", 1)
            i, p = (int(x) for x in rest.split("@"))
            feats_layer.append((int(layer), p, i, "set", 0.0))
        logits = al.dictionaries.intervene(lm, ex.prompt, tcs, [[], feats_layer])
        io, s_ = lm.token_id(ex.answer), lm.token_id(ex.wrong)
        ld = [float(logits[k, -1, io] - logits[k, -1, s_]) for k in range(2)]
        predicted = predicted_change(g, top)
        row = {
            "prompt": ex.prompt, "replacement": round(g.diagnostics["replacement_score"], 3),
            "completeness": round(g.diagnostics["completeness_score"], 3),
            "top_path": [f"{s}->{t}" for s, t, _ in path], "top_path_heads": path_heads,
            "graph_top_heads": graph_rank[:3], "patching_top_heads": patch_rank[:3],
            "top_path_heads_in_patching_top3": all(h in patch_rank[:3] for h in path_heads),
            "ablated_features": top, "logit_diff_clean": round(ld[0], 3),
            "logit_diff_ablated": round(ld[1], 3),
            "predicted_change": round(predicted, 3), "observed_change": round(ld[1] - ld[0], 3),
            "direction_as_predicted": (ld[1] - ld[0]) * predicted > 0,
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
        graph_heads_all.update(graph_rank[:3])
        patch_top_all.update(patch_rank[:3])
    n = len(rows)
    summary = {
        "prompts": n,
        "top_path_heads_in_patching_top3": sum(r["top_path_heads_in_patching_top3"] for r in rows),
        "direction_as_predicted": sum(r["direction_as_predicted"] for r in rows),
        "graph_top3_heads": graph_heads_all.most_common(4),
        "patching_top3_heads": patch_top_all.most_common(4),
        "median_replacement": sorted(r["replacement"] for r in rows)[n // 2],
        "median_completeness": sorted(r["completeness"] for r in rows)[n // 2],
    }
    print(json.dumps(summary))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "graph_ioi.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
