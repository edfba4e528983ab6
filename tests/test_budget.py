"""Batch sizes follow a memory budget, not a fixed count (issue 14, item 10)."""

from __future__ import annotations

import warnings

import pytest
import torch

import attrlab as al
from attrlab.model import budget

PROMPT = "When Mary and John went to the store, John gave a drink to"
CF = "When Mary and John went to the store, Mary gave a drink to"


@pytest.fixture(scope="module")
def lm():
    return al.wrap(*al.testing.tiny_model("gpt2"))


def _rows_per_forward(lm, fn):
    """Run ``fn`` and return the batch sizes of the model's forwards."""
    sizes: list[int] = []
    h = lm.model.register_forward_pre_hook(
        lambda m, a, kw: sizes.append(
            (kw.get("input_ids") if kw.get("input_ids") is not None else kw["inputs_embeds"]).shape[
                0
            ]
        ),
        with_kwargs=True,
    )
    try:
        out = fn()
    finally:
        h.remove()
    return out, sizes


@pytest.mark.parametrize(
    "method, options",
    [
        ("ig", {"steps": 16}),
        ("smoothgrad", {"samples": 8}),
        ("expected-gradients", {"samples": 8}),
        ("occlusion", {}),
        ("kernelshap", {"samples": 24}),
    ],
)
def test_small_budget_shrinks_batches_and_keeps_scores(lm, method, options):
    """Token methods: a small memory budget gives smaller batches and the same scores."""
    big, big_sizes = _rows_per_forward(
        lm, lambda: al.attribute(lm, PROMPT, target=" Mary", method=method, **options)
    )
    small, small_sizes = _rows_per_forward(
        lm,
        lambda: al.attribute(
            lm, PROMPT, target=" Mary", method=method, memory_budget="200KB", **options
        ),
    )
    assert max(small_sizes) < max(big_sizes)
    torch.testing.assert_close(small.scores, big.scores, atol=1e-5, rtol=1e-5)


def test_patching_follows_the_budget(lm):
    args = dict(target=(" Mary", " John"), units="heads", method="patch", counterfactual=CF)
    big, big_sizes = _rows_per_forward(lm, lambda: al.attribute(lm, PROMPT, **args))
    small, small_sizes = _rows_per_forward(
        lm, lambda: al.attribute(lm, PROMPT, memory_budget="100KB", **args)
    )
    assert max(small_sizes) < max(big_sizes)
    torch.testing.assert_close(small.scores, big.scores, atol=1e-5, rtol=1e-5)


def test_batch_size_follows_prompt_length_and_the_global_budget(lm, monkeypatch):
    """IG at 1,024 tokens no longer takes 32 points per forward by default: the
    rows per forward shrink with the square of the length; the budget can be set
    globally or by the environment, and an explicit batch_size wins."""
    from attrlab.model import budget

    monkeypatch.setattr(budget, "_override", None)
    monkeypatch.setenv("ATTRLAB_MEMORY_BUDGET", "1GB")
    assert budget.memory_budget() == 2**30
    long_rows = budget.batch_size_for(lm, 1024, cap=32, grad=True)
    assert 1 <= long_rows < 32
    assert budget.batch_size_for(lm, 2048, cap=32, grad=True) < long_rows
    assert budget.batch_size_for(lm, 16, cap=32, grad=True) == 32
    budget.set_memory_budget("10MB")
    try:
        assert budget.memory_budget() == 10 * 2**20
        assert budget.batch_size_for(lm, 1024, cap=32, grad=True) == 1
        assert budget.batch_size_for(lm, 1024, cap=32, grad=True, batch_size=4) == 4
    finally:
        budget.set_memory_budget(None)
    monkeypatch.delenv("ATTRLAB_MEMORY_BUDGET")
    assert 0 < budget.memory_budget() <= budget.DEFAULT_CAP


