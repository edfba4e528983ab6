"""AttnTrace and TracLLM (methods/context_traceback.py) against their papers'
definitions on hand-constructed cases, and the long-context guards of the
sources kind."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import attrlab as al
from attrlab.errors import ContextTooLongError, InputError
from attrlab.methods.context_traceback import (
    subsample_masks,
    topk_mean,
    tracllm_ensemble,
    tracllm_search,
)
from attrlab.model.long_context import attention_prefill_chunk
from attrlab.units import Sources

CTX = (
    "Paris is the capital of France. Bob likes green tea. The Nile is long. "
    "Berlin is in Germany. Cats sleep a lot. Rome has many old buildings."
)


@pytest.fixture(scope="module")
def llama():
    return al.wrap(*al.testing.tiny_model("llama"))


# ------------------------------------------------------------------ AttnTrace
def test_topk_mean_by_hand():
    a = torch.tensor([0.1, 0.5, 0.2, 0.3, 0.3, 0.0, 0.9, 0.4], dtype=torch.float64)
    # K=2: source 0 -> (0.5 + 0.2) / 2; source 1 -> (0.9 + 0.3) / 2; a 1-token source: itself;
    # a removed / empty source: 0
    got = topk_mean(a, [(0, 3), (3, 7), (7, 8), None, (2, 2)], 2)
    assert got.tolist() == pytest.approx([0.35, 0.6, 0.4, 0.0, 0.0])


def test_subsample_masks_keep_the_ratio_and_are_seeded():
    m = subsample_masks(10, 0.4, 50, seed=3)
    assert (m.sum(1) == 4).all()
    assert torch.equal(m, subsample_masks(10, 0.4, 50, seed=3))
    assert not torch.equal(m, subsample_masks(10, 0.4, 50, seed=4))
    assert (subsample_masks(3, 0.1, 5, seed=0).sum(1) == 1).all()  # at least one source


def _plain_attention(lm, ids, n_resp):
    """Oracle: one plain full forward caching every layer's full attention pattern;
    the weights of the queries that predict the response, averaged over layers, heads
    and queries ([len(ids) - 1])."""
    sites = [f"blocks.{la}.attn.pattern" for la in range(lm.cfg.n_layers)]
    _, cache = lm.run(torch.tensor([ids]), cache=sites)
    p = len(ids) - n_resp
    acc = torch.zeros(len(ids), dtype=torch.float64)
    for s in sites:
        acc += cache[s][0].double()[:, p - 1 : p - 1 + n_resp].mean((0, 1))
    return (acc / len(sites))[: len(ids) - 1]


def test_attntrace_full_context_is_topk_attention(llama):
    """ratio=1, subsamples=1: the top-K mean of the response's attention averaged over
    layers, heads and response tokens, from a plain forward (the method prefills
    in chunks of 16 tokens with a KV cache)."""
    units = Sources()
    resp = " Paris is nice"
    r = al.attribute(llama, CTX, resp, units=units, method="attntrace", ratio=1.0,
                     subsamples=1, top_k=3, memory_budget=1)  # fmt: skip
    assert r.diagnostics["prefill_chunk"] == 16
    prompt = units.prompt(llama, CTX, resp)
    ids, ranges = prompt.token_ranges(None)
    att = _plain_attention(llama, ids + prompt.response_ids, len(prompt.response_ids))
    assert len(ids) > 32  # several prefill chunks
    want = topk_mean(att, ranges, 3)
    torch.testing.assert_close(r.scores.double(), want, rtol=1e-4, atol=1e-7)


def test_attntrace_subsampling_averages_over_presence(llama):
    """Each subsample's scores come from the prompt with only its sources; a source's
    score is their mean over the subsamples that kept it."""
    units = Sources()
    resp = " Paris"
    r = al.attribute(llama, CTX, resp, units=units, method="attntrace", ratio=0.5,
                     subsamples=7, top_k=2, seed=5)  # fmt: skip
    prompt = units.prompt(llama, CTX, resp)
    n = prompt.n_sources
    masks = subsample_masks(n, 0.5, 7, seed=5)
    assert torch.equal(r.extra["subsample_masks"], masks)
    assert "logprobs" not in r.extra  # no forwards beyond the subsamples
    total, seen = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for m in masks:
        ids, ranges = prompt.token_ranges(m)
        att = _plain_attention(llama, ids + prompt.response_ids, len(prompt.response_ids))
        total += topk_mean(att, ranges, 2)
        seen += m.double()
    want = torch.where(seen > 0, total / seen.clamp(min=1), torch.zeros(n, dtype=torch.float64))
    torch.testing.assert_close(r.scores.double(), want, rtol=1e-4, atol=1e-7)
    assert r.diagnostics["times_kept"] == seen.long().tolist()


def test_attntrace_bad_options(llama):
    for kw in ({"ratio": 0.0}, {"ratio": 1.5}, {"top_k": 0}, {"subsamples": 0}, {"layers": [9]}):
        with pytest.raises(al.errors.AttrlabError):
            al.attribute(llama, CTX, " Paris", units="sources", method="attntrace", **kw)


# ------------------------------------------------------------------ TracLLM
def _additive(w):
    w = torch.as_tensor(w, dtype=torch.float64)
    return lambda keep: keep.double() @ w


W16 = [0.1, 0.1, 0.1, 5.0, 0.1, 0.1, 0.1, -1.0, 0.1, 0.1, 0.1, 0.1, 2.0, 0.1, 0.1, 0.1]


@pytest.mark.parametrize("func", ["stc", "loo", "shapley", "denoised_shapley"])
def test_tracllm_search_additive_by_hand(func):
    """Additive f: every score function gives a group its sum of weights. With K=2
    over 16 sources: level 1 makes 2 halves (<= K, not scored); level 2 scores the
    quarters 5.3, -0.7, 0.4, 2.3 -> keeps [0-3], [12-15]; level 3 scores [0,1] 0.2,
    [2,3] 5.1, [12,13] 2.1, [14,15] 0.2 -> keeps [2,3], [12,13]; level 4 scores the
    singles 0.1, 5, 2, 0.1 -> keeps 3 and 12."""
    kept, scores, levels = tracllm_search(_additive(W16), 16, top_k=2, func=func, permutations=3)
    assert kept == [3, 12] and levels == 4
    assert scores.tolist() == pytest.approx([5.0, 2.0])


def _redundant(keep):
    """The response is explained by source 2 or source 9 (either suffices)."""
    return (keep[:, 2] | keep[:, 9]).double()


def test_tracllm_scores_in_the_pruned_context_by_hand():
    """Two redundant sources (2 and 9), K=2, 16 sources.

    LOO: the quarters all score 0 (the other copy stays), ties keep the first two,
    [0-3] and [4-7]: source 9 is pruned, so at level 3 removing [2,3] now costs 1 ->
    keeps [0,1], [2,3]; level 4: 0, 0, 1, 0 -> keeps 2 (score 1) and 0 (score 0).
    STC: a group alone scores 1 iff it holds 2 or 9 -> keeps 2 and 9 (1 each).
    Denoised Shapley: a group's marginal is 1 when it comes before the other copy's
    group (half the permutations), so the mean of its top 20% is 1 -> 2 and 9 (1 each);
    plain Shapley averages to about 1/2.
    Ensemble (LOO weight 2): source 2 -> 2, source 9 -> 1, source 0 -> 0 (kept by LOO).
    """
    kept, s, _ = tracllm_search(_redundant, 16, top_k=2, func="loo")
    assert kept == [0, 2] and s.tolist() == [0.0, 1.0]
    kept, s, _ = tracllm_search(_redundant, 16, top_k=2, func="stc")
    assert kept == [2, 9] and s.tolist() == [1.0, 1.0]
    kept, s, _ = tracllm_search(_redundant, 16, top_k=2, func="denoised_shapley", seed=1)
    assert kept == [2, 9] and s.tolist() == [1.0, 1.0]
    _, s, _ = tracllm_search(_redundant, 16, top_k=2, func="shapley", permutations=400, seed=1)
    assert s.tolist() == pytest.approx([0.5, 0.5], abs=0.1)
    scores, selected, per_func, _ = tracllm_ensemble(_redundant, 16, top_k=2, seed=1)
    assert np.flatnonzero(selected).tolist() == [0, 2, 9]
    assert scores[[0, 2, 9]].tolist() == [0.0, 2.0, 1.0]
    assert scores.sum() == 3.0  # the others score 0
    assert per_func["loo"][2] == 1.0 and per_func["stc"][0] is None


def test_tracllm_method_is_the_ensemble_on_the_sources_f(llama):
    """The registered method runs tracllm_ensemble on the response's log-probability."""
    ctx = " ".join(f"Fact {i} is here." for i in range(9))
    kw = dict(top_k=2, permutations=3, seed=4)
    r = al.attribute(llama, ctx, " Fact 3", units="sources", method="tracllm", **kw)
    b = Sources().bind(llama, ctx, " Fact 3")
    want, selected, _, _ = tracllm_ensemble(
        lambda k: b.f(k)[:, 0], b.n, kw["top_k"], permutations=kw["permutations"], seed=kw["seed"]
    )
    torch.testing.assert_close(r.scores.double(), torch.from_numpy(want), rtol=1e-5, atol=1e-6)
    assert r.diagnostics["selected"] == selected
    assert r.diagnostics["n_prompts"] > 0 and r.diagnostics["n_forwards"] > 0


