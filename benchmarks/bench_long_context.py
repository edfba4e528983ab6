"""Long contexts within bounded memory: peak RSS of source attribution (and
token attribution) at 1k, 4k and 16k tokens of context on a tiny random Llama
with 32k positions, and the 10,000-source case (a typed error, fast).

Each (method, length) runs in a fresh subprocess, so that one run's freed memory
does not hide the next one's growth; the table reports the growth of the
process's RSS during the attribution (sampled, ``attrlab.model.budget.peak_rss_growth``)
and the process's peak RSS (``ru_maxrss``, includes Python, torch and the model).

Run::

    python benchmarks/bench_long_context.py                       # the table
    python benchmarks/bench_long_context.py --lengths 1000 4000   # fewer lengths
    python benchmarks/bench_long_context.py --one attntrace 4000  # one cell (json)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = {
    "attntrace": dict(units="sources", method="attntrace", subsamples=8),
    "contextcite": dict(units="sources", method="contextcite", samples=16),
    "occlusion-sources": dict(units="sources", method="occlusion"),
    "saliency-tokens": dict(units="tokens", method="saliency"),
    "saliency-tokens-sdpa": dict(units="tokens", method="saliency"),
}
WORDS = "the red box holds a small key and the blue box holds an old map".split()


def context_of(tokenizer, n_tokens: int, per_source: int = 50) -> tuple[str, int]:
    """Sentences of about ``per_source`` tokens until the context has ``n_tokens``."""
    probe = " ".join(WORDS)
    per_word = len(tokenizer(" " + probe, add_special_tokens=False)["input_ids"]) / len(WORDS)
    n_words = max(2, round(per_source / per_word) - 2)
    sents, total, i = [], 0, 0
    while total < n_tokens:
        words = [f"Fact{i}"] + [WORDS[(i + k) % len(WORDS)] for k in range(n_words)]
        s = " ".join(words) + "."
        n = len(tokenizer(" " + s, add_special_tokens=False)["input_ids"])
        sents.append(s)
        total += n
        i += 1
    return " ".join(sents), len(sents)


def one(method: str, n_tokens: int) -> dict:
    import attrlab as al
    from attrlab.model.budget import peak_rss_growth

    torch.set_num_threads(1)
    attn = "sdpa" if method.endswith("-sdpa") else "eager"
    model, tok = al.testing.tiny_model(
        "llama", max_position_embeddings=32768, attn_implementation=attn
    )
    lm = al.wrap(model, tok)
    ctx, n_sources = context_of(tok, n_tokens)
    kw = dict(METHODS[method])
    target = " the red box"
    if kw["units"] == "sources":
        kw["units"] = al.units.Sources()
    else:
        target = " the"  # a logit target for token attribution
    t0 = time.perf_counter()
    r, grew = peak_rss_growth(lambda: al.attribute(lm, ctx, target, **kw))
    secs = time.perf_counter() - t0
    return {
        "method": method,
        "tokens": len(tok(ctx)["input_ids"]),
        "sources": n_sources,
        "seconds": round(secs, 1),
        "rss_growth_mib": None if grew is None else round(grew / 2**20, 1),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "n_forwards": r.diagnostics.get("n_forwards"),
        "finite": bool(torch.isfinite(r.scores).all()),
    }


def ten_thousand() -> dict:
    """10,000 sources (~70k tokens) on a 128-position model: ContextTooLongError."""
    import attrlab as al
    from attrlab.errors import ContextTooLongError
    from attrlab.model.budget import peak_rss_growth

    lm = al.wrap(*al.testing.tiny_model("llama"))
    texts = [f"Fact {i} holds." for i in range(10_000)]
    out = {}
    for given in (False, True):
        units = al.units.Sources(sources=texts) if given else al.units.Sources()

        def run(units=units):
            try:
                al.attribute(lm, " ".join(texts), " Fact", units=units, method="contextcite")
            except ContextTooLongError as e:
                return type(e).__name__
            return "no error"

        t0 = time.perf_counter()
        err, grew = peak_rss_growth(run)
        out["given" if given else "split"] = {
            "error": err,
            "seconds": round(time.perf_counter() - t0, 2),
            "rss_growth_mib": None if grew is None else round(grew / 2**20, 1),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "TOKENS"))
    ap.add_argument("--lengths", nargs="+", type=int, default=[1000, 4000, 16000])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--ten-thousand", action="store_true")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], int(a.one[1]))))
        return
    if a.ten_thousand:
        print(json.dumps(ten_thousand()))
        return
    print("| method | context tokens | sources | seconds | RSS growth (MiB) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for m in a.methods:
        for n in a.lengths:
            p = subprocess.run([sys.executable, str(Path(__file__)), "--one", m, str(n)],
                               capture_output=True, text=True)  # fmt: skip
            if p.returncode != 0:
                why = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:120]
                print(f"| {m} | {n} | | failed: {why} | | |", flush=True)
                continue
            d = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"| {m} | {d['tokens']} | {d['sources']} | {d['seconds']} | "
                  f"{d['rss_growth_mib']} | {d['max_rss_mib']} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
