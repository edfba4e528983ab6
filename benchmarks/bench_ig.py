"""Integrated Gradients for a continuation: attrlab vs Captum.

Model: GPT-2 architecture, 12 layers, d_model 768, 12 heads, random weights
(seed 0), float32, 2 threads; vocabulary 50,257 (GPT-2's) or 2,003 (the size
of Captum's LLMGradientAttribution example), ``--vocab``. Input: a 16-token
prompt and an 8-token continuation (ids from attrlab's offline test tokenizer,
all below 2,003, so both vocabularies run the same ids). Both sides attribute
each continuation token's log-probability to the prompt tokens at the token
embedding (``transformer.wte``), baseline = the pad token (id 0), 50
Gauss-Legendre steps, the earlier continuation tokens fixed (Captum's
convention; attrlab ``units=Tokens(include_generated=False)``).

* Captum: ``LLMGradientAttribution(LayerIntegratedGradients(model, wte))`` —
  one full IG (forward + backward over the 50 steps) per continuation token.
  Documented defaults: ``n_steps=50, method="gausslegendre",
  internal_batch_size=None`` (all steps in one batch); its best batch setting is
  the fastest of ``internal_batch_size`` in ``--captum-batches`` (timed, not guessed).
* attrlab: ``method="ig"`` with ``ContinuationLogProb(..., reduce="none")`` —
  one batched forward over the 50 steps (without the last token, which no row
  reads), then one backward per token through the shared graph; the
  activations' derivatives are computed once and shared by the 8 backwards, and
  the linear layers' backwards skip the positions a row's gradient cannot reach.
  Rows: attrlab with its defaults (no ``batch_size=``: the memory budget's cost
  model picks the points per forward) and tuned (``batch_size=steps``).

Rows (ratio = Captum / attrlab, medians of interleaved repeats, A B / B A):
``defaults`` (attrlab defaults vs Captum defaults), ``vs best`` (attrlab
defaults vs Captum's fastest internal_batch_size) and ``tuned`` (attrlab
``batch_size=steps`` vs Captum defaults; when the defaults already take all
steps in one forward it is the same call, and the row reuses its times unless
``--time-tuned``), each per vocabulary; value agreement is max |attrlab -
captum| / max |captum|. Rows also carry ``cpu_ratio`` (median process CPU
seconds, steadier than wall time on a shared machine).

The full run (``main``) adds the time-to-accuracy table on the 50,257 model: for
every quadrature rule, the fewest steps whose completeness error (max over
rows) is at most ``--tta-slack`` (1.25) times the 50-step Gauss-Legendre (=
Captum's default) error. That error is already at float32 round-off (~2e-6),
where a converged rule lands just above or below it by chance, hence the slack.

Run:  python benchmarks/bench_ig.py [--vocab 2003 50257] [--repeats 3] [--threads 2]
          [--captum-batches 25 10] [--skip-tta] [--attn sdpa] [--load] [--time-tuned]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import attrlab as al
from attrlab.methods.gradient import RULES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _interleave import ConcurrentLoad, interleaved, loadavg, print_rows, row  # noqa: E402

PROMPT_TEXT = (
    "When Mary and John went to the store, John gave a drink to Mary. "
    "The capital of France is Paris. Alice and Bob talked about the weather."
)
VOCABS = (2003, 50257)


def build(
    attn: str = "sdpa", vocab: int = 50257, layers: int = 12
) -> tuple[al.LM, list[int], list[int]]:
    torch.manual_seed(0)
    special = {} if vocab > 50256 else {"bos_token_id": 0, "eos_token_id": 0}
    cfg = GPT2Config(
        n_layer=layers, n_embd=768, n_head=12, vocab_size=vocab, n_positions=1024,
        attn_implementation=attn, **special,
    )  # fmt: skip
    hf = GPT2LMHeadModel(cfg).eval()
    assert hf.config._attn_implementation == attn
    tok = al.testing.tiny_tokenizer()
    lm = al.wrap(hf, tok, name=f"gpt2-{layers}x768-v{vocab}-random")
    ids = lm.encode(PROMPT_TEXT)
    assert len(ids) >= 24 and max(ids[:24]) < vocab, (len(ids), max(ids))
    return lm, ids[:16], ids[16:24]


def captum_run(
    lm: al.LM,
    prompt: list[int],
    cont: list[int],
    steps: int,
    internal_batch_size: int | None = None,
) -> torch.Tensor:
    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution, TextTokenInput

    tok = lm.tokenizer
    text = tok.decode(prompt)
    inp = TextTokenInput(text, tok)
    assert inp.inp_tensor[0].tolist() == prompt, "prompt must re-tokenize to the same ids"
    lig = LayerIntegratedGradients(lm.model, lm.model.transformer.wte)
    llm = LLMGradientAttribution(lig, tok)
    res = llm.attribute(
        inp, target=torch.tensor(cont), n_steps=steps, method="gausslegendre",
        internal_batch_size=internal_batch_size,
    )  # fmt: skip
    return res.token_attr.detach()


def attrlab_run(
    lm: al.LM,
    prompt: list[int],
    cont: list[int],
    steps: int,
    rule: str = "gausslegendre",
    **tuning: Any,
) -> al.Attribution:
    """attrlab's IG; with no ``tuning`` (e.g. ``batch_size=``) its defaults."""
    return al.attribute(
        lm,
        [prompt],
        target=al.targets.ContinuationLogProb(cont, reduce="none"),
        units=al.units.Tokens(include_generated=False),
        method="ig",
        steps=steps,
        rule=rule,
        **tuning,
    )


