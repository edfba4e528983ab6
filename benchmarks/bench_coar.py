"""Benchmark: f over many random head masks (what COAR, KernelSHAP and LDS
evaluate), attrlab vs TransformerLens ``run_with_hooks``, on the same 12-layer
768-wide GPT-2-architecture weights.

Each mask zero-ablates the heads it drops (``attn.z`` = ``hook_z``) on a
16-token prompt; the target is a logit difference at the last position.
attrlab evaluates ``al.units.Heads().bind(lm, prompt, target, Zero()).f(masks)``
with its defaults (rows grouped by their earliest ablated layer, cached
residuals below it, rows per forward from the cost model); TransformerLens
runs in its own venv (``benchmarks/_envs/tl``) as a long-lived subprocess
(``benchmarks/_peer.py``) on the same safetensors file and masks, one forward
per mask (the plain ``run_with_hooks`` loop: its default) and with the masks
batched ``--tl-batch`` at a time (its best batch setting). The sides
interleave (A B C, C B A, ...; ``benchmarks/_interleave.py``), every side
evaluates the same masks; printed: max |value difference| and the ratios, for
keep-probabilities 0.5 and 0.95.

Build the peer environment once::

    python -m venv benchmarks/_envs/tl
    benchmarks/_envs/tl/bin/pip install torch==2.13.0 transformer-lens==2.18.0 \\
        "transformers<5" "datasets<3" "pyarrow<16"

Run::

    python benchmarks/bench_coar.py                 # 256 masks per keep-probability
    python benchmarks/bench_coar.py --masks 64      # quicker

Example:
    python benchmarks/bench_coar.py --masks 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "_out" / "bench_coar"
MODEL_DIR = OUT / "model"
PEER_PY = ROOT / "_envs" / "tl" / "bin" / "python"
INSTALL = (
    "python -m venv benchmarks/_envs/tl && benchmarks/_envs/tl/bin/pip install torch==2.13.0 "
    'transformer-lens==2.18.0 "transformers<5" "datasets<3" "pyarrow<16"'
)
N_LAYERS, N_HEADS, N_POS, VOCAB, SEED = 12, 12, 16, 50257, 0
ANSWER, WRONG = 1000, 2000
KEEPS = (0.5, 0.95)


# ------------------------------------------------------------------ peer side
def serve_peer(threads: int) -> None:
    """TransformerLens side: ``run {"key", "batch"}`` evaluates every mask of ``key``
    (``batch`` masks per forward) and answers its seconds and values."""
    import torch
    from _peer import serve
    from _tl_gpt2 import hooked_gpt2
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(threads)
    hf = GPT2LMHeadModel.from_pretrained(str(MODEL_DIR)).eval()
    model = hooked_gpt2(hf)
    model.eval()
    data = load_file(str(OUT / "masks.safetensors"))
    prompt = data["prompt"]

    def run(msg: dict[str, Any]) -> dict[str, Any]:
        keep = data[msg["key"]]  # [m, L * H] (layer, head)
        bs = int(msg.get("batch", 1))
        vals = []
        t0 = time.perf_counter()
        with torch.no_grad():
            for lo in range(0, len(keep), bs):
                k = keep[lo : lo + bs].reshape(-1, N_LAYERS, N_HEADS)

                def hook(z: torch.Tensor, hook: Any, k: torch.Tensor = k) -> torch.Tensor:
                    layer = int(hook.name.split(".")[1])  # z [batch, pos, head, d_head]
                    return z * k[:, layer].to(z.dtype)[:, None, :, None]

                hooks = [(f"blocks.{i}.attn.hook_z", hook) for i in range(N_LAYERS)]
                logits = model.run_with_hooks(prompt.expand(len(k), -1), fwd_hooks=hooks)
                vals.append(logits[:, -1, ANSWER] - logits[:, -1, WRONG])
        return {"seconds": time.perf_counter() - t0, "values": torch.cat(vals).tolist()}

    serve(
        {"run": run}, ready={"model": "hooked gpt2", "masks": {k: len(v) for k, v in data.items()}}
    )


# ------------------------------------------------------------------ our side
def save_model() -> None:
    """The seeded random 12x768 GPT-2 (random LayerNorm weights and biases), once."""
    import torch
    from bench_patching import _config_kwargs
    from transformers import GPT2Config, GPT2LMHeadModel

    if (MODEL_DIR / "model.safetensors").exists():
        return
    torch.manual_seed(SEED)
    hf = GPT2LMHeadModel(GPT2Config(**_config_kwargs()))
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    hf.save_pretrained(str(MODEL_DIR))


def measure(
    n_masks: int, repeats: int, threads: int = 2, tl_batch: int = 32, keeps: tuple = KEEPS
) -> list[dict[str, Any]]:
    """attrlab defaults vs TransformerLens (one forward per mask, and batched), interleaved."""
    import torch
    from _interleave import interleaved, loadavg, print_rows, row
    from _peer import PeerProcess
    from safetensors.torch import save_file
    from transformers import GPT2LMHeadModel

    import attrlab as al

    torch.set_num_threads(threads)
    OUT.mkdir(parents=True, exist_ok=True)
    save_model()
    hf = GPT2LMHeadModel.from_pretrained(str(MODEL_DIR)).eval()
    lm = al.wrap(hf)
    g = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(0, VOCAB, (1, N_POS), generator=g)
    target = al.targets.LogitDiff(ANSWER, WRONG)
    bound = al.units.Heads().bind(lm, prompt, target.bind(lm), al.ablations.Zero())
    masks = {f"keep{int(p * 100)}": torch.rand(n_masks, bound.n, generator=g) < p for p in keeps}
    save_file({"prompt": prompt, **{k: v.float() for k, v in masks.items()}},
              str(OUT / "masks.safetensors"))  # fmt: skip
    env = {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    argv = [str(PEER_PY), __file__, "--serve", "--threads", str(threads)]
    rows = []
    out: dict[str, Any] = {}
    with PeerProcess(argv, cwd=ROOT, env=env) as tl:
        for key, keep in masks.items():
            out.clear()

            def ours(keep: torch.Tensor = keep) -> None:  # no tuning arguments
                out["ours"] = bound.f(keep)[:, 0]

            def peer(bs: int, key: str = key) -> Any:
                return lambda: out.__setitem__(f"tl{bs}", tl.call("run", key=key, batch=bs))

            sides = {
                "attrlab defaults": ours,
                "tl bs=1": peer(1),
                f"tl bs={tl_batch}": peer(tl_batch),
            }
            print(f"COAR masks, {key}, {n_masks} masks, 12x768 gpt2, {N_POS} tokens, "
                  f"{threads} threads; load {loadavg()}", flush=True)  # fmt: skip
            times = interleaved(sides, repeats)
            ref = out["ours"].double()
            diff = max(
                float(
                    (torch.tensor(out[f"tl{bs}"]["values"], dtype=torch.float64) - ref).abs().max()
                )
                for bs in (1, tl_batch)
            )
            setup = f"{key}: {n_masks} head masks, 12x768 gpt2, {N_POS} tok"
            for label in ("tl bs=1", f"tl bs={tl_batch}"):
                peer_name = (
                    ("TL defaults (" if label == "tl bs=1" else "TL best (") + label[3:] + ")"
                )
                t = {"attrlab defaults": times["attrlab defaults"], peer_name: times[label]}
                rows.append(row("coar", setup, t, ours="attrlab defaults", peer=peer_name,
                                agreement=diff, metric="max |f diff|",
                                max_abs_value=round(float(ref.abs().max()), 4)))  # fmt: skip
    print_rows(rows)
    return rows


def summary(quick: bool = False) -> list[dict[str, Any]]:
    """Rows for ``benchmarks/run_all.py``; an error row when the TL venv is missing."""
    from _peer import rows_or_error

    if quick:
        return rows_or_error("coar", PEER_PY, INSTALL,
                             lambda: measure(n_masks=32, repeats=3, keeps=(0.5,)))  # fmt: skip
    return rows_or_error("coar", PEER_PY, INSTALL, lambda: measure(n_masks=256, repeats=3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--masks", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tl-batch", type=int, default=32, help="TransformerLens masks per forward")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        sys.path.insert(0, str(ROOT))
        serve_peer(a.threads)
        return
    rows = measure(a.masks, a.repeats, a.threads, a.tl_batch)
    (OUT / "summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
