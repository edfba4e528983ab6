"""Family quirks beyond the per-family contract of test_model.py: Falcon's
in-place MLP add and its layouts, OPT's projections and post-LN refusal,
BLOOM's refusals, Gemma 3 multimodal checkpoints (text stack of
Gemma3ForConditionalGeneration)."""

from __future__ import annotations

import pytest
import torch

import attrlab as al
from attrlab.testing import family_skip_reason, tiny_model


def needs(family: str):
    """Skip (with the reason) where the installed transformers cannot build ``family``."""
    reason = family_skip_reason(family)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


PROMPT = "When Mary and John went to the store, John gave a drink to"

pytestmark = pytest.mark.usefixtures("one_thread")


def _contract(lm: al.LM) -> None:
    """Logits equal the model's own; the residual decomposes exactly; DLA's
    parts sum to the target logit minus the unembedding bias."""
    batch = lm.tokenize([PROMPT, "The capital of France is"])
    with torch.no_grad():
        ref = lm.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).logits
    logits, cache = lm.run(batch, cache=lm.sites())
    real = batch.attention_mask.bool()
    assert (logits - ref)[real].abs().max() <= 1e-5
    for layer in range(lm.cfg.n_layers):
        p = f"blocks.{layer}."
        heads = cache[p + "attn.head_out"].sum(2)
        if lm.b_O(layer) is not None:
            heads = heads + lm.b_O(layer)
        torch.testing.assert_close(heads, cache[p + "attn.out"], atol=1e-5, rtol=1e-5)
        total = cache[p + "resid_pre"] + cache[p + "attn.out"] + cache[p + "mlp.out"]
        torch.testing.assert_close(total, cache[p + "resid_post"], atol=1e-5, rtol=1e-5)
    last = cache[f"blocks.{lm.cfg.n_layers - 1}.resid_post"]
    torch.testing.assert_close(lm.unembed(lm.apply_final_norm(last)), logits, atol=1e-5, rtol=1e-5)
    r = al.attribute(lm, PROMPT, target=" Mary", units="heads", method="dla", complete=True)
    _, c1 = lm.run(PROMPT, cache=["unembed"])
    want = c1["unembed"][0, -1, lm.token_id(" Mary")]
    if lm.b_U() is not None:
        want = want - lm.b_U()[lm.token_id(" Mary")]
    assert abs(float(r.scores.sum()) - float(want)) < 1e-4 * max(1.0, abs(float(want)))


