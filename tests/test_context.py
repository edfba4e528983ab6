"""Context attribution: sources, the ablation engine, ContextCite, baselines."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest
import torch

import attrlab as al
from attrlab.methods.contextcite import attribute_span
from attrlab.methods.surrogate import fit_lasso, sample_masks
from attrlab.units.sources import (
    EmptyResponseError,
    SourceNotFoundError,
    Sources,
    reduce_logprobs,
    split_text,
)

CTX = (
    "Paris is the capital of France. Rome is the capital of Italy. "
    "Berlin is in Germany. The cat sat on the mat. Bob likes tea."
)
QUERY = "What is the capital of France?"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread


@pytest.fixture(scope="module")
def llama():
    return al.wrap(*al.testing.tiny_model("llama"))


_plain_logprobs = al.testing.plain_response_logprobs


@pytest.mark.parametrize(
    "name",
    ["attrlab.units.sources", "attrlab.methods.contextcite", "attrlab.methods.context_baselines"],
)
def test_doctests(name):
    res = doctest.testmod(
        importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert res.failed == 0


# ------------------------------------------------------------------ splitting
def test_split_sentences_paragraphs_lines():
    t = "Dr. Smith arrived at 3.5 p.m. today. Was it late? Yes!\nA new line. e.g. this one"
    got = [t[a:b] for a, b in split_text(t)]
    assert got == [
        "Dr. Smith arrived at 3.5 p.m. today.",
        "Was it late?",
        "Yes!",
        "A new line.",
        "e.g. this one",
    ]
    t = "First para\nstill first.\n\n  Second para.\n\n\nThird."
    assert [t[a:b] for a, b in split_text(t, "paragraphs")] == [
        "First para\nstill first.",
        "Second para.",
        "Third.",
    ]
    assert [t[a:b] for a, b in split_text(t, "lines")][:2] == ["First para", "still first."]
    with pytest.raises(al.errors.InputError):
        split_text(t, "words")


def test_ablated_context_text(llama):
    p = Sources().prompt(llama, CTX, response=" Paris")
    assert len(p.texts) == 5 and p.context_text() == CTX
    assert p.context_text([0, 1, 1, 1, 1]) == CTX[len("Paris is the capital of France. ") :]
    assert p.context_text([1, 0, 0, 0, 1]) == "Paris is the capital of France. Bob likes tea."
    assert p.context_text([0, 0, 0, 0, 0]) == ""


def test_user_sources_verbatim_and_spans(llama):
    prompt = "Answer from the documents.\n[1] Rome is in Italy.\n[2] Paris is in France.\nQ: Paris?"
    docs = ["[2] Paris is in France.", "[1] Rome is in Italy."]
    p = Sources(sources=docs).prompt(llama, prompt, response=" France")
    assert p.texts == docs  # user order is unit order
    assert p.context_text([True, False]) == (
        "Answer from the documents.\n[2] Paris is in France.\nQ: Paris?"
    )
    spans = [(prompt.index(d), prompt.index(d) + len(d)) for d in docs]
    q = Sources(sources=spans).prompt(llama, prompt, response=" France")
    assert q.texts == docs
    with pytest.raises(SourceNotFoundError, match="verbatim"):
        Sources(sources=["[3] Not there.", docs[0]]).prompt(llama, prompt, response=" x")


def test_bad_inputs(llama):
    with pytest.raises(al.errors.EmptyPromptError):
        al.attribute(llama, "", units="sources", method="contextcite", target=" a")
    with pytest.raises(al.errors.EmptyPromptError):
        al.attribute(llama, "   \n ", units="sources", method="occlusion", target=" a")
    with pytest.raises(al.errors.InputError, match="at least two"):
        al.attribute(
            llama, "Only one sentence here.", units="sources", method="occlusion", target=" a"
        )
    with pytest.raises(EmptyResponseError):
        al.attribute(llama, CTX, units="sources", method="contextcite", target="")
    with pytest.raises(SourceNotFoundError):
        al.attribute(
            llama, CTX, units="sources", method="occlusion", target=" a", sources=["Nope.", "x"]
        )
    with pytest.raises(al.errors.InputError, match="one context"):
        al.attribute(llama, [CTX, CTX], units="sources", method="occlusion", target=" b")
    with pytest.raises(al.errors.InputError, match="both"):
        al.attribute(
            llama, CTX, units=Sources(query="a"), method="occlusion", target=" b", query="c"
        )


# ------------------------------------------------------------------ the engine
@pytest.mark.parametrize(
    "family, modes",
    [
        ("llama", [(1, True), (4, True), (3, False), (1, False)]),
        ("gemma2", [(1, True), (4, True)]),  # sliding window of 8 tokens
        ("gpt2", [(1, True), (4, True)]),
    ],
)
def test_engine_equals_plain_forwards(family, modes):
    overrides = {"sliding_window": 8} if family == "gemma2" else {}
    lm = al.wrap(*al.testing.tiny_model(family, **overrides))
    p = Sources(query=QUERY).prompt(lm, CTX, response=" Paris is the capital")
    masks = sample_masks(8, p.n_sources, 0.5, 3)
    masks[0] = True
    masks[1] = masks[2]  # a duplicate row: the whole prompt is a shared prefix
    plain = _plain_logprobs(lm, p, masks)
    for bs, reuse in modes:
        stats: dict = {}
        got = p.logprobs(masks, batch_size=bs, reuse=reuse, stats=stats)
        torch.testing.assert_close(got, plain, atol=2e-5, rtol=0)
        if reuse and bs == 1:  # the prefix-tree walk runs fewer tokens than the plain runs
            plain_tokens = sum(len(r) + len(p.response_ids) - 1 for r in p.prompt_ids(masks))
            assert stats["n_tokens"] < plain_tokens


def test_engine_chunked_long_prompt(llama):
    from attrlab.model.prefixes import PrefixRunner as _Runner
    from attrlab.units.sources import _token_logprobs

    p = Sources().prompt(llama, CTX, response=" Paris is")
    masks = sample_masks(5, p.n_sources, 0.5, 1)
    rows = p.prompt_ids(masks)
    ref = _plain_logprobs(llama, p, masks)
    runner = _Runner(llama, llama.cfg.n_ctx, chunk=7)  # forces chunked prefill
    got = torch.stack(runner.run(rows, p.response_ids, _token_logprobs(p.response_ids), 4))
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)


def test_mask_values_and_response_handling(llama):
    u = Sources(query=QUERY)
    masks = [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    v = u.bind(llama, CTX, " Paris").f(masks)[:, 0]
    p = u.prompt(llama, CTX, " Paris")
    torch.testing.assert_close(v, _plain_logprobs(llama, p, masks).sum(-1), atol=2e-5, rtol=0)
    tgt = al.targets.ContinuationLogProb(" Paris")
    torch.testing.assert_close(u.bind(llama, CTX, tgt).f(masks)[:, 0], v)
    lp = u.bind(llama, CTX, " Paris", output="logit_prob").f(masks)[:, 0]
    assert torch.allclose(lp, v - torch.log1p(-v.exp()))
    # generated response: greedy, deterministic, reused by a later bind with target=None
    g1 = Sources().prompt(llama, CTX, None, max_new_tokens=5)
    g2 = Sources().prompt(llama, CTX, None, max_new_tokens=5)
    assert g1.response_ids == g2.response_ids and 1 <= len(g1.response_ids) <= 5


def test_sampled_response_is_seeded(llama):
    a = Sources(do_sample=True, seed=7).prompt(llama, CTX, None, max_new_tokens=6)
    b = Sources(do_sample=True, seed=7).prompt(llama, CTX, None, max_new_tokens=6)
    assert a.response_ids == b.response_ids
    greedy = Sources().prompt(llama, CTX, None, max_new_tokens=6)
    draws = {
        tuple(
            Sources(do_sample=True, seed=s).prompt(llama, CTX, None, max_new_tokens=6).response_ids
        )
        for s in range(4)
    }
    assert len(draws) > 1 or tuple(greedy.response_ids) not in draws


def test_generic_lds_rebuilds_the_units(llama):
    r = al.attribute(llama, CTX, " Paris is", units="sources", method="occlusion", query=QUERY)
    s = al.evaluate.lds(llama, r, CTX, " Paris is", n_masks=12, seed=2)
    f = Sources(query=QUERY).bind(llama, CTX, " Paris is").f(s.masks)[:, 0]
    torch.testing.assert_close(s.values.double(), f.double())
    assert s.lds > 0.5  # leave-one-out is close to additive on this tiny model


def test_chat_template(llama):
    import copy

    hf, tok = al.testing.tiny_model("llama")
    tok = copy.deepcopy(tok)  # the tiny tokenizer is shared: do not change it
    tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}A:"
    lm = al.wrap(hf, tok)
    p = Sources(query="Q?").prompt(lm, CTX, " Paris")
    assert (
        p.chat
        and p.prompt_text().startswith("<u>Context: Paris")
        and p.prompt_text().endswith("A:")
    )
    with pytest.raises(al.errors.InputError, match="chat template"):
        Sources(chat_template=True).prompt(llama, CTX, " Paris")
    assert not Sources(chat_template=False).prompt(lm, CTX, " Paris").chat


# ------------------------------------------------------------------ ContextCite
def test_fit_lasso_recovers_a_linear_function():
    rng = np.random.default_rng(0)
    m = rng.random((256, 6)) < 0.5
    w_true = np.array([3.0, 0.0, -1.5, 0.0, 0.5, 0.0])
    y = m @ w_true + 2.0 + 0.01 * rng.standard_normal(256)
    w, b = fit_lasso(m, y, alpha=1e-4)
    np.testing.assert_allclose(w, w_true, atol=0.02)
    assert b == pytest.approx(2.0, abs=0.02)


def test_contextcite_is_lasso_on_plain_logprobs(llama):
    r = al.attribute(
        llama,
        CTX,
        units="sources",
        method="contextcite",
        query=QUERY,
        target=" Paris is",
        samples=24,
        seed=5,
    )
    masks = r.extra["masks"]
    assert torch.equal(masks, sample_masks(24, 5, 0.5, 5))
    p = Sources(query=QUERY).prompt(llama, CTX, " Paris is")
    per_token = _plain_logprobs(llama, p, masks)
    torch.testing.assert_close(r.extra["logprobs"], per_token, atol=2e-5, rtol=0)
    w, b = fit_lasso(masks.numpy(), reduce_logprobs(per_token, "logit_prob").numpy(), 2, 0.01)
    np.testing.assert_allclose(r.scores.numpy(), w, atol=1e-5)
    assert r.unit_kind == "sources" and r.units["text"][0] == "Paris is the capital of France."
    top = r.top(3)
    assert list(top.columns) == ["source", "text", "score"] and len(top) == 3
    # span attribution from the cache equals a fit on those tokens
    full = attribute_span(r)
    np.testing.assert_allclose(full.scores.numpy(), r.scores.numpy())
    second = attribute_span(r, 1, 2)
    w1, _ = fit_lasso(
        masks.numpy(), reduce_logprobs(per_token[:, 1:2], "logit_prob").numpy(), 1, 0.01
    )
    np.testing.assert_allclose(second.scores.numpy(), w1, atol=1e-5)
    with pytest.raises(al.errors.InputError):
        attribute_span(r, 2, 2)


def test_contextcite_result_roundtrip_and_per_token(llama, tmp_path):
    r = al.attribute(
        llama,
        CTX,
        " Paris is",
        units="sources",
        method="contextcite",
        samples=16,
        per_token=True,
    )
    assert r.scores.shape == (len(r.meta["response_ids"]), 5) and "token" in r.rows
    path = r.save(tmp_path / "cc.attr")
    back = al.Attribution.load(path)
    assert back.equals(r)
    np.testing.assert_allclose(
        attribute_span(back, 0, 1).scores.numpy(), r.scores[0].numpy(), atol=1e-9
    )


def test_contextcite_finds_a_planted_source(llama):
    """A source that repeats the response makes it (the copy) more likely."""
    ctx = "The sky is blue. Tom has a dog. Ice is cold. Kate reads books."
    resp = " Tom has a dog."
    lp = Sources().bind(llama, ctx, resp).f([[1, 1, 1, 1], [1, 0, 1, 1]])[:, 0]
    r = al.attribute(llama, ctx, resp, units="sources", method="contextcite", samples=32)
    loo = al.attribute(llama, ctx, resp, units="sources", method="occlusion")
    assert loo.scores[1] == pytest.approx(float(lp[0] - lp[1]), abs=1e-6)
    assert int(loo.scores.argmax()) == int(r.scores.argmax()) or float(lp[0] - lp[1]) < 0.1


# ------------------------------------------------------------------ baselines
def test_loo_jsd_attention_hierarchical(llama):
    p = Sources(query=QUERY).prompt(llama, CTX, " Paris is")
    plain = _plain_logprobs(llama, p, al.methods.context_baselines.loo_masks(5)).sum(-1)
    loo = al.attribute(llama, CTX, " Paris is", units="sources", method="occlusion", query=QUERY)
    np.testing.assert_allclose(loo.scores.numpy(), (plain[0] - plain[1:]).numpy(), atol=2e-5)
    jsd = al.attribute(llama, CTX, " Paris is", units="sources", method="jsd", query=QUERY)
    assert jsd.scores.shape == (5,) and bool((jsd.scores >= 0).all()) and jsd.scores.sum() > 0
    att = al.attribute(llama, CTX, " Paris is", units="sources", method="attention", query=QUERY)
    ranges = att.diagnostics["token_ranges"]
    assert all(b > a for a, b in ranges) and ranges == sorted(ranges)
    assert 0 < float(att.scores.sum()) <= 1.0 + 1e-6
    # hierarchical with branching >= n is leave-one-out
    h = al.attribute(
        llama, CTX, " Paris is", units="sources", method="hierarchical", query=QUERY, branching=8
    )
    # the two may run their masks by different strategies: float32 round-off apart
    np.testing.assert_allclose(h.scores.numpy(), loo.scores.numpy(), atol=1e-7)
    assert all(h.diagnostics["resolved"])


def test_hierarchical_many_sources_finds_the_top_loo_source():
    lm = al.wrap(*al.testing.tiny_model("llama", max_position_embeddings=4096))
    words = ["red", "blue", "cat", "dog", "sun", "tea", "box", "pen"]
    rng = np.random.default_rng(0)
    ctx = " ".join(f"{rng.choice(words)} {rng.choice(words)}." for _ in range(120))
    r = al.attribute(
        lm, ctx, " cat dog", units="sources", method="hierarchical", keep=2, branching=4
    )
    assert len(r) == 120 and r.diagnostics["n_prompts"] < 60
    best = int(np.argmax(r.scores.numpy()))
    assert r.diagnostics["resolved"][best]


# ------------------------------------------------------------------ parity with context-cite
def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_contextcite.py"
    spec = importlib.util.spec_from_file_location("bench_contextcite", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parity_with_context_cite_package():
    """Same sources, response and masks: scores equal context-cite 0.0.4's (default LASSO)."""
    import importlib.util

    if importlib.util.find_spec("context_cite") is None:  # importing it needs the shims
        pytest.skip("context-cite is not installed (pip install --no-deps context-cite==0.0.4)")
    bench = _bench_module()
    hf, _ = al.testing.tiny_model("llama", initializer_range=0.3)  # context matters more
    tok = bench.chat_tokenizer()
    gen = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    cc = bench.context_citer(
        hf, tok, CTX, QUERY, num_ablations=16, batch_size=1, generate_kwargs=gen
    )
    cc_scores = cc.get_attributions(verbose=False)
    lm = al.wrap(hf, tok)
    r = al.attribute(
        lm,
        CTX,
        cc._response_ids,
        units="sources",
        method="contextcite",
        query=QUERY,
        masks=cc._masks,
    )
    assert r.units["text"] == cc.sources
    assert r.meta["prompt"] == cc._get_prompt_ids(return_prompt=True)[1]  # same chat prompt
    assert r.meta["response"] == cc.response
    assert (np.abs(cc_scores) > 1e-3).sum() >= 3  # not a trivial all-zero comparison
    np.testing.assert_allclose(r.scores.numpy(), cc_scores, atol=1e-4, rtol=0)
    # a span of the response, from the cached log-probs on both sides
    span_cc = cc._get_attributions_for_ids_range(1, 4)[0]
    np.testing.assert_allclose(attribute_span(r, 1, 4).scores.numpy(), span_cc, atol=1e-4, rtol=0)
    # a generated response is the model's greedy continuation of the same prompt (context-cite
    # re-tokenizes the decoded text, which can change ids of broken UTF-8 bytes)
    ours = Sources(query=QUERY).prompt(lm, CTX, None, max_new_tokens=6)
    ids = torch.tensor([cc._get_prompt_ids()])
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), **gen, pad_token_id=0)[0]
    n = len(ours.response_ids)
    assert n >= 1 and ours.response_ids == ref[ids.shape[1] : ids.shape[1] + n].tolist()


