"""Source attribution over many sources on a 12-layer random Llama-architecture
model: attrlab's ContextCite, TracLLM and AttnTrace vs the ``context-cite``
package (0.0.4, installed with ``--no-deps``; see ``bench_contextcite.py`` for
its shims): wall time, cost (distinct prompts run) and held-out LDS.

The issue's size is 200 sources x 50 tokens (10k tokens) on a 768-wide model;
``--sources``, ``--tokens`` and ``--width`` shrink it when that does not fit the
time (RESULTS.md says which size was run). LDS: Spearman correlation of
``masks @ scores`` with the response's log-probability (attrlab's ``f``, the same
prompts context-cite builds) on held-out Bernoulli(1/2) masks, the same for all.

Run::

    python benchmarks/bench_long_sources.py --sources 40 --tokens 50 --width 256
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from bench_contextcite import chat_tokenizer, context_citer, make_sources


def model_of(layers: int, width: int, positions: int, init: float = 0.02):
    from transformers import AutoModelForCausalLM, LlamaConfig

    import attrlab as al

    heads = max(1, width // 64)
    cfg = LlamaConfig(
        vocab_size=len(al.testing.tiny_tokenizer()),
        hidden_size=width,
        intermediate_size=int(width * 8 / 3),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=positions,
        initializer_range=init,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def main() -> None:
    import attrlab as al
    from attrlab.evaluate.lds import spearman
    from attrlab.methods.surrogate import sample_masks

    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--ablations", type=int, default=64)
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--cc-batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--init",
        type=float,
        default=0.02,
        help="initializer range (larger: the context matters more to a random model)",
    )
    ap.add_argument("--skip", nargs="*", default=[])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = (
        model_of(a.layers, a.width, 4 * a.sources * a.tokens + 512, a.init),
        chat_tokenizer(),
    )
    lm = al.wrap(model, tok)
    sources = make_sources(a.sources, a.tokens)
    context, query = " ".join(sources), "The capital city?"
    gen = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
    cc = context_citer(model, tok, context, query, num_ablations=a.ablations,
                       batch_size=a.cc_batch, generate_kwargs=gen)  # fmt: skip
    response = list(cc._response_ids)
    assert cc.num_sources == a.sources, (cc.num_sources, a.sources)
    n_ctx_tokens = len(tok(context)["input_ids"])
    print(f"{a.sources} sources, {n_ctx_tokens} context tokens, {a.layers}x{a.width} llama (init {a.init}), "
          f"{len(response)}-token response, {a.threads} threads", flush=True)  # fmt: skip
    units = al.units.Sources(query=query)
    runs = {
        "attrlab contextcite": dict(method="contextcite", samples=a.ablations),
        "attrlab tracllm (permutations=5)": dict(method="tracllm", permutations=5),
        "attrlab attntrace": dict(method="attntrace"),
    }
    scores, secs, cost = {}, {}, {}
    if "context-cite" not in a.skip:
        t0 = time.perf_counter()
        scores["context-cite 0.0.4"] = np.asarray(cc.get_attributions(verbose=False))
        secs["context-cite 0.0.4"] = time.perf_counter() - t0
        cost["context-cite 0.0.4"] = a.ablations
        print("context-cite", round(secs["context-cite 0.0.4"], 1), flush=True)
    for name, kw in runs.items():
        if any(s in name for s in a.skip):
            continue
        t0 = time.perf_counter()
        r = al.attribute(lm, context, response, units=units, **kw)
        secs[name] = time.perf_counter() - t0
        scores[name] = r.scores.double().numpy()
        cost[name] = r.diagnostics.get("n_prompts")
        print(name, round(secs[name], 1), cost[name], flush=True)
    masks = sample_masks(a.heldout, a.sources, 0.5, 12345)
    f = units.bind(lm, context, response).f(masks)[:, 0].numpy()
    m = masks.numpy().astype(np.float64)
    print("| method | seconds | prompts run | held-out LDS |")
    print("|---|---|---|---|")
    for k in scores:
        print(f"| {k} | {secs[k]:.1f} | {cost[k]} | {spearman(m @ scores[k], f):.3f} |")


if __name__ == "__main__":
    main()
