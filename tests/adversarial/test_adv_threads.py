"""Adversarial cases, area `threads`: several threads on one model, memory budgets,
and sources methods on contexts too large to materialize. Each case asserts a typed
attrlab error with an actionable message, or a result equal to an oracle."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import attrlab as al

PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def lm():
    return al.wrap(*al.testing.tiny_model("gpt2"))


def _twice_in_threads(fn):
    out: list = [None, None]
    errors: list = []

    def work(k):
        try:
            out[k] = fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
    assert errors == [] and not any(t.is_alive() for t in ts)
    return out


# ------------------------------------------------------------- good: correct results
def _lens(lm):
    return al.logit_lens(lm, PROMPT, target=" Mary").scores


def _deletion(lm):
    r = al.attribute(lm, PROMPT, target=" Mary", method="occlusion")
    return torch.tensor(al.evaluate.deletion_curve(lm, r, PROMPT, " Mary").values)


def _dla(lm):
    return al.attribute(lm, PROMPT, target=" Mary", units="heads", method="dla").scores


def _eap(lm):
    cf = "When Mary and John went to the store, Mary gave a drink to"
    return al.attribute(
        lm, PROMPT, target=(" Mary", " John"), units="edges", method="eap", counterfactual=cf
    ).scores


@pytest.mark.parametrize("job", [_lens, _deletion, _dla, _eap])
def test_good_two_threads_equal_one_thread(lm, job):
    ref = job(lm)
    for got in _twice_in_threads(lambda: job(lm)):
        assert torch.equal(got, ref)


def test_good_a_failing_call_releases_the_lock(lm):
    """A call that raises inside the lock does not leave the model locked."""
    with pytest.raises(al.errors.UnknownMethodError):
        al.attribute(lm, PROMPT, target=" Mary", method="nope")
    with pytest.raises(al.errors.InputError):
        al.attribute(lm, PROMPT, target=" Mary", method="ig", steps=0)
    done = threading.Event()
    t = threading.Thread(target=lambda: (lm.run(PROMPT), done.set()))
    t.start()
    assert done.wait(timeout=30)


def test_good_edge_patcher_holds_the_lock_for_its_block(lm):
    """Another thread's run waits while an edge-patching block is open, then is clean."""
    from attrlab.units.edges import EdgePatcher, edge_activations

    g = al.units.Edges().graph(lm)
    ref = edge_activations(lm, lm.tokenize("a c"), g)
    clean = lm.run("a b")[0]
    got: dict = {}
    t = threading.Thread(target=lambda: got.setdefault("x", lm.run("a b")[0]))
    with EdgePatcher(lm, g, ref, torch.zeros(1, len(g.upstream), len(g.downstream))):
        t.start()
        t.join(timeout=0.3)
        assert t.is_alive()  # waits for the patcher's block to end
    t.join(timeout=30)
    assert torch.equal(got["x"], clean)


def test_good_one_byte_budget_still_runs_one_row_at_a_time(lm):
    ref = al.attribute(lm, PROMPT, target=" Mary", method="ig", steps=8, batch_size=32)
    r = al.attribute(lm, PROMPT, target=" Mary", method="ig", steps=8, memory_budget=1)
    torch.testing.assert_close(r.scores, ref.scores, atol=1e-5, rtol=1e-5)


def test_good_duplicate_sources_share_one_prompt():
    """Two identical sources: removing either gives the same prompt, run once."""
    lm = al.wrap(*al.testing.tiny_model("llama"))
    r = al.attribute(lm, "A b c. A b c.", " A", units="sources", method="occlusion")
    # the full context, the empty one, and the two removals' one shared prompt
    assert r.diagnostics["n_prompts"] == 3
    assert float(r.scores[0]) == float(r.scores[1])


# --------------------------------------------------------------- good: typed errors
@pytest.mark.parametrize("budget", ["lots", -5, "0MB", [1]])
def test_error_bad_memory_budget(lm, budget):
    with pytest.raises(al.errors.InputError, match="memory_budget"):
        al.attribute(lm, PROMPT, target=" Mary", method="occlusion", memory_budget=budget)


@pytest.mark.parametrize("method", ["ig", "occlusion", "patch"])
def test_error_zero_batch_size(lm, method):
    kw = {"units": "heads", "counterfactual": PROMPT} if method == "patch" else {}
    with pytest.raises(al.errors.InputError, match="batch_size"):
        al.attribute(lm, PROMPT, target=" Mary", method=method, batch_size=0, **kw)


@pytest.mark.parametrize("method", ["occlusion", "jsd", "hierarchical", "contextcite"])
def test_error_thousand_sources_fail_fast(lm, method):
    """1,000 sources on a 128-token model: a typed error within a second, no forward."""
    ctx = " ".join(f"Fact {i} is red." for i in range(1000))
    t = time.perf_counter()
    with pytest.raises(al.errors.ContextTooLongError, match="1000 sources"):
        al.attribute(lm, ctx, " Fact", units="sources", method=method)
    assert time.perf_counter() - t < 5.0


def test_error_mask_values_on_too_long_context(lm):
    ctx = " ".join(f"Fact {i} is red." for i in range(200))
    with pytest.raises(al.errors.ContextTooLongError, match="fewer or shorter sources"):
        al.units.Sources().bind(lm, ctx, " Fact").f([[True] * 200])
