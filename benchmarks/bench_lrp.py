"""Benchmark: AttnLRP, attrlab vs ``lxt`` (AttnLRP's reference implementation).

Three parts:

* ``parity``: on a small random model of every causal-LM family both support
  (gpt2, llama, qwen2, gemma3; random norm weights and biases), the token
  relevances of one logit, float64. ``lxt`` 2.1 patches the Hugging Face
  modeling modules of transformers 4.x, so it runs in its own venv
  (``benchmarks/_envs/lxt``): this script re-runs itself there with ``--peer``
  on the same safetensors weights.
* ``time``: wall time of one token attribution on a 12-layer, 768-wide random
  GPT-2 with a 64-token prompt, attrlab with its defaults vs lxt's documented
  use (``monkey_patch`` then input x gradient; lxt has no batch setting and
  attrlab explains one prompt at a time). lxt runs as a long-lived subprocess
  (``benchmarks/_peer.py``) so the sides interleave (A B, B A, ...;
  ``benchmarks/_interleave.py``); values: Pearson of the relevances (float32).
  Then attrlab's IG at equal completeness (the fewest Gauss-Legendre steps
  whose completeness error is below 1% of the target change).
* ``scaling``: peak RSS and time of ``attnlrp`` at 256, 1,024, 4,096 tokens on a
  tiny Llama with sdpa attention (memory-linear attention), one fresh process
  per length.

Build the peer environment once::

    python -m venv benchmarks/_envs/lxt
    benchmarks/_envs/lxt/bin/pip install torch==2.13.0 "transformers==4.53.3" safetensors numpy
    benchmarks/_envs/lxt/bin/pip install --no-deps lxt==2.1

Run::

    python benchmarks/bench_lrp.py parity
    python benchmarks/bench_lrp.py time --rounds 5
    python benchmarks/bench_lrp.py scaling
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "_out" / "bench_lrp"
PEER_PY = ROOT / "_envs" / "lxt" / "bin" / "python"
INSTALL = (
    "python -m venv benchmarks/_envs/lxt && benchmarks/_envs/lxt/bin/pip install torch==2.13.0 "
    '"transformers==4.53.3" safetensors numpy && benchmarks/_envs/lxt/bin/pip install --no-deps lxt==2.1'
)
FAMILIES = ("gpt2", "llama", "qwen2", "gemma3")
VOCAB = 512


def config(family: str, big: bool = False) -> Any:
    """The same config in both environments (transformers 4.53 and 5.x)."""
    import transformers as tf

    if family == "gpt2":
        if big:
            return tf.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257,
                                 n_positions=1024, activation_function="gelu_new")  # fmt: skip
        return tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128,
                             activation_function="gelu_new")  # fmt: skip
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                  max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(head_dim=16, **common)
    raise ValueError(family)


def build(family: str, big: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    cfg = config(family, big)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.eval()


def ids_for(n: int, vocab: int = VOCAB, seed: int = 1) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (1, n), generator=g)


# ------------------------------------------------------------------ peer side
def _peer_setup(task: str, family: str, n_pos: int) -> tuple[Any, Any]:
    """lxt side: load the weights, patch the modeling module; returns (model, ids)."""
    import importlib
    import types

    import torch

    # lxt's model registry imports torchvision for its ViT map, unused here (stub
    # it after transformers has checked which packages exist)
    for fam in FAMILIES:
        importlib.import_module(f"transformers.models.{fam}.modeling_{fam}")
    tv = types.ModuleType("torchvision")
    tv.models = types.ModuleType("torchvision.models")  # type: ignore[attr-defined]
    vt = types.ModuleType("torchvision.models.vision_transformer")
    vt.nn = torch.nn  # type: ignore[attr-defined]
    tv.models.vision_transformer = vt  # type: ignore[attr-defined]
    sys.modules.update({"torchvision": tv, "torchvision.models": tv.models,
                        "torchvision.models.vision_transformer": vt})  # fmt: skip
    from lxt.efficient import monkey_patch
    from safetensors.torch import load_file

    torch.set_num_threads(2)
    mod_name = {"gpt2": "gpt2", "llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3"}[family]
    monkey_patch(importlib.import_module(f"transformers.models.{mod_name}.modeling_{mod_name}"))
    big = task == "time"
    model = build(family, big)
    sd = load_file(str(OUT / f"{family}{'_big' if big else ''}.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    model.tie_weights()
    buffers = {n for n, _ in model.named_buffers()}
    assert not [k for k in missing if k not in buffers and k != "lm_head.weight"], missing
    ids = load_file(str(OUT / f"ids_{family}_{n_pos}.safetensors"))["ids"]
    if not big:
        model = model.double()
    return model, ids


def _peer_relevance(model: Any, ids: Any) -> Any:
    """lxt's documented use: input x gradient of the target logit on the patched model."""
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb).logits[0, -1, int(ids[0, -1])]
    out.backward()
    return (emb * emb.grad).sum(-1)[0].detach()


