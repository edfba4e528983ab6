"""Attribution graphs: head loadings of edges, the pre-flight memory estimate."""

from __future__ import annotations

import pytest
import torch

import attrlab as al
from attrlab.dictionaries import Dictionary
from attrlab.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "When Mary and John went to the store, John gave"


def _transcoders(lm, seed=0):
    return [Dictionary.random(lm.cfg.d_model, 32, f"blocks.{layer}.mlp.in", f"blocks.{layer}.mlp.out",
                              activation="topk", k=4, seed=seed + layer)
            for layer in range(lm.cfg.n_layers)]  # fmt: skip


def _graph(lm):
    return al.attribution_graph(lm, PROMPT, _transcoders(lm), target=" Mary", node_threshold=1.0,
                                edge_threshold=0.999, max_nodes=80, head_loadings=True)  # fmt: skip


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_head_loadings_carry_every_edge_between_positions(family):
    """An edge between two positions can only pass through attention: its head
    loadings sum to its weight and its attention-free share is zero; every
    edge's rows (heads + the residual share) sum to its weight."""
    m, t = tiny_model(family)
    lm = al.wrap(m.double(), t)
    g = _graph(lm)
    hl, edges = g.to_pandas("head_loadings"), g.to_pandas("edges")
    pos = g.to_pandas("nodes").set_index("id").position
    assert set(hl.layer[hl.layer >= 0]) <= set(range(lm.cfg.n_layers))
    assert set(hl["head"][hl["head"] >= 0]) <= set(range(lm.cfg.n_heads))
    through_heads = hl[hl["head"] >= 0].groupby(["source", "target"]).weight.sum()
    cross = edges[[pos[s] != pos[d] and pos[s] >= 0 for s, d in zip(edges.source, edges.target)]]
    assert len(cross) > 5
    scale = edges.weight.abs().max()
    # (float64 models; HF's RMS norms compute in float32, hence 1e-6)
    for s, d, w in zip(cross.source, cross.target, cross.weight):
        assert abs(through_heads[(s, d)] - w) < 1e-6 * scale
    total = hl.groupby(["source", "target"]).weight.sum()
    assert len(total) == len(edges)
    for s, d, w in zip(edges.source, edges.target, edges.weight):
        assert abs(total[(s, d)] - w) < 1e-12 * scale
    # same-position edges keep a share through the residual stream alone
    res = hl[(hl.layer == -1)]
    assert res.weight.abs().max() > 1e-3 * scale


def test_a_head_that_writes_nothing_carries_nothing():
    """Zero one head's output projection: it loads no edge, the others still do."""
    m, t = tiny_model("llama")
    lm = al.wrap(m.double(), t)
    with torch.no_grad():
        lm.adapter.W_O(0)[1].zero_()
    assert float(lm.adapter.W_O(0)[1].detach().abs().sum()) == 0.0  # the view reached the weights
    hl = _graph(lm).to_pandas("head_loadings")
    layer0 = hl[hl.layer == 0]
    assert (layer0[layer0["head"] == 1].weight.abs() < 1e-12).all()
    assert layer0[layer0["head"] != 1].weight.abs().max() > 1e-3


def test_head_loadings_save_and_load(tmp_path):
    m, t = tiny_model("gpt2")
    lm = al.wrap(m.double(), t)
    g = _graph(lm)
    back = al.GraphResult.load(g.save(tmp_path / "g.graph.json"))
    assert back.tables["head_loadings"] == g.tables["head_loadings"]
    assert "head_loadings" not in _transcoder_free_tables(lm)


def _transcoder_free_tables(lm):
    g = al.attribution_graph(lm, PROMPT, _transcoders(lm), target=" Mary", max_nodes=10)
    return g.tables


def test_a_pair_target_is_the_logit_difference():
    """Bias-free Llama: the direct effects into the target node sum to the logit
    difference; graph_faithfulness measures the same difference."""
    m, t = tiny_model("llama")
    lm = al.wrap(m.double(), t)
    tcs = _transcoders(lm)
    g = al.attribution_graph(lm, PROMPT, tcs, target=(" Mary", " John"), node_threshold=1.0,
                             edge_threshold=1.0, max_nodes=10_000)  # fmt: skip
    logits, _ = lm.run(PROMPT)
    diff = float(logits[0, -1, lm.token_id(" Mary")] - logits[0, -1, lm.token_id(" John")])
    assert g.target.startswith("logit_diff")
    assert abs(sum(g.incoming("logit")["weight"]) - diff) < 1e-6
    r = al.evaluate.graph_faithfulness(lm, g, tcs)
    assert abs(r["metric_clean"] - diff) < 1e-9 and abs(r["metric_full"] - diff) < 1e-8
    with pytest.raises(al.errors.InputError, match="pair"):
        al.attribution_graph(lm, PROMPT, tcs, target=(" Mary", " John", " a"))


def test_the_estimate_is_printed_before_the_rows(capsys):
    m, t = tiny_model("gpt2")
    lm = al.wrap(m, t)
    g = al.attribution_graph(lm, PROMPT, _transcoders(lm), progress=True)
    err = capsys.readouterr().err
    assert "active features" in err and " MB" in err
    # the measured row cost is in the estimate: above the adjacency alone
    n_rows, n_src = g.diagnostics["n_feature_rows"] + 1, g.meta["n_sources"]
    assert g.diagnostics["memory_estimate_bytes"] > 2 * n_rows * n_src * 8


