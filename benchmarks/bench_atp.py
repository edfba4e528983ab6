"""Benchmark: cost of AtP, AtP*, EAP and EAP-IG relative to one forward+backward.

Model: a seeded random 12-layer GPT-2-architecture model (d_model 768, 12
heads, vocab 50257, random LayerNorm weights; the same configuration as
``bench_patching.py``), eager attention, float32, 2 threads. Prompt: 16 random
tokens, counterfactual: the same with 3 tokens changed; metric: logit
difference of two fixed tokens at the last position.

Timed (median of ``--runs``):

* ``fwd+bwd``: one forward with the graph kept and one backward of the metric
  to the attention outputs (the unit of cost);
* ``atp``: AtP over all heads x positions (2 forwards + 1 backward);
* ``atp*``: attrlab's AtP* (default: GradDrop, ``next_attn``, ``tail_fix``)
  over all heads x positions, ``atp* (paper)`` the paper's AtP* (QK fix, which
  only applies to query/key units, and GradDrop), and ``atp* (k)``: AtP* over
  all key units with the QK fix;
* ``exact``: exact patching of heads x positions with
  ``attrlab.methods.patching.patch_sweep``, extrapolated from a timed chunk of
  128 patches (one batched forward; 12 x 12 x 16 = 2304 patches in all);
* ``eap``: EAP over all edges (separate q/k/v inputs), and ``eap-ig``
  (8 Gauss-Legendre steps: Integrated Gradients over edge gates).

Run::

    python benchmarks/bench_atp.py             # prints a table and the ratios
    python benchmarks/bench_atp.py --runs 1    # quicker
    python benchmarks/bench_atp.py --options-only --runs 3 --threads 1  # tail_fix / ig_steps / verify cost
    python benchmarks/bench_atp.py --ioi       # accuracy of AtP* options on the zoo IOI model
    python benchmarks/bench_atp.py --random-accuracy --threads 1  # same on the random model
    python benchmarks/bench_atp.py --ioi-prompt-sets --threads 1  # z units on 7 prompt sets
    python benchmarks/bench_atp.py --induction --threads 1  # zoo induction model (Llama, rotary)

Peer comparison (EAP vs auto-circuit's mask-gradient EAP, same weights, all
edges with separate q/k/v inputs, ``--prompts`` prompt pairs): auto-circuit
needs TransformerLens 2.x and transformers < 5, so it runs in its own venv as
a long-lived subprocess (``benchmarks/_peer.py``; this script re-run there
with ``--peer``; tensors exchanged as safetensors files in
``benchmarks/_out/bench_atp/``), so the sides interleave (A B C, C B A, ...;
``benchmarks/_interleave.py``): attrlab with its defaults vs
``mask_gradient_prune_scores`` as documented for EAP (``mask_val=0``, logit
difference) at batch size 1 and with every prompt in one batch::

    python -m venv benchmarks/_envs/ac
    benchmarks/_envs/ac/bin/pip install torch==2.13.0 transformer-lens==2.18.0 \\
        "transformers<5" auto-circuit==1.0.1 "datasets<3" "pyarrow<16"
    python benchmarks/bench_atp.py --autocircuit --runs 3 --prompts 4

Example:
    python benchmarks/bench_atp.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "_out" / "bench_atp"
PEER_PY = ROOT / "_envs" / "ac" / "bin" / "python"
INSTALL = (
    "python -m venv benchmarks/_envs/ac && benchmarks/_envs/ac/bin/pip install torch==2.13.0 "
    'transformer-lens==2.18.0 "transformers<5" auto-circuit==1.0.1 "datasets<3" "pyarrow<16"'
)
N_LAYERS, D_MODEL, N_HEADS, VOCAB, N_POS = 12, 768, 12, 50257, 16
ANSWER, WRONG = 1000, 2000


def build():  # -> al.LM
    from transformers import GPT2Config, GPT2LMHeadModel

    import attrlab as al

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=N_LAYERS,
        n_embd=D_MODEL,
        n_head=N_HEADS,
        vocab_size=VOCAB,
        n_positions=1024,
        initializer_range=0.05,
        activation_function="gelu_new",
        attn_implementation="eager",
    )
    hf = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    hf.eval()
    return al.wrap(hf, None, name="random-gpt2-12l")


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two score vectors."""
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def recall(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Share of ``b``'s ``k`` largest |scores| among ``a``'s ``k`` largest."""
    top = set(torch.argsort(b.abs(), descending=True)[:k].tolist())
    return len(top & set(torch.argsort(a.abs(), descending=True)[:k].tolist())) / k


def exact_in_atp_order(lm, prompts, cfs, target, units, site="z", direction="noising"):
    """Exact per-unit patching effects (``patch_sweep``, mean over prompts) in the
    unit order of AtP's results, ``[n_units]``."""
    from attrlab.methods.atp import NodeSet
    from attrlab.methods.patching import patch_sweep

    sw = patch_sweep(lm, prompts, cfs, target, units, site=site, direction=direction)
    eff = sw.effects.double().mean(0)
    by = {(u.layer, u.index, u.position): float(e) for u, e in zip(sw.units, eff)}
    ns = NodeSet.build(lm, units, lm.tokenize(prompts).shape[1], head_site=site)
    return torch.tensor([by[(ly, h, p)] for ly, p, h in map(ns.unit, range(ns.n_units))])


def timed(fn, runs: int) -> float:
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--autocircuit",
        action="store_true",
        help="compare EAP with auto-circuit's mask-gradient EAP (needs _envs/ac)",
    )
    ap.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", type=int, default=4, help="prompt pairs (--autocircuit)")
    ap.add_argument(
        "--options-only",
        action="store_true",
        help="time only fwd+bwd, AtP* and its tail_fix / ig_steps / verify options",
    )
    ap.add_argument(
        "--random-accuracy",
        action="store_true",
        help="Pearson / top-10 recall of AtP* options on the random 12-layer model",
    )
    ap.add_argument(
        "--ioi",
        action="store_true",
        help="accuracy table on the zoo IOI model: AtP*, ig_steps, verify vs patch_sweep",
    )
    ap.add_argument(
        "--ioi-prompt-sets",
        action="store_true",
        help="z units on the zoo IOI model over several prompt sets: AtP, paper AtP*, default",
    )
    ap.add_argument(
        "--induction",
        action="store_true",
        help="zoo induction model (Llama, rotary): AtP, paper AtP* with/without QK fix, default",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.peer:
        return peer(args.threads)
    if args.ioi:
        return ioi_table()
    if args.ioi_prompt_sets:
        return ioi_prompt_sets()
    if args.induction:
        return induction_table()
    if args.random_accuracy:
        return random_accuracy()
    if args.autocircuit:
        return print_rows_of(compare_autocircuit(args.runs, args.threads, args.prompts))
    import attrlab as al
    from attrlab.methods.atp import NodeSet, prepare_pair

    lm = build()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(100, VOCAB, (1, N_POS), generator=g)
    cf = ids.clone()
    cf[0, [3, 7, 11]] = torch.randint(100, VOCAB, (3,), generator=g)
    target = al.targets.LogitDiff(ANSWER, WRONG)
    heads = al.units.Heads(per_position=True)

    def fwd_bwd() -> None:
        t = target.bind(lm)
        logits, cache = lm.run(
            ids, cache=[f"blocks.{i}.attn.out" for i in range(N_LAYERS)], grad=True, last_only=True
        )
        torch.autograd.grad(t(logits, cache.batch).sum(), list(cache.values()))

    def run(method: str, units, **kw):
        return lambda: al.attribute(
            lm, ids, target=target, units=units, method=method, counterfactual=cf, **kw
        )

    t_fb = timed(fwd_bwd, args.runs)
    rows = {"fwd+bwd": t_fb}
    if args.options_only:
        paper = dict(next_attn=False, tail_fix=False)
        rows["atp* (paper)"] = timed(run("atp*", heads, **paper), args.runs)
        for steps in (1, 2):
            rows[f"paper ig_steps={steps}"] = timed(
                run("atp*", heads, ig_steps=steps, **paper), args.runs
            )
        rows["paper + tail_fix"] = timed(run("atp*", heads, next_attn=False), args.runs)
        rows["paper + next_attn"] = timed(run("atp*", heads, tail_fix=False), args.runs)
        rows["next_attn+tail 16pt"] = timed(run("atp*", heads, tail_points=16), args.runs)
        rows["atp* (default)"] = timed(run("atp*", heads), args.runs)
        rows["paper verify=10"] = timed(run("atp*", heads, verify=10, **paper), args.runs)
        print(f"{'what':<24}{'seconds':>10}{'x fwd+bwd':>12}")
        for k, v in rows.items():
            print(f"{k:<24}{v:>10.3f}{v / t_fb:>12.2f}")
        return None
    rows["atp"] = timed(run("atp", heads), args.runs)
    rows["atp*"] = timed(run("atp*", heads), args.runs)
    rows["atp* (paper)"] = timed(run("atp*", heads, next_attn=False, tail_fix=False), args.runs)
    rows["atp* (k, QK fix)"] = timed(run("atp*", heads, head_site="k"), args.runs)
    rows["eap"] = timed(run("eap", "edges"), args.runs)
    rows["eap-ig (8 steps)"] = timed(run("eap-ig", "edges", steps=8), max(1, args.runs // 2))

    t = target.bind(lm)
    clean, cfb = prepare_pair(lm, ids, t, cf)
    ns = NodeSet.build(lm, heads, N_POS)
    with torch.no_grad():
        _, src = lm.run(cfb, cache=ns.sites())
    from attrlab.methods.patching import PatchUnit, patch_sweep

    chunk = 128  # one batched forward of patch_sweep (its default batch size)
    plist = [
        PatchUnit(layer, "attn.z", position=p, index=h)
        for layer in range(N_LAYERS)
        for h in range(N_HEADS)
        for p in range(N_POS)
    ]
    t_chunk = timed(lambda: patch_sweep(lm, ids, cf, target, plist[:chunk]), 2)
    rows["exact (extrapolated)"] = t_chunk * len(plist) / chunk

    # agreement of AtP / AtP* with exact patching on a sample of units
    r_atp = run("atp*", heads)()
    sample = torch.randperm(ns.n_units, generator=g)[:96].tolist()
    top = torch.argsort(r_atp.scores.abs(), descending=True)[:32].tolist()
    idx = sorted(set(sample + top))
    from attrlab.methods.atp import exact_node_effects

    ex = exact_node_effects(lm, clean, src, t, ns, indices=idx, chunk=48)

    def corr(a: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a[idx].double(), ex]))[0, 1])

    print(f"{'what':<24}{'seconds':>10}{'x fwd+bwd':>12}")
    for k, v in rows.items():
        print(f"{k:<24}{v:>10.3f}{v / t_fb:>12.2f}")
    print(f"exact / atp*: {rows['exact (extrapolated)'] / rows['atp*']:.0f}x")
    print(
        f"Pearson with exact on {len(idx)} units: atp {corr(r_atp.extra['atp']):.4f}, "
        f"atp* {corr(r_atp.scores):.4f}"
    )


