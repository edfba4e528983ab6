"""Integrated Gradients for a continuation: attrlab vs Captum.

Model: GPT-2 architecture, 12 layers, d_model 768, 12 heads, vocab 50257, random
weights (seed 0), float32, 2 threads. Input: a 16-token prompt and an 8-token
continuation (ids from attrlab's offline test tokenizer). Both sides attribute
each continuation token's log-probability to the prompt tokens at the token
embedding (``transformer.wte``), baseline = the pad token (id 0), 50
Gauss-Legendre steps, the earlier continuation tokens fixed (Captum's
convention; attrlab ``units=Tokens(include_generated=False)``).

* Captum: ``LLMGradientAttribution(LayerIntegratedGradients(model, wte))`` —
  one full IG (forward + backward over the 50 steps) per continuation token.
* attrlab: ``method="ig"`` with ``ContinuationLogProb(..., reduce="none")`` —
  one batched forward over the 50 steps (without the last token, which no row
  reads), then one backward per token through the shared graph; the
  activations' derivatives are computed once and shared by the 8 backwards, and
  the linear layers' backwards skip the positions a row's gradient cannot reach.

Both run the model in the same attention implementation (``--attn``; default
``sdpa``, Hugging Face's default and the faster one for both here).

Reports value agreement, median wall times and their ratio, and the
time-to-accuracy table: for every quadrature rule, the fewest steps whose
completeness error (max over rows) is at most ``--tta-slack`` (1.25) times the
50-step Gauss-Legendre (= Captum's default) error. That error is already at
float32 round-off (~2e-6), where a converged rule lands just above or below it
by chance, hence the slack.

Run:  python benchmarks/bench_ig.py [--repeats 3] [--threads 2] [--skip-tta] [--attn sdpa]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import attrlab as al
from attrlab.methods.gradient import RULES

PROMPT_TEXT = (
    "When Mary and John went to the store, John gave a drink to Mary. "
    "The capital of France is Paris. Alice and Bob talked about the weather."
)


def build(attn: str = "sdpa") -> tuple[al.LM, list[int], list[int]]:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
        attn_implementation=attn,
    )  # fmt: skip
    hf = GPT2LMHeadModel(cfg).eval()
    assert hf.config._attn_implementation == attn
    tok = al.testing.tiny_tokenizer()
    lm = al.wrap(hf, tok, name="gpt2-12x768-random")
    ids = lm.encode(PROMPT_TEXT)
    assert len(ids) >= 24, len(ids)
    return lm, ids[:16], ids[16:24]


def captum_run(lm: al.LM, prompt: list[int], cont: list[int], steps: int) -> torch.Tensor:
    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution, TextTokenInput

    tok = lm.tokenizer
    text = tok.decode(prompt)
    inp = TextTokenInput(text, tok)
    assert inp.inp_tensor[0].tolist() == prompt, "prompt must re-tokenize to the same ids"
    lig = LayerIntegratedGradients(lm.model, lm.model.transformer.wte)
    llm = LLMGradientAttribution(lig, tok)
    res = llm.attribute(inp, target=torch.tensor(cont), n_steps=steps, method="gausslegendre")
    return res.token_attr.detach()


def attrlab_run(
    lm: al.LM, prompt: list[int], cont: list[int], steps: int, rule: str = "gausslegendre"
) -> al.Attribution:
    return al.attribute(
        lm,
        [prompt],
        target=al.targets.ContinuationLogProb(cont, reduce="none"),
        units=al.units.Tokens(include_generated=False),
        method="ig",
        steps=steps,
        rule=rule,
        batch_size=steps,
    )


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--skip-captum", action="store_true")
    ap.add_argument("--skip-tta", action="store_true", help="skip the time-to-accuracy table")
    ap.add_argument("--tta-slack", type=float, default=1.25)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm, prompt, cont = build(args.attn)
    print(f"model {lm.name}: 12 layers, d_model 768, vocab 50257; prompt 16, continuation 8 tokens")
    print(
        f"threads {args.threads}, IG {args.steps} Gauss-Legendre steps, baseline pad (id 0), "
        f"{args.attn} attention (both sides)\n"
    )

    attrlab_run(lm, prompt, cont, 4)  # warm up
    walls: dict[str, list[float]] = {"attrlab": [], "captum": []}
    cpus: dict[str, list[float]] = {"attrlab": [], "captum": []}
    ours: al.Attribution | None = None
    cap: torch.Tensor | None = None
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        for name in ("attrlab", "captum"):
            if name == "captum" and args.skip_captum:
                continue
            w, c = time.perf_counter(), time.process_time()
            if name == "attrlab":
                ours = attrlab_run(lm, prompt, cont, args.steps)
            else:
                cap = captum_run(lm, prompt, cont, args.steps)
            walls[name].append(time.perf_counter() - w)
            cpus[name].append(time.process_time() - c)
            print(
                f"  {name:8s} wall {walls[name][-1]:7.2f} s  cpu {cpus[name][-1]:7.2f} s",
                flush=True,
            )
    assert ours is not None
    med = {k: (statistics.median(v) if v else float("nan")) for k, v in walls.items()}
    cmed = {k: (statistics.median(v) if v else float("nan")) for k, v in cpus.items()}
    print(f"attrlab  median wall {med['attrlab']:7.2f} s  cpu {cmed['attrlab']:7.2f} s")
    if cap is not None:
        print(f"captum   median wall {med['captum']:7.2f} s  cpu {cmed['captum']:7.2f} s")
        print(
            f"speed-up {med['captum'] / med['attrlab']:.2f}x wall, "
            f"{cmed['captum'] / cmed['attrlab']:.2f}x cpu ({args.repeats} interleaved repeats)"
        )
        diff = float((ours.scores - cap).abs().max())
        scale = float(cap.abs().max())
        print(
            f"values: max |attrlab - captum| = {diff:.2e} (max |captum| = {scale:.2e}, "
            f"relative {diff / scale:.1e})\n"
        )
    err50 = torch.tensor(ours.diagnostics["completeness_error"]).abs()
    delta = torch.tensor(ours.diagnostics["delta"]).abs()
    if args.skip_tta:
        return

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
