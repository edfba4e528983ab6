"""Benchmark: f over many random head masks (what COAR, KernelSHAP and LDS
evaluate), attrlab vs a TransformerLens loop with one ``run_with_hooks``
forward per mask, on the same 12-layer 768-wide GPT-2-architecture weights.

Each mask zero-ablates the heads it drops (``attn.z`` = ``hook_z``) on a
16-token prompt; the target is a logit difference at the last position.
attrlab evaluates ``al.units.Heads().bind(lm, prompt, target, Zero()).f(masks)``
(rows grouped by their earliest ablated layer, cached residuals below it, many
masks per forward); TransformerLens runs in its own venv
(``benchmarks/_envs/tl``, see ``bench_patching.py``) on the same safetensors
file and masks. Printed: max |value difference| and the time ratio, for
keep-probabilities 0.5 and 0.95.

Run::

    python benchmarks/bench_coar.py                 # 1,024 masks per keep-probability
    python benchmarks/bench_coar.py --masks 128     # quicker

Example:
    python benchmarks/bench_coar.py --masks 64 --tl-masks 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "_out" / "bench_coar"
PEER_PY = ROOT / "_envs" / "tl" / "bin" / "python"
MODEL_DIR = ROOT / "_out" / "bench_patching" / "model"
N_LAYERS, N_HEADS, N_POS, VOCAB, SEED = 12, 12, 16, 50257, 0
ANSWER, WRONG = 1000, 2000


def peer(n_masks: int, threads: int) -> None:
    """TransformerLens side: one run_with_hooks forward per mask."""
    import torch
    from _tl_gpt2 import hooked_gpt2
    from bench_patching import _config_kwargs
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(threads)
    hf = GPT2LMHeadModel(GPT2Config(**_config_kwargs()))
    hf.load_state_dict(load_file(str(MODEL_DIR / "model.safetensors")), strict=False)
    hf.tie_weights()
    hf.eval()
    model = hooked_gpt2(hf)
    model.eval()
    data = load_file(str(OUT / "masks.safetensors"))
    out, times = {}, {}
    for key in [k for k in data if k.startswith("keep")]:
        keep = data[key][:n_masks]  # [m, L * H] (layer, head)
        vals = []
        t0 = time.perf_counter()
        with torch.no_grad():
            for row in keep:
                k = row.reshape(N_LAYERS, N_HEADS)

                def hook(z, hook, k=k):  # z [batch, pos, head, d_head]
                    layer = int(hook.name.split(".")[1])
                    return z * k[layer].to(z.dtype)[None, None, :, None]

                hooks = [(f"blocks.{i}.attn.hook_z", hook) for i in range(N_LAYERS)]
                logits = model.run_with_hooks(data["prompt"], fwd_hooks=hooks)
                vals.append(logits[0, -1, ANSWER] - logits[0, -1, WRONG])
        times[key] = (time.perf_counter() - t0) / len(keep)
        out[key] = torch.stack(vals)
    save_file(out, str(OUT / "peer.safetensors"))
    (OUT / "peer.json").write_text(json.dumps({"seconds_per_mask": times}))


def main(n_masks: int, tl_masks: int, threads: int, runs: int) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import GPT2LMHeadModel

    import attrlab as al

    torch.set_num_threads(threads)
    OUT.mkdir(parents=True, exist_ok=True)
    if not (MODEL_DIR / "model.safetensors").exists():
        raise SystemExit("run benchmarks/bench_patching.py --skip-peer --runs 1 once first")
    hf = GPT2LMHeadModel.from_pretrained(str(MODEL_DIR))
    hf.eval()
    lm = al.wrap(hf)
    g = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(0, VOCAB, (1, N_POS), generator=g)
    target = al.targets.LogitDiff(ANSWER, WRONG)
    bound = al.units.Heads().bind(lm, prompt, target.bind(lm), al.ablations.Zero())
    n = bound.n
    masks = {}
    for p in (0.5, 0.95):
        masks[f"keep{int(p * 100)}"] = torch.rand(n_masks, n, generator=g) < p
    save_file({"prompt": prompt, **{k: v.float() for k, v in masks.items()}},
              str(OUT / "masks.safetensors"))  # fmt: skip
    ours, our_t = {}, {}
    for key, keep in masks.items():
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            ours[key] = bound.f(keep)[:, 0]
            ts.append(time.perf_counter() - t0)
        our_t[key] = statistics.median(ts) / n_masks
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    subprocess.run([str(PEER_PY), __file__, "--peer", "--tl-masks", str(tl_masks),
                    "--threads", str(threads)], check=True, env=env)  # fmt: skip
    from safetensors.torch import load_file

    peer_v = load_file(str(OUT / "peer.safetensors"))
    peer_t = json.loads((OUT / "peer.json").read_text())["seconds_per_mask"]
    summary: dict = {"masks": n_masks, "tl_masks_timed": tl_masks, "threads": threads}
    for key in masks:
        m = peer_v[key].shape[0]
        summary[key] = {
            "attrlab_ms_per_mask": 1e3 * our_t[key],
            "transformer_lens_ms_per_mask": 1e3 * peer_t[key],
            "speedup": peer_t[key] / our_t[key],
            "max_abs_diff": float((peer_v[key].float() - ours[key][:m].float()).abs().max()),
            "max_abs_value": float(ours[key].abs().max()),
        }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--masks", type=int, default=1024)
    ap.add_argument("--tl-masks", type=int, default=128, help="masks TransformerLens runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--peer", action="store_true")
    a = ap.parse_args()
    if a.peer:
        sys.path.insert(0, str(ROOT))
        peer(a.tl_masks, a.threads)
        sys.exit(0)
    print(json.dumps(main(a.masks, a.tl_masks, a.threads, a.runs), indent=2))