# ------------------------------------------------------------------ Falcon
def test_falcon_parallel_mlp_out_is_the_mlps_own_output():
    """Falcon's parallel block adds attention's output into the MLP's output in
    place; the cached mlp.out is still the MLP's own output (the block gets a
    copy), in plain and in grad mode, and the logits are the model's."""
    lm = al.wrap(*tiny_model("falcon"))
    sites = ["blocks.0.mlp.normed", "blocks.0.mlp.out", "blocks.0.attn.out"]
    for grad in (False, True):
        _, cache = lm.run(PROMPT, cache=sites, grad=grad)
        with torch.no_grad():
            own = lm.adapter.mlp(0)(cache["blocks.0.mlp.normed"])
        torch.testing.assert_close(cache["blocks.0.mlp.out"].detach(), own, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(own + cache["blocks.0.attn.out"].detach(), own, atol=1e-3)


def test_falcon_new_architecture_with_one_shared_norm():
    """new_decoder_architecture with num_ln_in_parallel_attn=1 (Falcon 2 11B):
    attention and the MLP read one input_layernorm."""
    lm = al.wrap(*tiny_model("falcon_new", num_ln_in_parallel_attn=1))
    assert lm.adapter.mlp_shares_attn_norm(0) and lm.cfg.n_kv_heads == 2
    _contract(lm)


def test_falcon_sequential_rotary_layout():
    """Sequential Falcon with rotary and per-head (q, k, v): scores_qk is exact."""
    lm = al.wrap(*tiny_model("falcon", parallel_attn=False, multi_query=False))
    assert not lm.cfg.parallel_residual and lm.qk_scores_exact(8)
    _contract(lm)


# --------------------------------------------------------------------- OPT
@needs("opt")
def test_opt_post_ln_is_refused_with_the_reason():
    hf, tok = tiny_model("opt", do_layer_norm_before=False)
    with pytest.raises(al.errors.UnsupportedArchitectureError, match="post-LN"):
        al.wrap(hf, tok)


@needs("opt")
def test_opt_project_in_and_out():
    """word_embed_proj_dim != hidden_size: the embed site is project_in's output
    ([.., d_model]) and W_U is project_out then lm_head; every decomposition holds."""
    lm = al.wrap(*tiny_model("opt", word_embed_proj_dim=16))
    assert lm.model.model.decoder.project_in is not None
    d = lm.cfg.d_model
    assert tuple(lm.W_U().shape) == (d, lm.cfg.d_vocab)
    _, cache = lm.run(PROMPT, cache=["embed"])
    assert cache["embed"].shape[-1] == d
    ids = lm.tokenize(PROMPT).input_ids[0]
    torch.testing.assert_close(lm.embed_ids(ids), cache["embed"][0])
    _contract(lm)
    r = al.attribute(lm, PROMPT, target=" Mary", units="tokens", method="ig", steps=8)
    assert torch.isfinite(r.scores).all()


@needs("opt")
def test_opt_mlp_sites_are_batch_by_position():
    """OPT flattens [batch, pos] before its MLP; the MLP sites are [batch, pos, ...]
    and a per-position intervention on them equals the same change on mlp.out."""
    lm = al.wrap(*tiny_model("opt"))
    _, cache = lm.run([PROMPT, "When Mary went"], cache=["blocks.0.mlp.in", "blocks.0.mlp.neurons"])
    b, p = cache.batch.shape
    assert cache["blocks.0.mlp.in"].shape == (b, p, lm.cfg.d_model)
    assert cache["blocks.0.mlp.neurons"].shape == (b, p, lm.cfg.d_mlp)
    iv = al.Intervention("blocks.0.mlp.neurons", 0.0, positions=[-1])
    a, c = lm.run(PROMPT, interventions=[iv], cache=["blocks.0.mlp.out"])
    _, clean = lm.run(PROMPT, cache=["blocks.0.mlp.out"])
    b_out = lm.b_out(0)
    assert b_out is not None
    torch.testing.assert_close(c["blocks.0.mlp.out"][0, -1], b_out)
    torch.testing.assert_close(c["blocks.0.mlp.out"][0, :-1], clean["blocks.0.mlp.out"][0, :-1])


# ------------------------------------------------------------------- BLOOM
@pytest.mark.parametrize(
    "override, reason",
    [
        (dict(apply_residual_connection_post_layernorm=True), "layer-normed stream"),
        (dict(pretraining_tp=2, slow_but_exact=True), "slow_but_exact"),
    ],
)
def test_bloom_settings_that_break_the_sites_are_refused(override, reason):
    hf, tok = tiny_model("bloom", **override)
    with pytest.raises(al.errors.UnsupportedArchitectureError, match=reason):
        al.wrap(hf, tok)


def test_bloom_resid_pre_of_block_0_is_the_normed_embedding():
    lm = al.wrap(*tiny_model("bloom"))
    _, cache = lm.run(PROMPT, cache=["embed", "blocks.0.resid_pre"])
    norm = lm.model.transformer.word_embeddings_layernorm
    with torch.no_grad():
        torch.testing.assert_close(norm(cache["embed"]), cache["blocks.0.resid_pre"])


# ---------------------------------------------------------- Gemma 3 multimodal
def test_gemma3_multimodal_wraps_the_text_stack(tmp_path):
    """A Gemma3ForConditionalGeneration (text + tiny vision tower): al.wrap and
    al.load give the language model's sites and the full model's text-only
    logits; the shapes come from the text config."""
    hf, tok = tiny_model("gemma3_multimodal")
    assert type(hf).__name__ == "Gemma3ForConditionalGeneration"
    lm = al.wrap(hf, tok)
    text = hf.config.text_config
    assert lm.cfg.family == "gemma3" and lm.cfg.n_layers == text.num_hidden_layers
    assert lm.cfg.d_model == text.hidden_size and lm.cfg.post_block_norms
    _contract(lm)
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = al.load(str(tmp_path), dtype="float32")
    assert type(loaded.model).__name__ == "Gemma3ForConditionalGeneration"
    a, _ = loaded.run(PROMPT)
    b, _ = lm.run(PROMPT)
    torch.testing.assert_close(a, b)


def test_gemma3_multimodal_logits_are_not_soft_capped():
    """Gemma3ForConditionalGeneration does not soft-cap its logits even when the
    text config names a cap (Gemma3ForCausalLM would): the wrapper follows the model."""
    hf, tok = tiny_model("gemma3_multimodal", final_logit_softcapping=0.5)
    lm = al.wrap(hf, tok)
    assert lm.cfg.final_logit_softcap is None
    _contract(lm)


# ------------------------------------------------------------- GPT-Neo, MPT
def test_gpt_neo_scores_are_exact_within_the_local_window():
    """GPT-Neo's local layers see the last window_size keys: scores_qk (no
    scaling of q . k) reproduces the scores of runs up to that length only."""
    lm = al.wrap(*tiny_model("gpt_neo"))
    window = lm.model.config.window_size
    assert lm.attn_scale(0) == 1.0
    assert lm.qk_scores_exact(window) and not lm.qk_scores_exact(window + 1)


@needs("mpt")
def test_mpt_alibi_and_left_padding():
    """MPT's ALiBi bias is built from key indices, not from the attention mask;
    a left-padded row still equals its own run (the bias shifts every key of a
    row equally), and scores_qk refuses naming ALiBi."""
    lm = al.wrap(*tiny_model("mpt"))
    _contract(lm)
    with pytest.raises(al.errors.UnsupportedArchitectureError, match="ALiBi"):
        lm.scores_qk(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), torch.arange(2)[None])


