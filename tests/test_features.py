"""Sparse dictionaries (al.dictionaries) and their features as units (al.units.Features)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import attrlab as al
from attrlab.dictionaries import Dictionary
from attrlab.errors import FileFormatError, InputError
from attrlab.model.interventions import Intervention
from attrlab.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "When Mary and John went to the store, John gave"
CF = "When Mary and John went to the store, Mary gave"


@pytest.fixture(scope="module")
def lm():
    m, t = tiny_model("gpt2")
    return al.wrap(m.double(), t)


def _sae(d_model: int, site: str = "blocks.1.resid_pre", seed: int = 0, **kw) -> Dictionary:
    d = Dictionary.random(d_model, 48, site, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    d.b_enc = 0.1 * torch.randn(48, generator=g)
    d.b_dec = 0.1 * torch.randn(d_model, generator=g)
    return d


# ------------------------------------------------------------------ loading
@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_saelens_layout_written_by_hand_loads_and_encodes(tmp_path, arch):
    g = torch.Generator().manual_seed(0)
    d_in, width = 8, 24
    W_enc, W_dec = torch.randn(d_in, width, generator=g), torch.randn(width, d_in, generator=g)
    b_enc, b_dec = torch.randn(width, generator=g), torch.randn(d_in, generator=g)
    tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": width, "hook_name": "blocks.2.hook_resid_pre",
           "hook_layer": 2, "apply_b_dec_to_input": True, "activation_fn_str": "relu",
           "normalize_activations": "none"}  # fmt: skip
    if arch == "jumprelu":
        tensors["threshold"] = torch.full((width,), 0.3)
    if arch == "topk":
        cfg["activation_fn_str"], cfg["activation_fn_kwargs"] = "topk", {"k": 5}
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    d = al.dictionaries.load(tmp_path)
    assert d.in_site == d.out_site == "blocks.2.resid_pre" and d.width == width
    x = torch.randn(5, d_in, generator=g)
    pre = (x - b_dec) @ W_enc + b_enc  # by hand
    if arch == "standard":
        f = pre.clamp_min(0)
    elif arch == "jumprelu":
        f = torch.where(pre > 0.3, pre, torch.zeros_like(pre))
    else:
        f = torch.zeros_like(pre)
        top = pre.topk(5, dim=-1)
        f.scatter_(-1, top.indices, top.values.clamp_min(0))
    assert torch.allclose(d.encode(x), f)
    assert torch.allclose(d(x), f @ W_dec + b_dec)
    back = al.dictionaries.load(al.dictionaries.save_saelens(d, tmp_path / "again"))
    assert torch.allclose(back(x), d(x)) and back.activation == d.activation


def test_malformed_and_unsupported_files_raise(tmp_path):
    with pytest.raises(FileFormatError):
        al.dictionaries.load(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(FileFormatError):
        al.dictionaries.load(tmp_path)
    (tmp_path / "cfg.json").write_text(
        json.dumps({"architecture": "standard", "hook_name": "blocks.0.hook_resid_pre"})
    )
    (tmp_path / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(FileFormatError):
        al.dictionaries.load(tmp_path)
    with pytest.raises(InputError, match="not an attrlab site"):
        al.dictionaries.site_of_hook("blocks.0.attn.hook_z")
    with pytest.raises(InputError, match="topk"):
        Dictionary.random(4, 8, "s", activation="topk", k=99)


def test_circuit_tracer_layout_loads(tmp_path):
    g = torch.Generator().manual_seed(0)
    for layer in (0, 1):
        save_file({"W_enc": torch.randn(16, 8, generator=g),  # stored [width, d]
                   "b_enc": torch.randn(16, generator=g), "W_dec": torch.randn(16, 8, generator=g),
                   "b_dec": torch.randn(8, generator=g), "threshold": torch.full((16,), 0.2)},
                  str(tmp_path / f"layer_{layer}.safetensors"))  # fmt: skip
    (tmp_path / "config.yaml").write_text(
        "feature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n"
    )
    ds = al.dictionaries.load(tmp_path)
    assert [d.in_site for d in ds] == ["blocks.0.resid_mid", "blocks.1.resid_mid"]
    assert ds[1].out_site == "blocks.1.mlp.out" and ds[0].activation == "jumprelu"
    assert ds[0].W_enc.shape == (8, 16)


# ------------------------------------------------------------------ features as units
def test_features_f_matches_hand_patching(lm):
    d = _sae(lm.cfg.d_model)
    target = al.targets.Logit(" to")
    b = al.units.Features(d).bind(lm, PROMPT, target)
    logits, cache = lm.run(PROMPT, cache=[d.in_site])
    assert abs(float(b.clean()[0]) - float(target.bind(lm)(logits, lm.tokenize(PROMPT)))) < 1e-10
    # everything ablated (zero): the site becomes b_dec (decode of no feature, no error)
    hand, _ = lm.run(
        PROMPT,
        interventions=[Intervention(d.in_site, d.b_dec.double().expand_as(cache[d.in_site]))],
    )
    assert abs(float(b.empty()[0]) - float(target(hand, lm.tokenize(PROMPT)))) < 1e-8
    # one feature removed at one position
    lab = b.labels()
    u = next(
        i
        for i, (kind, p) in enumerate(zip(lab["unit"], lab["position"]))
        if kind == "feature" and p == 3
    )
    f, p = lab["feature"][u], lab["position"][u]
    a = d.encode(cache[d.in_site].float())
    x = cache[d.in_site].clone()
    x[0, p] -= (a[0, p, f] * d.W_dec[f]).double()
    hand, _ = lm.run(PROMPT, interventions=[Intervention(d.in_site, x)])
    keep = torch.ones(1, b.n, dtype=torch.bool)
    keep[0, u] = False
    assert abs(float(b.f(keep)[0, 0]) - float(target(hand, lm.tokenize(PROMPT)))) < 1e-8
    # gates agree with masks
    g = torch.rand(3, b.n, dtype=torch.float64) > 0.5
    assert torch.allclose(b.f_gated(g.double()).detach(), b.f(g), atol=1e-8)


def test_counterfactual_ablation_of_everything_is_patching_the_site(lm):
    d = _sae(lm.cfg.d_model, "blocks.0.resid_post")
    target = al.targets.LogitDiff(" Mary", " John")
    b = al.units.Features(d).bind(lm, PROMPT, target.bind(lm), al.ablations.Counterfactual(CF))
    _, cf_cache = lm.run(CF, cache=[d.in_site])
    hand, _ = lm.run(PROMPT, interventions=[Intervention(d.in_site, cf_cache[d.in_site])])
    assert abs(float(b.empty()[0]) - float(target.bind(lm)(hand, lm.tokenize(PROMPT)))) < 1e-6


def test_transcoder_features_and_every_estimator(lm):
    tc = Dictionary.random(lm.cfg.d_model, 40, "blocks.1.mlp.in", "blocks.1.mlp.out", seed=3,
                           activation="topk", k=6)  # fmt: skip
    sae = _sae(lm.cfg.d_model, "blocks.0.resid_post", seed=4)
    units = al.units.Features([sae, tc], positions=[-1, -2])
    target = (" Mary", " John")
    for method, kw in (("occlusion", {}), ("kernelshap", {"samples": 40}), ("ig", {"steps": 4}),
                       ("atp", {}), ("relp", {}), ("input-x-gradient", {})):  # fmt: skip
        r = al.attribute(
            lm, PROMPT, target=target, units=units, method=method, counterfactual=CF, **kw
        )
        assert len(r) > 4 and bool(torch.isfinite(r.scores).all()), method
        assert set(r.to_pandas()["site"]) == {"blocks.0.resid_post", "blocks.1.mlp.out"}
    # IG over features: completeness against f(all) - f(none)
    r = al.attribute(
        lm, PROMPT, target=target, units=units, method="ig", counterfactual=CF, steps=16
    )
    assert abs(r.diagnostics["relative_completeness_error"]) < 0.05


def test_features_input_errors(lm):
    with pytest.raises(InputError, match="needs dictionaries"):
        al.attribute(lm, PROMPT, target=" to", units="features", method="occlusion")
    bad = Dictionary.random(7, 8, "blocks.0.resid_pre")
    with pytest.raises(InputError, match="wide"):
        al.attribute(lm, PROMPT, target=" to", units=al.units.Features(bad), method="occlusion")
    with pytest.raises(InputError, match="same token length"):
        al.attribute(lm, PROMPT, target=" to", units=al.units.Features(_sae(lm.cfg.d_model)),
                     method="occlusion", counterfactual="a b")  # fmt: skip


# ------------------------------------------------------------------ training
def test_train_a_transcoder_on_the_zoo_ioi_model(tmp_path):
    lm = al.zoo.load("ioi")
    d = al.dictionaries.train(lm, "blocks.1.mlp.in", out_site="blocks.1.mlp.out", width=256,
                              activation="topk", k=16, steps=400, progress=False,
                              checkpoint=tmp_path / "ck", checkpoint_every=200)  # fmt: skip
    held = [e.prompt + e.answer for e in al.zoo.task("ioi").examples(64, seed=3)]
    ev = al.dictionaries.evaluate(lm, d, held)
    assert ev["fve"] >= 0.9 and ev["l0"] <= 16 and ev["kl"] < 0.05, ev
    again = al.dictionaries.train(lm, "blocks.1.mlp.in", out_site="blocks.1.mlp.out", width=256,
                                  activation="topk", k=16, steps=400, progress=False,
                                  checkpoint=tmp_path / "ck")  # fmt: skip
    assert torch.allclose(again.W_dec, d.W_dec)  # resumed at its last step: nothing left to do


def test_jumprelu_pseudo_derivatives_match_the_rectangle_kernel():
    from attrlab.dictionaries.train import jumprelu_ste

    g = torch.Generator().manual_seed(0)
    pre = torch.randn(50, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    theta = torch.full((6,), 0.2, dtype=torch.float64, requires_grad=True)
    eps, w = 0.3, torch.randn(50, 6, generator=g, dtype=torch.float64)
    f, l0 = jumprelu_ste(pre, theta, eps)
    assert torch.equal(f, pre * (pre > theta)) and torch.equal(l0, (pre > theta).sum(-1).double())
    gp, gt = torch.autograd.grad((f * w).sum() + 2.0 * l0.sum(), [pre, theta])
    kernel = ((pre - theta).abs() < eps / 2).double()  # rectangle K((z - theta) / eps)
    # reconstruction: d/dz = H(z - theta), d/dtheta = -(theta/eps) K; L0: d/dtheta = -(1/eps) K
    assert torch.allclose(gp, w * (pre > theta))
    hand = (-(theta / eps) * kernel * w - 2.0 / eps * kernel).sum(0)
    assert torch.allclose(gt, hand) and bool((gt != 0).any())


def test_train_a_jumprelu_transcoder_on_the_zoo_ioi_model(tmp_path):
    lm = al.zoo.load("ioi")
    kw = dict(out_site="blocks.1.mlp.out", width=256, activation="jumprelu", steps=300,
              progress=False, checkpoint=tmp_path / "ck", checkpoint_every=150)  # fmt: skip
    d = al.dictionaries.train(lm, "blocks.1.mlp.in", **kw)
    held = [e.prompt + e.answer for e in al.zoo.task("ioi").examples(64, seed=3)]
    ev = al.dictionaries.evaluate(lm, d, held)
    # measured: fve 0.985, l0 31, kl 0.001; thresholds from 1e-3 to min 0.019, median 0.10
    assert ev["fve"] >= 0.9 and ev["l0"] <= 40 and ev["kl"] < 0.05, ev
    th = d.threshold
    assert th is not None and d.activation == "jumprelu"
    assert float(th.min()) > 5e-3 and float(th.median()) > 2e-2, th  # learned, not left at 1e-3
    back = al.dictionaries.load(al.dictionaries.save_saelens(d, tmp_path / "tc"))
    assert back.activation == "jumprelu" and torch.equal(back.threshold, th)
    x = torch.randn(7, lm.cfg.d_model)
    assert torch.equal(back.encode(x), d.encode(x)) and torch.allclose(back(x), d(x))
    again = al.dictionaries.train(lm, "blocks.1.mlp.in", **kw)  # resumed at its last step
    assert torch.equal(again.threshold, th) and torch.equal(again.W_enc, d.W_enc)


def test_train_rejects_bad_settings_before_running():
    lm = al.zoo.load("ioi")
    for kw in ({"activation": "gelu"}, {"activation": "jumprelu", "bandwidth": 0.0},
               {"l0": -1.0}, {"width": 0}, {"l0_warmup": 2.0}):  # fmt: skip
        with pytest.raises(InputError):
            al.dictionaries.train(lm, "blocks.0.mlp.in", texts=[PROMPT], out_site="blocks.0.mlp.out",
                                  **{"steps": 1, "progress": False, **kw})  # fmt: skip


# ------------------------------------------------------------------ attribution graphs
def _transcoders(lm, seed=0):
    return [Dictionary.random(lm.cfg.d_model, 32, f"blocks.{layer}.mlp.in", f"blocks.{layer}.mlp.out",
                              activation="topk", k=4, seed=seed + layer)
            for layer in range(lm.cfg.n_layers)]  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_attribution_graph_direct_effects_sum_to_each_node(family):
    """Without model biases or learned positions, the direct effects into every
    feature (its pre-activation without the encoder bias) and into the logit
    sum to the node's value exactly: the replacement model is linear."""
    m, t = tiny_model(family)
    lm = al.wrap(m.double(), t)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    g = al.attribution_graph(lm, PROMPT, _transcoders(lm), target=" Mary", node_threshold=1.0,
                             edge_threshold=1.0, max_nodes=10_000)  # fmt: skip
    assert g.diagnostics["constant_terms_max"] < 1e-6
    assert (
        0 <= g.diagnostics["replacement_score"] <= 1
        and 0 <= g.diagnostics["completeness_score"] <= 1
    )
    ids = set(g.nodes["id"])
    assert "logit" in ids and set(g.edges["source"]) | set(g.edges["target"]) <= ids
    # the logit's direct inputs, summed, are the logit
    logits, _ = lm.run(PROMPT)
    into = g.incoming("logit")
    assert abs(sum(into["weight"]) - float(logits[0, -1, lm.token_id(" Mary")])) < 1e-6


