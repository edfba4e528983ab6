"""Circuits: extraction, evaluation by running the circuit, ACDC, files, drawing."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest
import torch

import attrlab as al
from attrlab.errors import FileFormatError, InputError
from attrlab.evaluate.circuits import (
    circuit_curve,
    circuit_metric,
    completeness,
    evaluate_circuit,
    faithfulness,
    minimality,
)
from attrlab.methods.atp import CounterfactualWarning
from attrlab.methods.circuits import Circuit, acdc, extract_circuit, prune_dangling
from attrlab.model.interventions import Intervention

PROMPT = "When Mary and John went to the store, John gave a drink to"
CF = "When Tom and Anna went to the park, Mary gave a ball to"
TARGET = (" Mary", " John")


@pytest.fixture(scope="module")
def lm():
    return al.wrap(*al.testing.tiny_model("gpt2", dtype=torch.float64))


@pytest.fixture(scope="module")
def eap(lm):
    return al.attribute(lm, PROMPT, target=TARGET, units="edges", method="eap", counterfactual=CF)


def metric(lm, prompt=PROMPT, ivs=()):
    t = al.targets.resolve(TARGET, lm)
    b = lm.tokenize(prompt)
    return float(t(lm.run(b, interventions=list(ivs))[0], b)[0])


def test_removing_a_nodes_edges_equals_patching_the_node(lm):
    """Independent oracle: a circuit without any edge out of head (1, 2) == the
    model with that head's output set to its counterfactual value."""
    g = al.units.Edges().graph(lm)
    mask = torch.ones(g.n_edges, dtype=torch.bool)
    ups = g.labels()["upstream"]
    mask[[i for i, u in enumerate(ups) if u == "a0.h2"]] = False
    value = circuit_metric(lm, Circuit(g, mask), PROMPT, TARGET, CF)
    _, cf_cache = lm.run(CF, cache=["blocks.0.attn.head_out"])
    iv = Intervention(
        "blocks.0.attn.head_out", cf_cache["blocks.0.attn.head_out"][:, :, 2:3], heads=2
    )
    assert value == pytest.approx(metric(lm, ivs=[iv]), abs=1e-10)
    assert abs(value - metric(lm)) > 1e-6  # the patch matters


def test_per_position_edges_patch_one_position(lm):
    units = al.units.Edges(per_position=True)
    n_pos = lm.tokenize(PROMPT).shape[1]
    g = units.graph(lm, n_pos=n_pos)
    lab = g.labels()
    mask = torch.tensor(
        [not (u == "m0" and p == 9) for u, p in zip(lab["upstream"], lab["position"])]
    )
    value = circuit_metric(lm, Circuit(g, mask), PROMPT, TARGET, CF)
    _, cf_cache = lm.run(CF, cache=["blocks.0.mlp.out"])
    iv = Intervention("blocks.0.mlp.out", cf_cache["blocks.0.mlp.out"][:, 9], positions=9)
    assert value == pytest.approx(metric(lm, ivs=[iv]), abs=1e-10)


def test_per_position_eap_sums_to_eap(lm, eap):
    per = al.attribute(
        lm,
        PROMPT,
        target=TARGET,
        units=al.units.Edges(per_position=True),
        method="eap",
        counterfactual=CF,
    )
    n_pos = lm.tokenize(PROMPT).shape[1]
    assert len(per) == len(eap) * n_pos
    torch.testing.assert_close(
        per.scores.reshape(-1, n_pos).sum(1), eap.scores, atol=1e-6, rtol=1e-5
    )


