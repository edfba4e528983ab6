"""The prefix runner under the sources kind: every strategy equals plain
forwards on every family, and the cost model chooses the way the model says."""

from __future__ import annotations

import doctest

import pytest
import torch

import attrlab as al
import attrlab.model.prefixes as prefixes
from attrlab.methods.surrogate import sample_masks
from attrlab.model.prefixes import PrefixRunner, Rows
from attrlab.units.sources import Sources

CTX = (
    "Paris is the capital of France. The Seine flows through it. Berlin is in Germany. "
    "Cats sleep a lot. The capital has many museums. Rome is old."
)


_plain = al.testing.plain_response_logprobs


def test_doctests():
    assert doctest.testmod(prefixes).failed == 0


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "mpt", "falcon_alibi", "qwen3_moe"])
def test_every_strategy_equals_plain_forwards(family):
    lm = al.wrap(*al.testing.tiny_model(family))
    p = Sources(query="Where?").prompt(lm, CTX, response=" Paris is the capital")
    masks = sample_masks(8, p.n_sources, 0.5, 3)
    masks[0] = True
    plain = _plain(lm, p, masks)
    for strategy in ("walk", "tree", "flat"):
        stats: dict = {}
        got = p.logprobs(masks, strategy=strategy, stats=stats)
        assert stats["strategy"] == strategy
        torch.testing.assert_close(got, plain, atol=3e-5, rtol=0, msg=f"{family} {strategy}")


@pytest.mark.parametrize("family", al.testing.FAMILIES)
def test_tree_equals_walk_on_every_family(family):
    """The batched walk (cached prefixes of different lengths, left-padded, in one
    forward) equals the one-row walk (tested against plain forwards above)."""
    lm = al.wrap(*al.testing.tiny_model(family))
    p = Sources().prompt(lm, CTX, response=" Paris is")
    masks = sample_masks(8, p.n_sources, 0.5, 5)
    walk = p.logprobs(masks, strategy="walk")
    torch.testing.assert_close(p.logprobs(masks, strategy="tree"), walk, atol=3e-5, rtol=0)


def test_tree_runs_waves_of_rows_on_cached_prefixes():
    """The batched walk runs the one-row walk's tokens (plus padding, fewer than
    flat batches run) in far fewer forwards, and its batches really start from
    cached prefixes of different lengths."""
    lm = al.wrap(*al.testing.tiny_model("llama"))
    p = Sources().prompt(lm, CTX, response=" Paris")
    masks = sample_masks(24, p.n_sources, 0.5, 0)
    walk, tree, flat = {}, {}, {}
    p.logprobs(masks, strategy="walk", stats=walk)
    p.logprobs(masks, strategy="tree", stats=tree)
    p.logprobs(masks, strategy="flat", stats=flat)
    unique, _ = p._distinct_rows(masks)
    plan = PrefixRunner(lm).make_plan(unique, len(p.response_ids), strategy="tree")
    assert walk["n_tokens"] <= tree["n_tokens"] < flat["n_tokens"]
    assert tree["n_forwards"] < walk["n_forwards"] / 2
    waves = [b for b in plan.batches if any(plan.source[i] >= 0 for i in b)]
    assert waves and any(len({plan.shared[i] for i in b}) > 1 for b in plan.batches)


def test_sliding_window_tree():
    """Left-padded cached prefixes keep the distances a sliding window counts."""
    lm = al.wrap(*al.testing.tiny_model("gemma2", sliding_window=8))
    p = Sources().prompt(lm, CTX, response=" Paris is")
    masks = sample_masks(10, p.n_sources, 0.5, 1)
    torch.testing.assert_close(
        p.logprobs(masks, strategy="tree"), _plain(lm, p, masks), atol=3e-5, rtol=0
    )


def test_cost_model_chooses_by_width():
    """Tiny model: a forward's fixed cost dominates, so few large forwards (flat or
    tree) win; a 768-wide model: the arithmetic dominates, and the prefix sharing
    (walk or tree) wins over flat batches."""
    # 64 ablations of 16 sources of 20 tokens each, as ContextCite draws them
    masks = sample_masks(64, 16, 0.5, 0).tolist()
    rows = Rows.of(
        [
            [1] + [t for s in range(16) if keep[s] for t in range(20 * s, 20 * s + 20)]
            for keep in masks
        ]
    )
    tiny = al.wrap(*al.testing.tiny_model("llama"))
    plan = PrefixRunner(tiny).make_plan(rows, 20)
    assert plan.strategy in ("flat", "tree")
    assert plan.estimates["walk"] > 2 * plan.estimates[plan.strategy]
    wide = al.wrap(
        *al.testing.tiny_model(
            "llama", hidden_size=768, intermediate_size=2048, num_attention_heads=12,
            num_key_value_heads=12, num_hidden_layers=12,
        )
    )  # fmt: skip
    plan = PrefixRunner(wide).make_plan(rows, 20)
    assert plan.strategy in ("walk", "tree")
    assert plan.estimates["flat"] > 1.1 * plan.estimates[plan.strategy]