def test_attribution_graph_checks_its_transcoders(lm):
    tcs = _transcoders(lm)
    with pytest.raises(InputError, match="every layer"):
        al.attribution_graph(lm, PROMPT, tcs[:1])
    with pytest.raises(InputError, match="transcoders"):
        al.attribution_graph(lm, PROMPT, [_sae(lm.cfg.d_model)] + tcs[1:])


def test_intervene_clamps_and_steers(lm):
    d = _sae(lm.cfg.d_model, "blocks.1.resid_pre")
    _, cache = lm.run(PROMPT, cache=[d.in_site])
    a = d.encode(cache[d.in_site].float())
    p, i = 5, int(a[0, 5].argmax())
    logits = al.dictionaries.intervene(lm, PROMPT, [d], [[], [(0, p, i, "set", 0.0)],
                                                         [(0, p, i, "add", -float(a[0, p, i]))]])  # fmt: skip
    clean, _ = lm.run(PROMPT)
    assert torch.allclose(logits[0], clean[0])
    assert torch.allclose(logits[1], logits[2], atol=1e-6)  # clamping to 0 = subtracting the value
    x = cache[d.in_site].clone()
    x[0, p] -= (a[0, p, i] * d.W_dec[i]).double()
    hand, _ = lm.run(PROMPT, interventions=[Intervention(d.in_site, x)])
    assert torch.allclose(logits[1], hand[0], atol=1e-8)
    with pytest.raises(InputError, match="op"):
        al.dictionaries.intervene(lm, PROMPT, [d], [[(0, 1, 1, "mul", 2.0)]])