def test_full_and_empty_circuits(lm):
    g = al.units.Edges().graph(lm)
    full = Circuit(g, torch.ones(g.n_edges, dtype=torch.bool))
    empty = Circuit(g, torch.zeros(g.n_edges, dtype=torch.bool))
    f = faithfulness(lm, full, PROMPT, TARGET, CF)
    e = faithfulness(lm, empty, PROMPT, TARGET, CF)
    assert f["faithfulness"] == pytest.approx(1.0, abs=1e-9)
    assert e["faithfulness"] == pytest.approx(0.0, abs=1e-9)
    assert e["metric_circuit"] == pytest.approx(metric(lm, CF), abs=1e-10)
    assert completeness(lm, full, PROMPT, TARGET, CF, n_subsets=3)["incompleteness"] < 1e-9
    mini = minimality(lm, full, PROMPT, TARGET, CF)
    assert set(mini["per_node"]) == {f"a{layer}.h{h}" for layer in range(2) for h in range(4)} | {
        "m0",
        "m1",
    }


def test_extraction_modes(lm, eap):
    top = extract_circuit(eap, top_n=10, prune=False)
    assert top.n_edges == 10
    order = torch.argsort(eap.scores.abs(), descending=True)[:10]
    assert set(torch.nonzero(top.mask)[:, 0].tolist()) == set(order.tolist())
    thr = extract_circuit(eap, threshold=float(eap.scores.abs().median()), prune=False)
    assert thr.n_edges == int((eap.scores.abs() >= eap.scores.abs().median()).sum())
    greedy = extract_circuit(eap, top_n=12, greedy=True, prune=False)
    nodes_fed = {u for u, _ in greedy.edges()} | {"logits"}
    for _u, v in greedy.edges():  # every edge feeds a node already in the circuit
        assert v.rsplit(".", 1)[0] in nodes_fed or v in nodes_fed
    with pytest.raises(al.errors.InputError):
        extract_circuit(eap, top_n=3, fraction=0.1)


def test_pruning_dangling_edges_is_lossless(lm, eap):
    raw = extract_circuit(eap, top_n=15, prune=False)
    pruned = Circuit(raw.graph, prune_dangling(raw.graph, raw.mask), raw.scores)
    assert pruned.n_edges <= raw.n_edges
    a = circuit_metric(lm, raw, PROMPT, TARGET, CF)
    b = circuit_metric(lm, pruned, PROMPT, TARGET, CF)
    assert a == pytest.approx(b, abs=1e-10)


def test_mean_ablation(lm):
    g = al.units.Edges().graph(lm)
    empty = Circuit(g, torch.zeros(g.n_edges, dtype=torch.bool))
    others = [PROMPT, CF, "When Tom and Anna went to the park, Anna gave a ball to"]
    r = evaluate_circuit(lm, empty, PROMPT, TARGET, ablation="mean", reference=others)
    assert r["faithfulness"] == pytest.approx(0.0, abs=1e-9)
    assert r["metric_circuit"] != pytest.approx(r["metric_clean"])
    assert r["ablation"] == "mean"
    # the deprecated spelling still works, with a warning
    with pytest.warns(DeprecationWarning, match="reference="):
        old = evaluate_circuit(lm, empty, PROMPT, TARGET, ablation="mean", mean_inputs=others)
    assert old["metric_circuit"] == r["metric_circuit"]
    # every node's output set to its mean over the references, by hand
    sites = ["blocks.0.resid_pre"] + [
        f"blocks.{i}.{s}" for i in range(2) for s in ("attn.head_out", "mlp.out")
    ]
    _, cache = lm.run(others, cache=sites)
    ivs = [Intervention(s, cache[s].mean(0, keepdim=True)) for s in sites]
    assert r["metric_circuit"] == pytest.approx(metric(lm, ivs=ivs), abs=1e-10)


def test_zero_ablation_and_ablation_objects(lm):
    g = al.units.Edges().graph(lm)
    empty = Circuit(g, torch.zeros(g.n_edges, dtype=torch.bool))
    a = faithfulness(lm, empty, PROMPT, TARGET, ablation="zero")
    b = faithfulness(lm, empty, PROMPT, TARGET, ablation=al.ablations.Zero())
    assert a["metric_circuit"] == b["metric_circuit"] and a["ablation"] == "zero"
    with pytest.raises(al.errors.InputError, match="counterfactual="):
        faithfulness(lm, empty, PROMPT, TARGET)  # edges have no default ablation


