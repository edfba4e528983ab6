"""Thought Anchors on the zoo reasoning model: rollout throughput and acceptance.

Part 1 (cost): counterfactual resampling (``method="resampling"``) on held-out
prompts of the ``reasoning`` zoo task, rollouts per second batched (all
rollouts of a prefix in one batch, continuing the trace's key/value cache)
versus one by one (``batch_size=1, reuse_prefix=False``: every rollout
recomputes its prefix). Both give identical scores (each rollout has its own
seeded stream); the sides are interleaved (benchmarks/_interleave.py), one
thread.

Part 2 (acceptance): :func:`attrlab.zoo.reasoning.anchor_metrics` on held-out
prompts: the top step by counterfactual resampling is a true dependency of the
answer; every distractor step scores below every true dependency; AUROC of the
attention-suppression matrix for the dependency edges.

Part 3 (removal): the generic estimators over ``units="trace"`` (``f``: the
answer sentence's log-probability with only the kept steps' text, or with the
dropped steps' tokens unread by later positions, ``ablation="suppress"``), on the same
held-out prompts and criteria as part 2 (top step is a true dependency; every
distractor below every dependency), with seconds and prompts run per method.

Part 4 (suppression variants): pooled and mean AUROC of the attention-suppression
matrix for the dependency edges, for the defaults and the paper's code's variant
(temperature 0.6, mean log-KL, outputs at the sentence's positions) and the
steps between them.

Part 5 (receiver heads): heads chosen by mean kurtosis over 30 training
prompts (``receiver_heads``), then on held-out prompts: is the top-scored
program step a true dependency of the answer (only steps with a sentence at
least ``min_distance`` later are ranked; chance given), and the AUROC of the
scores for dependencies vs distractors, per ``min_distance`` and ``top_k``.

Run: ``python benchmarks/bench_thought_anchors.py [--part 1|2|3|4|5|all] [--prompts 3]
[--rollouts 16] [--repeats 3] [--acceptance 100] [--acceptance-rollouts 20]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _interleave import interleaved, loadavg  # noqa: E402

import attrlab as al  # noqa: E402
from attrlab.zoo.reasoning import anchor_metrics  # noqa: E402


def part1(prompts: int, rollouts: int, repeats: int) -> dict[str, object]:
    lm = al.zoo.load("reasoning")
    exs = al.zoo.task("reasoning").examples(prompts, seed=7)
    out: dict[str, list[float]] = {}
    total = {"n": 0}

    def run(batched: bool) -> None:
        n = 0
        for ex in exs:
            kw = {} if batched else {"batch_size": 1, "reuse_prefix": False}
            r = al.attribute(
                lm, ex.prompt, units="trace", method="resampling", rollouts=rollouts,
                progress=False, **kw,
            )  # fmt: skip
            n += r.diagnostics["rollouts_total"]
        total["n"] = n

    times = interleaved(
        {"batched": lambda: run(True), "one-by-one": lambda: run(False)}, repeats=repeats
    )
    for k, v in times.items():
        out[k] = v
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "rollouts": total["n"],
        "seconds": med,
        "rollouts_per_second": {k: total["n"] / s for k, s in med.items()},
        "speedup": med["one-by-one"] / med["batched"],
        "load": loadavg(),
    }
    print(json.dumps(res, indent=1))
    return res


def part2(n: int, rollouts: int) -> dict[str, object]:
    lm = al.zoo.load("reasoning")
    exs = al.zoo.task("reasoning").examples(n, seed=0, split="test")
    t0 = time.perf_counter()
    m = anchor_metrics(lm, exs, rollouts=rollouts, seed=0, progress=True)
    m["seconds"] = time.perf_counter() - t0
    m["load"] = loadavg()
    print(json.dumps(m, indent=1))
    return m


REMOVAL_METHODS = (
    ("occlusion", "remove"),
    ("shapley-exact", "remove"),
    ("kernelshap", "remove"),
    ("contextcite", "remove"),
    ("occlusion", "suppress"),
    ("shapley-exact", "suppress"),
    ("kernelshap", "suppress"),
)


def part3(n: int) -> dict[str, object]:
    lm = al.zoo.load("reasoning")
    exs = al.zoo.task("reasoning").examples(n, seed=0, split="test")
    units = al.units.Trace()
    res: dict[str, object] = {}
    for method, ablation in REMOVAL_METHODS:
        top, below, secs, prompts, skipped = [], [], 0.0, 0, 0
        for ex in exs:
            t0 = time.perf_counter()
            r = al.attribute(lm, ex.prompt, units=units, method=method, ablation=ablation)
            secs += time.perf_counter() - t0
            if r.units["text"] != ex.steps[: len(ex.program)]:
                skipped += 1
                continue
            steps = r.scores.tolist()
            prompts += int(r.diagnostics.get("n_prompts", 0))
            best = max(range(len(steps)), key=lambda i: steps[i])
            top.append(best in ex.answer_deps)
            below.append(
                max(steps[i] for i in ex.distractors) < min(steps[i] for i in ex.answer_deps)
            )
        k = max(1, len(top))
        key = f"{method} ablation={ablation}"
        res[key] = {
            "evaluated": len(top),
            "wrong_trace": skipped,
            "top_is_dependency": sum(top) / k,
            "distractors_below": sum(below) / k,
            "seconds_per_prompt": secs / max(1, n),
            "prompts_run_per_prompt": prompts / k,
        }
        print(key, json.dumps(res[key]), flush=True)
    res["load"] = loadavg()
    return res


SUPPRESSION_VARIANTS = (
    (1.0, False, "tokens"),
    (1.0, False, "at"),
    (0.6, False, "tokens"),
    (1.0, True, "tokens"),
    (0.6, True, "at"),
)


def part4(n: int) -> dict[str, object]:
    from attrlab.methods.thought_anchors import suppression_matrix
    from attrlab.zoo.reasoning import auroc

    lm = al.zoo.load("reasoning")
    exs = al.zoo.task("reasoning").examples(n, seed=0, split="test")
    units = al.units.Trace()
    views = [(ex, units.prepare(lm, ex.prompt)) for ex in exs]
    views = [(ex, v) for ex, v in views if v.texts == ex.steps]
    res: dict[str, object] = {"evaluated": len(views)}
    for temp, log_kl, pos in SUPPRESSION_VARIANTS:
        ps: list[float] = []
        py: list[int] = []
        per = []
        for ex, v in views:
            m = suppression_matrix(lm, v, None, temp, log_kl, pos)
            pairs = [(i, j) for j in range(len(ex.steps)) for i in range(j)]
            s = [float(m[j, i]) for i, j in pairs]
            y = [int(i in ex.parents[j]) for i, j in pairs]
            per.append(auroc(s, y))
            ps += s
            py += y
        key = f"temperature={temp} log_kl={log_kl} positions={pos}"
        res[key] = {"pooled": auroc(ps, py), "mean": sum(per) / max(1, len(per))}
        print(key, json.dumps(res[key]), flush=True)
    return res


def part5(n: int) -> dict[str, object]:
    import math

    from attrlab.methods.thought_anchors import _kurtosis, _patterns, vertical_scores
    from attrlab.zoo.reasoning import auroc

    lm = al.zoo.load("reasoning")
    units = al.units.Trace()

    def views(exs: list) -> list:
        out = []
        for e in exs:
            v = units.prepare(lm, e.prompt)
            if v.texts == e.steps:
                out.append((e, v, _patterns(lm, v)))
        return out

    train = views(al.zoo.task("reasoning").examples(30, seed=1, split="train"))
    test = views(al.zoo.task("reasoning").examples(n, seed=0, split="test"))
    H = lm.cfg.n_heads
    res: dict[str, object] = {"evaluated": len(test)}
    for md in (1, 2, 4):
        kurt = [_kurtosis(vertical_scores(p, v.spans, md)) for _, v, p in train]
        k = torch.nanmean(torch.stack(kurt), 0)
        order = torch.nan_to_num(k, nan=-math.inf).flatten().argsort(descending=True).tolist()
        for top_k in (3, lm.cfg.n_layers * H):
            heads = [(o // H, o % H) for o in order[:top_k]]
            top, chance, ss, ys = [], [], [], []
            for ex, v, p in test:
                vert = vertical_scores(p, v.spans, md)
                sc = torch.nan_to_num(torch.stack([vert[a, b] for a, b in heads]), nan=0.0)
                sc = sc.mean(0)
                ranked = [i for i in range(len(ex.program)) if i + md < len(ex.steps)]
                best = max(ranked, key=lambda i: float(sc[i]))
                top.append(best in ex.answer_deps)
                chance.append(sum(i in ex.answer_deps for i in ranked) / len(ranked))
                ss += [float(sc[i]) for i in ranked]
                ys += [int(i in ex.answer_deps) for i in ranked]
            key = f"min_distance={md} top_k={top_k}"
            res[key] = {
                "top_is_dependency": sum(top) / len(top),
                "chance": sum(chance) / len(chance),
                "auroc_deps_vs_distractors": auroc(ss, ys),
            }
            print(key, json.dumps(res[key]), flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", default="all", choices=["1", "2", "3", "4", "5", "all"])
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--rollouts", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--acceptance", type=int, default=100)
    p.add_argument("--acceptance-rollouts", type=int, default=20)
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.part in ("1", "all"):
        part1(a.prompts, a.rollouts, a.repeats)
    if a.part in ("2", "all"):
        part2(a.acceptance, a.acceptance_rollouts)
    if a.part in ("3", "all"):
        part3(a.acceptance)
    if a.part in ("4", "all"):
        part4(a.acceptance)
    if a.part in ("5", "all"):
        part5(a.acceptance)


if __name__ == "__main__":
    main()
