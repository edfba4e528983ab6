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
compared. Timed with them, interleaved (A B C, C B A, ...;
``benchmarks/_interleave.py``; the package runs as a long-lived subprocess,
``benchmarks/_peer.py``): every layer's tuned-lens log-probabilities at every
position of ``--prompts`` prompts, attrlab with its defaults
(``al.logit_lens(lm, prompt, lens=lens, positions="all")`` per prompt; it
explains one prompt at a time and also ranks the top tokens) vs the package's
documented use, ``PredictionTrajectory.from_lens_and_model``'s computation (a
forward with hidden states, ``lens(h, i)`` per layer, log-softmax) per prompt,
and all prompts in one padded batch (its best batch setting); 1 thread on both
sides (the zoo models are tiny: a second thread only adds synchronisation
noise on a shared machine). Build the peer
environment once::

    python -m venv benchmarks/_envs/tunedlens
    benchmarks/_envs/tunedlens/bin/pip install torch==2.13.0 "transformers==5.25.*" \\
        safetensors numpy huggingface-hub
    benchmarks/_envs/tunedlens/bin/pip install --no-deps tuned-lens==0.2.0

Run::

    python benchmarks/bench_lenses.py kl
    python benchmarks/bench_lenses.py parity --prompts 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "_out" / "bench_lenses"
PEER_PY = ROOT / "_envs" / "tunedlens" / "bin" / "python"
INSTALL = (
    "python -m venv benchmarks/_envs/tunedlens && benchmarks/_envs/tunedlens/bin/pip install "
    'torch==2.13.0 "transformers==5.25.*" safetensors numpy huggingface-hub && '
    "benchmarks/_envs/tunedlens/bin/pip install --no-deps tuned-lens==0.2.0"
)
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


def serve_peer(task: str, threads: int = 1) -> None:
    """tuned-lens side, long-lived: the zoo model from its directory, the translators from
    our file. ``parity`` writes every layer's logits on the padded ids; ``run {"batch"}``
    computes every layer's log-probs of every prompt, ``batch`` prompts per forward."""
    from _peer import serve
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    from tuned_lens.nn.lenses import TunedLens

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(OUT / f"model_{task}")).eval()
    lens = TunedLens.from_model(model)
    lens.layer_translators.load_state_dict(load_file(str(OUT / f"translators_{task}.safetensors")))
    ids = load_file(str(OUT / f"ids_{task}.safetensors"))["ids"]
    prompts = json.loads((OUT / f"prompts_{task}.json").read_text())

    def parity(msg: dict) -> dict:
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states
            out = {f"layer{i}": lens(hs[i], i).contiguous() for i in range(len(lens))}
        save_file(out, str(OUT / f"peer_{task}.safetensors"))
        return {"layers": len(out)}

    def run(msg: dict) -> dict:
        bs = int(msg.get("batch", 1))
        t0 = time.perf_counter()
        with torch.no_grad():
            for lo in range(0, len(prompts), bs):
                chunk = prompts[lo : lo + bs]
                n = max(map(len, chunk))  # right-padded, masked
                x = torch.tensor([p + [0] * (n - len(p)) for p in chunk])
                mask = torch.tensor([[1] * len(p) + [0] * (n - len(p)) for p in chunk])
                out = model(x, attention_mask=mask, output_hidden_states=True)
                stream = out.hidden_states
                lps = [lens(h, i).log_softmax(-1) for i, h in enumerate(stream[:-1])]
                lps.append(out.logits.log_softmax(-1))
        return {"seconds": time.perf_counter() - t0, "layers": len(lps)}

    serve({"parity": parity, "run": run}, ready={"task": task, "prompts": len(prompts)})