# ----------------------------------------------- fused q/k/v layouts (oracles)
@pytest.mark.parametrize(
    "family", ["falcon", "falcon_new", "falcon_alibi", "bloom", "mpt", "codegen", "persimmon"]
)
def test_fused_qkv_layout_puts_each_head_where_the_model_does(family):
    """split_qkv is the family's column layout: zeroing value head g through the
    attn.v site zeroes exactly the attn.z of the query heads that read it, and
    (no ALiBi, no q/k norm) zeroing query head h through attn.q makes head h's
    pattern uniform over its keys and leaves the other heads' patterns alone."""
    lm = al.wrap(*tiny_model(family))
    c = lm.cfg
    rep = c.n_heads // c.n_kv_heads
    g = c.n_kv_heads - 1
    _, cache = lm.run(PROMPT, cache=["blocks.0.attn.z", "blocks.0.attn.pattern"])
    _, zv = lm.run(
        PROMPT,
        cache=["blocks.0.attn.z"],
        interventions=[al.Intervention("blocks.0.attn.v", 0.0, heads=[g])],
    )
    z = zv["blocks.0.attn.z"]
    mine = list(range(g * rep, (g + 1) * rep))
    others = [h for h in range(c.n_heads) if h not in mine]
    assert z[:, :, mine].abs().max() == 0
    torch.testing.assert_close(z[:, :, others], cache["blocks.0.attn.z"][:, :, others])
    if family in ("falcon", "falcon_new", "codegen"):  # rotary of 0 is 0: scores 0
        h = c.n_heads - 1
        _, zq = lm.run(
            PROMPT,
            cache=["blocks.0.attn.pattern"],
            interventions=[al.Intervention("blocks.0.attn.q", 0.0, heads=[h])],
        )
        pat = zq["blocks.0.attn.pattern"][0]
        n = pat.shape[-1]
        uniform = torch.ones(n, n).tril() / torch.arange(1, n + 1)[:, None]
        torch.testing.assert_close(pat[h], uniform, atol=1e-6, rtol=0)
        rest = [i for i in range(c.n_heads) if i != h]
        torch.testing.assert_close(pat[rest], cache["blocks.0.attn.pattern"][0, rest])


@pytest.mark.parametrize("family", ["mixtral", "opt", "nemotron", "persimmon"])
def test_families_checked_only_on_transformers_5_are_refused_on_4(monkeypatch, family):
    """Their 4.x implementations differ where the adapter reads them (per-expert
    module lists, attention weights not handed to the hooks): a typed refusal that
    names the version, not a failure inside a method."""
    from attrlab.model.adapters import base

    hf, tok = al.testing.tiny_model(family)
    monkeypatch.setattr(base, "TRANSFORMERS_MAJOR", 4)
    with pytest.raises(al.errors.UnsupportedArchitectureError, match="transformers >= 5"):
        al.wrap(hf, tok)


@pytest.mark.parametrize("family, module", [("mpt", "mpt"), ("falcon_alibi", "falcon")])
def test_alibi_relevance_is_refused_on_transformers_4(monkeypatch, family, module):
    import importlib

    lm = al.wrap(*al.testing.tiny_model(family))
    monkeypatch.setattr(
        importlib.import_module(f"attrlab.model.adapters.{module}"), "TRANSFORMERS_MAJOR", 4
    )
    with pytest.raises(al.errors.UnsupportedArchitectureError, match="ALiBi"):
        al.attribute(lm, "a b c", target=" a", units="tokens", method="attnlrp")
