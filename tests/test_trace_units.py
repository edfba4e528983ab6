"""``units="trace"`` under the core contract: ``f(keep)`` is the answer's
log-probability with only the kept reasoning steps in the trace, so every
estimator that needs ``f`` runs over reasoning steps."""

from __future__ import annotations

import pytest
import torch

import attrlab as al
from attrlab.methods.base import all_methods
from attrlab.model.attention_masks import suppression_mask
from attrlab.testing import plain_response_logprobs
from attrlab.units.base import all_masks


@pytest.fixture(scope="module")
def zoo():
    lm = al.zoo.load("reasoning")
    ex = al.zoo.task("reasoning").examples(3, seed=0, split="test")[1]
    return lm, ex, al.units.Trace().bind(lm, ex.prompt)


def test_the_full_trace_is_the_generated_tokens(zoo):
    lm, ex, b = zoo
    assert b.prompt.prompt_ids()[0] + b.prompt.response_ids == b.view.ids
    assert b.n == b.view.n - 1 and b.prompt.response.strip() == b.view.texts[-1]
    assert b.labels()["text"] == b.view.texts[:-1]
    assert b.labels()["start"] == [a for a, _ in b.view.spans[:-1]]


def test_f_equals_plain_forwards_on_every_mask(zoo):
    """The oracle: one plain forward of prompt + kept steps + answer per mask."""
    lm, ex, b = zoo
    masks = all_masks(b.n)
    ref = plain_response_logprobs(lm, b.prompt, masks).sum(-1)
    got = b.f(masks)[:, 0]
    assert torch.allclose(got, ref, atol=1e-4), float((got - ref).abs().max())
    # a removed step is gone from the text the model reads, the others stay in order
    drop = torch.ones(b.n, dtype=torch.bool)
    drop[1] = False
    text = b.prompt.prompt_text(drop)
    assert b.view.texts[1] not in text and b.view.texts[2] in text and text.startswith(ex.prompt)


def test_a_given_target_is_read_after_the_whole_trace():
    lm = al.wrap(*al.testing.tiny_model("gpt2"))
    # braces in the prompt are text, not template fields
    u = al.units.Trace(trace=" a b. c a. b c.")
    b = u.bind(lm, "x {y} z", " a")
    assert b.n == 3 and b.prompt.response == " a"
    masks = all_masks(3)
    ref = plain_response_logprobs(lm, b.prompt, masks).sum(-1)
    assert torch.allclose(b.f(masks)[:, 0], ref, atol=1e-5)
    assert b.prompt.prompt_text(torch.ones(3, dtype=torch.bool)) == "x {y} z a b. c a. b c."


def test_too_few_sentences_and_bad_options_are_typed_errors():
    lm = al.wrap(*al.testing.tiny_model("gpt2"))
    with pytest.raises(al.errors.InputError, match="no step is left"):
        al.units.Trace(trace=" a b.").bind(lm, "x y")
    with pytest.raises(al.errors.InputError, match="output"):
        al.units.Trace(output="probability")
    with pytest.raises(al.errors.InputError, match="batch_size"):
        al.units.Trace(trace=" a. b.").bind(lm, "x", batch_size=0)
    with pytest.raises(al.errors.UnsupportedAblationError):
        al.attribute(lm, "x", units=al.units.Trace(trace=" a. b."), method="occlusion",
                     ablation="zero")  # fmt: skip


def test_f_estimators_are_available_and_gradients_are_not():
    table = all_methods()
    for m in ("occlusion", "shapley", "shapley-exact", "kernelshap", "lime", "contextcite"):
        assert "trace" in table[m], m
    for m in ("ig", "input-x-gradient", "atp"):
        assert "trace" not in table[m], m


def test_occlusion_over_steps_is_the_drop_without_each_step(zoo):
    lm, ex, b = zoo
    r = al.attribute(lm, ex.prompt, units="trace", method="occlusion")
    keep = ~torch.eye(b.n, dtype=torch.bool)
    want = b.clean()[0] - b.f(keep)[:, 0]
    assert torch.allclose(r.scores.double(), want.double(), atol=1e-5)
    assert r.unit_kind == "trace" and r.units["text"] == b.view.texts[:-1]
    assert r.meta["answer"].strip() == ex.steps[-1]
    # one question, one evaluation: LDS over the same f
    lds = float(al.evaluate.lds(lm, r, ex.prompt, None, units="trace", n_masks=24))
    assert -1.0 <= lds <= 1.0


def test_exact_shapley_over_steps_sums_to_the_full_minus_empty(zoo):
    lm, ex, b = zoo
    r = al.attribute(lm, ex.prompt, units="trace", method="shapley-exact")
    total = float(b.clean()[0] - b.empty()[0])
    assert float(r.scores.double().sum()) == pytest.approx(total, abs=1e-4)


def test_suppress_ablation_equals_deleting_the_steps_with_positions_kept(zoo):
    """ablation='suppress': the dropped steps stay in the text, no later position
    reads them. Oracle: the run without their tokens, every other token at its
    own position id (a causal 4-D mask), reads the same answer log-probability,
    while the step just before the answer is kept (its last position predicts
    the answer's first token; dropped, it still does from its own residual)."""
    lm, ex, _ = zoo
    b = al.units.Trace().bind(lm, ex.prompt, ablation=al.ablations.Suppress())
    n = b.n
    rows = [[1] * n, [0] + [1] * (n - 1), [1, 0, 1, 0] + [1] * (n - 4), [0] * (n - 1) + [1]]
    masks = torch.tensor(rows, dtype=torch.bool)
    got = b.f(masks)[:, 0]
    ids = torch.tensor(b.view.ids)
    n_ans = len(b.prompt.response_ids)
    for row, value in zip(masks, got):
        drop = [b.view.spans[i] for i in range(n) if not row[i]]
        keep = torch.tensor([t for t in range(len(ids)) if not any(a <= t < c for a, c in drop)])
        causal = suppression_mask(len(keep), [])[None, None]
        with torch.no_grad():
            out = lm.hf_forward(ids[keep][None], attention_mask=causal, position_ids=keep[None])
        lp = out[0][0, -n_ans - 1 : -1].double().log_softmax(-1)
        want = lp.gather(-1, ids[-n_ans:, None])[:, 0].sum()
        assert float(value) == pytest.approx(float(want), abs=1e-4)
    assert float(got[0]) == pytest.approx(float(b.clean()[0]), abs=1e-9)
    assert len(set(got.tolist())) == len(rows)  # every mask moves the answer
    r = al.attribute(lm, ex.prompt, units="trace", method="occlusion", ablation="suppress")
    assert r.meta["ablation"]["name"] == "suppress" and len(r) == n
    with pytest.raises(al.errors.UnsupportedAblationError):
        al.attribute(lm, ex.prompt, units="sources", method="occlusion", ablation="suppress")


def test_suppress_refuses_a_model_without_4d_masks():
    lm = al.wrap(*al.testing.tiny_model("bloom"))  # ALiBi: no additive 4-D masks
    units = al.units.Trace(trace=" The cat sat. It slept. It woke.")
    with pytest.raises(al.errors.UnsupportedArchitectureError, match="ablation='remove'"):
        al.attribute(lm, "Paris is a city.", units=units, method="occlusion", ablation="suppress")
    r = al.attribute(lm, "Paris is a city.", units=units, method="occlusion")  # remove: runs
    assert len(r) == 2