def ioi_table() -> None:
    """Zoo IOI model, heads x positions: Pearson / top-10 recall of AtP* and its
    options against ``patch_sweep`` for every head site and direction."""
    import attrlab as al

    lm = al.zoo.load("ioi")
    exs = al.zoo.task("ioi").examples(8, seed=0)
    prompts, cfs = [e.prompt for e in exs], [e.counterfactual for e in exs]
    target = al.targets.LogitDiff([e.answer for e in exs], [e.wrong for e in exs])
    units = al.units.Heads(per_position=True)

    options = {
        "paper AtP*": {"next_attn": False, "tail_fix": False},
        "+tail_fix": {"next_attn": False},
        "+ig_steps=1": {"ig_steps": 1, "next_attn": False, "tail_fix": False},
        "+ig_steps=2": {"ig_steps": 2, "next_attn": False, "tail_fix": False},
        "+ig_steps=4": {"ig_steps": 4, "next_attn": False, "tail_fix": False},
        "+verify=10": {"verify": 10, "next_attn": False, "tail_fix": False},
        "+next_attn": {"tail_fix": False},
        "+next_attn+tail_fix, 16 points": {"tail_points": 16},
        "attrlab AtP* (default: next_attn+tail_fix, 32 points)": {},
    }
    print("Pearson / top-10 recall with patch_sweep (verify=10: the returned scores)")
    print("| site | direction | " + " | ".join(options) + " |")
    for site in ("z", "q", "k", "v"):
        for direction in ("noising", "denoising"):
            ex = exact_in_atp_order(lm, prompts, cfs, target, units, site, direction)
            cells = []
            for kw in options.values():
                r = al.attribute(
                    lm,
                    prompts,
                    target=target,
                    units=units,
                    method="atp*",
                    counterfactual=cfs,
                    head_site=site,
                    direction=direction,
                    **kw,
                )
                cells.append(f"{corr(r.scores, ex):.3f} / {recall(r.scores, ex):.1f}")
            print(f"| {site} | {direction} | " + " | ".join(cells) + " |", flush=True)


