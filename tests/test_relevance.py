"""Relevance propagation (attrlab.lrp, methods attnlrp / relp): conservation on
every family, the rules' local oracles, and relp = atp when every rule is the
gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attrlab as al
from attrlab.errors import InputError
from attrlab.lrp import (
    ATTNLRP,
    CP_LRP,
    Composite,
    Ledger,
    Stop,
    Uniform,
    _AttentionMode,
    _FrozenLayerNorm,
    _FrozenRMSNorm,
    _IdentityAct,
    propagation,
)
from attrlab.testing import FAMILIES, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "When Mary and John went to the store, John gave"
CF = "When Mary and John went to the store, Mary gave"


def _lm(family: str, zero_biases: bool = False) -> al.LM:
    model, tok = tiny_model(family)
    model = model.double()
    if zero_biases:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("bias", "wpe.weight", "embed_positions.weight")):
                    p.zero_()
    return al.wrap(model, tok)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rules", ["attnlrp", "cp-lrp"])
def test_every_share_accounted_for(family: str, rules: str) -> None:
    """value = relevance + bias + position + softmax + output shares, every family,
    for a logit and for a log-prob target (whose normaliser is the output share)."""
    lm = _lm(family)
    for target in (al.targets.Logit(" gave"), al.targets.LogProb(" gave")):
        r = al.attribute(lm, PROMPT, target=target, method="attnlrp", rules=rules)
        d = r.diagnostics
        parts = (d["relevance_sum"] + d["bias_share"] + d["position_share"]
                 + d["softmax_share"] + d["output_share"])  # fmt: skip
        assert _rel(parts, d["value"]) < 1e-4, d
        assert abs(d["conservation_error"]) < 1e-4 * max(1.0, abs(d["value"]))
        assert abs(float(r.scores.sum()) - d["relevance_sum"]) < 1e-6
        if rules == "cp-lrp":
            assert d["softmax_share"] == 0.0


ALIBI = ("bloom", "falcon_alibi", "mpt")  # a position bias on the scores that no weight holds


@pytest.mark.parametrize("family", FAMILIES)
def test_conservation_without_biases(family: str) -> None:
    """With zero biases (and no learned position embedding), CP-LRP's token
    relevances sum to the logit; AttnLRP's only leak is the softmax's (and, with
    ALiBi, the position bias's share of the scores, recorded as position)."""
    lm = _lm(family, zero_biases=True)
    target = al.targets.Logit(" gave")
    cp = al.attribute(lm, PROMPT, target=target, method="attnlrp", rules="cp-lrp")
    assert _rel(float(cp.scores.sum()), cp.diagnostics["value"]) < 1e-4
    r = al.attribute(lm, PROMPT, target=target, method="attnlrp")
    d = r.diagnostics
    assert abs(d["bias_share"]) < 1e-10
    assert (abs(d["position_share"]) > 1e-8) == (family in ALIBI)
    leak = d["softmax_share"] + d["position_share"]
    assert _rel(float(r.scores.sum()) + leak, d["value"]) < 1e-4


def test_continuation_rows_share_one_forward_and_conserve() -> None:
    lm = _lm("llama")
    r = al.attribute(lm, "When Mary and John", target=None, method="attnlrp", max_new_tokens=3)
    assert r.scores.shape[0] == 3
    errs = r.diagnostics["conservation_error"]
    assert len(errs) == 3 and max(abs(e) for e in errs) < 1e-4
    # each row equals its own single-row run
    first = r.meta["ids"][r.meta["n_prompt"]]
    one = al.attribute(lm, r.meta["prompt"], target=al.targets.LogProb(first), method="attnlrp")
    n = one.scores.shape[-1]
    assert torch.allclose(r.scores[0, :n], one.scores.reshape(-1), atol=1e-8)


def test_words_sum_their_tokens() -> None:
    lm = _lm("gpt2")
    t = al.attribute(lm, PROMPT, target=" to", method="attnlrp")
    w = al.attribute(lm, PROMPT, target=" to", method="attnlrp", units="words")
    assert abs(float(t.scores.sum()) - float(w.scores.sum())) < 1e-8


# ---------------------------------------------------------------- local rules
def test_identity_rule_passes_relevance_unchanged() -> None:
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    y = _IdentityAct.apply(x, F.gelu)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.allclose(x * gx, y * g)
    assert torch.allclose(y, F.gelu(x))


def test_norm_rules_hold_the_scale_constant() -> None:
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    g = torch.randn(3, 8, dtype=torch.float64)
    (gx,) = torch.autograd.grad(_FrozenLayerNorm.apply(x, (8,), w, b, 1e-5, None), x, g)
    std = (x.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt().detach()
    (ref,) = torch.autograd.grad((x - x.mean(-1, keepdim=True)) / std * w + b, x, g)
    assert torch.allclose(gx, ref)
    (gx,) = torch.autograd.grad(_FrozenRMSNorm.apply(x, (8,), w, 1e-6), x, g)
    rms = (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt().detach()
    (ref,) = torch.autograd.grad(x / rms * w, x, g)
    assert torch.allclose(gx, ref)


def test_uniform_rule_splits_a_product_in_halves() -> None:
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    with _AttentionMode(ATTNLRP, None):
        out = torch.matmul(a, b)
    g = torch.randn_like(out)
    ga, gb = torch.autograd.grad(out, (a, b), g)
    r_out = float((out * g).sum().detach())
    assert abs(float((a * ga).sum()) - r_out / 2) < 1e-10
    assert abs(float((b * gb).sum()) - r_out / 2) < 1e-10


def test_ledger_rows_follow_backwards() -> None:
    lm = _lm("qwen2")
    ids = torch.tensor([[1, 2, 3, 4]])
    ledger = Ledger()
    with propagation(lm, ATTNLRP, ledger):
        e = lm.adapter.token_embedding()(ids).detach().requires_grad_(True)
        logits = lm.model(inputs_embeds=e).logits[0, -1]
        for t in (3, 4):
            (g,) = torch.autograd.grad(logits[t], e, retain_graph=True)
    assert len(ledger.rows) == 2
    assert abs(ledger.rows[1]["logits"] - float(logits[4])) < 1e-10


def test_values_unchanged_and_forwards_restored() -> None:
    lm = _lm("gemma2")
    ids = torch.tensor([[1, 2, 3, 4]])
    before = lm.model(ids).logits
    with propagation(lm, ATTNLRP, Ledger()):
        during = lm.model(ids).logits
    assert torch.equal(before, during)
    assert not any("forward" in m.__dict__ for m in lm.model.modules())


# ------------------------------------------------------------------------ relp
@pytest.mark.parametrize("units", ["heads", "attn", "mlp", "neurons", "resid", "layers", "edges"])
def test_relp_with_gradient_rules_is_atp(units: str) -> None:
    lm = _lm("gpt2")
    plain = "eap" if units == "edges" else "atp"
    tgt = (" Mary", " John")
    a = al.attribute(lm, PROMPT, target=tgt, units=units, method=plain, counterfactual=CF)
    g = al.attribute(lm, PROMPT, target=tgt, units=units, method="relp", rules="gradient",
                     counterfactual=CF)  # fmt: skip
    r = al.attribute(lm, PROMPT, target=tgt, units=units, method="relp", counterfactual=CF)
    assert torch.equal(a.scores, g.scores)
    assert not torch.allclose(a.scores, r.scores)  # the rules change the coefficients
    assert r.params["rules"]["softmax"] == "stop"  # the RelP paper's rules by default


# ---------------------------------------------------------------------- errors
def test_bad_rules_and_kinds_raise() -> None:
    with pytest.raises(InputError, match="norm takes"):
        Composite(norm=Uniform())
    with pytest.raises(InputError, match="rules must be"):
        al.attribute(_lm("gpt2"), "a b", target=" a", method="attnlrp", rules="zennit")
    with pytest.raises(InputError):
        al.attribute(_lm("gpt2"), "a b", target=" a", units="heads", method="attnlrp")
    with pytest.raises(InputError, match="wrapped"):
        with propagation(torch.nn.Linear(2, 2), CP_LRP):
            pass
    assert Composite(softmax=Stop()) == CP_LRP


@pytest.mark.parametrize("rules", ["attnlrp", "cp-lrp"])
def test_fused_attention_gets_the_same_relevance(rules: str) -> None:
    """With sdpa the rules act at q, k, v of the fused call: the same relevances
    as eager attention, where they act on the two matmuls and the softmax."""
    model, tok = tiny_model("llama", attn_implementation="sdpa")
    model = model.double()
    eager, _ = tiny_model("llama")
    eager = eager.double()
    eager.load_state_dict(model.state_dict())
    target = al.targets.Logit(" gave")
    a = al.attribute(al.wrap(model, tok), PROMPT, target=target, method="attnlrp", rules=rules)
    b = al.attribute(al.wrap(eager, tok), PROMPT, target=target, method="attnlrp", rules=rules)
    assert torch.allclose(a.scores, b.scores, rtol=1e-5, atol=1e-8)
    if rules == "attnlrp":
        assert "note" in a.diagnostics and "note" not in b.diagnostics


def test_sources_sum_their_tokens_relevance() -> None:
    """attnlrp over sources = attnlrp over the prompt's tokens for the response's
    log-probability, summed over each source's token range."""
    lm = _lm("gpt2")
    ctx = "A is red. B is blue. C is green."
    r = al.attribute(lm, ctx, " red", units="sources", method="attnlrp")
    t = al.attribute(lm, ctx, target=al.targets.ContinuationLogProb(" red"), method="attnlrp",
                     units=al.units.Tokens(include_generated=False))  # fmt: skip
    ranges = r.diagnostics["token_ranges"]
    assert len(ranges) == len(r) == 3
    expected = torch.stack([t.scores.reshape(-1)[a:b].sum() for a, b in ranges])
    assert torch.allclose(r.scores.double(), expected.double(), atol=1e-8)
    assert abs(r.diagnostics["value"] - t.diagnostics["value"]) < 1e-6 * abs(t.diagnostics["value"])
    assert abs(r.diagnostics["conservation_error"]) < 1e-4 * abs(r.diagnostics["value"])