def test_circuit_curve_is_faithfulness_of_each_circuit(lm, eap):
    g = al.units.Edges().graph(lm)
    order = torch.argsort(eap.scores.abs(), descending=True)
    masks = torch.zeros(4, g.n_edges, dtype=torch.bool)
    for i, k in enumerate((0, 5, 40, g.n_edges)):
        masks[i, order[:k]] = True
    curve = circuit_curve(lm, masks, g, PROMPT, TARGET, CF)
    assert curve["faithfulness"][0] == pytest.approx(0.0, abs=1e-9)
    assert curve["faithfulness"][-1] == pytest.approx(1.0, abs=1e-9)
    for m, f in zip(masks, curve["faithfulness"]):
        assert f == pytest.approx(
            faithfulness(lm, Circuit(g, m), PROMPT, TARGET, CF)["faithfulness"], abs=1e-10
        )


def test_same_counterfactual_warns_not_nan(lm, eap):
    c = extract_circuit(eap, top_n=5)
    with pytest.warns(CounterfactualWarning):
        r = faithfulness(lm, c, PROMPT, TARGET, PROMPT)
    assert r["faithfulness"] == 1.0


def test_acdc_exact_reference(lm):
    units = al.units.Edges(qkv=False)
    full, _ = lm.run(PROMPT)
    p = full[0, -1].log_softmax(-1)
    kl_all = float((p.exp() * (p - lm.run(CF)[0][0, -1].log_softmax(-1))).sum())
    tau = kl_all / 30
    c = acdc(lm, PROMPT, CF, tau=tau, units=units)
    assert 0 < c.n_edges < c.graph.n_edges
    # its recorded final KL is what running the circuit gives
    from attrlab.units.edges import EdgePatcher, edge_activations

    ref = edge_activations(lm, lm.tokenize(CF), c.graph)
    with torch.no_grad(), EdgePatcher(lm, c.graph, ref, c.matrix()[None]):
        logits, _ = lm.run(PROMPT)
    kl = float((p.exp() * (p - logits[0, -1].log_softmax(-1))).sum())
    assert kl == pytest.approx(c.meta["final_distance"], abs=1e-9)
    r = al.attribute(
        lm, PROMPT, target=None, units=units, method="acdc", counterfactual=CF, tau=tau
    )
    assert torch.equal(r.extra["mask"].bool(), c.mask)
    assert Circuit.from_attribution(r).edges() == c.edges()
    # the speculative batches make the same decisions as one removal per forward
    assert c.meta["n_forwards"] < c.graph.n_edges
    slow = _acdc_one_at_a_time(lm, units, tau)
    assert torch.equal(slow, c.mask)


def _acdc_one_at_a_time(lm, units, tau):
    """ACDC written out plainly: one forward per tried edge (the oracle)."""
    from attrlab.units.edges import EdgePatcher, edge_activations

    g = units.graph(lm)
    ref = edge_activations(lm, lm.tokenize(CF), g)
    p = lm.run(PROMPT)[0][0, -1].log_softmax(-1)

    def kl(keep):
        with torch.no_grad(), EdgePatcher(lm, g, ref, keep[None].double()):
            logits, _ = lm.run(PROMPT)
        return float((p.exp() * (p - logits[0, -1].log_softmax(-1))).sum())

    keep = g.adjacency.clone().double()
    current = kl(keep)
    rank = {"embed": -1.0, "logits": 1e9}

    def node_rank(name):
        node = name.rsplit(".", 1)[0] if name.endswith((".q", ".k", ".v")) else name
        if node in rank:
            return rank[node]
        return int(node[1:].split(".")[0]) + (0.5 if node.startswith("m") else 0)

    for v in sorted(range(len(g.downstream)), key=lambda v: -node_rank(g.downstream[v])):
        for u in reversed(range(len(g.upstream))):
            if not g.adjacency[u, v]:
                continue
            keep[u, v] = 0.0
            new = kl(keep)
            if new - current < tau:
                current = new
            else:
                keep[u, v] = 1.0
    return g.from_matrix(keep).bool()