def ioi_prompt_sets() -> None:
    """Zoo IOI model, heads x positions (z): Pearson / top-10 recall with
    ``patch_sweep`` on five 8-prompt sets and two 32-prompt sets, for AtP, the
    paper's AtP*, its tail fix, and attrlab's default AtP* at 16 / 32 / 64 tail
    points (is the result stable across prompt sets and grid sizes?)."""
    import attrlab as al

    lm = al.zoo.load("ioi")
    units = al.units.Heads(per_position=True)
    paper = {"next_attn": False, "tail_fix": False}
    options = {
        "AtP": ("atp", {}),
        "paper AtP*": ("atp*", paper),
        "paper + tail_fix": ("atp*", {"next_attn": False}),
        "default, 16 points": ("atp*", {"tail_points": 16}),
        "default (32 points)": ("atp*", {}),
        "default, 64 points": ("atp*", {"tail_points": 64}),
    }

    print("| prompts | direction | " + " | ".join(options) + " |")
    for n, seed in [(8, 0), (8, 1), (8, 2), (8, 3), (8, 4), (32, 0), (32, 1)]:
        exs = al.zoo.task("ioi").examples(n, seed=seed)
        prompts, cfs = [e.prompt for e in exs], [e.counterfactual for e in exs]
        target = al.targets.LogitDiff([e.answer for e in exs], [e.wrong for e in exs])
        for direction in ("noising", "denoising"):
            ex = exact_in_atp_order(lm, prompts, cfs, target, units, "z", direction)
            cells = []
            for method, kw in options.values():
                r = al.attribute(
                    lm,
                    prompts,
                    target=target,
                    units=units,
                    method=method,
                    counterfactual=cfs,
                    head_site="z",
                    direction=direction,
                    **kw,
                )
                cells.append(f"{corr(r.scores, ex):.3f} / {recall(r.scores, ex):.1f}")
            row = f"| {n}, seed {seed} | {direction} | " + " | ".join(cells) + " |"
            print(row, flush=True)


