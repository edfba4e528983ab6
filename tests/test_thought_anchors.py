"""Thought Anchors over trace sentences: definitions pinned on hand-built cases
and brute-force oracles, seeds, typed errors, and the bundled reasoning model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import attrlab as al
from attrlab.methods.thought_anchors import (
    _kurtosis,
    answer_kl,
    conditioned_probs,
    dependency_graph,
    suppression_mask,
    suppression_matrix,
    vertical_scores,
)
from attrlab.zoo.reasoning import anchor_metrics, auroc, suppression_auroc

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm():
    return al.zoo.load("reasoning")


@pytest.fixture(scope="module")
def ex():
    return al.zoo.task("reasoning").examples(3, seed=0)[2]


# ------------------------------------------------------------- definitions
def test_answer_kl_is_smoothed_kl_by_hand():
    a, b = ["7"] * 3 + ["2"], ["7"] * 4
    # support {2, 7}; smoothing 1: p = (2/6, 4/6), q = (1/6, 5/6)
    p, q = [2 / 6, 4 / 6], [1 / 6, 5 / 6]
    want = sum(x * math.log(x / y) for x, y in zip(p, q))
    assert answer_kl(a, b) == pytest.approx(want, abs=1e-12)
    assert answer_kl(b, b) == 0.0
    assert answer_kl(["1"], ["2"], smoothing=0.0) == math.inf
    with pytest.raises(al.errors.InputError):
        answer_kl([], ["1"])


def test_conditioned_sampling_equals_brute_force_conditioning():
    """Sequential sampling with conditioned_probs gives exactly p(s | s != original)
    over every 2-token sentence of a hand-built 3-token model."""
    torch.manual_seed(0)
    p0 = torch.softmax(torch.randn(3), 0).double()  # p(a)
    p1 = torch.softmax(torch.randn(3, 3), -1).double()  # p(b | a)
    o = (1, 2)
    q1 = float(p1[o[0], o[1]])
    q0 = float(p0[o[0]]) * q1
    first = conditioned_probs(p0.log(), o[0], math.log(q0), math.log(q1))
    for a, b in itertools.product(range(3), range(3)):
        second = conditioned_probs(p1[a].log(), o[1], math.log(q1), 0.0) if a == o[0] else p1[a]
        got = float(first[a] * second[b])
        want = 0.0 if (a, b) == o else float(p0[a] * p1[a, b]) / (1 - q0)
        assert got == pytest.approx(want, abs=1e-12)


def test_conditioned_probs_refuses_a_certain_sentence():
    with pytest.raises(al.errors.InputError, match="temperature"):
        conditioned_probs(torch.tensor([0.0, -math.inf]), 0, 0.0, 0.0)


def test_suppression_equals_deleting_the_sentence_with_positions_kept(lm, ex):
    """Masking later attention to sentence i == running without sentence i's
    tokens at their original positions: an independent oracle of M[j, i]."""
    view = al.units.Trace().prepare(lm, ex.prompt)
    m = suppression_matrix(lm, view)
    ids = torch.tensor(view.ids)
    with torch.no_grad():
        base = lm.hf_forward(ids[None])[0][0].double().log_softmax(-1)
        for i, (a, b) in enumerate(view.spans):
            keep = torch.cat([torch.arange(a), torch.arange(b, len(ids))])
            causal = suppression_mask(len(keep), (0, 0))[None, None]  # plain causal, 4-D
            # (an explicit mask: a jump in position ids would otherwise read as packed sequences)
            out = lm.hf_forward(ids[keep][None], attention_mask=causal, position_ids=keep[None])[0][
                0
            ]
            lp = out.double().log_softmax(-1)
            for j in range(i + 1, view.n):
                c, d = view.spans[j]
                # the distributions j's tokens are predicted from: outputs at c-1 .. d-2
                # (a position inside sentence i still sees it: unchanged)
                sup = torch.stack(
                    [
                        base[t] if a <= t < b else lp[int((keep == t).nonzero())]
                        for t in range(c - 1, d - 1)
                    ]
                )
                want = base[c - 1 : d - 1]
                kl = (want.exp() * (want - sup)).sum(-1).mean()
                assert float(m[j, i]) == pytest.approx(float(kl), rel=1e-4, abs=1e-7)
    assert bool((m.triu() == 0).all())


def test_suppression_mask_by_hand():
    m = suppression_mask(5, (1, 3))
    allowed = (m == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 0, 0, 1, 0],
        [1, 0, 0, 1, 1],
    ]


def test_vertical_scores_and_kurtosis_by_hand():
    a = torch.zeros(6, 6)
    a[2:4, 0:2] = 0.5  # sentence 1 (tokens 2-3) attends to sentence 0 (tokens 0-1)
    a[4:6, 2:4] = 0.25
    spans = [(0, 2), (2, 4), (4, 6)]
    v = vertical_scores(a, spans)
    # sentence 0: mean over j=1,2 of (0.5, 0) ; sentence 1: j=2 -> 0.25 ; sentence 2: none
    assert v[:2].tolist() == [0.25, 0.25] and math.isnan(float(v[2]))
    assert vertical_scores(a, spans, min_distance=2)[0].item() == 0.0
    scipy = pytest.importorskip("scipy.stats")
    x = torch.tensor([[1.0, 2.0, 9.0, 1.5, float("nan")]])
    assert float(_kurtosis(x)[0]) == pytest.approx(float(scipy.kurtosis([1.0, 2.0, 9.0, 1.5])))


def test_receiver_heads_pick_the_highest_kurtosis(lm, ex):
    r = al.attribute(lm, ex.prompt, units="trace", method="receiver-heads", top_k=2)
    kurt = torch.tensor(
        [[(-1e9 if v is None else v) for v in row] for row in r.diagnostics["kurtosis"]]
    )
    best = kurt.flatten().argsort(descending=True)[:2].tolist()
    H = lm.cfg.n_heads
    assert r.diagnostics["receiver_heads"] == [[b // H, b % H] for b in best]
    vert = r.extra["vertical_scores"]
    want = torch.stack([vert[a, b] for a, b in r.diagnostics["receiver_heads"]]).mean(0)
    assert torch.allclose(r.scores, want.double())
    given = al.attribute(lm, ex.prompt, units="trace", method="receiver-heads", heads=[(0, 1)])
    assert torch.allclose(given.scores, vert[0, 1].double())


# ------------------------------------------------------------- resampling
def test_rollouts_are_seeded_and_independent_of_batching(lm, ex):
    from attrlab.methods.thought_anchors import _Sampler

    view = al.units.Trace().prepare(lm, ex.prompt)
    a, b = view.spans[2]
    batched = _Sampler(lm, view, 1.0, 96, True)
    single = _Sampler(lm, view, 1.0, 96, False)
    seeds = [11, 12, 13, 14]
    one = batched.run(a, seeds, (a, b), 4)
    assert one == single.run(a, seeds, (a, b), 1)  # same tokens, one by one, no reuse
    assert batched.tokens < single.tokens  # the prefix is not recomputed
    assert one != batched.run(a, [21, 22, 23, 24], (a, b), 4)


def test_resampling_scores_are_the_kl_of_its_answer_counts(lm, ex):
    kw = dict(units="trace", method="resampling", rollouts=3, seed=3, progress=False)
    r = al.attribute(lm, ex.prompt, **kw)
    again = al.attribute(lm, ex.prompt, **kw)
    assert torch.equal(r.scores, again.scores)
    assert r.diagnostics["resampled_answers"] == again.diagnostics["resampled_answers"]
    res, kept = r.diagnostics["resampled_answers"], r.diagnostics["kept_answers"]
    for i in range(len(r)):
        want = answer_kl(list(Counter_elements(res[i])), list(Counter_elements(kept[i])))
        assert r.scores[i].item() == pytest.approx(want, abs=1e-12)
    # the answer sentence itself: every resample names another answer
    assert ex.steps[-1] not in res[-1]


def Counter_elements(d):
    for k, v in d.items():
        yield from [k] * v


def test_resampled_sentences_differ_from_the_original(lm, ex):
    from attrlab.methods.thought_anchors import _Sampler

    view = al.units.Trace().prepare(lm, ex.prompt)
    s = _Sampler(lm, view, 1.0, 96, True)
    a, b = view.spans[1]
    outs = s.run(a, list(range(12)), (a, b), 12)
    orig = view.ids[a:b]
    assert all(t[: b - a] != orig for t, _ in outs)
    free = s.run(a, list(range(12)), None, 12)
    assert sum(t[: b - a] == orig for t, _ in free) >= 6  # the model mostly repeats it


def test_result_round_trips_and_reports_the_graph(lm, ex, tmp_path):
    r = al.attribute(lm, ex.prompt, units="trace", method="attention-suppression")
    assert r.rows["sentence"] == list(range(len(ex.steps))) and r.units["text"] == ex.steps
    r.save(tmp_path / "m.safetensors")
    back = al.Attribution.load(tmp_path / "m.safetensors")
    assert torch.equal(back.scores, r.scores) and back.unit_kind == "trace"
    g = dependency_graph(r, k=4)
    assert g.n_edges == 4 and all(w >= 0 for w in g.edges["weight"])
    r.units["text"][0] = "<b>&x"
    from attrlab.report import Report

    html = Report().add(r).to_html()
    assert "<svg" in html and "&lt;b&gt;&amp;x" in html and "<b>&x" not in html


# ------------------------------------------------------------------ errors
def test_typed_errors(lm, ex):
    E = al.errors
    with pytest.raises(E.InputError, match="rollouts"):
        al.attribute(lm, ex.prompt, units="trace", method="resampling", rollouts=0)
    with pytest.raises(E.InputError, match="regular expression"):
        al.attribute(lm, ex.prompt, units="trace", method="resampling", answer="(")
    with pytest.raises(E.UnknownMethodError):
        al.attribute(lm, ex.prompt, units="tokens", method="attention-suppression")
    with pytest.raises(E.IndexRangeError):
        al.attribute(lm, ex.prompt, units="trace", method="receiver-heads", heads=[(9, 0)])
    with pytest.raises(E.InputError, match="max_new_tokens"):
        al.units.Trace(max_new_tokens=0)
    with pytest.raises(E.InputError, match="no sentence"):
        al.attribute(lm, ex.prompt, units=al.units.Trace(trace=""), method="attention-suppression")
    with pytest.raises(E.InputError, match="one text prompt"):
        al.attribute(lm, [ex.prompt, ex.prompt], units="trace", method="attention-suppression")


def test_suppression_refuses_a_model_without_4d_masks():
    lm = al.wrap(*al.testing.tiny_model("bloom"))
    units = al.units.Trace(trace=" The cat sat. It slept.")
    with pytest.raises(al.errors.UnsupportedArchitectureError, match="4-D attention mask"):
        al.attribute(lm, "Paris is a city.", units=units, method="attention-suppression")


def test_auroc_by_hand():
    assert auroc([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0
    assert auroc([0, 1], [1, 0]) == 0.0
    assert math.isnan(auroc([1, 2], [1, 1]))


# ------------------------------------------------------- the bundled model
def test_bundled_model_meets_the_acceptance_floors_on_a_subset(lm):
    """A fast subset of the acceptance run (docs/reasoning.md): resampling on 4
    held-out prompts (few rollouts), attention suppression on 40."""
    task = al.zoo.task("reasoning")
    m = anchor_metrics(lm, task.examples(4, seed=1), rollouts=6, progress=False)
    assert m["evaluated"] == 4
    assert m["top_is_dependency"] >= 0.9
    assert m["distractors_below"] >= 0.75
    a = suppression_auroc(lm, task.examples(40, seed=2))
    assert a["evaluated"] >= 38 and a["auroc_pooled"] >= 0.9


@pytest.mark.parametrize("temperature,log_kl,positions", [(0.6, True, "at"), (2.0, False, "at"),
                                                          (1.0, True, "tokens")])  # fmt: skip
def test_suppression_options_match_the_deletion_oracle(lm, ex, temperature, log_kl, positions):
    """The paper's variant (temperature 0.6, mean log-KL, outputs at S_j's own
    positions) against the same independent oracle: deleting S_i's tokens."""
    view = al.units.Trace().prepare(lm, ex.prompt)
    m = suppression_matrix(lm, view, None, temperature, log_kl, positions)
    ids = torch.tensor(view.ids)
    shift = 1 if positions == "tokens" else 0
    with torch.no_grad():
        base = (lm.hf_forward(ids[None])[0][0].double() / temperature).log_softmax(-1)
        for i in (0, 2):
            a, b = view.spans[i]
            keep = torch.cat([torch.arange(a), torch.arange(b, len(ids))])
            causal = suppression_mask(len(keep), (0, 0))[None, None]
            out = lm.hf_forward(ids[keep][None], attention_mask=causal, position_ids=keep[None])
            lp = (out[0][0].double() / temperature).log_softmax(-1)
            for j in range(i + 1, view.n):
                c, d = view.spans[j]
                ts = range(c - shift, d - shift)
                # a position inside sentence i still sees it: unchanged
                sup = torch.stack(
                    [base[t] if a <= t < b else lp[int((keep == t).nonzero())] for t in ts]
                )
                want = base[c - shift : d - shift]
                kl = (want.exp() * (want - sup)).sum(-1).clamp(min=0)
                ref = (kl + 1e-9).log() - math.log(1e-9) if log_kl else kl  # the paper: log(KL+eps)
                assert float(m[j, i]) == pytest.approx(float(ref.mean()), rel=1e-4, abs=1e-6)
    with pytest.raises(al.errors.InputError, match="positions"):
        al.attribute(lm, ex.prompt, units="trace", method="attention-suppression", positions="of")


