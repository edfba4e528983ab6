"""The bound edge kind (``units="edges"``): f, f_gated and gate gradients.

Oracles, each independent of the edge patcher: plain runs of the model (the
clean prompt, the counterfactual, a resampled reference, the noised prompt),
node-level hook interventions for "every edge ablated" (an upstream node's
output replaced for every reader is every edge out of it replaced), path
patching of one edge built by hand (the downstream node's input recomputed
with the model's own modules, its output written back with an intervention),
finite differences, and one-mask-at-a-time evaluation.
"""

from __future__ import annotations

import pytest
import torch

import attrlab as al
from attrlab.ablations import Counterfactual, Mean, Noise, Resample, Zero
from attrlab.model.interventions import Intervention
from attrlab.units.base import Bound

PROMPT = "When Mary and John went to the store, John gave a drink to"
CF = "When Tom and Anna went to the park, Mary gave a ball to"
REFS = [CF, "When John and Mary went to the store, Mary gave a drink to"]
PAIR = (" Mary", " John")


def _lm(family: str, **kw):
    hf, tok = al.testing.tiny_model(family, dtype=torch.float64, **kw)
    with torch.no_grad():  # larger weights: ablations move the target visibly
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return al.wrap(hf, tok)


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox", "llama"])
def lm(request):
    return _lm(request.param)


@pytest.fixture(scope="module")
def gpt2():
    return _lm("gpt2")


def _value(lm, inputs=PROMPT, ivs=()):
    t = al.targets.resolve(PAIR, lm)
    b = lm.tokenize(inputs)
    with torch.no_grad():
        logits, _ = lm.run(b, interventions=list(ivs))
    return float(t(logits, b).double().mean())


def _bind(lm, ablation=None, units=None, inputs=PROMPT, **kw):
    units = units or al.units.Edges()
    return units.bind(
        lm, inputs, al.targets.resolve(PAIR, lm), ablation or Counterfactual(CF), **kw
    )


def _edge(b, up, down, position=None):
    lab = b.labels()
    for i, (u, v) in enumerate(zip(lab["upstream"], lab["downstream"])):
        if u == up and v == down and (position is None or lab["position"][i] == position):
            return i
    raise KeyError((up, down, position))


def _upstream_sites(lm):
    L = lm.cfg.n_layers
    return ["blocks.0.resid_pre"] + [
        f"blocks.{i}.{s}" for i in range(L) for s in ("attn.head_out", "mlp.out")
    ]


# ------------------------------------------------------------------ f(all), f(none)
@pytest.mark.parametrize("units", [al.units.Edges(), al.units.Edges(per_position=True)])
def test_f_all_is_the_clean_run_and_f_none_the_counterfactual_run(lm, units):
    b = _bind(lm, units=units)
    ones = torch.ones(1, b.n, dtype=torch.bool)
    assert float(b.f(ones)[0, 0]) == pytest.approx(_value(lm), abs=1e-12)  # no forward
    assert float(b.f(~ones)[0, 0]) == pytest.approx(_value(lm, CF), abs=1e-10)
    assert abs(_value(lm, CF) - _value(lm)) > 1e-3  # the comparison is informative


def test_f_none_with_zero_mean_resample_and_noise_equals_node_ablation_by_hand(lm):
    """Every edge out of every node ablated == every node's output replaced
    (embed, each head, each MLP) in a plain run with hook interventions."""
    sites = _upstream_sites(lm)
    # zero: every upstream output is zero
    zero = [Intervention(s, 0.0) for s in sites]
    # mean over the reference prompts, per position (same token length)
    _, cache = lm.run(REFS, cache=sites)
    mean = [Intervention(s, cache[s].mean(0, keepdim=True)) for s in sites]
    # resample: the reference drawn for the prompt, by the documented seeded rule
    pick = int(torch.randint(0, len(REFS), (1,), generator=torch.Generator().manual_seed(3)))
    cases = [
        (Zero(), _value(lm, ivs=zero)),
        (Mean(REFS), _value(lm, ivs=mean)),
        (Resample(REFS, seed=3), _value(lm, REFS[pick])),
    ]
    noise = Noise(std=0.5, seed=1, positions=[2, 3])
    gen = torch.Generator().manual_seed(1)
    eps = (torch.randn(1, 2, lm.cfg.d_model, generator=gen) * 0.5).double()  # the seeded draw
    cases.append((noise, _value(lm, ivs=[Intervention("embed", eps, op="add", positions=[2, 3])])))
    for abl, want in cases:
        b = _bind(lm, abl)
        got = float(b.f(torch.zeros(1, b.n, dtype=torch.bool))[0, 0])
        assert got == pytest.approx(want, abs=1e-9), abl
        assert abs(want - _value(lm)) > 1e-3, abl