def induction_table() -> None:
    """Zoo induction model (Llama: rotary positions, 2 layers), heads x positions,
    8 test prompts: Pearson / top-10 recall with ``patch_sweep`` for AtP, the
    paper's AtP* without and with the QK fix (rotary scores through
    ``adapter.scores_qk``), and attrlab's default (``next_attn`` does not apply to
    rotary families; ``tail_fix`` does)."""
    import attrlab as al

    lm = al.zoo.load("induction")
    exs = al.zoo.task("induction").examples(8, seed=0)
    prompts, cfs = [e.prompt for e in exs], [e.counterfactual for e in exs]
    target = al.targets.LogitDiff([e.answer for e in exs], [e.wrong for e in exs])
    units = al.units.Heads(per_position=True)
    paper = {"next_attn": False, "tail_fix": False}
    options = {
        "AtP": ("atp", {}),
        "paper AtP* without QK fix": ("atp*", {**paper, "qk_fix": False}),
        "paper AtP*": ("atp*", paper),
        "default": ("atp*", {}),
    }

    print("| site | direction | max abs exact | " + " | ".join(options) + " |")
    for site in ("z", "q", "k"):
        for direction in ("noising", "denoising"):
            ex = exact_in_atp_order(lm, prompts, cfs, target, units, site, direction)
            cells = []
            for method, kw in options.values():
                r = al.attribute(
                    lm,
                    prompts,
                    target=target,
                    units=units,
                    method=method,
                    counterfactual=cfs,
                    head_site=site,
                    direction=direction,
                    **kw,
                )
                cells.append(f"{corr(r.scores, ex):.3f} / {recall(r.scores, ex):.1f}")
            row = f"| {site} | {direction} | {float(ex.abs().max()):.3f} | " + " | ".join(cells)
            print(row + " |", flush=True)


