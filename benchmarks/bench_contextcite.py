"""attrlab's ContextCite vs the ``context-cite`` package (0.0.4).

Part 1 (speed with defaults): a 12-layer, 768-wide random Llama-architecture
model with the local tiny tokenizer, 20 sources of ~25 tokens, a 4-token query
and a 20-token response (generated once, not timed), 64 ablations, 2 threads.
attrlab is called as a user would, with no tuning arguments; context-cite at
batch size 1 (its default) and at 8 and 16 (its best is reported). The sides
alternate (A B C, C B A, ...; benchmarks/_interleave.py); ``--load`` repeats
it beside a second CPU-bound process. Values: attrlab run on context-cite's
own masks and response, largest score difference.

Part 2 (same quality): on the zoo context_qa task (when it is available), the
held-out LDS of context-cite's estimator at 64 ablations versus cheaper attrlab
estimators, and the time each takes.

context-cite downloads nltk data when imported and imports spacy and datasets;
:func:`install_shims` replaces those three with small local stand-ins (its
sentence splitter becomes attrlab's regex splitter), before importing it.
Install it without its dependencies: ``pip install --no-deps context-cite==0.0.4``.

Run: ``python benchmarks/bench_contextcite.py [--repeats 3] [--part 1|2|all] [--load]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from typing import Any

import numpy as np
import torch


# ------------------------------------------------------------------ shims
def install_shims() -> None:
    """Stand-ins for nltk (no download), spacy and datasets, as context-cite uses them."""
    from attrlab.units.sources import split_text

    nltk = types.ModuleType("nltk")
    nltk.download = lambda *a, **k: True  # type: ignore[attr-defined]
    nltk.sent_tokenize = lambda text: [text[a:b] for a, b in split_text(text)]  # type: ignore[attr-defined]
    sys.modules["nltk"] = nltk
    try:
        import spacy.lang.en  # noqa: F401
    except ImportError:
        spacy = types.ModuleType("spacy")
        lang = types.ModuleType("spacy.lang")
        en = types.ModuleType("spacy.lang.en")

        class English:  # only the "word" source type needs it
            def __init__(self) -> None:
                raise RuntimeError("spacy is not installed (shim)")

        en.English = English  # type: ignore[attr-defined]
        sys.modules.update({"spacy": spacy, "spacy.lang": lang, "spacy.lang.en": en})
    try:
        import datasets  # noqa: F401
    except ImportError:
        ds = types.ModuleType("datasets")

        class Dataset:
            def __init__(self, rows: list[dict[str, Any]]):
                self.rows = rows

            @classmethod
            def from_dict(cls, d: dict[str, list[Any]]) -> Dataset:
                keys = list(d)
                return cls([dict(zip(keys, vals)) for vals in zip(*d.values())])

            def __len__(self) -> int:
                return len(self.rows)

            def __getitem__(self, i: int) -> dict[str, Any]:
                return self.rows[i]

        ds.Dataset = Dataset  # type: ignore[attr-defined]
        sys.modules["datasets"] = ds


def chat_tokenizer() -> Any:
    """A copy of attrlab's tiny tokenizer with a minimal chat template (context-cite needs one)."""
    import copy

    import attrlab as al

    tok = copy.deepcopy(al.testing.tiny_tokenizer())
    tok.chat_template = (
        "{% for m in messages %}<|endoftext|>User: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    )
    return tok


def context_citer(model: Any, tok: Any, context: str, query: str, **kw: Any) -> Any:
    """A ``context_cite.ContextCiter`` (shims installed first)."""
    install_shims()
    import logging

    from context_cite import ContextCiter

    logging.getLogger("ContextCite").setLevel(logging.ERROR)
    return ContextCiter(model, tok, context, query, **kw)


# ------------------------------------------------------------------ part 1
WORDS = (
    "the quick brown fox jumps over lazy dog a cat sat on mat paris is city in france rome "
    "italy berlin germany meeting monday report due friday alice bob talked about weather "
    "sunny warm store park gave drink ball question answer capital went"
).split()


def make_sources(n: int = 20, tokens: int = 25, seed: int = 0) -> list[str]:
    """``n`` sentences of about ``tokens`` tiny-tokenizer tokens each."""
    import attrlab as al

    tok = al.testing.tiny_tokenizer()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words: list[str] = []
        while True:
            s = " ".join(words).capitalize() + "."
            if len(tok(s, add_special_tokens=False)["input_ids"]) >= tokens:
                break
            words.append(str(rng.choice(WORDS)))
        out.append(s)
    return out


def big_llama(seed: int = 0, layers: int = 12) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    import attrlab as al

    cfg = LlamaConfig(
        vocab_size=len(al.testing.tiny_tokenizer()),
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=layers,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def part1(
    repeats: int, layers: int = 12, batch_sizes: tuple[int, ...] = (1, 8, 16), load: bool = False
) -> list[dict[str, Any]]:
    """attrlab with its defaults vs context-cite at each batch size, interleaved;
    scores compared on context-cite's own masks. Returns result rows."""
    import contextlib

    from _interleave import ConcurrentLoad, interleaved, loadavg, print_rows, row

    import attrlab as al

    torch.set_num_threads(2)
    model, tok = big_llama(layers=layers), chat_tokenizer()
    lm = al.wrap(model, tok)
    context = " ".join(make_sources())
    query = "The capital city?"  # 4 tokens
    gen = {"max_new_tokens": 20, "min_new_tokens": 20, "do_sample": False}
    citers = {
        bs: context_citer(
            model, tok, context, query, num_ablations=64, batch_size=bs, generate_kwargs=gen
        )
        for bs in batch_sizes
    }
    response_ids = None
    for cc in citers.values():  # generation is not timed
        ids = list(cc._response_ids)
        assert response_ids is None or ids == response_ids
        response_ids = ids
    assert response_ids is not None and len(response_ids) == 20
    assert next(iter(citers.values())).num_sources == 20
    out: dict[str, Any] = {}

    def cc_side(bs: int) -> Any:
        def run() -> None:
            cc = citers[bs]
            cc._cache.pop("reg_masks", None)
            cc._cache.pop("reg_logit_probs", None)
            out[f"cc{bs}"] = cc.get_attributions(verbose=False)
            out["masks"] = cc._masks

        return run

    def ours() -> None:  # attrlab as a user calls it: no tuning arguments
        out["ours"] = al.attribute(
            lm, context, response_ids, units="sources", method="contextcite", query=query
        )

    sides: dict[str, Any] = {"attrlab defaults": ours}
    sides.update({f"context-cite bs={bs}": cc_side(bs) for bs in batch_sizes})
    where = "under a concurrent CPU load" if load else "quiet"
    print(
        f"ContextCite, {layers}-layer 768-wide Llama, 20 sources x 25 tokens, 64 ablations, "
        f"20-token response, 2 threads, {where}; load {loadavg()}",
        flush=True,
    )
    with ConcurrentLoad() if load else contextlib.nullcontext():
        times = interleaved(sides, repeats)
    # values: attrlab on context-cite's masks and response
    same = al.attribute(
        lm, context, response_ids, units="sources", method="contextcite", query=query,
        masks=out["masks"],
    )  # fmt: skip
    diff = max(float(np.abs(same.scores.numpy() - out[f"cc{bs}"]).max()) for bs in batch_sizes)
    setup = f"{layers}x768 llama, 20x25 tokens, 64 abl., {where}"
    rows = []
    best = min(batch_sizes, key=lambda bs: statistics.median(times[f"context-cite bs={bs}"]))
    peers = [("context-cite defaults (bs=1)", 1)] if 1 in batch_sizes else []
    peers.append((f"context-cite best (bs={best})", best))
    for label, bs in peers:
        t = {"attrlab defaults": times["attrlab defaults"], label: times[f"context-cite bs={bs}"]}
        rows.append(
            row(
                "contextcite",
                setup,
                t,
                ours="attrlab defaults",
                peer=label,
                agreement=diff,
                metric="max |score diff| (same masks)",
                strategy=out["ours"].diagnostics.get("strategy"),
                n_tokens=out["ours"].diagnostics.get("n_tokens"),
            )  # fmt: skip
        )
    print_rows(rows)
    return rows


# ------------------------------------------------------------------ part 2
class Timer:
    """Wall-clock and CPU (process) seconds of a block; CPU time is steadier on a busy box."""

    def __enter__(self) -> Timer:
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.w
        self.cpu = time.process_time() - self.c


def zoo_chat_tokenizer(tok: Any) -> Any:
    """The zoo tokenizer with a chat template that renders the bare prompt after BOS,
    so context-cite's prompts are exactly the zoo prompts."""
    import copy

    tok = copy.deepcopy(tok)
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tok


def heldout_lds(
    lm: Any,
    ex: Any,
    response_ids: list[int],
    scores: dict[str, np.ndarray],
    n_masks: int = 64,
    seed: int = 12345,
) -> dict[str, float]:
    """Spearman correlation of ``masks @ scores`` with the measured response log-prob on
    held-out Bernoulli(1/2) masks (the same masks for every estimator)."""
    from attrlab.evaluate.lds import spearman
    from attrlab.methods.surrogate import sample_masks
    from attrlab.units.sources import Sources

    masks = sample_masks(n_masks, len(ex.sources), 0.5, seed)
    f = Sources(sources=ex.sources).bind(lm, ex.prompt, response_ids).f(masks)[:, 0].numpy()
    m = masks.numpy().astype(np.float64)
    return {k: spearman(m @ v, f) for k, v in scores.items()}


def part2(n_prompts: int, threads: int = 1) -> dict[str, Any]:
    import attrlab as al

    torch.set_num_threads(threads)
    lm = al.zoo.load("context_qa")
    cc_tok = zoo_chat_tokenizer(lm.tokenizer)
    examples = al.zoo.task("context_qa").examples(n_prompts, seed=0)
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    lds: dict[str, list[float]] = {}
    estimators = {
        "attrlab contextcite n=64": dict(method="contextcite", samples=64),
        "attrlab contextcite n=16": dict(method="contextcite", samples=16),
        "attrlab contextcite n=8": dict(method="contextcite", samples=8),
        "attrlab occlusion": dict(method="occlusion"),
    }

    def add(key: str, t: Timer) -> None:
        wall[key] = wall.get(key, 0.0) + t.wall
        cpu[key] = cpu.get(key, 0.0) + t.cpu

    for ex in examples:
        context = "\n".join(ex.sources)
        assert ex.prompt.startswith(context)
        # the rest of the zoo prompt (question and answer stem) as a fixed template
        rest = ex.prompt[len(context) :].replace("{", "{{").replace("}", "}}")
        scores: dict[str, np.ndarray] = {}
        resp = None
        for bs in (1, 8, 64):
            cc = context_citer(
                lm.model,
                cc_tok,
                context,
                "",
                num_ablations=64,
                batch_size=bs,
                prompt_template="{context}" + rest,
                generate_kwargs={"max_new_tokens": 1, "do_sample": False},
            )
            resp = list(cc._response_ids)
            ours = al.units.Sources(sources=ex.sources).prompt(lm, ex.prompt, resp)
            assert cc._get_prompt_ids() == ours.prompt_ids()[0]  # the same prompt tokens
            with Timer() as t:
                s = cc.get_attributions(verbose=False)
            add(f"context-cite n=64 bs={bs}", t)
            scores.setdefault("context-cite n=64", s)
        assert resp is not None
        units = al.units.Sources(sources=ex.sources)
        for name, kw in estimators.items():
            with Timer() as t:
                r = al.attribute(lm, ex.prompt, resp, units=units, **kw)
            add(name, t)
            scores[name] = r.scores.numpy()
        for k, v in heldout_lds(lm, ex, resp, scores).items():
            lds.setdefault(k, []).append(v)
    best_cc = min(v for k, v in cpu.items() if k.startswith("context-cite"))
    print(
        f"{n_prompts} zoo context_qa prompts, {threads} thread(s); held-out LDS on 64 "
        "Bernoulli(1/2) masks per prompt (same masks for all)"
    )
    print(
        f"{'estimator':28s} {'mean LDS':>9s} {'wall s':>8s} {'cpu s':>8s} {'cc best cpu / this':>19s}"
    )
    for k in [*[k for k in cpu if k.startswith("context-cite")], *estimators]:
        lk = "context-cite n=64" if k.startswith("context-cite") else k
        print(
            f"{k:28s} {np.nanmean(lds[lk]):9.3f} {wall[k]:8.2f} {cpu[k]:8.2f} "
            f"{best_cc / cpu[k]:18.1f}x"
        )
    return {"wall": wall, "cpu": cpu, "lds": {k: float(np.nanmean(v)) for k, v in lds.items()}}


def summary(quick: bool = False) -> list[dict[str, Any]]:
    """Rows for ``benchmarks/run_all.py``: part 1, quiet and under a concurrent load
    (quick: a 6-layer model, context-cite at batch size 8 only)."""
    if quick:
        kw: dict[str, Any] = dict(repeats=3, layers=6, batch_sizes=(8,))
    else:
        kw = dict(repeats=3, layers=12, batch_sizes=(1, 8, 16))
    return part1(**kw) + part1(**kw, load=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--part", default="all", choices=["1", "2", "all"])
    ap.add_argument("--layers", type=int, default=12, help="part 1 model depth")
    ap.add_argument("--batch-sizes", default="1,8,16", help="context-cite batch sizes (part 1)")
    ap.add_argument("--load", action="store_true", help="part 1 under a concurrent CPU load too")
    ap.add_argument("--n-prompts", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="threads for part 2 (tiny model)")
    args = ap.parse_args()
    if args.part in ("1", "all"):
        sizes = tuple(int(x) for x in args.batch_sizes.split(","))
        part1(args.repeats, args.layers, sizes)
        if args.load:
            part1(args.repeats, args.layers, sizes, load=True)
    if args.part in ("2", "all"):
        part2(args.n_prompts, args.threads)


if __name__ == "__main__":
    main()