# ------------------------------------------------------------ one edge by hand
def _with_delta(x, delta, position=None):
    out = x.clone()
    if position is None:
        out = out + delta
    else:
        out[:, position] = out[:, position] + delta[:, position]
    return out


def _head_value(lm, layer, comp, head, x):
    """The model's own q/k/v of ``head`` at residual input ``x`` (its module)."""
    a = lm.adapter
    normed = a.attn_in_norm(layer)(x)
    mods = a.qkv_modules(layer)
    if "qkv" in mods:
        q, k, v = a.split_qkv(mods["qkv"](normed))
        out = {"q": q, "k": k, "v": v}[comp]
    else:
        out = mods[comp](normed).unflatten(-1, (-1, lm.cfg.d_head))
    return out[:, :, head : head + 1]


def _one_edge_oracle(lm, up, down, position=None):
    """The target with one edge u -> v patched to the counterfactual, by hand."""
    sites = _upstream_sites(lm) + ["final_norm.input"]
    sites += [f"blocks.{i}.{s}" for i in range(lm.cfg.n_layers) for s in ("resid_pre", "resid_mid")]
    if lm.cfg.parallel_residual:
        sites = [s for s in sites if not s.endswith("resid_mid")]
    _, clean = lm.run(PROMPT, cache=sites)
    _, cf = lm.run(CF, cache=sites)

    def out(cache, node):
        if node == "embed":
            return cache["blocks.0.resid_pre"]
        if node.startswith("m"):
            return cache[f"blocks.{node[1:]}.mlp.out"]
        layer, h = node[1:].split(".h")
        return cache[f"blocks.{layer}.attn.head_out"][:, :, int(h)]

    delta = out(cf, up) - out(clean, up)
    if down == "logits":
        x = _with_delta(clean["final_norm.input"], delta, position)
        return _value(lm, ivs=[Intervention("final_norm.input", x)])
    if down.startswith("m"):
        layer = int(down[1:])
        a = lm.adapter
        x_in = clean[
            f"blocks.{layer}.resid_pre" if lm.cfg.parallel_residual else f"blocks.{layer}.resid_mid"
        ]
        x = _with_delta(x_in, delta, position)
        with torch.no_grad():
            mlp_out = a.mlp(layer)(a.mlp_in_norm(layer)(x))
        return _value(lm, ivs=[Intervention(f"blocks.{layer}.mlp.out", mlp_out)])
    node, comp = down.rsplit(".", 1)
    layer, head = node[1:].split(".")
    layer, head = int(layer), int(head[2:] if head.startswith("kv") else head[1:])
    x = _with_delta(clean[f"blocks.{layer}.resid_pre"], delta, position)
    with torch.no_grad():
        val = _head_value(lm, layer, comp, head, x)
    return _value(lm, ivs=[Intervention(f"blocks.{layer}.attn.{comp}", val, heads=head)])


EDGES = [
    ("a0.h2", "m1"),
    ("a1.h3", "m1"),  # a head into the MLP of its own layer (sequential blocks only)
    ("embed", "a1.h3.k"),
    ("a0.h1", "a1.h0.q"),
    ("m0", "a1.h2.v"),
    ("m1", "logits"),
    ("a1.h1", "logits"),
]


@pytest.mark.parametrize("up,down", EDGES)
def test_one_edge_ablated_equals_path_patching_by_hand(lm, up, down):
    if lm.cfg.n_kv_heads < lm.cfg.n_heads and (down.endswith(".k") or down.endswith(".v")):
        head = int(down.split(".")[1][1:]) // (lm.cfg.n_heads // lm.cfg.n_kv_heads)
        down = f"{down.split('.')[0]}.kv{head}.{down[-1]}"
    if lm.cfg.parallel_residual and (up, down) == ("a1.h3", "m1"):
        pytest.skip("parallel blocks: a layer's MLP does not read its own heads")
    b = _bind(lm)
    keep = torch.ones(1, b.n, dtype=torch.bool)
    keep[0, _edge(b, up, down)] = False
    want = _one_edge_oracle(lm, up, down)
    assert float(b.f(keep)[0, 0]) == pytest.approx(want, abs=1e-10)
    assert abs(want - _value(lm)) > 1e-8  # the edge matters


