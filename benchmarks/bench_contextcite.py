"""attrlab's ContextCite vs the ``context-cite`` package (0.0.4).

Part 1 (same masks): a 12-layer, 768-wide random Llama-architecture model with
the local tiny tokenizer, 20 sources of ~25 tokens, a 4-token query and a
20-token response, 2 threads. context-cite runs at batch sizes 1 and 8; attrlab
runs on context-cite's masks and response. Prints the largest score difference
and the time ratio (medians).

Part 2 (same quality): on the zoo context_qa task (when it is available), the
held-out LDS of context-cite's estimator at 64 ablations versus cheaper attrlab
estimators, and the time each takes.

context-cite downloads nltk data when imported and imports spacy and datasets;
:func:`install_shims` replaces those three with small local stand-ins (its
sentence splitter becomes attrlab's regex splitter), before importing it.
Install it without its dependencies: ``pip install --no-deps context-cite==0.0.4``.

Run: ``python benchmarks/bench_contextcite.py [--repeats 3] [--part 1|2|all]``
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


def big_llama(seed: int = 0) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    import attrlab as al

    cfg = LlamaConfig(
        vocab_size=len(al.testing.tiny_tokenizer()),
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


class Timer:
    """Wall-clock and CPU (process) seconds of a block; CPU time is steadier on a busy box."""

    def __enter__(self) -> Timer:
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.w
        self.cpu = time.process_time() - self.c


def part1(repeats: int) -> dict[str, Any]:
    import attrlab as al

    torch.set_num_threads(2)
    model, tok = big_llama(), chat_tokenizer()
    lm = al.wrap(model, tok)
    context = " ".join(make_sources())
    query = "The capital city?"  # 4 tokens
    print(f"query tokens: {len(tok(query, add_special_tokens=False)['input_ids'])}")
    gen = {"max_new_tokens": 20, "min_new_tokens": 20, "do_sample": False}
    wall: dict[str, list[float]] = {"cc_bs1": [], "cc_bs8": [], "attrlab": []}
    cpu: dict[str, list[float]] = {k: [] for k in wall}
    diffs = []
    for rep in range(repeats):
        for name in ("cc_bs1", "attrlab", "cc_bs8"):  # attrlab between the two, on a noisy box
            if name.startswith("cc"):
                bs = int(name[5:])
                cc = context_citer(
                    model, tok, context, query, num_ablations=64, batch_size=bs, generate_kwargs=gen
                )
                response_ids = cc._response_ids  # generation is not timed
                with Timer() as t:
                    cc_scores = cc.get_attributions(verbose=False)
                if bs == 1:
                    masks, ref_scores = cc._masks, cc_scores
                assert cc.num_sources == 20 and len(response_ids) == 20
            else:
                with Timer() as t:
                    r = al.attribute(
                        lm,
                        context,
                        response_ids,
                        units="sources",
                        method="contextcite",
                        query=query,
                        masks=masks,
                    )
                diffs.append(float(np.abs(r.scores.numpy() - ref_scores).max()))
            wall[name].append(t.wall)
            cpu[name].append(t.cpu)
        prompt = al.units.Sources(query=query).prompt(lm, context, response_ids)
        plain_tokens = sum(len(x) + 20 for x in prompt.prompt_ids(masks))
        print(
            f"repeat {rep}: "
            + ", ".join(f"{k} {wall[k][-1]:.1f}s wall / {cpu[k][-1]:.1f}s cpu" for k in wall)
            + f"; max |score diff| {diffs[-1]:.1e}; tokens run by attrlab "
            f"{r.diagnostics['n_tokens']} (plain forwards: {plain_tokens})"
        )
    out = {}
    for label, d in (("wall", wall), ("cpu", cpu)):
        med = {k: statistics.median(v) for k, v in d.items()}
        best = min(med["cc_bs1"], med["cc_bs8"])
        out[label] = med
        print(
            f"median {label} seconds: "
            + ", ".join(f"{k} {v:.2f}" for k, v in med.items())
            + f"; context-cite best / attrlab = {best / med['attrlab']:.2f}x"
        )
    print(f"max |score diff| over repeats: {max(diffs):.2e}")
    return {**out, "max_diff": max(diffs)}


# ------------------------------------------------------------------ part 2
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--part", default="all", choices=["1", "2", "all"])
    ap.add_argument("--n-prompts", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="threads for part 2 (tiny model)")
    args = ap.parse_args()
    if args.part in ("1", "all"):
        part1(args.repeats)
    if args.part in ("2", "all"):
        part2(args.n_prompts, args.threads)


if __name__ == "__main__":
    main()
