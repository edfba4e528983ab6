"""Perturbation family over input units: exact Shapley oracle, sampling
convergence, KernelSHAP exactness, occlusion vs token replacement, masks."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import attrlab as al
from attrlab.errors import InputError
from attrlab.methods import perturbation as pert
from attrlab.methods.perturbation import (
    KernelShap,
    ShapleySampling,
    exact_shapley,
    kernelshap_weights,
    solve_kernelshap,
)
from attrlab.methods.surrogate import Lime

PROMPT = "When Mary and John went to the"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread


@pytest.fixture(scope="module")
def lm64():
    return al.wrap(*al.testing.tiny_model("gpt2", dtype=torch.float64))


def _game(n: int, seed: int = 0):
    """A value function with pairwise and triple interactions, and its exact
    Shapley values from the closed form (each interaction term splits evenly)."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.randn(n, generator=g, dtype=torch.float64)
    pairs = [(0, 1, 2.0), (2, 5 % n, -1.5), (1, 3 % n, 0.7)]
    triple = (0, 2, 4 % n, 3.0)

    def v(masks: torch.Tensor) -> torch.Tensor:
        m = masks.double()
        out = m @ lin
        for i, j, c in pairs:
            out = out + c * m[:, i] * m[:, j]
        i, j, k, c = triple
        return out + c * m[:, i] * m[:, j] * m[:, k]

    phi = lin.clone()
    for i, j, c in pairs:
        phi[i] += c / 2
        phi[j] += c / 2
    i, j, k, c = triple
    for u in (i, j, k):
        phi[u] += c / 3
    return v, phi


def test_doctests():
    res = doctest.testmod(pert, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0


def test_exact_shapley_matches_closed_form():
    v, phi = _game(7)
    torch.testing.assert_close(exact_shapley(v, 7)[0], phi, atol=1e-12, rtol=0)
    with pytest.raises(InputError):
        exact_shapley(v, 17)


def test_kernelshap_all_coalitions_is_exact_shapley_on_a_game():
    v, phi = _game(8)
    masks, w = kernelshap_weights(8)
    vals = v(masks)[:, None]
    full = v(torch.ones(1, 8, dtype=torch.bool))
    empty = v(torch.zeros(1, 8, dtype=torch.bool))
    out = solve_kernelshap(masks, vals, w, empty, full)[0]
    torch.testing.assert_close(out, phi, atol=1e-10, rtol=0)


def test_shapley_sampling_converges_on_a_game():
    v, phi = _game(9)
    full = v(torch.ones(1, 9, dtype=torch.bool))
    empty = v(torch.zeros(1, 9, dtype=torch.bool))
    errs = []
    for k in (4, 64, 1024):
        m = ShapleySampling(permutations=k, antithetic=False, seed=1)
        est, diag = m._scores(lambda x: v(x)[:, None], 9, full, empty)
        errs.append(float((est[0] - phi).abs().max()))
        assert abs(float(est.sum()) - float(full - empty)) < 1e-9  # efficiency, every k
    assert errs[2] < errs[0] and errs[2] < 0.1 * float(phi.abs().max())


def test_lime_recovers_an_additive_function():
    w = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0], dtype=torch.float64)
    m = Lime(samples=200, alpha=1e-8, seed=0)
    full, empty = w.sum()[None], torch.zeros(1, dtype=torch.float64)
    coef, diag = m._scores(lambda x: (x.double() @ w)[:, None], 5, full, empty)
    torch.testing.assert_close(coef[0], w, atol=1e-5, rtol=0)
    assert diag["r2"] > 0.9999


@pytest.mark.parametrize("units", ["tokens", "words"])
def test_model_kernelshap_and_sampling_vs_exact(lm64, units):
    exact = al.attribute(lm64, PROMPT, target=" store", units=units, method="shapley-exact")
    d = exact.diagnostics
    assert abs(float(exact.scores.sum()) - (d["value"] - d["empty_value"])) < 1e-10
    ks = al.attribute(lm64, PROMPT, target=" store", units=units, method="kernelshap")
    assert ks.diagnostics["exact"] is True
    torch.testing.assert_close(ks.scores, exact.scores, atol=1e-10, rtol=0)
    scale = float(exact.scores.abs().max())
    few = al.attribute(
        lm64,
        PROMPT,
        target=" store",
        units=units,
        method="shapley",
        permutations=2,
        antithetic=False,
    )
    many = al.attribute(
        lm64, PROMPT, target=" store", units=units, method="shapley", permutations=100
    )
    err_many = float((many.scores - exact.scores).abs().max())
    assert err_many < 0.05 * scale
    assert err_many <= float((few.scores - exact.scores).abs().max())
    n_coalitions = 2 ** len(exact) - 2
    sampled = al.attribute(
        lm64, PROMPT, target=" store", units=units, method="kernelshap", samples=n_coalitions - 20
    )
    assert sampled.diagnostics["exact"] is False
    assert float((sampled.scores - exact.scores).abs().max()) < 0.1 * scale