def parity(
    tasks: tuple[str, ...] = ("ioi", "induction"), n_prompts: int = 32, repeats: int = 3,
    steps: int = 100, threads: int = 1,
) -> list[dict]:  # fmt: skip
    """Logit parity with the package and interleaved timing, per task; returns result rows."""
    from _interleave import interleaved, loadavg, print_rows, row
    from _peer import PeerProcess
    from safetensors.torch import load_file, save_file

    import attrlab as al

    if not PEER_PY.exists():
        sys.exit(f"no tuned-lens venv at {PEER_PY}; see this file's docstring")
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)  # zoo models are tiny: a second thread only adds sync noise
    rows = []
    for task in tasks:
        lm = al.zoo.load(task)
        lm.model.save_pretrained(str(OUT / f"model_{task}"))
        lens = al.lenses.train_tuned_lens(lm, steps=steps, progress=False)
        save_file(lens.to_tuned_lens_state(), str(OUT / f"translators_{task}.safetensors"))
        prompts = [e.prompt for e in al.zoo.task(task).examples(4, seed=2)]
        ids = lm.tokenize(prompts).input_ids
        save_file({"ids": ids.contiguous()}, str(OUT / f"ids_{task}.safetensors"))
        timed = [e.prompt for e in al.zoo.task(task).examples(n_prompts, seed=3)]
        tok_lists = [lm.tokenize(p).input_ids[0].tolist() for p in timed]
        (OUT / f"prompts_{task}.json").write_text(json.dumps(tok_lists))
        argv = [str(PEER_PY), __file__, "--peer", task, "--threads", str(threads)]
        with PeerProcess(argv, cwd=ROOT, env={"PYTHONPATH": str(ROOT)}) as tl:
            tl.call("parity")

            def ours(lm: Any = lm, lens: Any = lens, texts: list[str] = timed) -> None:
                for p in texts:  # as a user calls it: no tuning arguments
                    al.logit_lens(lm, p, lens=lens, positions="all")

            sides = {"attrlab defaults": ours,
                     "tuned-lens per prompt": lambda: tl.call("run", batch=1),
                     "tuned-lens batched": lambda: tl.call("run", batch=n_prompts)}  # fmt: skip
            print(f"tuned lens, zoo {task}, {n_prompts} prompts, all layers x positions, "
                  f"{threads} thread(s); "
                  f"load {loadavg()}", flush=True)  # fmt: skip
            times = interleaved(sides, repeats)
        theirs = load_file(str(OUT / f"peer_{task}.safetensors"))
        with torch.no_grad():
            _, cache = lm.run(ids, cache=[f"blocks.{i}.resid_pre" for i in range(lm.cfg.n_layers)])
            worst = 0.0
            for i in range(lm.cfg.n_layers):
                ours_l = lm.unembed(
                    lm.apply_final_norm(lens.translate(cache[f"blocks.{i}.resid_pre"], i))
                )
                t = theirs[f"layer{i}"]
                worst = max(worst, float((ours_l - t).abs().max() / t.abs().max()))
        setup = f"zoo {task}: {n_prompts} prompts, all layers x positions"
        for label, peer_name in (("tuned-lens per prompt", "tuned-lens defaults (per prompt)"),
                                 ("tuned-lens batched", f"tuned-lens best (batch {n_prompts})")):  # fmt: skip
            t = {"attrlab defaults": times["attrlab defaults"], peer_name: times[label]}
            rows.append(row("lenses", setup, t, ours="attrlab defaults", peer=peer_name,
                            agreement=worst, metric="max rel logit diff"))  # fmt: skip
        print(json.dumps({"task": task, "max_rel_logit_diff": worst}), flush=True)
    print_rows(rows)
    (OUT / "parity.json").write_text(json.dumps(rows, indent=1))
    return rows


def summary(quick: bool = False) -> list[dict]:
    """Rows for ``benchmarks/run_all.py`` (quick: the ioi model, 16 prompts, 30 training steps)."""
    from _peer import rows_or_error

    if quick:
        return rows_or_error("lenses", PEER_PY, INSTALL,
                             lambda: parity(("ioi",), n_prompts=16, repeats=3, steps=30))  # fmt: skip
    return rows_or_error("lenses", PEER_PY, INSTALL, parity)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["kl", "parity"], nargs="?", default="kl")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--prompts", type=int, default=32, help="prompts timed (parity)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="parity timing (both sides)")
    ap.add_argument("--peer", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.peer:
        sys.path.insert(0, str(ROOT))
        serve_peer(a.peer, a.threads)
    elif a.what == "kl":
        kl(a.steps)
    else:
        parity(n_prompts=a.prompts, repeats=a.repeats, threads=a.threads)


if __name__ == "__main__":
    main()
