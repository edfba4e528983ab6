"""Mixture-of-experts MLPs: the ``mlp.router`` / ``mlp.experts`` sites and the
``experts`` unit kind on tiny Mixtral, Qwen2-MoE (shared expert), Qwen3-MoE and
OLMoE models, checked against the Hugging Face model and hand interventions."""

from __future__ import annotations

import functools

import pytest
import torch

import attrlab as al
from attrlab import Intervention
from attrlab.testing import MOE_FAMILIES, tiny_model

PROMPT = "When Mary and John went to the store, John gave a drink to"
CF = "When Mary and John went to the store, Mary gave a drink to"
TARGET = (" Mary", " John")

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _lm(family: str, **overrides: object) -> al.LM:
    return al.wrap(*tiny_model(family, **overrides), name=f"tiny-{family}")


@pytest.fixture(params=MOE_FAMILIES)
def lm(request) -> al.LM:
    return _lm(request.param)


def _logit_diff(lm: al.LM, ivs=()) -> float:
    logits, _ = lm.run(PROMPT, interventions=list(ivs))
    a, b = (lm.token_id(t) for t in TARGET)
    return float(logits[0, -1, a] - logits[0, -1, b])


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_logits_equal_hf_and_experts_sum_to_mlp_out(family, impl):
    """Logits through the wrapper (reading every site) equal the model's own, with
    transformers' eager experts loop and its default grouped kernel; per layer the
    expert slots sum to ``mlp.out``, each token uses top-k routed experts (plus the
    shared one), and ``mlp.router`` is the router's own logits."""
    lm = _lm(family, experts_implementation=impl)
    c = lm.cfg
    ref = lm.model(input_ids=lm.tokenize(PROMPT).input_ids).logits
    got, cache = lm.run(PROMPT, cache=lm.sites())
    assert (got - ref).abs().max() <= 1e-5
    b, p = cache.batch.shape
    for layer in range(c.n_layers):
        e = cache[f"blocks.{layer}.mlp.experts"]
        assert e.shape == (b, p, c.n_experts + c.n_shared_experts, c.d_model)
        torch.testing.assert_close(e.sum(2), cache[f"blocks.{layer}.mlp.out"], atol=1e-6, rtol=1e-5)
        used = (e[:, :, : c.n_experts].abs().sum(-1) > 0).sum(-1)
        assert (used == 2).all()  # top-2
        if c.n_shared_experts:
            assert (e[:, :, -1].abs().sum(-1) > 0).all()  # the shared expert: every token
        x = cache[f"blocks.{layer}.mlp.normed"].reshape(-1, c.d_model)
        with torch.no_grad():
            logits, weights, index = lm.adapter.router(layer)(x)
        torch.testing.assert_close(
            cache[f"blocks.{layer}.mlp.router"].reshape(-1, c.n_experts), logits
        )
        w2, i2 = lm.adapter.route(layer, logits)  # the routing formula is the router's
        assert torch.equal(i2, index) and torch.equal(w2, weights)
    assert "blocks.0.mlp.neurons" not in lm.sites()


def test_shared_expert_slot_is_the_sigmoid_gated_output():
    lm = _lm("qwen2_moe")
    _, cache = lm.run(PROMPT, cache=["blocks.0.mlp.normed", "blocks.0.mlp.experts"])
    shared, gate = lm.adapter.shared_expert(0)
    x = cache["blocks.0.mlp.normed"]
    with torch.no_grad():
        want = torch.sigmoid(gate(x)) * shared(x)
    torch.testing.assert_close(cache["blocks.0.mlp.experts"][:, :, 4], want)


def test_zero_ablating_one_expert_removes_exactly_its_contribution(lm):
    c = lm.cfg
    _, clean = lm.run(PROMPT, cache=["blocks.1.mlp.experts", "blocks.1.mlp.out"])
    for e in range(c.n_experts + c.n_shared_experts):
        iv = Intervention("blocks.1.mlp.experts", 0.0, heads=[e])
        _, cache = lm.run(PROMPT, interventions=[iv], cache=["blocks.1.mlp.out"])
        want = clean["blocks.1.mlp.out"] - clean["blocks.1.mlp.experts"][:, :, e]
        torch.testing.assert_close(cache["blocks.1.mlp.out"], want, atol=1e-6, rtol=1e-5)


