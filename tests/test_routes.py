"""Information-flow routes (al.routes) and the graph result type."""

from __future__ import annotations

import collections

import pytest
import torch

import attrlab as al
from attrlab.errors import FileFormatError, InputError, NonFiniteError
from attrlab.graph import GraphResult
from attrlab.methods.routes import proximity_importance
from attrlab.testing import FAMILIES, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "When Mary and John went to the store, John gave"


@pytest.mark.parametrize("family", FAMILIES)
def test_parts_rebuild_each_update_and_weights_sum_to_one(family: str) -> None:
    """Every family: the parts (plus the biases) rebuild each decomposed update,
    and with tau = 0 the importances into every node sum to 1 (the paper's
    normalisation)."""
    m, t = tiny_model(family)
    lm = al.wrap(m, t)
    g = al.routes(lm, PROMPT, positions="all", tau=0.0)
    assert g.diagnostics["decomposition_error"] < 1e-4
    into = collections.defaultdict(float)
    for dst, w in zip(g.edges["target"], g.edges["weight"]):
        into[dst] += w
    assert into and all(abs(v - 1.0) < 1e-5 for v in into.values()), into
    assert all(0 <= w <= 1 for w in g.edges["weight"])


def test_proximity_importance_by_hand() -> None:
    y = torch.tensor([3.0, 1.0])  # |y| = 4
    parts = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, -2.0]])
    # proximities: 4 - 1 = 3, 4 - 3 = 1, 4 - 6 < 0 -> 0
    assert proximity_importance(y, parts).tolist() == pytest.approx([0.75, 0.25, 0.0])


def _copy_model() -> tuple[al.LM, int, int]:
    """A 2-layer GPT-2 whose only working part is head 0 of layer 0: it attends
    from every position to the planted token and writes it to dimension 5;
    every MLP and every other head writes nothing."""
    from transformers import GPT2Config, GPT2LMHeadModel

    d, dh, planted = 16, 8, 7
    cfg = GPT2Config(n_layer=2, n_embd=d, n_head=2, vocab_size=32, n_positions=16,
                     tie_word_embeddings=False, attn_implementation="eager")  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
        wte[:, 8:] = 0.3 * torch.randn(32, 8, generator=g)  # every token: some content
        wte[:, 1] = 1.0
        wte[planted, 1] = 0.0
        wte[planted, 0] = 1.0  # the planted token's feature
        wpe[:, 2] = 1.0  # a query feature everywhere
        attn = model.transformer.h[0].attn
        W = attn.c_attn.weight  # Conv1D [in, 3d]: q | k | v, head 0 first
        W[2, 0] = 6.0  # q_0 reads the query feature
        W[0, d + 0] = 6.0  # k_0 reads the planted feature
        W[0, 2 * d + 0] = 1.0  # v_0 reads the planted feature
        attn.c_proj.weight[0, 5] = 8.0  # head 0 writes it to dimension 5
        model.lm_head.weight[:] = 0.0
        model.lm_head.weight[3, 5] = 1.0
    lm = al.wrap(model, None, name="copy-head")
    return lm, planted, dh


def test_planted_copy_route() -> None:
    lm, planted, _ = _copy_model()
    ids = torch.tensor([[3, 4, planted, 5, 6, 9, 10, 11]])
    k, last = 2, 7
    _, cache = lm.run(ids, cache=["blocks.0.attn.pattern"])
    assert float(cache["blocks.0.attn.pattern"][0, 0, last, k]) > 0.9  # the head does copy
    g = al.routes(lm, ids, tau=0.1)
    e = g.to_pandas("edges")
    path = e[(e.source == f"x0.{k}") & (e.target == f"m0.{last}") & (e.kind == "attention")]
    assert len(path) == 1 and int(path["head"].iloc[0]) == 0 and float(path.weight.iloc[0]) > 0.1
    # the path reaches the prediction: m0.last -> x1.last -> m1.last -> x2.last
    for src, dst in ((f"m0.{last}", f"x1.{last}"), (f"x1.{last}", f"m1.{last}"),
                     (f"m1.{last}", f"x2.{last}")):  # fmt: skip
        assert ((e.source == src) & (e.target == dst)).any(), (src, dst)
    # nothing else flows into the last position from another position above tau
    into_last = e[e.target.str.endswith(f".{last}") & (e.kind == "attention")]
    assert set(into_last.source) == {f"x0.{k}"}
    assert not (e.kind == "mlp").any()


def test_several_roots_share_the_forward() -> None:
    m, t = tiny_model("llama")
    lm = al.wrap(m, t)
    both = al.routes(lm, PROMPT, positions=[-1, 3], tau=0.05)
    one = al.routes(lm, PROMPT, positions=3, tau=0.05)
    n = len(both.meta["tokens"])
    assert both.meta["roots"] == [3, n - 1]
    mine = {(s, d, k, h) for s, d, k, h, r in zip(both.edges["source"], both.edges["target"],
            both.edges["kind"], both.edges["head"], both.edges["roots"]) if 3 in r}  # fmt: skip
    alone = set(zip(one.edges["source"], one.edges["target"], one.edges["kind"], one.edges["head"]))
    assert mine == alone


def test_per_block_edges_sum_heads() -> None:
    m, t = tiny_model("gpt2")
    lm = al.wrap(m, t)
    g = al.routes(lm, PROMPT, tau=0.0, per_head=False)
    assert set(g.edges["head"]) == {-1}


def test_graph_result_round_trip_and_views(tmp_path) -> None:
    m, t = tiny_model("gpt2")
    lm = al.wrap(m, t)
    g = al.routes(lm, "<b>Mary</b> & John", tau=0.02)
    p = g.save(tmp_path / "r.graph.json")
    back = GraphResult.load(p)
    assert back.edges == g.edges and back.nodes == g.nodes and back.params == g.params
    G = g.to_networkx()
    assert G.number_of_nodes() == g.n_nodes and G.number_of_edges() == g.n_edges
    html = g.to_html()
    assert "<b>" not in html and "</b>" not in html and "&lt;" in html
    assert g.to_svg().startswith("<svg")
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(FileFormatError):
        GraphResult.load(tmp_path / "bad.json")
    with pytest.raises(NonFiniteError):
        GraphResult(
            {"id": ["a", "b"]}, {"source": ["a"], "target": ["b"], "weight": [float("nan")]}
        )
    with pytest.raises(InputError):
        GraphResult({"id": ["a"]}, {"source": ["a"], "target": ["zz"], "weight": [1.0]})


def test_bad_input_raises() -> None:
    m, t = tiny_model("gpt2")
    lm = al.wrap(m, t)
    with pytest.raises(InputError, match="tau"):
        al.routes(lm, PROMPT, tau=1.5)
    with pytest.raises(InputError, match="positions"):
        al.routes(lm, PROMPT, positions=[100])
    with pytest.raises(InputError, match="one prompt"):
        al.routes(lm, [PROMPT, PROMPT])