def test_forced_choices_and_errors(monkeypatch):
    lm = al.wrap(*al.testing.tiny_model("llama"))
    rows = Rows.of([[1, 2, 3, 4], [1, 2, 3, 5], [1, 6, 7, 8]])
    r = PrefixRunner(lm)
    assert r.make_plan(rows, 2, batch_size=1).strategy == "walk"
    assert r.make_plan(rows, 2, strategy="flat").strategy == "flat"
    assert r.make_plan(rows, 2, strategy="tree", batch_size=2).rows == 2
    with pytest.raises(al.errors.InputError, match="strategy"):
        r.make_plan(rows, 2, strategy="fast")
    with pytest.raises(al.errors.InputError, match="strategy"):
        Sources(strategy="fast")
    with pytest.raises(al.errors.InputError, match="batch_size"):
        r.make_plan(rows, 2, batch_size=0)
    # a tree whose kept prefixes would not fit the memory budget is not chosen
    monkeypatch.setattr(prefixes, "memory_budget", lambda *a: 1)
    plan = r.make_plan(rows, 2)
    assert plan.estimates["tree"] == float("inf") and plan.strategy != "tree"


def test_units_option_reaches_the_runner():
    lm = al.wrap(*al.testing.tiny_model("gpt2"))
    r = al.attribute(lm, CTX, " Paris", units=Sources(strategy="walk"), method="occlusion")
    assert r.diagnostics["strategy"] == "walk"
    auto = al.attribute(lm, CTX, " Paris", units="sources", method="occlusion")
    torch.testing.assert_close(auto.scores, r.scores, atol=3e-5, rtol=0)


@pytest.fixture
def two_threads():
    """Two intra-op threads (the suite may run at one), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon_alibi", "qwen3_moe"])
def test_parallel_walk_equals_plain_forwards(family, two_threads):
    """Chains of the walk in parallel threads give the plain forwards' values,
    count every token once, and leave the thread count as it was."""
    lm = al.wrap(*al.testing.tiny_model(family))
    p = Sources(query="Where?").prompt(lm, CTX, response=" Paris is the capital")
    masks = sample_masks(16, p.n_sources, 0.5, 2)
    one, par = {}, {}
    torch.set_num_threads(1)
    single = p.logprobs(masks, strategy="walk", stats=one)
    torch.set_num_threads(2)
    got = p.logprobs(masks, strategy="walk", stats=par)
    assert one["workers"] == 1 and par["workers"] == 2 and torch.get_num_threads() == 2
    torch.testing.assert_close(got, _plain(lm, p, masks), atol=3e-5, rtol=0)
    torch.testing.assert_close(got, single, atol=3e-5, rtol=0)
    # each chain starts with no cache: at most one more prefix per extra chain
    longest = max(p._distinct_rows(masks)[0].lengths)
    assert one["n_tokens"] <= par["n_tokens"] <= one["n_tokens"] + longest


def test_parallel_walk_only_when_safe(two_threads):
    """One chain when the model has hooks, for few rows, or at one thread."""
    lm = al.wrap(*al.testing.tiny_model("llama"))
    runner = PrefixRunner(lm)
    assert runner.parallel_workers(64) == 2
    assert runner.parallel_workers(2 * prefixes.MIN_CHAIN_ROWS - 1) == 1
    h = lm.model.model.layers[0].register_forward_hook(lambda *a: None)
    try:
        assert runner.parallel_workers(64) == 1
    finally:
        h.remove()
    torch.set_num_threads(1)
    assert runner.parallel_workers(64) == 1


def test_parallel_walk_errors_propagate_and_restore_threads(two_threads):
    lm = al.wrap(*al.testing.tiny_model("llama"))
    rows = [[1, 2, 3, i] for i in range(4, 20)]

    def bad(logits, idx):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        PrefixRunner(lm).run(rows, [4, 5], bad, strategy="walk")
    assert torch.get_num_threads() == 2
    assert not lm.lock._is_owned()  # type: ignore[attr-defined]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_chains_cut_the_order_into_contiguous_balanced_pieces(k):
    order = [7, 3, 0, 9, 1, 4, 8, 2, 6, 5]
    cost = [1, 5, 2, 2, 9, 1, 1, 3, 2, 4]
    chains = prefixes._chains(order, cost, k)
    assert len(chains) == k and all(chains)
    assert [i for c in chains for i in c] == order
    sums = [sum(cost[i] for i in c) for c in chains]
    assert max(sums) - min(sums) <= 2 * max(cost)