@pytest.mark.parametrize("bad", ["lots", -1, 0, "0GB", True, float("nan")])
def test_bad_budgets_are_input_errors(lm, bad):
    with pytest.raises(al.errors.InputError, match="memory_budget"):
        al.attribute(lm, PROMPT, target=" Mary", method="ig", steps=4, memory_budget=bad)


@pytest.mark.parametrize(
    "rows, seq, kinds",
    [(64, 128, ("attn.head_out", "resid_pre")), (64, 64, ("attn.z", "mlp.neurons", "resid_mid"))],
)
@pytest.mark.parametrize("grad", [False, True])
def test_cache_estimate_is_within_half_of_the_measured_peak(lm, rows, seq, kinds, grad):
    """The pre-flight estimate of a run that caches activations (the cached
    tensors plus the forward's working memory) against the process's measured
    peak memory growth during that run."""
    from attrlab.model.budget import cache_bytes, peak_rss_growth

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sites = [f"blocks.{layer}.{k}" for layer in range(lm.cfg.n_layers) for k in kinds]
        ids = torch.randint(
            0, lm.cfg.d_vocab, (rows, seq), generator=torch.Generator().manual_seed(0)
        )
        lm.run(ids[:1, :4], cache=sites, grad=grad)  # warm up
        grew = []
        for _ in range(2):
            (logits, cache), g = peak_rss_growth(lambda: lm.run(ids, cache=sites, grad=grad))
            del logits, cache
            if g is None:
                pytest.skip("no /proc/self/statm to measure memory")
            grew.append(g)
    finally:
        torch.set_num_threads(n)
    est = cache_bytes(lm, sites, rows, seq, grad)
    assert 0.5 * max(grew) <= est <= 1.5 * max(grew), (est / 2**20, [g / 2**20 for g in grew])


def test_runs_that_cache_announce_their_memory(lm, monkeypatch, capsys):
    """Above ANNOUNCE_BYTES a run that caches warns before it starts; with
    progress=True a method prints its largest cached run's estimate."""
    from attrlab.model import budget

    with warnings.catch_warnings():
        warnings.simplefilter("error", budget.MemoryEstimateWarning)
        lm.run(PROMPT, cache=["blocks.0.resid_pre"])  # small: silent
    assert capsys.readouterr().err == ""
    for method, units in [("patch", "heads"), ("atp*", "heads"), ("eap", "edges")]:
        al.attribute(lm, PROMPT, target=" Mary", units=units, method=method,
                     counterfactual=CF, progress=True)  # fmt: skip
        err = capsys.readouterr().err
        assert "attrlab: a run caching" in err and "will need about" in err, method
    monkeypatch.setattr(budget, "ANNOUNCE_BYTES", 1000)
    with pytest.warns(budget.MemoryEstimateWarning, match="will need about"):
        lm.run(PROMPT, cache=["blocks.0.attn.head_out"])


# ------------------------------------------------ the throughput cost model (issue 23)
def _gpt2(d_model: int, heads: int, vocab: int = 2003):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=d_model, n_head=heads, vocab_size=vocab, n_positions=128,
                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    return al.wrap(GPT2LMHeadModel(cfg).eval(), al.testing.tiny_tokenizer())


def test_efficient_rows_grow_for_narrow_models_and_short_prompts():
    narrow, wide = _gpt2(32, 4), _gpt2(512, 8)
    assert budget.overhead_tokens(narrow) > 10 * budget.overhead_tokens(wide)
    assert budget.efficient_rows(narrow, 16) > 10 * budget.efficient_rows(wide, 16)
    for m in (narrow, wide):
        assert budget.efficient_rows(m, 8) > budget.efficient_rows(m, 64) >= 1
        # the choice is rows x tokens ~ EFFICIENT_FACTOR x the fixed cost in tokens
        want = budget.EFFICIENT_FACTOR * budget.overhead_tokens(m, 16)
        assert 16 * budget.efficient_rows(m, 16) == pytest.approx(want, abs=16)