@pytest.mark.parametrize("read", ["mlp.normed", "resid_mid"])
def test_transcoders_reading_after_the_norm_or_with_a_skip_sum_exactly(read):
    """circuit-tracer's transcoders read the MLP's normalised input (``mlp.hook_in``
    -> ``mlp.normed``) and may have a skip connection; the direct effects into the
    logit still sum to it on a bias-free Llama."""
    m, t = tiny_model("llama")
    lm = al.wrap(m.double(), t)
    d = lm.cfg.d_model
    tcs = []
    for layer in range(lm.cfg.n_layers):
        tc = Dictionary.random(d, 32, f"blocks.{layer}.{read}", f"blocks.{layer}.mlp.out",
                               activation="topk", k=4, seed=layer)  # fmt: skip
        tc.W_skip = 0.1 * torch.randn(d, d, generator=torch.Generator().manual_seed(layer))
        tcs.append(tc)
    g = al.attribution_graph(lm, PROMPT, tcs, target=" Mary", node_threshold=1.0,
                             edge_threshold=1.0, max_nodes=10_000)  # fmt: skip
    logits, _ = lm.run(PROMPT)
    into = g.incoming("logit")["weight"]
    scale = sum(abs(w) for w in into)  # HF's RMS norm computes in float32
    assert abs(sum(into) - float(logits[0, -1, lm.token_id(" Mary")])) < 1e-7 * scale
    assert g.diagnostics["constant_terms_max"] < 1e-7 * scale


def test_circuit_tracer_hook_names_map_to_the_right_sites():
    from attrlab.dictionaries.io import site_of_hook

    assert site_of_hook("mlp.hook_in", 3) == "blocks.3.mlp.normed"  # after the norm
    assert site_of_hook("blocks.2.ln2.hook_normalized") == "blocks.2.mlp.normed"
    assert site_of_hook("mlp.hook_out", 1) == "blocks.1.mlp.out"
    assert site_of_hook("hook_mlp_in", 1) == "blocks.1.mlp.in"  # before it
    # the normalised input is what the MLP's first projection reads
    m, t = tiny_model("llama")
    lm = al.wrap(m, t)
    _, cache = lm.run(PROMPT, cache=["blocks.0.mlp.in", "blocks.0.mlp.normed"])
    x = cache["blocks.0.mlp.in"]
    normed = lm.adapter.mlp_in_norm(0)(x)
    assert torch.allclose(cache["blocks.0.mlp.normed"], normed, atol=1e-6)
    assert not torch.allclose(x, normed, atol=1e-3)


def test_method_graph_in_attribute_points_to_the_graph_function():
    m, t = tiny_model("gpt2")
    lm = al.wrap(m, t)
    with pytest.raises(al.errors.UnknownMethodError, match="attribution_graph"):
        al.attribute(lm, PROMPT, method="graph")


def test_a_cross_layer_transcoder_graph_sums_exactly_and_reduces_to_per_layer():
    """A CLT's features write to later layers' MLP outputs: the direct effects into
    the logit still sum to it (bias-free Llama). With its cross-layer decoders
    zeroed it is a per-layer set: the same graph as those transcoders."""
    from attrlab.dictionaries import CrossLayerTranscoder

    m, t = tiny_model("llama")
    lm = al.wrap(m.double(), t)
    L, d = lm.cfg.n_layers, lm.cfg.d_model
    clt = CrossLayerTranscoder.random(d, 32, n_layers=L, activation="topk", k=4, seed=3)
    kw = dict(target=" Mary", node_threshold=1.0, edge_threshold=1.0, max_nodes=10_000)
    g = al.attribution_graph(lm, PROMPT, clt, **kw)
    logits, _ = lm.run(PROMPT)
    into = g.incoming("logit")["weight"]
    scale = sum(abs(w) for w in into)
    assert abs(sum(into) - float(logits[0, -1, lm.token_id(" Mary")])) < 1e-7 * scale
    assert g.diagnostics["constant_terms_max"] < 1e-7 * scale
    before = g.to_pandas("edges").set_index(["source", "target"]).weight
    for la in range(L):
        clt.W_dec[la][:, 1:] = 0.0
    per_layer = []
    for la in range(L):
        tc = Dictionary.random(d, 32, f"blocks.{la}.mlp.in", f"blocks.{la}.mlp.out",
                               activation="topk", k=4)  # fmt: skip
        tc.W_enc, tc.b_enc = clt.W_enc[la].clone(), clt.b_enc[la].clone()
        tc.W_dec, tc.b_dec = clt.W_dec[la][:, 0].clone(), clt.b_dec[la].clone()
        per_layer.append(tc)
    a = al.attribution_graph(lm, PROMPT, clt, **kw).to_pandas("edges")
    b = al.attribution_graph(lm, PROMPT, per_layer, **kw).to_pandas("edges")
    merged = a.merge(b, on=["source", "target"], suffixes=("_clt", "_tc"))
    assert len(merged) == len(a) == len(b)
    assert (merged.weight_clt - merged.weight_tc).abs().max() < 1e-9
    # the cross-layer decoders mattered: the full CLT's graph differs
    shared = before.index.intersection(a.set_index(["source", "target"]).index)
    diff = (before[shared] - a.set_index(["source", "target"]).weight[shared]).abs().max()
    assert diff > 1e-3