@pytest.mark.parametrize(
    "up,down,pos",
    [("embed", "a1.h3.k", 1), ("a0.h1", "a1.h0.v", 3), ("a0.h2", "m1", 13), ("m1", "logits", 13)],
)
def test_one_edge_at_one_position_equals_path_patching_by_hand(gpt2, up, down, pos):
    b = _bind(gpt2, units=al.units.Edges(per_position=True))
    keep = torch.ones(1, b.n, dtype=torch.bool)
    keep[0, _edge(b, up, down, position=pos)] = False
    want = _one_edge_oracle(gpt2, up, down, position=pos)
    assert float(b.f(keep)[0, 0]) == pytest.approx(want, abs=1e-10)
    assert abs(want - _value(gpt2)) > 1e-8


# ------------------------------------------------------------ batching, gates
def test_many_masks_in_one_call_equal_one_mask_at_a_time(lm):
    b = _bind(lm)
    keep = torch.rand(7, b.n, generator=torch.Generator().manual_seed(0)) < 0.6
    keep[3] = True  # a full row in the middle (no forward for it)
    together = b.f(keep)
    alone = torch.cat([b.f(k[None]) for k in keep])
    torch.testing.assert_close(together, alone, atol=1e-12, rtol=0)
    one_row = _bind(lm, batch_size=1).f(keep)  # one mask per forward
    torch.testing.assert_close(together, one_row, atol=1e-12, rtol=0)
    assert float((together - together[3]).abs().max()) > 1e-3


def test_f_gated_at_zero_one_gates_is_f(lm):
    for units in (al.units.Edges(), al.units.Edges(per_position=True)):
        b = _bind(lm, units=units)
        keep = torch.rand(4, b.n, generator=torch.Generator().manual_seed(1)) < 0.5
        torch.testing.assert_close(b.f_gated(keep.double()), b.f(keep), atol=1e-12, rtol=0)


def test_several_prompts_average_their_own_questions(gpt2):
    prompts = [PROMPT, "When Anna and Tom went to the park, Tom gave a ball to"]
    cfs = [CF, "When John and Mary went to the store, Mary gave a drink to"]
    t = al.targets.resolve(PAIR, gpt2)
    both = al.units.Edges().bind(gpt2, prompts, t, Counterfactual(cfs))
    each = [al.units.Edges().bind(gpt2, p, t, Counterfactual(c)) for p, c in zip(prompts, cfs)]
    keep = torch.rand(3, both.n, generator=torch.Generator().manual_seed(2)) < 0.5
    want = (each[0].f(keep) + each[1].f(keep)) / 2
    torch.testing.assert_close(both.f(keep), want, atol=1e-12, rtol=0)
    g = torch.full((1, both.n), 0.3, dtype=torch.float64)
    _, gb = both.gate_grad(g)
    want_g = (each[0].gate_grad(g)[1] + each[1].gate_grad(g)[1]) / 2
    torch.testing.assert_close(gb, want_g, atol=1e-12, rtol=0)


@pytest.mark.parametrize("abl", [Counterfactual(CF), Zero(), Mean(REFS)], ids=lambda a: a.name)
def test_closed_form_gate_gradient_equals_autograd(lm, abl):
    """gate_grad at gates equal on every edge (EAP at 1, IG's path points) ==
    autograd through f_gated; per-position edges and qkv=False too."""
    kinds = [al.units.Edges(), al.units.Edges(per_position=True)]
    if lm.cfg.n_kv_heads == lm.cfg.n_heads:
        kinds.append(al.units.Edges(qkv=False))
    for units in kinds:
        b = _bind(lm, abl, units=units)
        g = torch.tensor([[1.0], [0.35], [0.0]], dtype=torch.float64).expand(3, b.n)
        v1, d1 = b.gate_grad(g)
        v2, d2 = Bound.gate_grad(b, g)  # autograd
        torch.testing.assert_close(v1, v2, atol=1e-12, rtol=0)
        torch.testing.assert_close(d1, d2, atol=1e-12, rtol=1e-9)
        assert float(d2.abs().max()) > 1e-4


def test_gate_gradient_matches_finite_differences(gpt2):
    b = _bind(gpt2)
    gen = torch.Generator().manual_seed(4)
    for g in (torch.full((1, b.n), 0.6, dtype=torch.float64),
              0.2 + 0.6 * torch.rand(1, b.n, generator=gen, dtype=torch.float64)):  # fmt: skip
        _, d = b.gate_grad(g)
        top = torch.argsort(d[0, 0].abs(), descending=True)[:3]
        eps = 1e-5
        for i in top.tolist():
            gg = g.repeat(2, 1)
            gg[0, i] += eps
            gg[1, i] -= eps
            v = b.f_gated(gg)[:, 0]
            fd = float(v[0] - v[1]) / (2 * eps)
            assert fd == pytest.approx(float(d[0, 0, i]), rel=1e-5, abs=1e-9)