def test_graph_features_carry_the_logit_and_their_ablation_moves_it():
    m, t = tiny_model("llama")
    lm = al.wrap(m.double(), t)
    tcs = _transcoders(lm, seed=7)
    g = al.attribution_graph(lm, PROMPT, tcs, target=" Mary")
    r = al.evaluate.graph_faithfulness(lm, g, tcs)
    assert abs(r["metric_full"] - r["metric_clean"]) < 1e-8
    assert 0 < r["n_graph_features"] <= r["n_features"]
    # the feature with the largest positive direct effect on the logit, zeroed: the logit drops
    into = g.incoming("logit")
    feats = [(w, s) for w, s in zip(into["weight"], into["source"]) if s.startswith("f")]
    w, node = max(feats)
    assert w > 0
    layer, rest = node[1:].split(".", 1)
    i, p = (int(x) for x in rest.split("@"))
    logits = al.dictionaries.intervene(lm, PROMPT, tcs, [[], [(int(layer), p, i, "set", 0.0)]])
    tok = lm.token_id(" Mary")
    assert float(logits[1, -1, tok]) < float(logits[0, -1, tok])


def test_circuit_tracer_graph_json_round_trips_unchanged(tmp_path):
    doc = {
        "metadata": {"slug": "demo", "scan": "gemma-2-2b", "transcoder_list": [],
                     "prompt_tokens": ["<bos>", "The", " cat"], "prompt": "The cat",
                     "node_threshold": 0.8, "schema_version": 1},
        "qParams": {"pinnedIds": ["0_12_1"], "supernodes": [], "linkType": "both", "clickedId": "",
                    "sg_pos": ""},
        "nodes": [
            {"node_id": "E_651_1", "feature": 1, "layer": "E", "ctx_idx": 1, "feature_type": "embedding",
             "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
             "jsNodeId": "E_651-1", "clerp": "", "influence": 0.5, "activation": None},
            {"node_id": "0_12_1", "feature": 90, "layer": "0", "ctx_idx": 1,
             "feature_type": "cross layer transcoder", "token_prob": 0.0, "is_target_logit": False,
             "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": "0_12-0", "clerp": "cat-ish",
             "influence": 0.4, "activation": 3.25},
            {"node_id": "27_9999_2", "feature": 9999, "layer": "27", "ctx_idx": 2, "feature_type": "logit",
             "token_prob": 0.61, "is_target_logit": True, "run_idx": 0, "reverse_ctx_idx": 0,
             "jsNodeId": "L_9999-2", "clerp": 'Output " sat" (p=0.610)', "influence": None,
             "activation": None},
        ],
        "links": [{"source": "E_651_1", "target": "0_12_1", "weight": 1.5},
                  {"source": "0_12_1", "target": "27_9999_2", "weight": -0.25}],
    }  # fmt: skip
    src = tmp_path / "graph.json"
    src.write_text(json.dumps(doc))
    g = al.neuronpedia.load_graph_json(src)
    assert g.n_nodes == 3 and g.n_edges == 2 and g.incoming("27_9999_2")["weight"] == [-0.25]
    out = al.neuronpedia.save_graph_json(g, tmp_path / "again.json")
    assert json.loads(out.read_text()) == doc
    (tmp_path / "bad.json").write_text('{"nodes": 3}')
    with pytest.raises(FileFormatError):
        al.neuronpedia.load_graph_json(tmp_path / "bad.json")