def auto_points(lm: al.LM, prompt: list[int], cont: list[int], steps: int) -> int:
    """The points per forward attrlab's defaults choose here (for the report)."""
    from attrlab.units.tokens import make_forward

    fwd = make_forward(lm, [prompt], al.targets.ContinuationLogProb(cont, reduce="none"))
    return fwd.points_per_forward(steps)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def compare(
    vocab: int,
    repeats: int = 3,
    steps: int = 50,
    layers: int = 12,
    captum_batches: tuple[int, ...] = (25, 10),
    attn: str = "sdpa",
    time_tuned: bool = False,
    built: tuple[al.LM, list[int], list[int]] | None = None,
) -> tuple[list[dict[str, Any]], al.Attribution]:
    """The three rows (defaults, vs best, tuned) for one vocabulary, from one
    interleaved group: attrlab defaults, attrlab ``batch_size=steps``, Captum
    defaults and Captum at each ``internal_batch_size`` of ``captum_batches``.
    ``time_tuned=False``: when the defaults already take all steps in one
    forward, the tuned call is the same call and its row reuses its times."""
    lm, prompt, cont = built or build(attn, vocab, layers)
    auto = auto_points(lm, prompt, cont, steps)
    setup = (
        f"{layers}x768 gpt2 v{vocab}, 16+8 tok, {steps} GL steps"
        f"{'' if layers == 12 else ' (quick)'}"
    )
    outs: dict[str, Any] = {}
    cpu: dict[str, list[float]] = {}  # process CPU seconds per call (the harness times wall)

    def keep(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            c = time.process_time()
            outs[name] = fn()
            cpu.setdefault(name, []).append(time.process_time() - c)
            return outs[name]

        return run

    sides: dict[str, Callable[[], Any]] = {
        "attrlab defaults": keep("attrlab defaults", lambda: attrlab_run(lm, prompt, cont, steps)),
        "captum defaults": keep("captum defaults", lambda: captum_run(lm, prompt, cont, steps)),
    }
    same = auto == steps and not time_tuned
    if not same:
        sides[f"attrlab batch_size={steps}"] = keep(
            "tuned", lambda: attrlab_run(lm, prompt, cont, steps, batch_size=steps)
        )
    for b in captum_batches:
        if b < steps:
            name = f"captum internal_batch_size={b}"
            sides[name] = keep(name, lambda b=b: captum_run(lm, prompt, cont, steps, b))
    print(f"{setup}: attrlab defaults take {auto} of {steps} points per forward", flush=True)
    times = interleaved(sides, repeats)
    if same:
        times[f"attrlab batch_size={steps}"] = times["attrlab defaults"]
        outs["tuned"] = outs["attrlab defaults"]
    cap = outs["captum defaults"]
    scale = float(cap.abs().max())

    def agree(name: str) -> float:
        return float((outs[name].scores - cap).abs().max()) / scale

    captum_sides = [n for n in times if n.startswith("captum")]
    best = min(captum_sides, key=lambda n: statistics.median(times[n]))
    metric = "max |diff| / max |captum|"
    extra = {"vocab": vocab, "auto_points_per_forward": auto, "steps": steps}

    def cpu_ratio(ours: str, peer: str) -> float:
        """Ratio of median CPU seconds (warm-up call left out): steadier than
        wall time when other processes share the cores."""
        med = {n: statistics.median(cpu[n][1:] or cpu[n]) for n in (ours, peer)}
        return round(med[peer] / med[ours], 3)

    tuned = "attrlab defaults" if same else "tuned"
    rows = [
        row("ig", setup + " defaults", times, "attrlab defaults", "captum defaults",
            agree("attrlab defaults"), metric,
            cpu_ratio=cpu_ratio("attrlab defaults", "captum defaults"), **extra),
        row("ig", setup + " vs best", times, "attrlab defaults", best,
            agree("attrlab defaults"), metric,
            cpu_ratio=cpu_ratio("attrlab defaults", best), **extra),
        row("ig", setup + " tuned", times, f"attrlab batch_size={steps}", "captum defaults",
            agree("tuned"), metric, cpu_ratio=cpu_ratio(tuned, "captum defaults"),
            same_call_as_defaults=same, **extra),
    ]  # fmt: skip
    for r in rows:
        print(f"  {r['setup']}: wall ratio {r['ratio']}x, cpu ratio {r['cpu_ratio']}x "
              f"({r['peer']}), agreement {r['agreement']:.1e}")  # fmt: skip
    return rows, outs["attrlab defaults"]


def summary(quick: bool = False) -> list[dict[str, Any]]:
    """Rows for ``benchmarks/run_all.py``: defaults, vs best and tuned, both
    vocabularies. ``quick``: a 4-layer model and 16 steps (Captum's best from
    ``internal_batch_size`` in {None, 8}), about a minute on an idle 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows: list[dict[str, Any]] = []
        for vocab in VOCABS:
            if quick:
                r, _ = compare(vocab, 3, steps=16, layers=4, captum_batches=(8,), time_tuned=False)
            else:
                r, _ = compare(vocab, 3, time_tuned=False)
            rows += r
        return rows
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, nargs="+", default=list(VOCABS), choices=VOCABS)
    ap.add_argument("--captum-batches", type=int, nargs="*", default=[25, 10])
    ap.add_argument("--skip-tta", action="store_true", help="skip the time-to-accuracy table")
    ap.add_argument("--tta-slack", type=float, default=1.25)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--load", action="store_true", help="run under a concurrent CPU load")
    ap.add_argument(
        "--time-tuned",
        action="store_true",
        help="time batch_size=steps as its own side even when the defaults make the same call",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"threads {args.threads}, IG {args.steps} Gauss-Legendre steps, baseline pad (id 0), "
        f"{args.attn} attention (both sides); load {loadavg()}\n"
    )
    rows: list[dict[str, Any]] = []
    ours: al.Attribution | None = None
    built = None
    for vocab in args.vocab:
        built = build(args.attn, vocab, args.layers)
        if args.load:
            with ConcurrentLoad():
                r, ours = compare(vocab, args.repeats, args.steps, args.layers,
                                  tuple(args.captum_batches), args.attn, args.time_tuned,
                                  built=built)  # fmt: skip
        else:
            r, ours = compare(vocab, args.repeats, args.steps, args.layers,
                              tuple(args.captum_batches), args.attn, args.time_tuned,
                              built=built)  # fmt: skip
        rows += r
    print()
    print_rows(rows)
    print(f"load {loadavg()}\n")
    if args.skip_tta or built is None or ours is None:
        return
    lm, prompt, cont = built
    err50 = torch.tensor(ours.diagnostics["completeness_error"]).abs()
    delta = torch.tensor(ours.diagnostics["delta"]).abs()
    target = args.tta_slack * float(err50.max())
    print(
        f"completeness error at {args.steps} Gauss-Legendre steps (= Captum's): "
        f"max over rows {float(err50.max()):.2e} (|f(x) - f(x0)| up to {float(delta.max()):.2f})"
    )
    print(f"time-to-accuracy: fewest steps reaching {args.tta_slack} x that error = {target:.2e}")
    print(f"{'rule':20s} {'steps':>6s} {'time (s)':>9s} {'max error':>10s}")
    grid = [4, 6, 8, 12, 16, 24, 32, 48, 64]
    for rule in RULES:
        found, tried = None, {}

        def err_at(n: int, rule: str = rule, tried: dict = tried) -> tuple[float, float]:
            if n not in tried:
                t, r = timed(lambda: attrlab_run(lm, prompt, cont, n, rule), 1)
                tried[n] = (float(torch.tensor(r.diagnostics["completeness_error"]).abs().max()), t)
            return tried[n]

        # check the largest step count first: slow rules stop after one run
        if err_at(grid[-1])[0] <= target:
            for n in grid:
                e, t = err_at(n)
                if e <= target:
                    found = (n, t, e)
                    break
        if found:
            print(f"{rule:20s} {found[0]:6d} {found[1]:9.2f} {found[2]:10.2e}", flush=True)
        else:
            e, _ = err_at(grid[-1])
            print(
                f"{rule:20s} {'>' + str(grid[-1]):>6s} {'-':>9s} {e:10.2e} (at {grid[-1]})",
                flush=True,
            )


if __name__ == "__main__":
    main()
