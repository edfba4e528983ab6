"""Benchmark: exact activation patching of every head x position, attrlab vs
TransformerLens, on one random 12-layer GPT-2-architecture model.

The model (GPT2Config: 12 layers, d_model 768, 12 heads, vocab 50257, seeded
random weights, random LayerNorm weights/biases) is saved with
``save_pretrained`` (safetensors). attrlab runs in this environment;
TransformerLens 2.x needs transformers < 5, so it runs in its own venv
(``benchmarks/_envs/tl``) on the same safetensors file: this script re-runs
itself there with ``--peer`` and the two sides exchange tensors as
safetensors files in ``benchmarks/_out/bench_patching/``.

Compared, on a 16-token prompt with a counterfactual and a logit-difference
metric (denoising, as TransformerLens' ``get_act_patch_*`` do):

* head output (``z``) patching by layer x position x head
  (``patching.get_act_patch_attn_head_out_by_pos``): values and time
  (median of 3 runs each, 2 threads);
* resid_pre patching by layer x position (``get_act_patch_resid_pre``): values;
* per-head direct logit attribution (``stack_head_results`` + the final
  LayerNorm's frozen scale): values.

Build the peer environment once::

    python -m venv benchmarks/_envs/tl
    benchmarks/_envs/tl/bin/pip install torch==2.13.0 transformer-lens==2.18.0 \\
        "transformers<5" "datasets<3" "pyarrow<16"

Run::

    python benchmarks/bench_patching.py            # writes benchmarks/_out/bench_patching/summary.json

Example:
    python benchmarks/bench_patching.py --runs 1   # quicker, one timing run each
    python benchmarks/bench_patching.py --runs 1 --n-pos 256 --tl-patches 48 --layers 6
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
OUT = ROOT / "_out" / "bench_patching"
PEER_PY = ROOT / "_envs" / "tl" / "bin" / "python"
N_LAYERS, D_MODEL, N_HEADS, VOCAB, N_POS = 12, 768, 12, 50257, 16
SEED = 0
ANSWER, WRONG = 1000, 2000  # token ids of the logit difference


def _config_kwargs() -> dict:
    return dict(
        n_layer=N_LAYERS,
        n_embd=D_MODEL,
        n_head=N_HEADS,
        vocab_size=VOCAB,
        n_positions=1024,
        initializer_range=0.05,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
    )


# ------------------------------------------------------------------ peer side
def peer(runs: int, n_patches: int = 0, threads: int = 2) -> None:
    """TransformerLens side (runs in the TL venv): load the same weights, patch, time.

    ``n_patches > 0`` times an evenly spaced subset of the (layer, pos, head)
    patches (each is one full forward in TransformerLens, so its time per patch
    does not depend on which ones); 0 = all of them."""
    import torch
    from _tl_gpt2 import hooked_gpt2
    from safetensors.torch import load_file, save_file
    from transformer_lens import patching
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(threads)
    hf = GPT2LMHeadModel(GPT2Config(**_config_kwargs()))
    sd = load_file(str(OUT / "model" / "model.safetensors"))
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in m or "attn.bias" in m for m in missing), missing
    hf.tie_weights()
    hf.eval()
    model = hooked_gpt2(hf)
    model.eval()
    toks = load_file(str(OUT / "tokens.safetensors"))
    clean, corrupt = toks["clean"], toks["corrupt"]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, ANSWER] - logits[0, -1, WRONG]

    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean)
        hf_logits = hf(clean).logits
        # per-head DLA: head results at the last position, through the frozen final LN
        stack = clean_cache.stack_head_results(layer=-1, pos_slice=-1)  # [L*H, 1, d]
        normed = clean_cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1)
        direction = model.W_U[:, ANSWER] - model.W_U[:, WRONG]
        dla = (normed * model.ln_final.w) @ direction  # [L*H, 1]
        import pandas as pd

        def index_df(sizes: tuple[int, ...], names: list[str], n: int) -> pd.DataFrame | None:
            total = 1
            for x in sizes:
                total *= x
            if n <= 0 or n >= total:
                return None
            flat = torch.linspace(0, total - 1, n).round().long().unique()
            rows = torch.stack(torch.unravel_index(flat, sizes), -1)
            return pd.DataFrame(rows.numpy(), columns=names)

        r_df = index_df((N_LAYERS, N_POS), ["layer", "pos"], n_patches // 12 if n_patches else 0)
        resid = patching.get_act_patch_resid_pre(
            model,
            corrupt,
            clean_cache,
            metric,
            **({"index_df": r_df, "index_axis_names": None} if r_df is not None else {}),
        )
        early = {"resid_pre": resid.contiguous(), "dla_heads": dla[:, 0].contiguous()}
        save_file(early, str(OUT / "peer_early.safetensors"))
        print("peer: DLA and resid_pre done; timing head patching", flush=True)
        h_df = index_df((N_LAYERS, N_POS, N_HEADS), ["layer", "pos", "head"], n_patches)
        times = []
        heads = None
        for _ in range(runs):
            t0 = time.perf_counter()
            heads = patching.get_act_patch_attn_head_out_by_pos(
                model,
                corrupt,
                clean_cache,
                metric,
                **({"index_df": h_df, "index_axis_names": None} if h_df is not None else {}),
            )
            times.append(time.perf_counter() - t0)
    assert heads is not None
    n_done = N_LAYERS * N_POS * N_HEADS if h_df is None else len(h_df)
    out = {
        "heads_by_pos": heads.contiguous(),  # [L, pos, H] or [n_sampled]
        "resid_pre": resid.contiguous(),  # [L, pos] or [n_sampled]
        "dla_heads": dla[:, 0].contiguous(),  # [L*H]
        "hf_vs_tl_logits": (hf_logits - clean_logits).abs().max().reshape(1),
    }
    if h_df is not None:
        out["heads_index"] = torch.tensor(h_df.to_numpy())
    if r_df is not None:
        out["resid_index"] = torch.tensor(r_df.to_numpy())
    save_file(out, str(OUT / "peer.safetensors"))
    (OUT / "peer.json").write_text(json.dumps({"times": times, "n_patches": n_done}))


# ------------------------------------------------------------------ our side
def main(
    runs: int,
    batch_size: int,
    skip_peer: bool,
    tl_patches: int = 0,
    threads: int = 2,
    layers: list[int] | None = None,
) -> dict:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    import attrlab as al
    from attrlab.methods.patching import patch_sweep

    torch.set_num_threads(threads)
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    hf = GPT2LMHeadModel(GPT2Config(**_config_kwargs()))
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():  # random LayerNorm weights and biases, as tiny_model does
        for name, p in hf.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    hf.eval()
    hf.save_pretrained(str(OUT / "model"))
    clean = torch.randint(0, VOCAB, (1, N_POS), generator=g)
    corrupt = clean.clone()
    corrupt[0, [3, 9]] = torch.randint(0, VOCAB, (2,), generator=g)  # two swapped tokens
    save_file({"clean": clean, "corrupt": corrupt}, str(OUT / "tokens.safetensors"))

    lm = al.wrap(hf)
    target = al.targets.LogitDiff(ANSWER, WRONG)
    sel = list(range(N_LAYERS)) if layers is None else sorted(layers)
    units = al.units.Heads(per_position=True, layers=sel)
    times, sweep = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        sweep = patch_sweep(
            lm, clean, corrupt, target, units, direction="denoising", batch_size=batch_size
        )
        times.append(time.perf_counter() - t0)
    assert sweep is not None
    # attrlab's unit order is layer, head, position; TransformerLens' is layer, pos, head
    ours_heads = torch.full((N_LAYERS, N_POS, N_HEADS), float("nan"))
    ours_heads[sel] = sweep.patched[0].reshape(len(sel), N_HEADS, N_POS).permute(0, 2, 1)
    # with --layers, the full sweep's time is estimated from the selected layers: a
    # row of layer l recomputes layers l..L-1, so the work scales with sum (L - l)
    scale = sum(N_LAYERS - la for la in range(N_LAYERS)) / sum(N_LAYERS - la for la in sel)
    ours_resid = (
        patch_sweep(lm, clean, corrupt, target, al.units.Resid(), direction="denoising")
        .patched[0]
        .reshape(N_LAYERS, N_POS)
    )
    ours_dla = al.attribute(lm, clean, target=target, units="heads", method="dla").scores

    summary: dict = {
        "model": f"GPT-2 arch, {N_LAYERS} layers, d_model {D_MODEL}, {N_HEADS} heads, "
        f"vocab {VOCAB}, random weights (seed {SEED})",
        "prompt_tokens": N_POS,
        "threads": threads,
        "n_patches": int(sweep.patched.shape[1]),
        "attrlab_forwards": sweep.n_forwards,
        "attrlab_batch_size": batch_size,
        "attrlab_times_s": times,
        "attrlab_median_s": statistics.median(times),
        "attrlab_layers": sel,
        "attrlab_full_sweep_s": statistics.median(times) * scale,
        "clean_logit_diff": float(sweep.clean[0]),
        "corrupt_logit_diff": float(sweep.corrupt[0]),
        "max_abs_head_patch_effect": float((sweep.patched - sweep.corrupt[0]).abs().max()),
    }
    if not skip_peer:
        if not PEER_PY.exists():
            raise SystemExit(
                f"peer environment missing: build {PEER_PY.parent.parent} (see docstring)"
            )
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(
            [
                str(PEER_PY),
                __file__,
                "--peer",
                "--runs",
                str(runs),
                "--tl-patches",
                str(tl_patches),
                "--threads",
                str(threads),
                "--n-pos",
                str(N_POS),
            ],
            check=True,
            env=env,
        )
        peer_t = load_file(str(OUT / "peer.safetensors"))
        pj = json.loads((OUT / "peer.json").read_text())
        peer_times, n_peer = pj["times"], pj["n_patches"]
        n_all = N_LAYERS * N_POS * N_HEADS
        tl_full = statistics.median(peer_times) * n_all / n_peer
        peer_h = peer_t["heads_by_pos"]
        if "heads_index" in peer_t:
            i = peer_t["heads_index"]
            ours_h = ours_heads[i[:, 0], i[:, 1], i[:, 2]]
        else:
            ours_h = ours_heads
        compared = ~torch.isnan(ours_h)  # the patches of the layers attrlab ran
        ours_h, peer_h = ours_h[compared], peer_h[compared]
        if "resid_index" in peer_t:
            i = peer_t["resid_index"]
            ours_r = ours_resid[i[:, 0], i[:, 1]]
        else:
            ours_r = ours_resid
        summary.update(
            {
                "transformer_lens_patches_timed": n_peer,
                "transformer_lens_times_s": peer_times,
                "transformer_lens_median_s": statistics.median(peer_times),
                "transformer_lens_full_sweep_s": tl_full,
                "speedup_median": tl_full / summary["attrlab_full_sweep_s"],
                "head_patches_compared": int(compared.sum()),
                "max_abs_diff_heads_by_pos": float((peer_h - ours_h).abs().max()),
                "max_abs_diff_resid_pre": float((peer_t["resid_pre"] - ours_r).abs().max()),
                "max_abs_diff_dla_heads": float((peer_t["dla_heads"] - ours_dla).abs().max()),
                "max_abs_dla_head": float(ours_dla.abs().max()),
                "tl_vs_hf_logits_max_abs": float(peer_t["hf_vs_tl_logits"][0]),
            }
        )
        summary["parity_ok"] = all(
            summary[k] < 1e-4
            for k in (
                "max_abs_diff_heads_by_pos",
                "max_abs_diff_resid_pre",
                "max_abs_diff_dla_heads",
            )
        )
        summary["speed_ok"] = summary["speedup_median"] >= 8
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--n-pos", type=int, default=16, help="prompt length in tokens")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--peer", action="store_true", help="run the TransformerLens side (TL venv)")
    ap.add_argument("--skip-peer", action="store_true", help="time attrlab only")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    ap.add_argument(
        "--layers",
        default=None,
        help="comma-separated layers attrlab sweeps (its full-sweep time is then estimated "
        "from them; long prompts)",
    )
    ap.add_argument(
        "--tl-patches",
        type=int,
        default=0,
        help="time TransformerLens on an evenly spaced subset of this many head patches and "
        "scale to all 2,304 (0 = the full sweep)",
    )
    a = ap.parse_args()
    N_POS = a.n_pos  # noqa: F811 - the prompt length both sides use
    OUT = OUT / f"pos{N_POS}" if N_POS != 16 else OUT  # noqa: F811
    if a.peer:
        peer(a.runs, a.tl_patches, a.threads)
        sys.exit(0)
    layers = [int(x) for x in a.layers.split(",")] if a.layers else None
    s = main(a.runs, a.batch_size, a.skip_peer, a.tl_patches, a.threads, layers)
    print(json.dumps(s, indent=2))