def test_occlusion_equals_replacing_tokens_by_pad(lm64):
    """Replacing a unit's embeddings by the pad embedding is replacing its ids by pad."""
    hf = lm64.model
    ids = lm64.tokenize(PROMPT).input_ids[0]
    tid = lm64.token_id(" store")

    def f(row):
        with torch.no_grad():
            return float(hf(input_ids=row[None]).logits[0, -1, tid])

    full = f(ids)
    expect = []
    for p in range(len(ids)):
        row = ids.clone()
        row[p] = lm64.pad_token_id
        expect.append(full - f(row))
    r = al.attribute(lm64, PROMPT, target=" store", method="occlusion")
    torch.testing.assert_close(
        r.scores, torch.tensor(expect, dtype=torch.float64), atol=1e-10, rtol=0
    )
    # words: "went" and "to" dropped together
    words = al.units.resolve("words")
    m = torch.ones(1, 7, dtype=torch.bool)
    m[0, 4:6] = False
    row = ids.clone()
    row[4:6] = lm64.pad_token_id
    got = words.bind(lm64, PROMPT, al.targets.resolve(" store", lm64)).f(m)
    assert abs(float(got[0, 0]) - f(row)) < 1e-10


def test_perturbation_rows_for_continuations(lm64):
    tgt = al.targets.ContinuationLogProb(" store and", reduce="none")
    r = al.attribute(lm64, PROMPT, target=tgt, method="occlusion")
    assert tuple(r.scores.shape) == (2, 9)
    assert r.rows["token"] == [" store", " and"]
    # the continuation token of row 0 cannot change row 0: zero effect
    assert float(r.scores[0, 7:].abs().max()) < 1e-6
    # sentence units never ablate the continuation
    sent = al.attribute(
        lm64, "It rains. We stay", target=tgt, units="sentences", method="kernelshap"
    )
    assert tuple(sent.scores.shape) == (2, 2)
    d = sent.diagnostics
    total = torch.tensor(d["value"]) - torch.tensor(d["empty_value"])
    torch.testing.assert_close(sent.scores.sum(-1), total.to(sent.scores.dtype), atol=1e-5, rtol=0)


def test_spans_and_baselines(lm64):
    r = al.attribute(
        lm64,
        PROMPT,
        target=" store",
        units=[(0, 4), (5, 9), (14, 18)],
        method="occlusion",
        ablation="zero",
    )
    assert r.unit_kind == "spans" and r.units["text"] == ["When", "Mary", "John"]
    assert r.meta["units_params"] == {"spans": [[0, 4], [5, 9], [14, 18]]}
    with pytest.raises(InputError):
        al.attribute(lm64, PROMPT, target=" store", units=[(0, 400)], method="occlusion")
    with pytest.raises(InputError):
        bound = al.units.resolve("tokens").bind(lm64, PROMPT, al.targets.resolve(" store", lm64))
        bound.f(torch.ones(2, 3).bool())
    with pytest.raises(InputError):
        al.attribute(lm64, [[1, 2, 3]], target=" store", units="words", method="occlusion")


def test_seeds(lm64):
    a = al.attribute(lm64, PROMPT, target=" store", method="lime", samples=64, seed=0)
    b = al.attribute(lm64, PROMPT, target=" store", method="lime", samples=64, seed=0)
    assert torch.equal(a.scores, b.scores)
    c = al.attribute(lm64, PROMPT, target=" store", method="shapley", permutations=3, seed=5)
    d = al.attribute(lm64, PROMPT, target=" store", method="shapley", permutations=3, seed=5)
    assert torch.equal(c.scores, d.scores)
    assert c.diagnostics["n_evaluations"] == 2 + 2 * 3 * (len(c) - 1)
    assert math.isfinite(float(KernelShap().params()["max_exact_units"]))


def test_ioi_zoo_model_attributes_the_indirect_object():
    """Issue floor: on the IOI zoo model, occlusion and IG (pad baseline, 16
    Gauss-Legendre steps) put the largest score among the context tokens on the
    IO name for more than 90% of 200 test prompts, for the target log p(IO) (the
    model's prediction; measured 200/200 and 199/200) and for the logit
    difference IO - S (200/200 and 193/200). On retrained seeds of the same
    recipe the log p(IO) numbers hold (IG 97.5-100%) but IG on the logit
    difference does not (28-97%): ``benchmarks/bench_ioi_seeds.py``,
    docs/inputs.md."""
    lm = al.zoo.load("ioi")
    exs = al.zoo.task("ioi").examples(200, seed=0)
    hits = {(m, t): 0 for m in ("occlusion", "ig") for t in ("logprob", "diff")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    try:
        for ex in exs:
            for method, kind in hits:
                opts = {"steps": 16} if method == "ig" else {}
                tgt = al.targets.LogProb(ex.answer) if kind == "logprob" else (ex.answer, ex.wrong)
                r = al.attribute(lm, ex.prompt, target=tgt, method=method, **opts)
                context = r.scores[:-1]  # the final " to" is the query position
                hits[method, kind] += int(context.argmax()) == ex.positions["IO"]
    finally:
        torch.set_num_threads(threads)
    assert min(hits.values()) > 180, hits