def test_acdc_with_a_target_and_a_zero_ablation(lm):
    units = al.units.Edges(qkv=False)
    c = acdc(lm, PROMPT, tau=0.02, units=units, target=TARGET, ablation="zero")
    full = Circuit(c.graph, torch.ones(c.graph.n_edges, dtype=torch.bool))
    dist = abs(circuit_metric(lm, c, PROMPT, TARGET, ablation="zero")
               - circuit_metric(lm, full, PROMPT, TARGET, ablation="zero"))  # fmt: skip
    assert dist == pytest.approx(c.meta["final_distance"], abs=1e-10)
    assert 0 < c.n_edges < c.graph.n_edges
    assert dist < 0.02 * (c.graph.n_edges - c.n_edges)  # each accepted removal adds < tau


def test_save_load_and_draw(lm, eap, tmp_path):
    c = extract_circuit(eap, top_n=12)
    back = Circuit.load(c.save(tmp_path / "c.attr"))
    assert torch.equal(back.mask, c.mask) and torch.equal(back.scores, c.scores)
    assert back.edges() == c.edges()
    assert circuit_metric(lm, back, PROMPT, TARGET, CF) == pytest.approx(
        circuit_metric(lm, c, PROMPT, TARGET, CF)
    )
    dot = c.to_dot()
    assert dot.startswith("digraph") and all(f'"{u}"' in dot for u, _ in c.edges())
    svg = c.to_svg()
    root = ET.fromstring(svg)  # well-formed XML
    assert root.tag.endswith("svg")
    assert len([e for e in root.iter() if e.tag.endswith("path")]) >= len(c.edges())
    assert len([e for e in root.iter() if e.tag.endswith("rect")]) == len(c.nodes())


def test_grouped_query_circuit(tmp_path):
    """Grouped-query attention: a shared key/value input ``a{l}.kv{g}.k`` is read
    by every query head of its group, so pruning keeps an edge into it while any
    of those heads feeds the circuit; circuits extract, run, save and draw."""
    lm = al.wrap(*al.testing.tiny_model("llama", dtype=torch.float64))
    g = al.units.Edges().graph(lm)
    labels = g.labels()
    pairs = list(zip(labels["upstream"], labels["downstream"]))

    def mask_of(*edges):
        m = torch.zeros(g.n_edges, dtype=torch.bool)
        for e in edges:
            m[pairs.index(e)] = True
        return m

    # embed -> a0.kv0.k feeds heads 0 and 1 of layer 0 (4 query heads, 2 kv heads)
    kept = prune_dangling(g, mask_of(("embed", "a0.kv0.k"), ("a0.h1", "logits")))
    assert kept.sum() == 2
    # a0.h2 (group 1) is fed by nothing, then kv0's readers feed nothing
    assert prune_dangling(g, mask_of(("embed", "a0.kv0.k"), ("a0.h2", "logits"))).sum() == 0
    r = al.attribute(lm, PROMPT, target=TARGET, units="edges", method="eap-ig",
                     counterfactual=CF, steps=4)  # fmt: skip
    assert any(d.endswith(".k") and ".kv" in d for d in r.units["downstream"])
    c = extract_circuit(r, top_n=20, greedy=True)
    assert c.n_edges > 0
    assert math.isfinite(evaluate_circuit(lm, c, PROMPT, TARGET, CF)["faithfulness"])
    full = extract_circuit(r, fraction=1.0)
    assert evaluate_circuit(lm, full, PROMPT, TARGET, CF)["faithfulness"] == pytest.approx(1.0)
    back = Circuit.load(c.save(tmp_path / "gqa.attr"))
    assert back.edges() == c.edges() and back.graph.n_kv_heads == 2
    root = ET.fromstring(c.to_svg())
    assert len([e for e in root.iter() if e.tag.endswith("rect")]) == len(c.nodes())