def test_writing_the_router_reroutes(lm):
    """An identity write changes nothing; forcing logits re-routes every token to
    the two experts with the largest logits."""
    same, _ = lm.run(PROMPT, interventions=[Intervention("blocks.0.mlp.router", lambda x: x)])
    clean, _ = lm.run(PROMPT)
    assert torch.equal(same, clean)
    forced = torch.tensor([5.0, 4.0, -5.0, -5.0])
    _, cache = lm.run(
        PROMPT,
        interventions=[Intervention("blocks.0.mlp.router", forced)],
        cache=["blocks.0.mlp.experts"],
    )
    used = cache["blocks.0.mlp.experts"][:, :, : lm.cfg.n_experts].abs().sum(-1) > 0
    assert used[..., :2].all() and not used[..., 2:].any()


def test_grad_mode_experts_gradient_is_the_mlp_out_gradient(lm):
    sites = ["blocks.0.mlp.experts", "blocks.0.mlp.out", "blocks.0.mlp.router"]
    logits, cache = lm.run(PROMPT, cache=sites, grad=True)
    g_e, g_out, g_r = torch.autograd.grad(logits[0, -1, 5], [cache[s] for s in sites])
    for e in range(g_e.shape[2]):
        torch.testing.assert_close(g_e[:, :, e], g_out, atol=1e-7, rtol=1e-5)
    assert g_r.abs().sum() > 0  # the routing weights depend on the router logits
    # reading the sites under grad leaves the gradients upstream unchanged
    grads = []
    for extra in ([], sites):
        logits, cache = lm.run(PROMPT, cache=["embed", *extra], grad=True)
        grads.append(torch.autograd.grad(logits[0, -1, 5], cache["embed"])[0])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-5)


