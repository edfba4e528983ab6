"""The wrapper's contract on tiny random models of every supported family."""

from __future__ import annotations

import functools

import pytest
import torch

import attrlab as al
from attrlab import Intervention
from attrlab.testing import FAMILIES, tiny_model

PROMPT = "When Mary and John went to the store, John gave a drink to"


@functools.cache
def _lm(family: str) -> al.LM:
    return al.wrap(*tiny_model(family), name=f"tiny-{family}")


@pytest.fixture(params=FAMILIES)
def lm(request) -> al.LM:
    return _lm(request.param)


def test_logits_equal_hf(lm):
    batch = lm.tokenize(PROMPT)
    ref = lm.model(input_ids=batch.input_ids).logits
    plain, _ = lm.run(PROMPT)
    cached, _ = lm.run(PROMPT, cache=[])
    everything, cache = lm.run(PROMPT, cache=lm.sites())
    for got in (plain, cached, everything):
        assert (got - ref).abs().max() <= 1e-5
    assert set(cache) == set(lm.sites())


def test_site_shapes(lm):
    c = lm.cfg
    _, cache = lm.run(PROMPT, cache=lm.sites())
    b, p = cache.batch.shape
    assert cache["blocks.0.attn.z"].shape == (b, p, c.n_heads, c.d_head)
    assert cache["blocks.0.attn.head_out"].shape == (b, p, c.n_heads, c.d_model)
    assert cache["blocks.0.attn.q"].shape == (b, p, c.n_heads, c.d_head)
    assert cache["blocks.0.attn.k"].shape == (b, p, c.n_kv_heads, c.d_head)
    assert cache["blocks.0.attn.pattern"].shape == (b, c.n_heads, p, p)
    if lm.has_experts(1):  # mixture of experts: no neuron layer, router and experts instead
        slots = c.n_experts + c.n_shared_experts
        assert cache["blocks.1.mlp.experts"].shape == (b, p, slots, c.d_model)
        assert cache["blocks.1.mlp.router"].shape == (b, p, c.n_experts)
    else:
        assert cache["blocks.1.mlp.neurons"].shape == (b, p, c.d_mlp)
    assert cache["final_norm.scale"].shape == (b, p, 1)
    assert cache["unembed"].shape == (b, p, c.d_vocab)