# ---------------------------------------------------------------- zoo IOI model
@pytest.fixture(scope="module")
def ioi():
    lm = al.zoo.load("ioi")
    task = al.zoo.task("ioi")
    return lm, task


def _split(task, n, seed):
    exs = task.examples(n, seed=seed)
    return (
        [e.prompt for e in exs],
        [e.counterfactual for e in exs],
        al.targets.LogitDiff([e.answer for e in exs], [e.wrong for e in exs]),
    )


def test_ioi_eap_ig_circuit_is_faithful_on_held_out_prompts(ioi):
    """Acceptance: an EAP-IG circuit with <= 5% of the edges keeps >= 80% of the
    clean-vs-counterfactual logit difference on held-out prompts, by running it."""
    lm, task = ioi
    p, c, t = _split(task, 16, seed=0)
    p2, c2, t2 = _split(task, 16, seed=1)
    r = al.attribute(
        lm,
        p,
        target=t,
        units=al.units.Edges(per_position=True),
        method="eap-ig",
        counterfactual=c,
        steps=8,
    )
    circ = extract_circuit(r, fraction=0.05)
    assert circ.fraction <= 0.05
    res = evaluate_circuit(lm, circ, p2, t2, c2, completeness_subsets=4)
    assert res["faithfulness"] >= 0.8
    assert res["metric_clean"] - res["metric_ablated"] > 1.0  # a real gap to explain


def test_edges_f_many_masks(lm):
    units = al.units.Edges(qkv=False)
    b = units.bind(lm, PROMPT, al.targets.resolve(TARGET, lm), al.ablations.Counterfactual(CF))
    masks = torch.stack([torch.ones(b.n, dtype=torch.bool), torch.zeros(b.n, dtype=torch.bool)])
    vals = b.f(masks)[:, 0]
    assert float(vals[0]) == pytest.approx(metric(lm), abs=1e-10)
    assert float(vals[1]) == pytest.approx(metric(lm, CF), abs=1e-10)


def test_circuit_modules_do_not_import_each_other():
    import ast
    from pathlib import Path

    src = Path(al.__file__).parent
    for mine, other in (("evaluate", "methods"), ("methods", "evaluate")):
        tree = ast.parse((src / mine / "circuits.py").read_text())
        names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not any(f"{other}.circuits" in m or m == f"..{other}" for m in names), (mine, names)