def test_gate_grad_sum_weights_the_points(gpt2):
    b = _bind(gpt2)
    g = torch.tensor([[0.2], [0.9]], dtype=torch.float64).expand(2, b.n)
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    acc, vals = b.gate_grad_sum(g, w)
    v, d = b.gate_grad(g)
    torch.testing.assert_close(acc[0], (w[:, None] * d[:, 0]).sum(0), atol=1e-12, rtol=0)
    torch.testing.assert_close(vals, v, atol=1e-12, rtol=0)


# ------------------------------------------------------------------ questions
def test_ablations_and_errors(gpt2):
    t = al.targets.resolve(PAIR, gpt2)
    with pytest.raises(al.errors.InputError, match="counterfactual="):
        al.units.Edges().bind(gpt2, PROMPT, t)
    with pytest.raises(al.errors.UnsupportedAblationError, match="edges"):
        al.units.Edges().check_ablation(al.ablations.Token("pad"))
    with pytest.raises(al.errors.CounterfactualLengthError):
        al.units.Edges().bind(gpt2, PROMPT, t, Counterfactual("a b"))
    with pytest.raises(al.errors.InputError, match="reduce="):
        al.units.Edges().bind(
            gpt2, PROMPT, al.targets.ContinuationLogProb(" a b", reduce="none"), Zero()
        )
    b = _bind(gpt2)
    with pytest.raises(al.errors.InputError, match="n_units"):
        b.f(torch.ones(2, b.n + 1, dtype=torch.bool))
    assert al.units.Edges.ablations[0] is Counterfactual
    assert {"f", "gates"} <= al.units.Edges.provides


def test_identical_counterfactual_gives_the_clean_value_and_zero_gradients(gpt2):
    with pytest.warns(al.errors.CounterfactualWarning):
        b = _bind(gpt2, Counterfactual(PROMPT))
    keep = torch.rand(3, b.n, generator=torch.Generator().manual_seed(5)) < 0.5
    assert bool((b.f(keep) == b.clean()).all())
    _, d = b.gate_grad(torch.ones(1, b.n, dtype=torch.float64))
    assert float(d.abs().max()) == 0.0


def test_generic_estimators_run_on_edges(gpt2):
    """Edges provide f and gates, so occlusion, KernelSHAP, IG ... run on them:
    occlusion's scores are f(all) - f(all without the edge)."""
    units = al.units.Edges(qkv=False)
    r = al.attribute(gpt2, PROMPT, target=PAIR, units=units, method="occlusion",
                     counterfactual=CF)  # fmt: skip
    b = _bind(gpt2, units=units)
    i = int(torch.argmax(r.scores.abs()))
    keep = torch.ones(1, b.n, dtype=torch.bool)
    keep[0, i] = False
    assert float(r.scores[i]) == pytest.approx(_value(gpt2) - float(b.f(keep)[0, 0]), abs=1e-10)
    s = al.evaluate.lds(gpt2, r, n_masks=8)
    assert bool(torch.isfinite(s.values).all())


# ------------------------------------------------------- per-head input sites
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "phi3", "qwen2"])
def test_per_head_input_sites_equal_the_modules_own_projection(family):
    """Writing blocks.1.attn.{q,k,v}_in for one head == that head's q/k/v
    recomputed by the model's own (fused or separate) projection module."""
    lm = _lm(family)
    _, cache = lm.run(PROMPT, cache=["blocks.1.resid_pre"])
    x = cache["blocks.1.resid_pre"]
    delta = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    for comp in "qkv":
        got = _value(lm, ivs=[Intervention(f"blocks.1.attn.{comp}_in", delta[:, :, None], op="add",
                                           heads=1)])  # fmt: skip
        with torch.no_grad():
            val = _head_value(lm, 1, comp, 1, x + delta)
        want = _value(lm, ivs=[Intervention(f"blocks.1.attn.{comp}", val, heads=1)])
        assert got == pytest.approx(want, abs=1e-10), comp
        assert abs(want - _value(lm)) > 1e-6


@pytest.mark.parametrize("name", ["attrlab.units.edges", "attrlab.circuit"])
def test_doctests(name):
    import doctest
    import importlib

    res = doctest.testmod(
        importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert res.failed == 0 and res.attempted > 0