def test_tracllm_bad_options(llama):
    for kw in ({"score_funcs": ("bogus",)}, {"score_funcs": ()}, {"beta": 0.0},
               {"permutations": 0}, {"top_k": 0}):  # fmt: skip
        with pytest.raises(InputError):
            al.attribute(llama, CTX, " Paris", units="sources", method="tracllm", **kw)


# ------------------------------------------------------------------ long contexts
def test_prefill_chunk_follows_the_budget(llama):
    assert attention_prefill_chunk(llama, 16_000, "1GB") > attention_prefill_chunk(
        llama, 16_000, "64MB"
    )
    assert attention_prefill_chunk(llama, 16_000, 1) == 16


@pytest.mark.parametrize("given", [False, True])
def test_ten_thousand_sources_fail_fast(llama, given):
    """10,000 sources on a 128-position model: a typed error before any batch is
    built, in well under 2 s and without growing memory by 1 GB."""
    from attrlab.model.budget import peak_rss_growth

    texts = [f"Fact {i} holds." for i in range(10_000)]
    ctx = " ".join(texts)
    units = Sources(sources=texts) if given else Sources()

    def run():
        t0 = time.perf_counter()
        with pytest.raises(ContextTooLongError):
            al.attribute(llama, ctx, " Fact", units=units, method="contextcite")
        return time.perf_counter() - t0

    seconds, grew = peak_rss_growth(run)
    assert seconds < 2.0
    assert grew is None or grew < 2**30


def test_tracllm_and_hierarchical_are_estimators_on_every_f_kind():
    """Written against f only: over heads, TracLLM's leave-one-out (K >= n) and a
    fully refined hierarchical search equal occlusion; several target rows are
    refused with a typed error before any evaluation."""
    lm = al.wrap(*al.testing.tiny_model("gpt2"))
    prompt = "When Mary and John went"
    occ = al.attribute(lm, prompt, " Mary", units="heads", method="occlusion")
    n = len(occ)
    tr = al.attribute(lm, prompt, " Mary", units="heads", method="tracllm",
                      score_funcs=("loo",), loo_weight=1.0, top_k=n)  # fmt: skip
    hi = al.attribute(lm, prompt, " Mary", units="heads", method="hierarchical",
                      branching=2, keep=n)  # fmt: skip
    torch.testing.assert_close(tr.scores.double(), occ.scores.double(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(hi.scores.double(), occ.scores.double(), atol=1e-5, rtol=1e-4)
    assert tr.unit_kind == "heads" and tr.units == occ.units
    cont = al.targets.ContinuationLogProb(" Mary and", reduce="none")
    with pytest.raises(al.errors.InputError, match="one target value"):
        al.attribute(lm, prompt, cont, units="tokens", method="tracllm")
