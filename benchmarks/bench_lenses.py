"""Benchmark: the tuned lens on every zoo model, and parity with the
``tuned-lens`` package.

``kl``: for each zoo model, train a tuned lens on its task generator (training
split, ``--steps`` Adam steps) and report the mean ``KL(p_final || p_layer)``
per layer on 256 held-out test examples, logit lens vs tuned lens, and the
training time.

``parity``: the same translator weights loaded into ``tuned_lens.TunedLens``
(package 0.2.0, in its own venv ``benchmarks/_envs/tunedlens``, where this
script re-runs itself with ``--peer``) and into ``al.lenses.TunedLens``; the
per-layer logits on the same prompts (the package's ``lens(h, idx)`` on the
model's ``hidden_states[idx]``; attrlab's ``logit_lens(..., lens=)`` path) are
compared. Build the peer environment once::

    python -m venv benchmarks/_envs/tunedlens
    benchmarks/_envs/tunedlens/bin/pip install torch==2.13.0 "transformers==5.25.*" \\
        safetensors numpy huggingface-hub
    benchmarks/_envs/tunedlens/bin/pip install --no-deps tuned-lens==0.2.0

Run::

    python benchmarks/bench_lenses.py kl
    python benchmarks/bench_lenses.py parity
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "_out" / "bench_lenses"
PEER_PY = ROOT / "_envs" / "tunedlens" / "bin" / "python"
TASKS = ("ioi", "induction", "facts", "context_qa")


def kl(steps: int) -> list[dict]:
    import attrlab as al

    rows = []
    OUT.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        lm = al.zoo.load(task)
        t0 = time.perf_counter()
        lens = al.lenses.train_tuned_lens(lm, steps=steps, progress=False)
        dt = time.perf_counter() - t0
        lens.save(OUT / f"lens_{task}")
        exs = al.zoo.task(task).examples(256, seed=1, split="test")
        held = [e.prompt + getattr(e, "answer", "") for e in exs]
        logit = al.lenses.lens_kl(lm, held)
        tuned = al.lenses.lens_kl(lm, held, lens)
        row = {"task": task, "train_s": round(dt, 1),
               "logit_lens_kl": [round(float(x), 4) for x in logit],
               "tuned_lens_kl": [round(float(x), 4) for x in tuned],
               "tuned_below_logit_every_layer": bool((tuned < logit).all())}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    (OUT / "kl.json").write_text(json.dumps(rows, indent=1))
    return rows


def peer(task: str) -> None:
    """tuned-lens side: the zoo model from its directory, the translators from our file."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    from tuned_lens.nn.lenses import TunedLens

    model = AutoModelForCausalLM.from_pretrained(str(OUT / f"model_{task}")).eval()
    lens = TunedLens.from_model(model)
    lens.layer_translators.load_state_dict(load_file(str(OUT / f"translators_{task}.safetensors")))
    ids = load_file(str(OUT / f"ids_{task}.safetensors"))["ids"]
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        out = {f"layer{i}": lens(hs[i], i).contiguous() for i in range(len(lens))}
    save_file(out, str(OUT / f"peer_{task}.safetensors"))


def parity() -> list[dict]:
    from safetensors.torch import load_file, save_file

    import attrlab as al

    if not PEER_PY.exists():
        sys.exit(f"no tuned-lens venv at {PEER_PY}; see this file's docstring")
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for task in ("ioi", "induction"):
        lm = al.zoo.load(task)
        lm.model.save_pretrained(str(OUT / f"model_{task}"))
        lens = al.lenses.train_tuned_lens(lm, steps=100, progress=False)
        save_file(lens.to_tuned_lens_state(), str(OUT / f"translators_{task}.safetensors"))
        prompts = [e.prompt for e in al.zoo.task(task).examples(4, seed=2)]
        ids = lm.tokenize(prompts).input_ids
        save_file({"ids": ids.contiguous()}, str(OUT / f"ids_{task}.safetensors"))
        subprocess.run([str(PEER_PY), __file__, "--peer", task], check=True, cwd=str(ROOT))
        theirs = load_file(str(OUT / f"peer_{task}.safetensors"))
        with torch.no_grad():
            _, cache = lm.run(ids, cache=[f"blocks.{i}.resid_pre" for i in range(lm.cfg.n_layers)])
            worst = 0.0
            for i in range(lm.cfg.n_layers):
                ours = lm.unembed(
                    lm.apply_final_norm(lens.translate(cache[f"blocks.{i}.resid_pre"], i))
                )
                t = theirs[f"layer{i}"]
                worst = max(worst, float((ours - t).abs().max() / t.abs().max()))
        row = {"task": task, "max_rel_logit_diff": worst}
        print(json.dumps(row), flush=True)
        rows.append(row)
    (OUT / "parity.json").write_text(json.dumps(rows, indent=1))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["kl", "parity"], nargs="?", default="kl")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--peer", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.peer:
        peer(a.peer)
    elif a.what == "kl":
        kl(a.steps)
    else:
        parity()


if __name__ == "__main__":
    main()