def random_accuracy() -> None:
    """Random 12-layer model, heads x positions (z): Pearson and top-10 recall of
    AtP* options against exact patching on the union of each option's top 32
    units and 96 random units (exact patching of all 2304 is slow on CPU)."""
    import attrlab as al
    from attrlab.methods.atp import NodeSet, exact_node_effects, prepare_pair

    lm = build()
    ids, cf = _tokens()
    target = al.targets.LogitDiff(ANSWER, WRONG)
    heads = al.units.Heads(per_position=True)
    options = {
        "paper AtP*": {"next_attn": False, "tail_fix": False},
        "+tail_fix": {"next_attn": False},
        "+next_attn": {"tail_fix": False},
        "+next_attn+tail_fix 16pt": {"tail_points": 16},
        "default (next_attn+tail_fix 32pt)": {},
    }
    for direction in ("noising", "denoising"):
        res = {
            name: al.attribute(
                lm,
                ids,
                target=target,
                units=heads,
                method="atp*",
                counterfactual=cf,
                direction=direction,
                **kw,
            ).scores
            for name, kw in options.items()
        }
        t = target.bind(lm)
        clean, cfb = prepare_pair(lm, ids, t, cf)
        base, src = (clean, cfb) if direction == "noising" else (cfb, clean)
        ns = NodeSet.build(lm, heads, N_POS)
        with torch.no_grad():
            _, src_cache = lm.run(src, cache=ns.sites())
        g = torch.Generator().manual_seed(2)
        idx = set(torch.randperm(ns.n_units, generator=g)[:96].tolist())
        for sc in res.values():
            idx |= set(torch.argsort(sc.abs(), descending=True)[:32].tolist())
        order = sorted(idx)
        ex = exact_node_effects(lm, base, src_cache, t, ns, indices=order, chunk=48)
        top = set(torch.argsort(ex.abs(), descending=True)[:10].tolist())
        cells = []
        for name, sc in res.items():
            a = sc[order].double()
            pear = float(torch.corrcoef(torch.stack([a, ex]))[0, 1])
            mine = set(torch.argsort(a.abs(), descending=True)[:10].tolist())
            cells.append(f"{name} {pear:.3f} / {len(top & mine) / 10:.1f}")
        print(f"{direction} ({len(order)} units): " + " | ".join(cells), flush=True)


