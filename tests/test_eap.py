"""EAP / EAP-IG edge scores against brute-force edge patching."""

from __future__ import annotations

import pytest
import torch

import attrlab as al
from attrlab.methods.atp import CounterfactualWarning
from attrlab.units.edges import EdgePatcher, edge_activations, input_gradients

PROMPT = "When Mary and John went to the store, John gave a drink to"
CF = "When Tom and Anna went to the park, Mary gave a ball to"


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox"])
def lm(request):
    return al.wrap(*al.testing.tiny_model(request.param, dtype=torch.float64))


def eap(lm, units="edges", method="eap", **kw):
    return al.attribute(
        lm, PROMPT, target=(" Mary", " John"), units=units, method=method, counterfactual=CF, **kw
    )


def test_all_edges_patched_is_the_counterfactual_run(lm):
    g = al.units.Edges().graph(lm)
    ref = edge_activations(lm, lm.tokenize(CF), g)
    zero = torch.zeros(1, len(g.upstream), len(g.downstream), dtype=torch.float64)
    with EdgePatcher(lm, g, ref, zero):
        patched, _ = lm.run(PROMPT)
    with EdgePatcher(lm, g, ref, 1 - zero):
        kept, _ = lm.run(PROMPT)
    torch.testing.assert_close(patched, lm.run(CF)[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(kept, lm.run(PROMPT)[0], atol=1e-10, rtol=0)


def test_eap_equals_brute_force_edge_patching_linearized(lm):
    """One batch row per edge; each row patches its own edge by a gate alpha;
    d metric / d alpha at 0 is the edge-patching effect linearized at the clean run."""
    g = al.units.Edges().graph(lm)
    r = eap(lm)
    t = al.targets.resolve((" Mary", " John"), lm)
    ref = edge_activations(lm, lm.tokenize(CF), g)
    idx = g.edge_index()
    n = len(idx)
    alpha = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    onehot = torch.zeros(n, len(g.upstream), len(g.downstream), dtype=torch.float64)
    onehot[torch.arange(n), idx[:, 0], idx[:, 1]] = 1.0
    mask = 1.0 - alpha[:, None, None] * onehot
    rows = lm.tokenize([PROMPT] * n)
    with EdgePatcher(lm, g, ref, mask):
        logits, _ = lm.run(rows, grad=True)
    (brute,) = torch.autograd.grad(t(logits, rows).sum(), alpha)
    # scores are contributions: minus the linearized effect of patching the edge
    assert float((r.scores.double() + brute).abs().max()) < 1e-4
    torch.testing.assert_close(r.scores.double(), -brute, atol=1e-7, rtol=1e-5)
    assert float(brute.abs().max()) > 1e-4  # not a trivially zero comparison


def test_eap_is_the_keep_mask_gradient(lm):
    g = al.units.Edges(qkv=False).graph(lm)
    r = eap(lm, units=al.units.Edges(qkv=False))
    t = al.targets.resolve((" Mary", " John"), lm)
    ref = edge_activations(lm, lm.tokenize(CF), g)
    mask = torch.ones(
        1, len(g.upstream), len(g.downstream), dtype=torch.float64, requires_grad=True
    )
    with EdgePatcher(lm, g, ref, mask):
        logits, _ = lm.run(PROMPT, grad=True)
    (gm,) = torch.autograd.grad(t(logits, lm.tokenize(PROMPT)).sum(), mask)
    torch.testing.assert_close(r.scores.double(), g.from_matrix(gm[0]), atol=1e-8, rtol=1e-5)


def test_qkv_scores_sum_to_head_scores(lm):
    sep = eap(lm)
    joint = eap(lm, units=al.units.Edges(qkv=False))
    df = sep.to_pandas()
    df["head"] = df["downstream"].str.replace(r"\.[qkv]$", "", regex=True)
    summed = df.groupby(["upstream", "head"], sort=False)["score"].sum()
    jf = joint.to_pandas().set_index(["upstream", "downstream"])["score"]
    for (u, v), s in summed.items():
        assert jf[(u, v)] == pytest.approx(s, abs=1e-6)


def test_head_input_gradients_sum_to_attention_path():
    """Per-head q/k/v input gradients add up to the whole attention path's gradient."""
    lm = al.wrap(*al.testing.tiny_model("gpt2", dtype=torch.float64))
    g = al.units.Edges(qkv=True).graph(lm)
    t = al.targets.resolve((" Mary", " John"), lm)
    b = lm.tokenize(PROMPT)
    grads, _ = input_gradients(lm, b, g, t)
    logits, cache = lm.run(b, cache=["blocks.1.resid_pre", "blocks.1.resid_mid"], grad=True)
    gp, gm = torch.autograd.grad(
        t(logits, b).sum(), [cache["blocks.1.resid_pre"], cache["blocks.1.resid_mid"]]
    )
    per = 3 * lm.cfg.n_heads + 1
    heads = grads[per : per + 3 * lm.cfg.n_heads].sum(0)
    torch.testing.assert_close(heads, gp - gm, atol=1e-10, rtol=1e-7)


def test_eap_ig_is_complete(lm):
    """IG over edge gates: the scores sum to f(all) - f(none), and every edge
    ablated is the counterfactual run (values from plain runs)."""
    r = eap(lm, method="eap-ig", steps=16)
    t = al.targets.resolve((" Mary", " John"), lm)
    clean = float(t(lm.run(PROMPT)[0], lm.tokenize(PROMPT))[0])
    cf = float(t(lm.run(CF)[0], lm.tokenize(CF))[0])
    assert float(r.scores.sum()) == pytest.approx(clean - cf, rel=1e-3, abs=1e-6)
    assert abs(r.diagnostics["relative_completeness_error"]) < 1e-3
    assert r.diagnostics["baseline_value"] == pytest.approx(cf, abs=1e-9)  # f(no edge)
    assert r.diagnostics["value"] == pytest.approx(clean, abs=1e-9)


def test_eap_ig_agrees_with_eap_and_checks_options(lm):
    base = eap(lm)
    ig = eap(lm, method="eap-ig", steps=4)
    assert torch.isfinite(ig.scores).all()
    assert float(torch.corrcoef(torch.stack([ig.scores, base.scores]))[0, 1]) > 0.5
    with pytest.raises(al.errors.InputError, match="steps"):
        eap(lm, method="eap-ig", steps=0)
    with pytest.raises(al.errors.InputError, match="variant"):  # gone: IG over gates only
        eap(lm, method="eap-ig", variant="activations")


def test_eap_with_zero_and_mean_ablations_is_the_gate_gradient(lm):
    """Any ablation the edge kind supports: EAP is d f / d gate at g = 1 (finite
    differences on f_gated over the two largest edges)."""
    t = al.targets.resolve((" Mary", " John"), lm)
    for abl in (al.ablations.Zero(), al.ablations.Mean([PROMPT, CF])):
        r = al.attribute(lm, PROMPT, target=(" Mary", " John"), units="edges", method="eap",
                         ablation=abl)  # fmt: skip
        b = al.units.Edges().bind(lm, PROMPT, t, abl)
        for i in torch.argsort(r.scores.abs(), descending=True)[:2].tolist():
            g = torch.ones(2, b.n, dtype=torch.float64)
            g[0, i] = 1 - 1e-5
            v = b.f_gated(g)[:, 0]
            assert float(v[1] - v[0]) / 1e-5 == pytest.approx(float(r.scores[i]), rel=1e-3)


def test_same_counterfactual_warns(lm):
    with pytest.warns(CounterfactualWarning):
        r = al.attribute(
            lm,
            PROMPT,
            target=(" Mary", " John"),
            units="edges",
            method="eap",
            counterfactual=PROMPT,
        )
    assert torch.isfinite(r.scores).all() and float(r.scores.abs().max()) == 0.0


def test_unsupported_architectures_raise():
    gqa = al.wrap(*al.testing.tiny_model("llama"))
    with pytest.raises(al.errors.InputError, match="qkv=True"):
        al.attribute(
            gqa, PROMPT, target=" Mary", units=al.units.Edges(qkv=False), method="eap",
            counterfactual=CF,
        )  # fmt: skip
    post = al.wrap(*al.testing.tiny_model("gemma2"))
    with pytest.raises(al.errors.InputError, match="normalizes"):
        al.attribute(post, PROMPT, target=" Mary", units="edges", method="eap", counterfactual=CF)


# ------------------------------------------------- grouped-query attention
@pytest.fixture(scope="module", params=["llama", "qwen2", "phi3"])
def gqa(request):
    """4 query heads sharing 2 key/value heads (Qwen2: q/k/v biases; Phi-3: fused qkv)."""
    return al.wrap(*al.testing.tiny_model(request.param, dtype=torch.float64))


def test_gqa_graph_has_one_input_per_key_value_head(gqa):
    g = al.units.Edges().graph(gqa)
    assert gqa.cfg.n_kv_heads < gqa.cfg.n_heads
    layer0 = [v for v in g.downstream if v.startswith("a0.")]
    assert layer0 == ["a0.h0.q", "a0.h1.q", "a0.h2.q", "a0.h3.q"] + [
        "a0.kv0.k", "a0.kv1.k", "a0.kv0.v", "a0.kv1.v"
    ]  # fmt: skip
    assert g.down_slices()["per_layer"] == 4 + 2 + 2 + 1


def test_gqa_all_edges_patched_is_the_counterfactual_run(gqa):
    test_all_edges_patched_is_the_counterfactual_run(gqa)


def test_gqa_eap_equals_brute_force_edge_patching_linearized(gqa):
    """Patching the edge u -> a{l}.kv{g}.k changes the key every query head of
    group g reads; EAP's score is that edge's linearized effect."""
    test_eap_equals_brute_force_edge_patching_linearized(gqa)


def test_gqa_eap_ig_completeness(gqa):
    test_eap_ig_is_complete(gqa)


def test_llama_without_gqa_matches_mask_gradient():
    lm = al.wrap(*al.testing.tiny_model("llama", dtype=torch.float64, num_key_value_heads=4))
    test_eap_is_the_keep_mask_gradient(lm)


@pytest.mark.parametrize("extra", ["blocks.0.attn.head_out", "blocks.0.resid_mid"])
def test_caching_head_out_or_resid_mid_leaves_gradients_unchanged(extra):
    """Regression: a cached head_out / resid_mid under grad once doubled upstream gradients."""
    lm = al.wrap(*al.testing.tiny_model("gpt2", dtype=torch.float64))
    t = al.targets.resolve(" a", lm)
    b = lm.tokenize("a b c")
    grads = []
    for sites in (["blocks.0.attn.z"], ["blocks.0.attn.z", extra]):
        logits, cache = lm.run(b, cache=sites, grad=True)
        grads.append(torch.autograd.grad(t(logits, b).sum(), [cache[s] for s in sites]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    _, cache = lm.run(b, cache=["blocks.0.attn.out"], grad=True)
    logits, cache2 = lm.run(b, cache=["blocks.0.attn.out", extra], grad=True)
    (g_out,) = torch.autograd.grad(t(logits, b).sum(), [cache2[extra]])
    logits, cache3 = lm.run(b, cache=["blocks.0.attn.out"], grad=True)
    (g_attn,) = torch.autograd.grad(t(logits, b).sum(), [cache3["blocks.0.attn.out"]])
    if extra.endswith("head_out"):
        g_out = g_out.sum(2) / lm.cfg.n_heads
    torch.testing.assert_close(g_out, g_attn)


def test_doctests():
    import doctest

    import attrlab.methods.gradient as mod

    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0 and res.attempted > 0
