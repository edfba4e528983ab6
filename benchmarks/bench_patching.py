"""Benchmark: exact activation patching of every head x position, attrlab vs
TransformerLens, on one random 12-layer GPT-2-architecture model, the two
sides interleaved (A B / B A) within one window.

The model (GPT2Config: 12 layers, d_model 768, 12 heads, vocab 50257, seeded
random weights, random LayerNorm weights/biases) is saved with
``save_pretrained`` (safetensors). attrlab runs in this process;
TransformerLens 2.x needs transformers < 5, so it runs in its own venv
(``benchmarks/_envs/tl``) as a **long-lived peer process** on the same
safetensors file: it loads the model once and then waits for JSON commands on
stdin (``{"cmd": "run"}`` -> one head-patching sweep, answered with one JSON
line on stdout), so the parent drives both sides in A B / B A order
(``_interleave.interleaved``) and prints load averages. Values are exchanged
as safetensors files in ``benchmarks/_out/bench_patching/``.

Compared, on a 16-token prompt with a counterfactual and a logit-difference
metric (denoising, as TransformerLens' ``get_act_patch_*`` do):

* head output (``z``) patching by layer x position x head: attrlab
  ``patch_sweep(..., al.units.Heads(per_position=True), direction="denoising")``
  with its **defaults** (no batch size, no memory budget) vs TransformerLens
  ``patching.get_act_patch_attn_head_out_by_pos(model, corrupt, clean_cache,
  metric)`` as documented (one forward per patch; it has no batch setting, so
  its defaults are also its best setting). TransformerLens is timed on an
  evenly spaced subset of the patches (``--tl-patches``; each patch is one full
  forward, so its time per patch does not depend on which) and scaled to all
  2,304;
* the tuned row: attrlab with ``batch_size=256`` (this script's former
  default) vs the same TransformerLens;
* each row also has ``cpu_ratio``: the same ratio of the two processes' CPU
  seconds (both threads), which other jobs on a shared machine disturb less
  than wall time;
* value agreement: the head patches TransformerLens ran, resid_pre patching by
  layer x position (``get_act_patch_resid_pre``) and per-head direct logit
  attribution (``stack_head_results`` + the final LayerNorm's frozen scale).

Build the peer environment once::

    python -m venv benchmarks/_envs/tl
    benchmarks/_envs/tl/bin/pip install torch==2.13.0 transformer-lens==2.18.0 \\
        "transformers<5" "datasets<3" "pyarrow<16"

Run::

    python benchmarks/bench_patching.py            # writes benchmarks/_out/bench_patching/summary.json

Example:
    python benchmarks/bench_patching.py --repeats 3 --tl-patches 96
    python benchmarks/bench_patching.py --quick                      # what run_all.py calls
    python benchmarks/bench_patching.py --repeats 1 --n-pos 256 --tl-patches 48 --layers 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _peer import PeerProcess  # noqa: E402
from _peer import serve as peer_serve  # noqa: E402

OUT = ROOT / "_out" / "bench_patching"
PEER_PY = ROOT / "_envs" / "tl" / "bin" / "python"
N_LAYERS, D_MODEL, N_HEADS, VOCAB = 12, 768, 12, 50257
SEED = 0
ANSWER, WRONG = 1000, 2000  # token ids of the logit difference
TUNED_BATCH = 256  # the batch size this script used to pass


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


def _out_dir(n_pos: int) -> Path:
    return OUT if n_pos == 16 else OUT / f"pos{n_pos}"


def _subset(sizes: tuple[int, ...], n: int) -> Any:
    """An evenly spaced ``[n, len(sizes)]`` index array over a grid (None: all of it)."""
    import torch

    total = 1
    for x in sizes:
        total *= x
    if n <= 0 or n >= total:
        return None
    flat = torch.linspace(0, total - 1, n).round().long().unique()
    return torch.stack(torch.unravel_index(flat, sizes), -1)


# ------------------------------------------------------------------ peer side
def serve(n_pos: int, tl_patches: int, threads: int) -> None:
    """TransformerLens side (runs in the TL venv): load the same weights once,
    then answer commands from stdin (:func:`_peer.serve`):

    * ``run``: one timed ``get_act_patch_attn_head_out_by_pos`` over the
      ``tl_patches`` subset (all patches if 0) -> ``{"seconds", "cpu_seconds", "n_patches"}``;
    * ``values``: the last run's head patches, resid_pre patching (on a
      subset) and per-head DLA, saved as safetensors -> ``{"path"}``;
    * ``quit`` (the :mod:`_peer` protocol).
    """
    import pandas as pd
    import torch
    from _tl_gpt2 import hooked_gpt2
    from safetensors.torch import load_file, save_file
    from transformer_lens import patching
    from transformers import GPT2Config, GPT2LMHeadModel

    out_dir = _out_dir(n_pos)
    torch.set_num_threads(threads)
    hf = GPT2LMHeadModel(GPT2Config(**_config_kwargs()))
    sd = load_file(str(out_dir / "model" / "model.safetensors"))
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in m or "attn.bias" in m for m in missing), missing
    hf.tie_weights()
    hf.eval()
    model = hooked_gpt2(hf)
    model.eval()
    toks = load_file(str(out_dir / "tokens.safetensors"))
    clean, corrupt = toks["clean"], toks["corrupt"]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, ANSWER] - logits[0, -1, WRONG]

    def df(idx: torch.Tensor | None, names: list[str]) -> dict:
        if idx is None:
            return {}
        return {"index_df": pd.DataFrame(idx.numpy(), columns=names), "index_axis_names": None}

    h_idx = _subset((N_LAYERS, n_pos, N_HEADS), tl_patches)
    r_idx = _subset((N_LAYERS, n_pos), tl_patches // 12 if tl_patches else 0)
    n_heads = N_LAYERS * n_pos * N_HEADS if h_idx is None else len(h_idx)
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean)
    last: dict[str, Any] = {}

    def head_patches() -> torch.Tensor:
        with torch.no_grad():
            return patching.get_act_patch_attn_head_out_by_pos(
                model, corrupt, clean_cache, metric, **df(h_idx, ["layer", "pos", "head"])
            )

    def run(_: dict) -> dict:
        t0, c0 = time.perf_counter(), time.process_time()
        last["heads"] = head_patches()
        return {
            "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0,
            "n_patches": n_heads,
        }

    def values(_: dict) -> dict:
        heads = last["heads"] if "heads" in last else head_patches()
        with torch.no_grad():
            resid = patching.get_act_patch_resid_pre(
                model, corrupt, clean_cache, metric, **df(r_idx, ["layer", "pos"])
            )
            # per-head DLA: head results at the last position, through the frozen final LN
            stack = clean_cache.stack_head_results(layer=-1, pos_slice=-1)  # [L*H, 1, d]
            normed = clean_cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1)
            direction = model.W_U[:, ANSWER] - model.W_U[:, WRONG]
            dla = (normed * model.ln_final.w) @ direction  # [L*H, 1]
            hf_logits = hf(clean).logits
        out = {
            "heads_by_pos": heads.contiguous(),  # [L, pos, H] or [n_sampled]
            "resid_pre": resid.contiguous(),  # [L, pos] or [n_sampled]
            "dla_heads": dla[:, 0].contiguous(),  # [L*H]
            "hf_vs_tl_logits": (hf_logits - clean_logits).abs().max().reshape(1),
        }
        if h_idx is not None:
            out["heads_index"] = h_idx
        if r_idx is not None:
            out["resid_index"] = r_idx
        path = out_dir / "peer.safetensors"
        save_file(out, str(path))
        return {"path": str(path)}

    peer_serve({"run": run, "values": values}, ready={"n_patches": n_heads})


def start_peer(n_pos: int, tl_patches: int, threads: int) -> PeerProcess:
    """The TransformerLens process (:class:`_peer.PeerProcess`), started once and
    driven by ``call("run")`` / ``call("values")``; ``ready["n_patches"]`` is the
    number of patches it times. Its own output goes to ``peer.log``.

    Example::

        with start_peer(n_pos=16, tl_patches=96, threads=2) as tl:
            tl.call("run")["seconds"]
    """
    if not PEER_PY.exists():
        raise SystemExit(f"peer environment missing: build {PEER_PY.parent.parent} (see docstring)")
    argv = [str(PEER_PY), __file__, "--serve", "--n-pos", str(n_pos), "--threads", str(threads),
            "--tl-patches", str(tl_patches)]  # fmt: skip
    return PeerProcess(
        argv, cwd=ROOT, env={"OMP_NUM_THREADS": str(threads)},
        stderr=_out_dir(n_pos) / "peer.log",
    )  # fmt: skip


# ------------------------------------------------------------------ our side
def _build(n_pos: int) -> tuple[Any, Any, Any]:
    """The random model and the two prompts, also saved for the peer."""
    import torch
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    out_dir = _out_dir(n_pos)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    hf = GPT2LMHeadModel(GPT2Config(**_config_kwargs()))
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():  # random LayerNorm weights and biases, as tiny_model does
        for name, p in hf.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    hf.eval()
    hf.save_pretrained(str(out_dir / "model"))
    clean = torch.randint(0, VOCAB, (1, n_pos), generator=g)
    corrupt = clean.clone()
    corrupt[0, [3, 9]] = torch.randint(0, VOCAB, (2,), generator=g)  # two swapped tokens
    save_file({"clean": clean, "corrupt": corrupt}, str(out_dir / "tokens.safetensors"))
    return hf, clean, corrupt


def measure(
    n_pos: int = 16,
    repeats: int = 3,
    tl_patches: int = 96,
    threads: int = 2,
    layers: list[int] | None = None,
    tuned: bool = True,
) -> tuple[list[dict], dict]:
    """Interleaved rows (defaults, tuned) and the details (agreement, forwards)."""
    import torch
    from _interleave import interleaved, loadavg, row
    from safetensors.torch import load_file

    import attrlab as al
    from attrlab.methods.patching import patch_sweep

    torch.set_num_threads(threads)
    hf, clean, corrupt = _build(n_pos)
    lm = al.wrap(hf)
    target = al.targets.LogitDiff(ANSWER, WRONG)
    sel = list(range(N_LAYERS)) if layers is None else sorted(layers)
    units = al.units.Heads(per_position=True, layers=sel)
    # with --layers, the full sweep's time is estimated from the selected layers: a
    # row of layer l recomputes layers l..L-1, so the work scales with sum (L - l)
    scale = sum(N_LAYERS - la for la in range(N_LAYERS)) / sum(N_LAYERS - la for la in sel)
    n_all = N_LAYERS * n_pos * N_HEADS
    last: dict[str, Any] = {}

    cpu: dict[str, list[float]] = {}  # CPU seconds of each side's process, per call

    def ours(name: str, **kw: Any) -> Any:
        def run() -> None:  # the last timed sweep of each side is kept for its values
            c0 = time.process_time()
            last[name] = patch_sweep(lm, clean, corrupt, target, units, direction="denoising", **kw)
            cpu.setdefault(name, []).append(time.process_time() - c0)

        return run

    def theirs(tl: PeerProcess) -> Any:
        def run() -> None:
            cpu.setdefault("transformer_lens", []).append(tl.call("run")["cpu_seconds"])

        return run

    print(f"load before: {loadavg()}", flush=True)
    with start_peer(n_pos, tl_patches, threads) as tl:
        tuned_name = f"attrlab batch_size={TUNED_BATCH}"
        sides = {"attrlab defaults": ours("attrlab defaults")}
        if tuned:
            sides[tuned_name] = ours(tuned_name, batch_size=TUNED_BATCH)
        sides["transformer_lens"] = theirs(tl)
        # warm-up: one short sweep each (the first layer's last position), not timed
        patch_sweep(
            lm, clean, corrupt, target, al.units.Heads(per_position=True, layers=[N_LAYERS - 1]),
            direction="denoising",
        )  # fmt: skip
        tl.call("run")
        times = interleaved(sides, repeats=repeats, warmup=False)
        cpu_med = {n: statistics.median(ts) for n, ts in cpu.items()}
        forwards = {name: sw.n_forwards for name, sw in last.items()}
        defaults_sweep = last["attrlab defaults"]
        sweep = last.get(tuned_name, defaults_sweep)
        peer_t = load_file(tl.call("values")["path"])
        n_peer = int(tl.ready["n_patches"])
    times = {
        n: [t * (scale if n.startswith("attrlab") else n_all / n_peer) for t in ts]
        for n, ts in times.items()
    }
    # attrlab's unit order is layer, head, position; TransformerLens' is layer, pos, head
    ours_heads = torch.full((N_LAYERS, n_pos, N_HEADS), float("nan"))
    ours_heads[sel] = defaults_sweep.patched[0].reshape(len(sel), N_HEADS, n_pos).permute(0, 2, 1)
    tuned_vs_defaults = float((sweep.patched - defaults_sweep.patched).abs().max())
    peer_h = peer_t["heads_by_pos"]
    if "heads_index" in peer_t:
        i = peer_t["heads_index"]
        ours_h = ours_heads[i[:, 0], i[:, 1], i[:, 2]]
    else:
        ours_h = ours_heads
    compared = ~torch.isnan(ours_h)  # the patches of the layers attrlab ran
    head_diff = float((peer_h[compared] - ours_h[compared]).abs().max())
    ours_resid = (
        patch_sweep(lm, clean, corrupt, target, al.units.Resid(), direction="denoising")
        .patched[0]
        .reshape(N_LAYERS, n_pos)
    )
    if "resid_index" in peer_t:
        i = peer_t["resid_index"]
        ours_resid = ours_resid[i[:, 0], i[:, 1]]
    ours_dla = al.attribute(lm, clean, target=target, units="heads", method="dla").scores
    details = {
        "model": f"GPT-2 arch, {N_LAYERS} layers, d_model {D_MODEL}, {N_HEADS} heads, "
        f"vocab {VOCAB}, random weights (seed {SEED})",
        "prompt_tokens": n_pos,
        "threads": threads,
        "n_patches": n_all,
        "attrlab_layers": sel,
        "attrlab_forwards": forwards,
        "attrlab_default_batch_size": defaults_sweep.meta.get("batch_size"),
        "transformer_lens_patches_timed": n_peer,
        "head_patches_compared": int(compared.sum()),
        "max_abs_diff_heads_by_pos": head_diff,
        "max_abs_diff_resid_pre": float((peer_t["resid_pre"] - ours_resid).abs().max()),
        "max_abs_diff_dla_heads": float((peer_t["dla_heads"] - ours_dla).abs().max()),
        "max_abs_diff_tuned_vs_defaults": tuned_vs_defaults,
        "max_abs_head_patch_effect": float(
            (defaults_sweep.patched - defaults_sweep.corrupt[0]).abs().max()
        ),
        "tl_vs_hf_logits_max_abs": float(peer_t["hf_vs_tl_logits"][0]),
    }
    setup = f"{N_LAYERS}x{D_MODEL} gpt2, {n_pos} tok, {n_all} head x pos patches"
    if layers is not None:
        setup += f" (attrlab layers {sel} scaled)"
    # CPU seconds of each side's process (both threads): less disturbed by other
    # jobs on a shared machine than wall time, scaled the same way
    cpu_s = {
        n: c * (scale if n.startswith("attrlab") else n_all / n_peer) for n, c in cpu_med.items()
    }
    extra = dict(
        tl_patches_timed=n_peer,
        speed_floor=15.0 if n_pos == 16 else None,
        parity_ok=head_diff < 1e-4,
    )
    rows = [
        row(
            "patching", setup + ", defaults", times, ours="attrlab defaults",
            peer="transformer_lens", agreement=head_diff,
            attrlab_forwards=forwards["attrlab defaults"],
            cpu_ratio=round(cpu_s["transformer_lens"] / cpu_s["attrlab defaults"], 3), **extra,
        )
    ]  # fmt: skip
    if tuned:
        name = f"attrlab batch_size={TUNED_BATCH}"
        rows.append(
            row(
                "patching", setup + f", tuned (batch_size={TUNED_BATCH})", times, ours=name,
                peer="transformer_lens", agreement=tuned_vs_defaults,
                metric="max |diff| vs defaults", attrlab_forwards=forwards[name],
                cpu_ratio=round(cpu_s["transformer_lens"] / cpu_s[name], 3), **extra,
            )
        )  # fmt: skip
    print(f"load after: {loadavg()}", flush=True)
    return rows, details


def summary(quick: bool = False) -> list[dict]:
    """Rows for ``benchmarks/run_all.py``: defaults (and, unless ``quick``, tuned)
    at 16 tokens on the 12-layer model, interleaved. ``quick``: 3 repeats,
    TransformerLens timed on 48 patches.

    Example::

        rows = summary(quick=True)
        rows[0]["ratio"]  # TransformerLens seconds / attrlab seconds, defaults
    """
    rows, details = measure(n_pos=16, repeats=3, tl_patches=48 if quick else 96, tuned=not quick)
    for r in rows:
        r["details"] = details
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-pos", type=int, default=16, help="prompt length in tokens")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    ap.add_argument("--quick", action="store_true", help="summary(quick=True), as run_all does")
    ap.add_argument("--no-tuned", action="store_true", help="skip the batch_size=256 row")
    ap.add_argument("--serve", action="store_true", help="(internal) the TransformerLens peer")
    ap.add_argument(
        "--layers",
        default=None,
        help="comma-separated layers attrlab sweeps (its full-sweep time is then estimated "
        "from them; long prompts)",
    )
    ap.add_argument(
        "--tl-patches",
        type=int,
        default=96,
        help="time TransformerLens on an evenly spaced subset of this many head patches and "
        "scale to all of them (0 = the full sweep)",
    )
    a = ap.parse_args()
    if a.serve:
        serve(a.n_pos, a.tl_patches, a.threads)
        return
    from _interleave import print_rows

    if a.quick:
        rows = summary(quick=True)
        details = rows[0]["details"]
    else:
        layers = [int(x) for x in a.layers.split(",")] if a.layers else None
        rows, details = measure(
            a.n_pos, a.repeats, a.tl_patches, a.threads, layers, tuned=not a.no_tuned
        )
    print_rows(rows)
    print(json.dumps(details, indent=2))
    out = {"rows": [{k: v for k, v in r.items() if k != "details"} for r in rows], **details}
    (_out_dir(a.n_pos) / "summary.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