def peer(task: str, family: str, n_pos: int, reps: int) -> None:
    """lxt side, one shot (parity): relevance and logits written to a safetensors file."""
    import torch
    from safetensors.torch import save_file

    model, ids = _peer_setup(task, family, n_pos)
    rel = _peer_relevance(model, ids)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _peer_relevance(model, ids)
        times.append(time.perf_counter() - t0)
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    save_file({"rel": rel, "logits": logits.contiguous()}, str(OUT / f"peer_{family}.safetensors"))
    (OUT / f"peer_{family}.json").write_text(json.dumps({"times": times}))


def serve_peer(family: str, n_pos: int) -> None:
    """lxt side, long-lived (time): ``run`` answers one attribution's seconds and relevances."""
    from _peer import serve

    model, ids = _peer_setup("time", family, n_pos)

    def run(msg: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        rel = _peer_relevance(model, ids)
        return {"seconds": time.perf_counter() - t0, "rel": rel.tolist()}

    serve({"run": run}, ready={"family": family, "n_pos": n_pos})


def run_peer(task: str, family: str, n_pos: int, reps: int = 0) -> dict[str, Any]:
    if not PEER_PY.exists():
        sys.exit(f"no lxt venv at {PEER_PY}; see this file's docstring")
    cmd = [str(PEER_PY), __file__, "--peer", task, "--family", family, "--n-pos", str(n_pos),
           "--reps", str(reps)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=str(ROOT))
    from safetensors.torch import load_file

    out: dict[str, Any] = dict(load_file(str(OUT / f"peer_{family}.safetensors")))
    out.update(json.loads((OUT / f"peer_{family}.json").read_text()))
    return out


# ------------------------------------------------------------------ our side
def save_model(family: str, big: bool = False) -> Any:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build(family, big)
    with torch.no_grad():  # random norm weights and biases, so every rule matters
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(
                    torch.randn_like(p) * 0.2 + (1.0 if "norm" in name or "ln" in name else 0.0)
                )
    sd = {k: v.detach().contiguous() for k, v in model.named_parameters()}  # tied: once
    save_file(sd, str(OUT / f"{family}{'_big' if big else ''}.safetensors"))
    return model


def attrlab_relevance(lm: Any, ids: Any, target: int) -> Any:
    import attrlab as al

    r = al.attribute(lm, ids, target=al.targets.Logit(target), method="attnlrp")
    return r


def parity() -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    import attrlab as al

    OUT.mkdir(parents=True, exist_ok=True)
    rows = {}
    for family in FAMILIES:
        model = save_model(family).double()
        ids = ids_for(12)
        save_file({"ids": ids}, str(OUT / f"ids_{family}_12.safetensors"))
        lm = al.wrap(model, al.testing.tiny_tokenizer(VOCAB))
        r = attrlab_relevance(lm, ids, int(ids[0, -1]))
        ours = r.scores.reshape(-1).double()
        peer_out = run_peer("parity", family, 12)
        theirs = peer_out["rel"].double()
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        rel = float((ours - theirs).abs().max() / theirs.abs().max())
        rows[family] = {
            "max_rel_diff": rel,
            "logits_max_diff": float((logits - peer_out["logits"]).abs().max()),
            "sum_ours": float(ours.sum()), "sum_lxt": float(theirs.sum()),
            "conservation_error": r.diagnostics["conservation_error"],
        }  # fmt: skip
        print(f"{family:8s} max |ours - lxt| / max|lxt| = {rel:.2e}   "
              f"logits diff {rows[family]['logits_max_diff']:.1e}")  # fmt: skip
    (OUT / "parity.json").write_text(json.dumps(rows, indent=1))
    return rows


def timing(rounds: int, n_pos: int, ig: bool = True) -> list[dict[str, Any]]:
    """attrlab's AttnLRP with its defaults vs lxt, interleaved; then IG at equal completeness."""
    import torch
    from _interleave import interleaved, loadavg, print_rows, row
    from _peer import PeerProcess
    from safetensors.torch import save_file

    import attrlab as al

    if not PEER_PY.exists():
        sys.exit(f"no lxt venv at {PEER_PY}; see this file's docstring")
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    model = save_model("gpt2", big=True)
    ids = ids_for(n_pos, 50257)
    save_file({"ids": ids}, str(OUT / f"ids_gpt2_{n_pos}.safetensors"))
    lm = al.wrap(model, al.testing.tiny_tokenizer(VOCAB))
    target = al.targets.Logit(int(ids[0, -1]))
    out: dict[str, Any] = {}

    def ours() -> None:  # no tuning arguments
        out["ours"] = al.attribute(lm, ids, target=target, method="attnlrp")

    argv = [str(PEER_PY), __file__, "--serve", "--family", "gpt2", "--n-pos", str(n_pos)]
    print(f"AttnLRP, 12x768 gpt2, {n_pos} tokens, 2 threads; load {loadavg()}", flush=True)
    with PeerProcess(argv, cwd=ROOT, env={"PYTHONPATH": str(ROOT)}) as lxt:
        sides = {"attrlab defaults": ours,
                 "lxt defaults": lambda: out.__setitem__("lxt", lxt.call("run"))}  # fmt: skip
        times = interleaved(sides, rounds)
    r = out["ours"]
    a = r.scores.reshape(-1).double()
    b = torch.tensor(out["lxt"]["rel"], dtype=torch.float64)
    agreement = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    rows = [row("lrp", f"attnlrp, 12x768 gpt2, {n_pos} tokens", times, ours="attrlab defaults",
                peer="lxt defaults", agreement=agreement, metric="pearson (float32)",
                max_rel_diff=float((a - b).abs().max() / b.abs().max()),
                attnlrp_conservation_error=r.diagnostics["conservation_error"])]  # fmt: skip
    print_rows(rows)
    if ig:  # IG at equal completeness: fewest steps with |completeness error| < 1% of the change
        t_lrp = statistics.median(times["attrlab defaults"])
        for steps in (8, 16, 32, 64, 128):
            t0 = time.perf_counter()
            g = al.attribute(lm, ids, target=target, method="ig", steps=steps)
            dt = time.perf_counter() - t0
            if g.diagnostics["relative_completeness_error"] < 0.01:
                rows[0].update(ig_steps_for_1pct=steps, ig_time_s=dt, ig_over_attnlrp=dt / t_lrp)
                break
        print(json.dumps({k: rows[0].get(k) for k in ("ig_steps_for_1pct", "ig_over_attnlrp")}))
    (OUT / "time.json").write_text(json.dumps(rows, indent=1))
    return rows


def summary(quick: bool = False) -> list[dict[str, Any]]:
    """Rows for ``benchmarks/run_all.py``: the timed comparison (quick: 32 tokens, no IG),
    with the float64 parity on every family as extra fields in the full run."""
    from _peer import rows_or_error

    def measure() -> list[dict[str, Any]]:
        rows = timing(rounds=3, n_pos=32, ig=False) if quick else timing(rounds=5, n_pos=64)
        if not quick:
            par = parity()
            rows[0]["parity_max_rel_diff_float64"] = {f: v["max_rel_diff"] for f, v in par.items()}
        return rows

    return rows_or_error("lrp", PEER_PY, INSTALL, measure)


def scaling_one(n_pos: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import attrlab as al

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                      max_position_embeddings=8192)  # fmt: skip
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    lm = al.wrap(model, al.testing.tiny_tokenizer(VOCAB))
    ids = ids_for(n_pos)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    r = al.attribute(lm, ids, target=al.targets.Logit(5), method="attnlrp")
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n_pos": n_pos, "time_s": dt, "peak_rss_mb": peak, "before_mb": base,
                      "n_scores": int(r.scores.numel())}))  # fmt: skip


def scaling(lengths: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in lengths:
        out = subprocess.run([sys.executable, __file__, "--scaling-one", str(n)], check=True,
                             capture_output=True, text=True)  # fmt: skip
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "scaling.json").write_text(json.dumps(rows, indent=1))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("task", nargs="?", default="parity", choices=["parity", "time", "scaling"])
    ap.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--family", default="gpt2", help=argparse.SUPPRESS)
    ap.add_argument("--n-pos", type=int, default=64)
    ap.add_argument("--reps", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--scaling-one", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lengths", default="256,1024,4096")
    a = ap.parse_args()
    if a.serve:
        sys.path.insert(0, str(ROOT))
        serve_peer(a.family, a.n_pos)
    elif a.peer:
        peer(a.task, a.family, a.n_pos, a.reps)
    elif a.scaling_one:
        scaling_one(a.scaling_one)
    elif a.task == "parity":
        parity()
    elif a.task == "time":
        timing(a.rounds, a.n_pos)
    else:
        scaling([int(x) for x in a.lengths.split(",")])


if __name__ == "__main__":
    main()