def test_memory_budget_caps_the_cost_model_and_vocabulary_counts():
    small_v, large_v = _gpt2(32, 4, vocab=2003), _gpt2(32, 4, vocab=50257)
    cap = budget.efficient_rows(small_v, 16)
    assert budget.efficient_rows(large_v, 16) == cap  # throughput ignores the vocabulary
    rows = [budget.batch_size_for(m, 16, cap=cap, memory_budget="8MB") for m in (small_v, large_v)]
    assert rows[1] < rows[0] <= cap  # memory does not: the logits rows


def _heads_sweep(lm, **kw):
    from attrlab.methods.patching import patch_sweep

    units = al.units.Heads(per_position=True)
    return patch_sweep(lm, PROMPT, CF, (" Mary", " John"), units, direction="denoising", **kw)


def test_sweep_defaults_use_the_cost_model_and_a_forced_batch_size_wins(lm):
    auto = _heads_sweep(lm)
    n_pos = auto.meta["n_positions"]
    chosen = budget.batch_size_for(lm, n_pos, cap=budget.efficient_rows(lm, n_pos))
    assert auto.meta["batch_size"] == chosen > 128  # a tiny model: more than the old fixed cap
    forced_same = _heads_sweep(lm, batch_size=chosen)
    assert torch.equal(auto.patched, forced_same.patched)  # the same plan, the same values
    assert forced_same.n_forwards == auto.n_forwards
    forced = _heads_sweep(lm, batch_size=3)
    assert forced.meta["batch_size"] == 3
    assert forced.n_forwards > auto.n_forwards
    assert torch.allclose(forced.patched, auto.patched, atol=1e-5)


def test_positions_share_a_forward_by_the_cost_model(lm, monkeypatch):
    """A forward's fixed cost (in tokens) decides whether the next position's
    rows join the current forward: never when it is ~0, always when it is huge."""
    import attrlab.model.masked as masked

    n_layers = lm.cfg.n_layers
    monkeypatch.setattr(masked, "overhead_tokens", lambda lm, n_pos=1: 0.0)
    apart = _heads_sweep(lm)
    n_pos = apart.meta["n_positions"]
    assert apart.n_forwards == n_layers * n_pos  # one forward per layer and position
    monkeypatch.setattr(masked, "overhead_tokens", lambda lm, n_pos=1: 1e12)
    joined = _heads_sweep(lm)
    assert joined.n_forwards == n_layers  # one per layer, from position 0
    assert torch.allclose(apart.patched, joined.patched, atol=1e-5)


# ------------------------------------------- gradient points per forward (#23)
CONT = [5, 9, 13, 17]  # a 4-token continuation (ids of the tiny tokenizer)


def _ig(lm, **options):
    return al.attribute(
        lm,
        PROMPT,
        target=al.targets.ContinuationLogProb(CONT, reduce="none"),
        units=al.units.Tokens(include_generated=False),
        method="ig",
        **options,
    )


def test_ig_defaults_take_all_steps_in_one_forward_and_equal_the_forced_choice(lm):
    """With the budget to spare, IG's default is one forward over all steps
    (not 32 + 18 for 50 steps), and its scores are exactly those of
    batch_size=steps."""
    auto, sizes = _rows_per_forward(lm, lambda: _ig(lm, steps=50))
    assert max(sizes) == 50 and sizes.count(50) == 1
    forced, forced_sizes = _rows_per_forward(lm, lambda: _ig(lm, steps=50, batch_size=50))
    assert sizes == forced_sizes
    assert torch.equal(auto.scores, forced.scores)


def test_ig_splits_into_equal_forwards_when_the_budget_is_short(lm):
    """A budget that fits fewer points than the steps gives the fewest forwards
    of equal size; scores agree with one forward to round-off."""
    from attrlab.units.tokens import make_forward

    fwd = make_forward(lm, PROMPT, al.targets.ContinuationLogProb(CONT, reduce="none"))
    per_point = fwd.points_per_forward(1, memory_budget="1GB")  # = 1
    assert per_point == 1
    from attrlab.model.budget import row_bytes

    one = row_bytes(lm, fwd.view.n_pos, True, fwd.logit_positions(), expected=True)
    budget = 35 * one  # fits 35 points: 50 steps take 2 x 25
    assert fwd.points_per_forward(50, memory_budget=budget) == 25
    small, sizes = _rows_per_forward(lm, lambda: _ig(lm, steps=50, memory_budget=budget))
    assert [s for s in sizes if s > 1] == [25, 25]
    big = _ig(lm, steps=50)
    torch.testing.assert_close(small.scores, big.scores, atol=1e-5, rtol=1e-5)