def test_similarity_filter_splits_resamples_as_the_paper_does(lm, ex):
    """A similarity that calls every resample dissimilar is free resampling
    (different=False); one that calls every resample similar moves them all
    to the kept side and scores 0."""
    kw = dict(units="trace", method="resampling", rollouts=3, seed=5, progress=False)
    free = al.attribute(lm, ex.prompt, different=False, **kw)
    seen = []

    def never_similar(a, b):
        seen.append((a, b))
        return 0.0

    apart = al.attribute(lm, ex.prompt, similarity=never_similar, **kw)
    assert torch.equal(apart.scores, free.scores)
    assert apart.diagnostics["resampled_answers"] == free.diagnostics["resampled_answers"]
    assert apart.diagnostics["dissimilar"] == [3] * len(ex.steps)
    view = al.units.Trace().prepare(lm, ex.prompt)
    assert {b for _, b in seen} == set(view.texts)  # compared with the original sentence
    assert all(a.strip() and a == a.strip() for a, _ in seen)  # a sentence, not the rollout
    same = al.attribute(lm, ex.prompt, similarity=lambda a, b: 1.0, **kw)
    assert bool((same.scores == 0).all())
    assert all(sum(k.values()) == 6 for k in same.diagnostics["kept_answers"])
    assert same.params["similarity"].endswith("<lambda>")  # JSON-able
    with pytest.raises(al.errors.InputError, match="similarity"):
        al.attribute(lm, ex.prompt, similarity="cosine", **kw)
    with pytest.raises(al.errors.InputError, match="threshold"):
        al.attribute(lm, ex.prompt, similarity=never_similar, threshold=float("nan"), **kw)
    with pytest.raises(al.errors.NonFiniteError):
        al.attribute(lm, ex.prompt, similarity=lambda a, b: float("nan"), **kw)