def test_dla_over_experts_sums_to_the_layers_mlp(lm):
    ex = al.attribute(lm, PROMPT, target=TARGET, units="experts", method="dla")
    mlp = al.attribute(lm, PROMPT, target=TARGET, units="mlp", method="dla")
    n = lm.cfg.n_experts + lm.cfg.n_shared_experts
    assert list(ex.units["expert"]) == list(range(n)) * lm.cfg.n_layers
    per_layer = ex.scores.reshape(lm.cfg.n_layers, n).double().sum(1)
    torch.testing.assert_close(per_layer, mlp.scores.double(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("ablation", ["zero", "mean", "counterfactual"])
def test_occlusion_over_experts_equals_hand_ablation(lm, ablation):
    """Occlusion of each expert equals the clean logit difference minus the run with
    that expert's slot replaced by hand through ``lm.run(interventions=...)``."""
    kw: dict = {}
    if ablation == "mean":
        kw = dict(ablation=al.ablations.Mean([PROMPT, CF]))
    elif ablation == "counterfactual":
        kw = dict(counterfactual=CF)
    units = al.units.Experts(layers=[1])
    r = al.attribute(lm, PROMPT, target=TARGET, units=units, method="occlusion", **kw)
    site = "blocks.1.mlp.experts"
    if ablation == "mean":
        _, ref = lm.run([PROMPT, CF], cache=[site])
        donor = ref[site].mean(0, keepdim=True)
    elif ablation == "counterfactual":
        donor = lm.run(CF, cache=[site])[1][site]
    else:
        donor = torch.zeros(1)
    clean = _logit_diff(lm)
    for j, e in enumerate(r.units["expert"]):
        value = donor if donor.dim() == 1 else donor[:, :, [e]]
        hand = clean - _logit_diff(lm, [Intervention(site, value, heads=[e])])
        assert abs(float(r.scores[j]) - hand) < 1e-5, (e, float(r.scores[j]), hand)


def test_atp_over_experts_is_close_to_occlusion(lm):
    """AtP is occlusion to first order: on these tiny models (small expert outputs)
    within 10 % of the largest score, correlation above 0.99."""
    kw = dict(target=TARGET, units="experts")
    occ = al.attribute(lm, PROMPT, method="occlusion", **kw).scores.double()
    atp = al.attribute(lm, PROMPT, method="atp", **kw).scores.double()
    assert (atp - occ).abs().max() <= 0.1 * occ.abs().max()
    assert torch.corrcoef(torch.stack([atp, occ]))[0, 1] > 0.99


def test_atp_star_over_experts_tracks_counterfactual_occlusion(lm):
    """atp* (counterfactuals only) on experts is AtP with GradDrop (its QK fix is
    for attention): measured here 0.97-0.996 correlation with occlusion (plain
    AtP: > 0.9999; GradDrop's averaging over dropped layers costs accuracy on a
    2-layer model)."""
    kw = dict(target=TARGET, units="experts", counterfactual=CF)
    occ = al.attribute(lm, PROMPT, method="occlusion", **kw).scores.double()
    star = al.attribute(lm, PROMPT, method="atp*", **kw).scores.double()
    assert torch.corrcoef(torch.stack([star, occ]))[0, 1] > 0.95


def test_atp_star_over_a_subset_of_experts_is_that_part_of_the_full_result(lm):
    kw = dict(target=TARGET, counterfactual=CF)
    full = al.attribute(lm, PROMPT, method="atp*", units=al.units.Experts(), **kw)
    sub = al.attribute(lm, PROMPT, method="atp*", units=al.units.Experts(experts=[1, 2]), **kw)
    pick = [i for i, e in enumerate(full.units["expert"]) if e in (1, 2)]
    assert sub.units["layer"] == [full.units["layer"][i] for i in pick]
    torch.testing.assert_close(sub.scores, full.scores[pick])
    router = al.attribute(lm, PROMPT, method="atp*", units=al.units.Experts(site="router"), **kw)
    assert len(router) == lm.cfg.n_layers * lm.cfg.n_experts
    assert torch.isfinite(router.scores).all()


def test_gradient_and_surrogate_methods_run_on_experts():
    lm = _lm("mixtral")
    kw = dict(target=TARGET, units=al.units.Experts(layers=[1]))
    ig = al.attribute(lm, PROMPT, method="ig", steps=8, **kw)
    assert abs(ig.diagnostics["completeness_error"]) < 0.05 * abs(ig.diagnostics["delta"]) + 1e-3
    ks = al.attribute(lm, PROMPT, method="kernelshap", samples=32, **kw)
    assert torch.isfinite(ks.scores).all() and len(ks) == lm.cfg.n_experts
    assert "experts" in al.methods.base.all_methods()["occlusion"]


def test_per_position_experts():
    """One unit per (layer, expert, position); a (position, expert) pair the token
    is not routed to contributes nothing, so its zero-ablation score is 0 (up to the
    rounding of a run resumed from the key/value cache)."""
    lm = _lm("qwen3_moe")
    units = al.units.Experts(layers=[0], per_position=True)
    short = "When Mary and John went"
    r = al.attribute(lm, short, target=TARGET, units=units, method="occlusion")
    _, cache = lm.run(short, cache=["blocks.0.mlp.experts"])
    n_pos = cache.batch.shape[1]
    assert len(r) == lm.cfg.n_experts * n_pos
    used = cache["blocks.0.mlp.experts"][0].abs().sum(-1) > 0  # [pos, expert]
    for j in range(len(r)):
        e, pos = int(r.units["expert"][j]), int(r.units["position"][j])
        if not used[pos, e]:
            assert abs(float(r.scores[j])) < 1e-6
    assert r.scores.abs().sum() > 0


def test_models_without_experts_say_so():
    lm = al.wrap(*tiny_model("llama"))
    for method in ("dla", "occlusion"):
        with pytest.raises(al.errors.UnsupportedArchitectureError, match="no experts"):
            al.attribute(lm, PROMPT, target=TARGET, units="experts", method=method)
    with pytest.raises(al.errors.SiteNotExposedError, match="not a mixture of experts"):
        lm.run(PROMPT, cache=["blocks.0.mlp.experts"])
    assert not any("mlp.experts" in s or "mlp.router" in s for s in lm.sites())


def test_moe_neurons_are_refused_with_the_reason():
    lm = _lm("mixtral")
    with pytest.raises(al.errors.UnsupportedArchitectureError, match="mixtures of experts"):
        al.attribute(lm, PROMPT, target=TARGET, units="neurons", method="occlusion")


def test_dense_layers_of_a_partly_sparse_model():
    """Qwen2-MoE with layer 1 dense: experts only on layer 0, neurons on layer 1."""
    lm = al.wrap(*tiny_model("qwen2_moe", mlp_only_layers=[1]))
    assert lm.has_experts(0) and not lm.has_experts(1)
    r = al.attribute(lm, PROMPT, target=TARGET, units="experts", method="dla")
    assert set(r.units["layer"]) == {0}
    with pytest.raises(al.errors.InputError, match="dense"):
        al.attribute(lm, PROMPT, target=TARGET, units=al.units.Experts(layers=[1]), method="dla")
    _, cache = lm.run(PROMPT, cache=["blocks.1.mlp.neurons", "blocks.1.mlp.out"])
    out = cache["blocks.1.mlp.neurons"] @ lm.W_out(1)
    torch.testing.assert_close(out, cache["blocks.1.mlp.out"], atol=1e-5, rtol=1e-5)


def test_router_units_equal_a_hand_edit_of_the_router_logits(lm):
    """``Experts(site="router")``: occlusion of router logit e equals the run with that
    logit set to zero by hand (the tokens are re-routed); AtP is its first-order
    estimate; DLA refuses (router logits write nothing to the residual)."""
    units = al.units.Experts(layers=[1], site="router")
    r = al.attribute(lm, PROMPT, target=TARGET, units=units, method="occlusion")
    assert len(r) == lm.cfg.n_experts  # routed experts only (no shared slot)
    site = "blocks.1.mlp.router"
    clean = _logit_diff(lm)
    for j, e in enumerate(r.units["expert"]):
        hand = clean - _logit_diff(lm, [Intervention(site, torch.zeros(1), heads=[e])])
        assert abs(float(r.scores[j]) - hand) < 1e-5, (e, float(r.scores[j]), hand)
    assert any(abs(float(s)) > 1e-6 for s in r.scores)  # the edit changes the routing
    atp = al.attribute(lm, PROMPT, target=TARGET, units=units, method="atp")
    assert torch.isfinite(atp.scores).all() and len(atp) == len(r)
    with pytest.raises(al.errors.InputError, match="router logits"):
        al.attribute(lm, PROMPT, target=TARGET, units=units, method="dla")
    with pytest.raises(al.errors.InputError, match="'experts' .* or 'router'"):
        al.units.Experts(site="gate")


@pytest.mark.parametrize("site", ["experts", "router"])
def test_exact_patching_over_experts_equals_counterfactual_occlusion(lm, site):
    """``method="patch"`` runs on experts (and router logits) through the same
    component locations: its scores are occlusion's with the counterfactual
    ablation, per layer and per position."""
    for units in (al.units.Experts(site=site), al.units.Experts(layers=[1], per_position=True)):
        kw = dict(target=TARGET, units=units, counterfactual=CF)
        p = al.attribute(lm, PROMPT, method="patch", **kw)
        o = al.attribute(lm, PROMPT, method="occlusion", **kw)
        assert p.units == o.units
        torch.testing.assert_close(p.scores.double(), o.scores.double(), atol=1e-6, rtol=1e-6)
        assert float(p.scores.abs().max()) > 1e-6