def test_attribution_graph_exports_to_the_circuit_tracer_format(tmp_path):
    m, t = tiny_model("llama")
    lm = al.wrap(m.double(), t)
    g = al.attribution_graph(lm, PROMPT, _transcoders(lm), target=" Mary")
    doc = json.loads(al.neuronpedia.save_graph_json(g, tmp_path / "g.json", slug="s").read_text())
    kinds = {n["feature_type"] for n in doc["nodes"]}
    assert {"embedding", "logit"} <= kinds and all(n["node_id"] for n in doc["nodes"])
    logit = [n for n in doc["nodes"] if n["is_target_logit"]]
    assert len(logit) == 1 and logit[0]["feature"] == lm.token_id(" Mary")
    ours = {w for s, w in zip(g.edges["source"], g.edges["weight"]) if not s.startswith("tcbias")}
    assert {lk["weight"] for lk in doc["links"]} == ours
    with pytest.raises(InputError, match="attribution graphs"):
        al.neuronpedia.save_graph_json(al.routes(lm, PROMPT), tmp_path / "r.json")


def test_attribution_graph_row_budget():
    m, t = tiny_model("llama")
    lm = al.wrap(m.double(), t)
    tcs = _transcoders(lm)
    wide = {"node_threshold": 1.0, "edge_threshold": 1.0, "max_nodes": 10_000}
    full = al.attribution_graph(lm, PROMPT, tcs, target=" Mary", **wide)
    small = al.attribution_graph(lm, PROMPT, tcs, target=" Mary", max_feature_nodes=8, batch_size=4,
                                 **wide)  # fmt: skip
    assert small.diagnostics["n_feature_rows"] == 8 < full.diagnostics["n_feature_rows"]
    # the logit's own inputs do not depend on the budget
    assert sorted(small.incoming("logit")["weight"]) == pytest.approx(
        sorted(full.incoming("logit")["weight"])
    )
    assert small.diagnostics["memory_estimate_bytes"] < full.diagnostics["memory_estimate_bytes"]
