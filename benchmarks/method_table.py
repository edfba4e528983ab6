"""The unit x method table, measured: which ``al.attribute(units=kind,
method=name)`` calls actually run.

Every registered method is tried on every canonical unit kind on a tiny
random GPT-2 (a prompt, a logit-difference target, and — if the plain call
fails — a counterfactual prompt; sources get a two-sentence context and a
response). Training examples are tried with a toy retraining function
(``TrainingExamples(retrain=...)``); the methods that need feature stores
(TRAK, TracIn …) are marked registered ("r").
A cell counts when the call returns finite scores.

Run::

    python benchmarks/method_table.py              # prints the Markdown table and the count
    python benchmarks/method_table.py --json out.json

Example:
    python benchmarks/method_table.py --kinds heads tokens
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

import attrlab as al

PROMPT = "When Mary and John went to the store, John gave a drink to"
CF = "When Mary and John went to the store, Mary gave a drink to"
CONTEXT = "Mary went to the store. John stayed at home. The store sold drinks."


def _try(lm: al.LM, method: str, kind: str) -> tuple[bool, str]:
    small = {"steps": 4} if method in ("ig", "eap-ig", "expected-gradients") else {}
    if method in ("shapley", "kernelshap", "lime", "coar", "contextcite", "datamodels"):
        small = {"samples": 16}
    calls: list[dict] = []
    if kind == "sources":
        calls.append(dict(inputs=CONTEXT, target=" Mary"))
    else:
        calls.append(dict(inputs=PROMPT, target=(" Mary", " John")))
        calls.append(dict(inputs=PROMPT, target=(" Mary", " John"), counterfactual=CF))
    units = kind
    if kind == "spans":
        units = al.units.Spans([(0, 4), (5, 9), (14, 18)])
    err = ""
    for c in calls:
        inputs, target = c.pop("inputs"), c.pop("target")
        for opts in (small, {}):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = al.attribute(lm, inputs, target=target, units=units, method=method,
                                     **c, **opts)  # fmt: skip
                if bool(torch.isfinite(torch.as_tensor(r.scores)).all()):
                    return True, ""
                err = "non-finite scores"
            except Exception as e:  # noqa: BLE001 - the table records why a cell fails
                err = f"{type(e).__name__}: {str(e)[:80]}"
    return False, err


def _try_train(method: str) -> tuple[bool, str]:
    """Estimators over training examples, on a retraining whose outputs are a
    fixed linear function of the kept examples (stores-based methods such as
    TRAK are marked registered, "r": they need feature stores)."""
    import numpy as np

    w = np.random.default_rng(0).normal(size=(2, 6))
    units = al.units.TrainingExamples(retrain=lambda idx, j: w[:, idx].sum(1), n_train=6)
    try:
        cls = al.methods.find_method(method, "train")
    except Exception as e:  # noqa: BLE001
        return False, type(e).__name__
    if not hasattr(cls, "run"):
        return False, "needs feature stores"
    small = {"samples": 16} if "samples" in al.methods.base.option_names(cls)[0] else {}
    try:
        r = cls(**small).run(units.bind())
        return bool(torch.isfinite(r.scores).all()), ""
    except Exception as e:  # noqa: BLE001
        return False, f"{type(e).__name__}: {str(e)[:80]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", nargs="*", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = al.wrap(*al.testing.tiny_model("gpt2"))
    from attrlab.units.base import _KINDS

    kinds = sorted({c.kind for c in _KINDS.values()})
    if args.kinds:
        kinds = [k for k in kinds if k in args.kinds]
    methods = sorted(al.methods.all_methods())
    cells: dict[str, dict[str, str]] = {}
    works = 0
    for m in methods:
        cells[m] = {}
        for k in kinds:
            if k == "train":
                ok, err = _try_train(m)
                reg = k in al.methods.all_methods().get(m, [])
                cells[m][k] = "x" if ok else ("r" if reg else "")
                works += ok
                continue
            ok, err = _try(lm, m, k)
            cells[m][k] = "x" if ok else ""
            works += ok
            if not ok and k in al.methods.all_methods().get(m, []):
                print(f"# registered but fails: {m} on {k}: {err}")
    print("| method | " + " | ".join(kinds) + " |")
    print("|---" * (len(kinds) + 1) + "|")
    for m in methods:
        print(f"| {m} | " + " | ".join(cells[m][k] for k in kinds) + " |")
    n_cells = len(methods) * len(kinds)
    n_reg_train = sum(cells[m].get("train") == "r" for m in methods)
    n_train = sum(cells[m].get("train") == "x" for m in methods)
    print(
        f"\n{works} of {n_cells} cells run ({len(methods)} methods x {len(kinds)} kinds; "
        f"{n_train} of them on training examples by retraining); train: {n_reg_train} more "
        "registered (r: they need feature stores, not run here)"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cells": cells, "works": works, "methods": methods, "kinds": kinds}, fh)


if __name__ == "__main__":
    main()