def test_decompositions(lm):
    _, cache = lm.run(PROMPT, cache=lm.sites())
    logits, _ = lm.run(PROMPT)
    for layer in range(lm.cfg.n_layers):
        p = f"blocks.{layer}."
        heads = cache[p + "attn.head_out"].sum(2)
        bias = lm.adapter.b_O(layer)
        if bias is not None:
            heads = heads + bias
        torch.testing.assert_close(heads, cache[p + "attn.out"], atol=1e-5, rtol=1e-5)
        total = cache[p + "resid_pre"] + cache[p + "attn.out"] + cache[p + "mlp.out"]
        torch.testing.assert_close(total, cache[p + "resid_post"], atol=1e-5, rtol=1e-5)
        if not lm.cfg.parallel_residual:
            mid = cache[p + "resid_pre"] + cache[p + "attn.out"]
            torch.testing.assert_close(mid, cache[p + "resid_mid"], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(
                cache[p + "resid_mid"] + cache[p + "mlp.out"], cache[p + "resid_post"]
            )
        # the MLP output is its neurons through the output projection (or its experts' sum)
        if lm.has_experts(layer):
            out = cache[p + "mlp.experts"].sum(2)
        else:
            out = cache[p + "mlp.neurons"] @ lm.W_out(layer)
            if lm.adapter.b_out(layer) is not None:
                out = out + lm.adapter.b_out(layer)
        if not lm.cfg.post_block_norms:
            torch.testing.assert_close(out, cache[p + "mlp.out"], atol=1e-5, rtol=1e-5)
    last = cache[f"blocks.{lm.cfg.n_layers - 1}.resid_post"]
    torch.testing.assert_close(last, cache["final_norm.input"])
    torch.testing.assert_close(lm.unembed(lm.apply_final_norm(last)), logits, atol=1e-5, rtol=1e-5)
    # the frozen-scale linear form of the final norm equals the norm itself
    norm = lm.adapter.final_norm()
    lin = lm.adapter.norm_linearized(norm, last, cache["final_norm.scale"])
    torch.testing.assert_close(lin, cache["final_norm.output"], atol=1e-5, rtol=1e-5)


def test_batched_interventions_equal_separate_runs(lm):
    c = lm.cfg
    mlp_units = "blocks.1.mlp.experts" if lm.has_experts(1) else "blocks.1.mlp.neurons"
    ivs = [
        Intervention("blocks.0.attn.z", 0.0, heads=[1]),
        Intervention(mlp_units, 3.0, op="scale", positions=[2, 3]),
        Intervention("blocks.0.resid_pre", torch.randn(c.d_model), op="add", positions=[-1]),
        Intervention("blocks.1.attn.head_out", 0.5, op="scale", heads=[0, 2]),
        Intervention("blocks.0.attn.v", 0.0, heads=[0]),
        Intervention("blocks.1.attn.out", torch.randn(c.d_model)),
    ]
    separate = [lm.run(PROMPT, interventions=[iv])[0][0] for iv in ivs]
    batched_ivs = []
    for row, iv in enumerate(ivs):
        batched_ivs.append(
            Intervention(
                iv.site, iv.value, iv.op, rows=[row], positions=iv.positions, heads=iv.heads
            )
        )
    together, _ = lm.run([PROMPT] * len(ivs), interventions=batched_ivs)
    clean, _ = lm.run(PROMPT)
    for row, ref in enumerate(separate):
        torch.testing.assert_close(together[row], ref, atol=1e-5, rtol=1e-5)
        assert (ref - clean[0]).abs().max() > 1e-6  # each intervention does something


def test_paired_indices_patch_different_units_per_row(lm):
    """rows/positions/heads vectors are paired: one (position, head) per row."""
    n = 3
    rows, positions, heads = [0, 1, 2], [1, 4, 6], [2, 0, 1]
    value = torch.zeros(n, lm.cfg.d_head)
    together, _ = lm.run(
        [PROMPT] * n,
        interventions=[
            Intervention("blocks.0.attn.z", value, rows=rows, positions=positions, heads=heads)
        ],
    )
    for r in range(n):
        single, _ = lm.run(
            PROMPT,
            interventions=[
                Intervention("blocks.0.attn.z", 0.0, positions=[positions[r]], heads=[heads[r]])
            ],
        )
        torch.testing.assert_close(together[r], single[0], atol=1e-5, rtol=1e-5)


def test_left_padding_matches_unbatched(lm):
    prompts = ["When Mary went", PROMPT, "The capital of France is"]
    batched, cache = lm.run(prompts, cache=["blocks.1.attn.head_out", "blocks.0.mlp.out"])
    lengths = cache.batch.lengths.tolist()
    for i, prompt in enumerate(prompts):
        single, c1 = lm.run(prompt, cache=["blocks.1.attn.head_out", "blocks.0.mlp.out"])
        n = lengths[i]
        torch.testing.assert_close(batched[i, -n:], single[0], atol=1e-4, rtol=1e-4)
        for site in c1:
            torch.testing.assert_close(cache[site][i, -n:], c1[site][0], atol=1e-4, rtol=1e-4)


def test_start_layer_equals_full_run(lm):
    full, cache = lm.run(PROMPT, cache=["blocks.1.resid_pre"])
    resumed, _ = lm.run(PROMPT, start_layer=1, start_resid=cache["blocks.1.resid_pre"])
    torch.testing.assert_close(resumed, full, atol=1e-5, rtol=1e-5)


def test_last_only(lm):
    full, _ = lm.run([PROMPT, "When Mary went"])
    last, cache = lm.run([PROMPT, "When Mary went"], last_only=True, cache=["final_norm.input"])
    assert last.shape[1] == 1
    assert cache["final_norm.input"].shape[1] == full.shape[1]  # only the logits are cut
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)


def test_grad_mode_gives_live_cache(lm):
    sites = [
        "embed",
        "blocks.0.attn.head_out",
        "blocks.1.attn.z",
        "blocks.1.mlp.experts" if lm.has_experts(1) else "blocks.1.mlp.neurons",
        "blocks.0.attn.q",
    ]
    logits, cache = lm.run(PROMPT, cache=sites, grad=True)
    metric = logits[0, -1, 5] - logits[0, -1, 7]
    grads = torch.autograd.grad(metric, [cache[s] for s in sites])
    for s, g in zip(sites, grads):
        assert g is not None and g.abs().sum() > 0, s
    # the head_out gradient is the gradient of attn.out (a head's output is additive)
    logits, cache = lm.run(PROMPT, cache=["blocks.0.attn.head_out", "blocks.0.attn.out"], grad=True)
    metric = logits[0, -1, 5]
    g_heads, g_out = torch.autograd.grad(
        metric, [cache["blocks.0.attn.head_out"], cache["blocks.0.attn.out"]]
    )
    for h in range(lm.cfg.n_heads):
        torch.testing.assert_close(g_heads[:, :, h], g_out, atol=1e-6, rtol=1e-5)


