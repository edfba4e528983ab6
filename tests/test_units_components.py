"""The unit contract for component kinds: f(keep) and f_gated(g) against
hand-written hook oracles (one plain forward per mask, values set by hand
from a separately cached donor run), for every kind and ablation."""

from __future__ import annotations

import pytest
import torch

import attrlab as al
from attrlab.model.interventions import Intervention
from attrlab.units.components import locations

P = "When Mary and John went to the store, John gave a drink to"
CF = "When Mary and John went to the store, Mary gave a drink to"
REF = [CF, P]  # same token length: the mean is per position

KINDS = {
    "heads": lambda: al.units.Heads(),
    "heads_pos": lambda: al.units.Heads(layers=[1], per_position=True),
    "heads_v": lambda: al.units.Heads(layers=[0]),
    "attn": lambda: al.units.AttnOut(per_position=True),
    "mlp": lambda: al.units.MlpOut(),
    "resid": lambda: al.units.Resid(),
    "neurons": lambda: al.units.Neurons(neurons=[0, 5, 7]),
    "layers": lambda: al.units.Layers(),
}
ABLATIONS = {
    "zero": lambda: al.ablations.Zero(),
    "counterfactual": lambda: al.ablations.Counterfactual(CF),
    "mean": lambda: al.ablations.Mean(REF),
    "noise": lambda: al.ablations.Noise(std=0.5, seed=3, positions=[2, 4]),
}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request):
    torch.manual_seed(0)
    return al.wrap(*al.testing.tiny_model(request.param))


def _donor_cache(lm, abl, sites):
    """The ablated values of each site, computed by hand (independent of the engine)."""
    n_pos = lm.tokenize(P).shape[1]
    if isinstance(abl, al.ablations.Zero):
        _, c = lm.run(P, cache=sites)
        return {s: torch.zeros_like(c[s]) for s in sites}
    if isinstance(abl, al.ablations.Counterfactual):
        _, c = lm.run(CF, cache=sites)
        return {s: c[s] for s in sites}
    if isinstance(abl, al.ablations.Mean):
        out = {}
        for s in sites:
            vals = [lm.run(r, cache=[s])[1][s] for r in REF]
            out[s] = torch.stack(vals).mean(0)
        return out
    g = torch.Generator().manual_seed(abl.seed)
    noise = torch.randn(1, len(abl.positions), lm.cfg.d_model, generator=g) * abl.std
    x = lm.run(P, cache=["embed"])[1]["embed"].clone()
    x[:, abl.positions] += noise
    _, c = lm.run(P, cache=sites, interventions=[Intervention("embed", x)])
    assert n_pos == x.shape[1]
    return {s: c[s] for s in sites}


def _by_hand(lm, target, locs, unit_of, keep_row, donors):
    """One plain forward with every ablated location set to its donor value."""
    ablated = [loc for loc, u in zip(locs, unit_of) if not keep_row[u]]
    by_site: dict[str, list] = {}
    for loc in ablated:
        by_site.setdefault(loc.site, []).append(loc)
    ivs = []
    for site, ls in by_site.items():

        def setter(x, ls=ls, d=donors[site]):
            y = x.clone()
            for loc in ls:
                pos = slice(None) if loc.position is None else loc.position
                if loc.index is None:
                    y[:, pos] = d[:, pos].to(y.dtype)
                else:
                    y[:, pos, loc.index] = d[:, pos, loc.index].to(y.dtype)
            return y

        ivs.append(Intervention(site, setter))
    batch = lm.tokenize(P)
    logits, _ = lm.run(batch, interventions=ivs)
    return float(target(logits, batch).mean())