def test_user_batch_size_is_respected(lm):
    _, sizes = _rows_per_forward(lm, lambda: _ig(lm, steps=20, batch_size=7))
    assert [s for s in sizes if s > 1] == [7, 7, 6]
    _, sizes = _rows_per_forward(
        lm,
        lambda: al.attribute(
            lm, PROMPT, target=" Mary", method="smoothgrad", samples=10, batch_size=4
        ),  # fmt: skip
    )
    assert [s for s in sizes if s > 1] == [4, 4, 2]


def test_points_per_forward_follow_width_vocabulary_and_budget():
    """Under one budget: a wider model or a larger vocabulary (logits of a
    next-token target at every position's share, here one position per row)
    fit fewer points per forward; a continuation read row by row counts its
    rows' logits only, not the whole sequence's."""
    from attrlab.units.tokens import make_forward

    def points(width: int, vocab: int, target=" Mary", budget="4MB") -> int:
        m = _gpt2(width, 4, vocab)
        return make_forward(m, PROMPT, target).points_per_forward(1000, memory_budget=budget)

    narrow, wide = points(32, 600), points(256, 600)
    assert wide < narrow
    small_vocab, big_vocab = points(32, 600), points(32, 60_000)
    assert big_vocab < small_vocab
    assert points(32, 600, budget="8MB") > narrow  # a larger budget, more points
    m = _gpt2(32, 4, 60_000)
    cont = make_forward(m, PROMPT, al.targets.ContinuationLogProb(CONT, reduce="none"))
    assert cont.logit_positions() == len(CONT) < cont.view.n_pos


def test_ig_memory_stays_within_the_budget():
    """The auto choice sizes by the expected need of a point; the measured
    peak growth of an IG run stays within 2x the budget."""
    from attrlab.model.budget import peak_rss_growth

    m = _gpt2(256, 4, 2000)
    prompt = " ".join(["Mary and John went to the store"] * 12)
    run = lambda: al.attribute(m, prompt, target=" Mary", method="ig", steps=64,  # noqa: E731
                               memory_budget="48MB")  # fmt: skip
    run()
    grew = [peak_rss_growth(run)[1] for _ in range(3)]  # the least noisy of three
    if grew[0] is None:
        pytest.skip("no /proc/self/statm to measure memory")
    # RSS growth is noisy inside a long test session (allocator state of earlier tests)
    assert min(grew) <= 2.0 * 48 * 2**20, [g / 2**20 for g in grew]


def test_pattern_estimate_counts_the_keys_of_a_continued_cache():
    """A run continuing a key/value cache of P positions caches attention
    patterns over P + n keys: the estimate's cached part equals the tensors the
    run returns (it counted only n keys before)."""
    from attrlab.model.budget import cache_bytes

    lm = al.wrap(*al.testing.tiny_model("gpt2"))
    ids = torch.randint(0, lm.cfg.d_vocab, (1, 24), generator=torch.Generator().manual_seed(1))
    _, kv = lm.hf_forward(ids[:, :20], use_cache=True)
    sites = ["blocks.0.attn.pattern", "blocks.1.attn.pattern"]
    _, cache = lm.run(ids[:, 20:], cache=sites, kv_cache=kv)
    real = sum(cache[s].numel() * cache[s].element_size() for s in sites)
    assert cache[sites[0]].shape[-1] == 24  # keys: 20 cached + 4 new
    est = cache_bytes(lm, sites, 1, 4, past=20) - cache_bytes(lm, [], 1, 4, past=20)
    assert est == real, (est, real)