def _tokens(n: int = 1):
    """``n`` random prompts and their counterfactuals (3 tokens changed); the first
    is the same for every ``n``."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(100, VOCAB, (n, N_POS), generator=g)
    cf = ids.clone()
    cf[:, [3, 7, 11]] = torch.randint(100, VOCAB, (n, 3), generator=g)
    return ids, cf


def print_rows_of(rows: list) -> None:
    from _interleave import print_rows

    print_rows(rows)


def compare_autocircuit(runs: int, threads: int, n_prompts: int = 4) -> list:
    """attrlab EAP (defaults) vs auto-circuit's mask-gradient EAP on the same weights and
    prompts, interleaved; returns result rows (``_interleave.row``)."""
    from _interleave import interleaved, loadavg, row
    from _peer import PeerProcess
    from safetensors.torch import load_file, save_file

    import attrlab as al

    torch.set_num_threads(threads)
    lm = build()
    OUT.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(OUT / "model")
    ids, cf = _tokens(n_prompts)
    save_file({"clean": ids, "corrupt": cf}, str(OUT / "tokens.safetensors"))
    target = al.targets.LogitDiff(ANSWER, WRONG)
    out: dict = {}

    def ours() -> None:  # no tuning arguments
        out["r"] = al.attribute(lm, ids, target=target, units="edges", method="eap",
                                counterfactual=cf)  # fmt: skip

    if not PEER_PY.exists():
        raise SystemExit(f"auto-circuit environment missing ({PEER_PY}); see the module docs")
    argv = [str(PEER_PY), __file__, "--peer", "--threads", str(threads)]
    print(f"EAP, 12x768 gpt2, {n_prompts} x {N_POS} tokens, {threads} threads; load {loadavg()}")
    with PeerProcess(argv, cwd=ROOT, env={"PYTHONPATH": str(ROOT)}) as ac:
        ac.call("save", batch=n_prompts)
        sides = {"attrlab defaults": ours,
                 "ac bs=1": lambda: ac.call("run", batch=1),
                 f"ac bs={n_prompts}": lambda: ac.call("run", batch=n_prompts)}  # fmt: skip
        times = interleaved(sides, runs)
    r = out["r"]
    peer_scores = load_file(str(OUT / "ac_scores.safetensors"))["scores"]
    peer_meta = json.loads((OUT / "ac_meta.json").read_text())
    names = {"embed": "Resid Start", "logits": "Resid End"}

    def ac_name(n: str) -> str:
        if n in names:
            return names[n]
        if n.startswith("m"):
            return f"MLP {n[1:]}"
        parts = n[1:].split(".h")
        layer, rest = parts[0], parts[1]
        head, _, comp = rest.partition(".")
        return f"A{layer}.{head}" + (f".{comp.upper()}" if comp else "")

    index = {tuple(k.split("->")): i for i, k in enumerate(peer_meta["edges"])}
    mine, theirs = [], []
    # auto-circuit reports the effect of patching an edge (the metric change when
    # it is patched); attrlab's scores are contributions, their negative. Both
    # average the metric over the prompts of a batch.
    effect = r.effect_of_patching().scores.tolist()
    for u, v, s in zip(r.units["upstream"], r.units["downstream"], effect):
        key = (ac_name(u), ac_name(v))
        if key in index:
            mine.append(s)
            theirs.append(-float(peer_scores[index[key]]))  # their score: d(-metric)/d mask
    a, b = torch.tensor(mine, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64)
    pear = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    diff = float((a - b).abs().max())
    print(f"edges matched: {len(mine)} of {len(r)} (auto-circuit: {len(index)})")
    print(f"Pearson {pear:.6f}, max |diff| {diff:.3g}, max |score| {float(a.abs().max()):.3g}")
    setup = f"eap, all edges, 12x768 gpt2, {n_prompts}x{N_POS} tokens"
    rows = []
    for label, peer_name in (("ac bs=1", "auto-circuit defaults (bs=1)"),
                             (f"ac bs={n_prompts}", f"auto-circuit best (bs={n_prompts})")):  # fmt: skip
        t = {"attrlab defaults": times["attrlab defaults"], peer_name: times[label]}
        rows.append(row("atp", setup, t, ours="attrlab defaults", peer=peer_name, agreement=diff,
                        metric="max |edge score diff|", pearson=pear, edges_matched=len(mine),
                        max_abs_score=float(a.abs().max())))  # fmt: skip
    return rows


def summary(quick: bool = False) -> list:
    """Rows for ``benchmarks/run_all.py``: EAP vs auto-circuit (quick: 2 prompts)."""
    from _peer import rows_or_error

    rows = rows_or_error("atp", PEER_PY, INSTALL,
                         lambda: compare_autocircuit(runs=3, threads=2, n_prompts=2 if quick else 4))  # fmt: skip
    if "error" not in rows[0]:
        print_rows_of(rows)
    return rows


def peer(threads: int) -> None:
    """auto-circuit side (runs in _envs/ac: TransformerLens 2.x, transformers 4), long-lived:
    ``run {"batch"}`` times one ``mask_gradient_prune_scores``; ``save`` writes its scores."""
    import sys

    sys.path.insert(0, str(ROOT))
    from _peer import serve
    from _tl_gpt2 import hooked_gpt2
    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores
    from auto_circuit.utils.graph_utils import patchable_model
    from safetensors.torch import load_file, save_file
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(threads)
    hf = GPT2LMHeadModel.from_pretrained(OUT / "model")
    hf.eval()
    model = hooked_gpt2(hf)
    model.cfg.use_attn_result = True
    model.cfg.use_attn_in = True
    model.cfg.use_split_qkv_input = True
    model.cfg.use_hook_mlp_in = True
    model.eval()
    for p in model.parameters():
        p.requires_grad = False
    toks = load_file(str(OUT / "tokens.safetensors"))
    n = len(toks["clean"])
    ds = PromptDataset(toks["clean"], toks["corrupt"], [torch.tensor([ANSWER])] * n,
                       [torch.tensor([WRONG])] * n)  # fmt: skip
    pm = patchable_model(
        model,
        factorized=True,
        slice_output="last_seq",
        separate_qkv=True,
        device=torch.device("cpu"),
    )

    def scores(bs: int):
        loader = PromptDataLoader(ds, seq_len=None, diverge_idx=0, batch_size=bs)
        return mask_gradient_prune_scores(
            pm, loader, None, grad_function="logit", answer_function="avg_diff", mask_val=0.0
        )

    def run(msg: dict) -> dict:
        t0 = time.perf_counter()
        scores(int(msg.get("batch", 1)))
        return {"seconds": time.perf_counter() - t0}

    def save(msg: dict) -> dict:
        bs = int(msg.get("batch", n))
        sc = scores(bs)
        edges = sorted(pm.edges, key=lambda e: (e.dest.module_name, e.patch_idx))
        # mask-gradient scores add up over batches: per prompt-batch mean, like attrlab's
        vals = [float(sc[e.dest.module_name][e.patch_idx]) / -(-n // bs) for e in edges]
        save_file({"scores": torch.tensor(vals)}, str(OUT / "ac_scores.safetensors"))
        (OUT / "ac_meta.json").write_text(
            json.dumps({"edges": [f"{e.src.name}->{e.dest.name}" for e in edges]})
        )
        return {"edges": len(edges)}

    serve({"run": run, "save": save}, ready={"prompts": n})


if __name__ == "__main__":
    main()