def test_gate_gradient_equals_finite_difference():
    lm = _lm("llama")
    gate = torch.ones(lm.cfg.n_heads, requires_grad=True)
    logits, _ = lm.run(
        PROMPT,
        interventions=[Intervention("blocks.0.attn.z", gate[:, None], op="scale")],
        grad=True,
    )
    (g,) = torch.autograd.grad(logits[0, -1, 3], gate)
    eps = 1e-3
    for h in range(lm.cfg.n_heads):
        up = torch.ones(lm.cfg.n_heads, 1)
        up[h] += eps
        lo = torch.ones(lm.cfg.n_heads, 1)
        lo[h] -= eps
        a, _ = lm.run(PROMPT, interventions=[Intervention("blocks.0.attn.z", up, op="scale")])
        b, _ = lm.run(PROMPT, interventions=[Intervention("blocks.0.attn.z", lo, op="scale")])
        fd = (a[0, -1, 3] - b[0, -1, 3]) / (2 * eps)
        assert abs(fd - g[h]) < 1e-2 * max(1.0, abs(float(g[h])))


def test_head_out_patch_equals_z_patch_for_linear_output():
    lm = _lm("gpt2")
    a, _ = lm.run(PROMPT, interventions=[Intervention("blocks.1.attn.z", 0.0, heads=[3])])
    b, _ = lm.run(PROMPT, interventions=[Intervention("blocks.1.attn.head_out", 0.0, heads=[3])])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_resid_mid_write_changes_mlp_input_and_residual():
    lm = _lm("gpt2")
    _, cache = lm.run(PROMPT, cache=["blocks.0.resid_mid"])
    new = cache["blocks.0.resid_mid"] * 0.5
    logits, c2 = lm.run(
        PROMPT,
        interventions=[Intervention("blocks.0.resid_mid", new)],
        cache=["blocks.0.resid_mid", "blocks.0.resid_post", "blocks.0.mlp.out"],
    )
    torch.testing.assert_close(c2["blocks.0.resid_mid"], new)
    torch.testing.assert_close(
        c2["blocks.0.resid_post"], new + c2["blocks.0.mlp.out"], atol=1e-5, rtol=1e-5
    )


def test_sites_list_and_pattern_needs_eager():
    lm = al.wrap(*tiny_model("llama", attn_implementation="sdpa"))
    logits, _ = lm.run(PROMPT)  # fine without the pattern
    with pytest.raises(al.errors.SiteNotExposedError, match="eager"):
        lm.run(PROMPT, cache=["blocks.0.attn.pattern"])
    assert not any("resid_mid" in s for s in _lm("gpt_neox").sites())
    with pytest.raises(al.errors.SiteNotExposedError, match="parallel"):
        _lm("gpt_neox").run(PROMPT, cache=["blocks.0.resid_mid"])


def test_float64_and_bfloat16():
    for dtype in (torch.float64, torch.bfloat16):
        hf, tok = tiny_model("llama", dtype=dtype)
        lm = al.wrap(hf, tok)
        assert lm.dtype == dtype
        logits, cache = lm.run(
            PROMPT,
            cache=["blocks.0.attn.head_out"],
            interventions=[Intervention("blocks.1.attn.z", 0.0, heads=[0])],
        )
        assert logits.dtype == dtype and cache["blocks.0.attn.head_out"].dtype == dtype


def test_load_from_directory(tmp_path):
    hf, tok = tiny_model("qwen2")
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = al.load(str(tmp_path), dtype="float32")
    ref = al.wrap(hf, tok)
    a, _ = lm.run(PROMPT)
    b, _ = ref.run(PROMPT)
    torch.testing.assert_close(a, b)
    assert lm.name == str(tmp_path)


def test_load_passes_device_map_and_dtype(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    hf, tok = tiny_model("llama")
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    lm = al.load(str(tmp_path), dtype=torch.float64, device_map={"": "cpu"})
    assert seen["device_map"] == {"": "cpu"} and seen["dtype"] == torch.float64
    assert lm.dtype == torch.float64
    logits, cache = lm.run(PROMPT, cache=["blocks.1.attn.head_out"])
    assert logits.dtype == torch.float64


def test_unsupported_checkpoint_type(tmp_path):
    from transformers import BertConfig

    BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    ).save_pretrained(tmp_path)
    with pytest.raises(al.errors.UnsupportedArchitectureError, match="bert"):
        al.load(str(tmp_path))


def test_mlp_normed_is_what_the_mlp_reads(lm):
    """``mlp.normed`` is the MLP's own input: its norm applied to ``mlp.in``; the
    MLP run on it gives ``mlp.out`` (a block's post-MLP norm, if any, aside)."""
    _, cache = lm.run(PROMPT, cache=["blocks.0.mlp.in", "blocks.0.mlp.normed", "blocks.0.mlp.out"])
    a = lm.adapter
    with torch.no_grad():
        normed = a.mlp_in_norm(0)(cache["blocks.0.mlp.in"])
    assert torch.allclose(cache["blocks.0.mlp.normed"], normed, atol=1e-5)
    if a.mlp_out_norm(0) is None:
        with torch.no_grad():
            out = a.mlp(0)(cache["blocks.0.mlp.normed"])
        out = out[0] if isinstance(out, tuple) else out
        out = out * a.residual_multiplier  # Granite: mlp.out is what the residual receives
        assert torch.allclose(cache["blocks.0.mlp.out"], out, atol=1e-5)