@pytest.mark.parametrize("name", ["attrlab.methods.circuits", "attrlab.evaluate.circuits"])
def test_doctests(name):
    import doctest
    import importlib

    res = doctest.testmod(
        importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert res.failed == 0 and res.attempted > 0


# ------------------------------------------------------------ MIB circuit curves
class _LinearBound:
    """f(S) = sum of the kept units' effects: every circuit's value is known by hand."""

    kind = "heads"

    def __init__(self, effects):
        self.e = torch.tensor(effects, dtype=torch.float64)
        self.n = len(effects)

    def f(self, keep):
        return (keep.double() @ self.e)[:, None]

    def clean(self):
        return self.e.sum()[None]


def test_circuit_curve_cpr_cmd_by_hand():
    """effects [3, -1, 2, 0]: m(all) = 4, m(none) = 0; signed top-1/2/3/4 =
    {0}, {0,2}, {0,2,3}, all -> f = .75, 1.25, 1.25, 1; by |score|: {0}, {0,2},
    {0,2,1}, all -> .75, 1.25, 1, 1. Trapezoids over k with width .25."""
    from attrlab.evaluate.circuits import circuit_curve as curve

    class R:
        scores = torch.tensor([3.0, -1.0, 2.0, 0.0])

    c = curve(None, R(), bound=_LinearBound([3, -1, 2, 0]), fractions=(0.25, 0.5, 0.75, 1.0))
    assert c["faithfulness"] == pytest.approx([0.75, 1.25, 1.25, 1.0])
    assert c["faithfulness_abs"] == pytest.approx([0.75, 1.25, 1.0, 1.0])
    assert c["cpr"] == pytest.approx(0.25 * (1.0 + 1.25 + 1.125))
    assert c["cmd"] == pytest.approx(0.25 * (0.25 + 0.125 + 0.0))
    assert c["n_units"] == [1, 2, 3, 4]
    logc = curve(None, R(), bound=_LinearBound([3, -1, 2, 0]), fractions=(0.25, 0.5, 1.0),
                 log_scale=True)  # fmt: skip
    import math

    assert logc["cpr"] == pytest.approx(math.log(2) * (1.0 + 1.125))


def test_circuit_curve_of_results(lm):
    r = al.attribute(lm, PROMPT, target=TARGET, units=al.units.Edges(qkv=True), method="eap",
                     counterfactual=CF)  # fmt: skip
    c = al.evaluate.circuit_curve(lm, r)
    assert c["fractions"] == list(al.evaluate.MIB_FRACTIONS)
    assert c["faithfulness"][-1] == pytest.approx(1.0) and c["faithfulness_abs"][
        -1
    ] == pytest.approx(1.0)
    # one point by hand: the 10% circuit is the pruned top-10% keep-mask through f
    from attrlab.circuit import prune_dangling
    from attrlab.evaluate.circuits import top_fraction_masks

    g = al.units.Edges(qkv=True).graph(lm)
    m = prune_dangling(g, top_fraction_masks(r.scores, [0.1], absolute=True)[0])
    f = faithfulness(lm, al.circuit.Circuit(g, m), PROMPT, TARGET, CF)["faithfulness"]
    assert c["faithfulness_abs"][6] == pytest.approx(f, abs=1e-6)
    h = al.attribute(lm, PROMPT, target=TARGET, units="heads", method="atp", counterfactual=CF)
    ch = al.evaluate.circuit_curve(lm, h, fractions=(0.5, 1.0))
    assert ch["n_units"] == [len(h) // 2, len(h)]
    with pytest.raises(InputError):
        al.evaluate.circuit_curve(lm, h, fractions=(0.5, 0.2))


def test_mib_json_round_trip_and_names(lm, tmp_path):
    from attrlab.circuit import from_mib_json, to_mib_json

    r = al.attribute(lm, PROMPT, target=TARGET, units=al.units.Edges(qkv=True), method="eap",
                     counterfactual=CF)  # fmt: skip
    d = to_mib_json(r, tmp_path / "g.json")
    n_layers, n_heads = lm.cfg.n_layers, lm.cfg.n_heads
    # EAP-IG's graph: per layer, every earlier node feeds q, k, v of each head and the MLP
    n_up = [1 + layer * (n_heads + 1) for layer in range(n_layers)]
    expected = sum(u * 3 * n_heads + (u + n_heads) for u in n_up) + 1 + n_layers * (n_heads + 1)
    assert len(d["edges"]) == expected == len(r)
    assert "input->a0.h0<q>" in d["edges"] and "a0.h0->m0" in d["edges"]
    assert f"m{n_layers - 1}->logits" in d["edges"]
    back = from_mib_json(tmp_path / "g.json")
    assert torch.allclose(back.scores, r.scores.double())
    c1 = al.evaluate.circuit_curve(lm, r, fractions=(0.1, 1.0))
    c2 = al.evaluate.circuit_curve(lm, back, inputs=PROMPT, target=TARGET, counterfactual=CF,
                                   fractions=(0.1, 1.0))  # fmt: skip
    assert c1["faithfulness"] == pytest.approx(c2["faithfulness"])
    with pytest.raises(InputError, match="qkv"):
        to_mib_json(al.attribute(lm, PROMPT, target=TARGET, units=al.units.Edges(qkv=False),
                                 method="eap", counterfactual=CF))  # fmt: skip
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(FileFormatError):
        from_mib_json(tmp_path / "bad.json")