# ------------------------------------------------------------------ the zoo context_qa task
N_ZOO = 200


@pytest.fixture(scope="module")
def zoo_qa():
    if "context_qa" not in al.zoo.tasks():
        pytest.skip(
            "the zoo context_qa model is not bundled (python -m attrlab.zoo.train context_qa)"
        )
    return al.zoo.load("context_qa"), al.zoo.task("context_qa").examples(N_ZOO, seed=0)


def test_zoo_top1_source_is_gold(zoo_qa):
    """ContextCite (64 ablations) and leave-one-out put the gold document first."""
    lm, examples = zoo_qa
    hits = {"contextcite": 0, "occlusion": 0}
    for ex in examples:
        units = Sources(sources=ex.sources)
        for method, kw in (("contextcite", {"samples": 64}), ("occlusion", {})):
            r = al.attribute(
                lm, ex.prompt, ex.answer, units=units, method=method, batch_size=64, **kw
            )
            hits[method] += int(r.top(1, by="pos")["source"][0] == ex.gold)
    acc = {k: v / len(examples) for k, v in hits.items()}
    print(f"\nzoo context_qa top-1 == gold over {len(examples)} prompts: {acc}")
    assert acc["contextcite"] >= 0.95 and acc["occlusion"] >= 0.95


@pytest.mark.slow
def test_zoo_top1_attntrace_and_tracllm(zoo_qa):
    """AttnTrace (paper defaults: K=5, ratio 0.4, 30 subsamples) and TracLLM (K=2 so
    that the search prunes among the 5 documents; 20 permutations) put the gold
    document first on >= 95% of 200 prompts; their cost is printed beside ContextCite's."""
    lm, examples = zoo_qa
    runs = {
        "attntrace": {},
        "tracllm": {"top_k": 2},
        "contextcite": {"samples": 64},
    }
    hits = dict.fromkeys(runs, 0)
    prompts = dict.fromkeys(runs, 0)
    forwards = dict.fromkeys(runs, 0)
    for j, ex in enumerate(examples):
        units = Sources(sources=ex.sources)
        for method, kw in runs.items():
            if method == "contextcite" and j >= 50:  # its cost only (its accuracy: above)
                continue
            r = al.attribute(lm, ex.prompt, ex.answer, units=units, method=method,
                             batch_size=64, **kw)  # fmt: skip
            hits[method] += int(r.top(1, by="pos")["source"][0] == ex.gold)
            prompts[method] += r.diagnostics["n_prompts"]
            forwards[method] += r.diagnostics["n_forwards"]
    n = {m: (len(examples) if m != "contextcite" else min(50, len(examples))) for m in runs}
    acc = {m: hits[m] / n[m] for m in runs}
    cost = {m: (round(prompts[m] / n[m], 1), round(forwards[m] / n[m], 1)) for m in runs}
    print(f"\nzoo context_qa top-1 == gold: {acc}; (distinct prompts, forwards) per "
          f"attribution: {cost}")  # fmt: skip
    assert acc["attntrace"] >= 0.95 and acc["tracllm"] >= 0.95


