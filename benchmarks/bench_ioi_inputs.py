"""IOI zoo model: how often IG / occlusion / AttnLRP put the largest context score on
the indirect-object (IO) name, for several targets, baselines, rules and
reductions.

The final token (``" to"``, the query position) is left out of the argmax, as
in ``tests/test_perturbation.py::test_ioi_zoo_model_attributes_the_indirect_object``.
For IG the median and max relative completeness error over the prompts is
printed (a large error means the integral has not converged).

Run:  python benchmarks/bench_ioi_inputs.py [--n 200] [--configs a,b,...]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import attrlab as al

# name: (method, target kind, options)
CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ig_diff_pad_gl16": ("ig", "diff", {"steps": 16}),
    "ig_diff_pad_gl64": ("ig", "diff", {"steps": 64}),
    "ig_diff_pad_trap128": ("ig", "diff", {"steps": 128, "rule": "riemann_trapezoid"}),
    "ig_diff_unk_gl16": ("ig", "diff", {"steps": 16, "baseline": 1}),
    "ig_diff_unk_gl64": ("ig", "diff", {"steps": 64, "baseline": 1}),
    "ig_diff_zero_gl16": ("ig", "diff", {"steps": 16, "baseline": "zero"}),
    "ig_diff_pad_l2": ("ig", "diff", {"steps": 16, "reduce": "l2"}),
    "ig_diff_cfabc_gl16": ("ig", "diff", {"steps": 16, "cf": "abc"}),
    "ig_logit_pad_gl16": ("ig", "logit", {"steps": 16}),
    "ig_logprob_pad_gl16": ("ig", "logprob", {"steps": 16}),
    "ig_logprob_pad_gl64": ("ig", "logprob", {"steps": 64}),
    "ig_logprob_unk_gl64": ("ig", "logprob", {"steps": 64, "baseline": 1}),
    "occ_diff": ("occlusion", "diff", {}),
    "occ_logprob": ("occlusion", "logprob", {}),
    "attnlrp_logprob": ("attnlrp", "logprob", {}),
    "cplrp_logprob": ("attnlrp", "logprob", {"rules": "cp-lrp"}),
    "attnlrp_diff": ("attnlrp", "diff", {}),
}


def target(ex: Any, kind: str) -> Any:
    if kind == "diff":
        return (ex.answer, ex.wrong)
    if kind == "logit":
        return ex.answer
    return al.targets.LogProb(ex.answer)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    args = ap.parse_args()
    torch.set_num_threads(1)  # a tiny model
    lm = al.zoo.load("ioi")
    exs = al.zoo.task("ioi").examples(args.n, seed=args.seed, split="test")
    for name in args.configs.split(","):
        method, kind, opts = CONFIGS[name]
        opts = dict(opts)
        cf = opts.pop("cf", None)
        hits, errs, t0 = 0, [], time.perf_counter()
        for ex in exs:
            kw = {"counterfactual": ex.counterfactual_abc} if cf else {}
            r = al.attribute(lm, ex.prompt, target=target(ex, kind), method=method, **opts, **kw)
            hits += int(r.scores[:-1].argmax()) == ex.positions["IO"]
            if "relative_completeness_error" in r.diagnostics:
                errs.append(float(r.diagnostics["relative_completeness_error"]))
        err = ""
        if errs:
            errs.sort()
            err = f"  rel. completeness error median {errs[len(errs) // 2]:.1e} max {errs[-1]:.1e}"
        print(
            f"{name:22s} {hits}/{len(exs)} = {100 * hits / len(exs):5.1f}%{err}"
            f"  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