@pytest.mark.parametrize("abl_name", list(ABLATIONS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_f_equals_hand_built_ablation(lm, kind, abl_name):
    units = KINDS[kind]()
    abl = ABLATIONS[abl_name]()
    target = al.targets.resolve((" Mary", " John"), lm)
    site = "v" if kind == "heads_v" else "z"
    b = units.bind(lm, P, target, abl, site=site, batch_size=7)
    n_pos = lm.tokenize(P).shape[1]
    locs, unit_of, _ = locations(lm, units, n_pos, site)
    donors = _donor_cache(lm, abl, sorted({loc.site for loc in locs}))
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(6, b.n, generator=g) > 0.5
    keep[0] = True  # f(all)
    keep[1] = False  # f(none)
    keep[2] = True
    keep[2, b.n // 2] = False  # leave one out
    got = b.f(keep)[:, 0]
    want = torch.tensor([_by_hand(lm, target, locs, unit_of, k, donors) for k in keep])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    clean_logits, _ = lm.run(P)
    assert abs(float(b.clean()) - float(target(clean_logits, lm.tokenize(P)))) < 1e-5
    # the gated form at 0/1 gates is the same function
    torch.testing.assert_close(b.f_gated(keep.float())[:, 0].detach(), got, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["heads", "heads_pos", "mlp", "layers"])
def test_gate_gradient_matches_finite_differences(lm, kind):
    units = KINDS[kind]()
    target = al.targets.resolve((" Mary", " John"), lm)
    b = units.bind(lm, P, target, al.ablations.Counterfactual(CF))
    g0 = torch.full((1, b.n), 0.6, dtype=torch.float64)
    _, grad = b.gate_grad(g0.float())
    eps = 1e-2
    cols = list(range(min(b.n, 5)))
    for j in cols:
        gp, gm = g0.clone(), g0.clone()
        gp[0, j] += eps
        gm[0, j] -= eps
        fd = (b.f_gated(gp.float()) - b.f_gated(gm.float())).detach()[0, 0] / (2 * eps)
        assert abs(float(fd) - float(grad[0, 0, j])) < 2e-3 + 2e-2 * abs(float(fd))


def test_grouping_equals_one_forward_per_mask(lm):
    """Grouping rows by earliest layer / position and reusing the key/value prefix
    changes nothing: same values as ungrouped single-mask evaluation."""
    units = al.units.Heads(per_position=True)
    target = al.targets.resolve((" Mary", " John"), lm)
    # zero ablation: a counterfactual equals the prompt before its changed token,
    # so patching early positions with it would not test the prefix reuse
    b = units.bind(lm, P, target, al.ablations.Zero(), batch_size=16)
    g = torch.Generator().manual_seed(2)
    keep = torch.rand(24, b.n, generator=g) > 0.03  # sparse: first changes at many positions
    keep[:8] = True
    for r in range(8):  # single-unit patches at scattered positions
        keep[r, (r * 13) % b.n] = False
    batched = b.f(keep)[:, 0]
    assert b.runner.prefix is not None or lm.cfg.family not in ("gpt2", "llama")
    single = torch.cat([b.f(k[None])[:, 0] for k in keep])
    plain = units.bind(lm, P, target, al.ablations.Zero(), reuse_prefix=False)
    torch.testing.assert_close(batched, single, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(batched, plain.f(keep)[:, 0], atol=2e-5, rtol=1e-4)


def test_unsupported_ablation_is_refused_before_work(lm):
    with pytest.raises(al.errors.UnsupportedAblationError, match="heads"):
        al.attribute(lm, P, target=" Mary", units="heads", method="occlusion", ablation="remove")
    with pytest.raises(al.errors.InputError, match="reference"):
        al.attribute(lm, P, target=" Mary", units="heads", method="occlusion", ablation="mean")


def test_float64_models_keep_float64_values():
    """f on a float64 model is computed and returned in float64: it equals the
    hand-built ablation to 1e-10 (float32 rounding would show at ~1e-7)."""
    lm64 = al.wrap(*al.testing.tiny_model("gpt2", dtype=torch.float64))
    target = al.targets.resolve(" John", lm64)
    units = al.units.Heads(layers=[1], per_position=True)
    b = units.bind(lm64, P, target, al.ablations.Counterfactual(CF))
    keep = torch.ones(3, b.n, dtype=torch.bool)
    keep[1, 5] = False
    keep[2, [0, 7, 30]] = False
    vals = b.f(keep)[:, 0]
    assert vals.dtype == torch.float64
    locs, unit_of, _ = locations(lm64, units, lm64.tokenize(P).shape[1])
    donors = _donor_cache(lm64, al.ablations.Counterfactual(CF), sorted({x.site for x in locs}))
    for i in range(3):
        ref = _by_hand(lm64, target, locs, unit_of, keep[i].tolist(), donors)
        assert abs(float(vals[i]) - ref) < 1e-10