def test_zoo_lds_and_topk_drop(zoo_qa):
    """Held-out LDS of ContextCite through al.evaluate.lds, and the top-1 removal drop."""
    lm, examples = zoo_qa
    lds, drop_top, drop_other = [], [], []
    for ex in examples[:100]:
        r = al.attribute(
            lm,
            ex.prompt,
            ex.answer,
            units=Sources(sources=ex.sources),
            method="contextcite",
            samples=64,
            batch_size=64,
        )
        s = al.evaluate.lds(lm, r, ex.prompt, ex.answer, n_masks=64, seed=1)
        if not np.isnan(s.lds):
            lds.append(s.lds)
        c = al.evaluate.deletion_curve(lm, r, ex.prompt, ex.answer)
        drop_top.append(c.values[0] - c.values[1])
        last = c.order[-1]  # the lowest-scored source, for comparison
        keep = torch.ones(1, len(ex.sources), dtype=torch.bool)
        keep[0, last] = False
        f_last = Sources(sources=ex.sources).bind(lm, ex.prompt, ex.answer).f(keep)[:, 0]
        drop_other.append(c.values[0] - float(f_last[0]))
    print(
        f"\nzoo context_qa, ContextCite n=64, {len(lds)} prompts: mean held-out LDS "
        f"{np.mean(lds):.3f}; top-1 removal drop {np.mean(drop_top):.2f} nats "
        f"(lowest-scored source: {np.mean(drop_other):.2f})"
    )
    assert np.mean(lds) > 0.5
    assert np.mean(drop_top) > 1.0 + np.mean(drop_other)


def test_generated_response_is_reused_only_for_the_same_request(llama):
    """One Sources object reuses its generated response for the same context and
    length, and generates again for another length."""
    u = Sources()
    a = u.prompt(llama, CTX, None, max_new_tokens=5)
    assert u.prompt(llama, CTX, None, max_new_tokens=5) is a
    b = u.prompt(llama, CTX, None, max_new_tokens=2)
    assert b is not a and len(b.response_ids) <= 2
