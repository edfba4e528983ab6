"""Direct logit attribution: the parts sum to the model's own target logit minus
the unembedding bias, for every family and granularity; granularities agree."""

from __future__ import annotations

import functools

import pytest
import torch

import attrlab as al
from attrlab.errors import InputError, MultiTokenTargetError
from attrlab.testing import FAMILIES

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The capital of France is",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread


@functools.cache
def _lm(family: str) -> al.LM:
    return al.wrap(*al.testing.tiny_model(family, initializer_range=0.3))


def _pre_cap_target(lm: al.LM, prompts: list[str], a: list[str], b: list[str] | None):
    """The model's own logit (difference) before soft-capping, minus the unembedding bias."""
    batch = lm.tokenize(prompts)
    _, cache = lm.run(batch, cache=["unembed"])
    last = cache["unembed"][:, -1].double()
    bias = lm.b_U()
    ia = torch.tensor([lm.token_id(t) for t in a])
    val = last.gather(-1, ia[:, None])[:, 0] - (bias[ia].double() if bias is not None else 0)
    if b is not None:
        ib = torch.tensor([lm.token_id(t) for t in b])
        val = val - last.gather(-1, ib[:, None])[:, 0]
        val = val + (bias[ib].double() if bias is not None else 0)
    return val


@pytest.mark.parametrize("family", FAMILIES)
def test_parts_sum_to_target_minus_bias(family: str) -> None:
    lm = _lm(family)
    a, b = [" Mary", " Paris"], [" John", " Rome"]
    for target, want in (
        (al.targets.LogitDiff(a, b), _pre_cap_target(lm, PROMPTS, a, b)),
        (al.targets.Logit(a), _pre_cap_target(lm, PROMPTS, a, None)),
    ):
        mlp_units = "experts" if lm.has_experts(0) else "neurons"  # MoE MLPs have no neurons
        for units, opts in (("heads", {}), (mlp_units, {}), ("heads", {"per_source": True})):
            r = al.attribute(
                lm,
                PROMPTS,
                target=target,
                units=units,
                method="dla",
                complete=True,
                per_prompt=True,
                **opts,
            )
            got = r.scores.double().sum(-1)
            assert r.scores.shape[0] == 2
            scale = torch.maximum(want.abs(), torch.ones_like(want) * 1e-3)
            rel = ((got - want).abs() / scale).max().item()
            assert rel < 1e-4, (family, units, opts, got, want)
            # the parts are not trivially one number: several are non-zero
            assert (r.scores.abs() > 1e-6).sum() > 4


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "llama", "gpt_neox"])
def test_granularities_agree(family: str) -> None:
    lm = _lm(family)
    t = (" Mary", " John")
    p = PROMPTS[0]
    attn = al.attribute(lm, p, target=t, units="attn", method="dla").scores  # [L]
    mlp = al.attribute(lm, p, target=t, units="mlp", method="dla").scores
    heads = al.attribute(lm, p, target=t, units="heads", method="dla", complete=True)
    hdf = heads.to_pandas()
    src = al.attribute(lm, p, target=t, units="heads", method="dla", per_source=True)
    neu = al.attribute(lm, p, target=t, units="neurons", method="dla", complete=True)
    ndf = neu.to_pandas()
    sdf = src.to_pandas()
    for layer in range(lm.cfg.n_layers):
        # heads + projection bias == attention output (computed from attn.out directly)
        hl = hdf[(hdf.layer == layer) & hdf.component.isin(["head", "attn_bias"])].score.sum()
        assert hl == pytest.approx(attn[layer].item(), abs=1e-5)
        # neurons + output bias == MLP output
        nl = ndf[(ndf.layer == layer) & ndf.component.isin(["neuron", "mlp_bias"])].score.sum()
        assert nl == pytest.approx(mlp[layer].item(), abs=1e-5)
        # head x source summed over sources == head
        for h in range(lm.cfg.n_heads):
            s = sdf[(sdf.layer == layer) & (sdf["head"] == h)].score.sum()
            one = hdf[(hdf.layer == layer) & (hdf["head"] == h)].score.item()
            assert s == pytest.approx(one, abs=1e-5)
    layers = al.attribute(lm, p, target=t, units="layers", method="dla")
    assert layers.units["component"][0] == "embed"
    assert layers.scores.sum().item() == pytest.approx(heads.scores.sum().item(), abs=1e-4)


def test_per_source_labels_and_dla_of_a_head_is_its_projection() -> None:
    lm = _lm("gpt2")
    p = PROMPTS[0]
    r = al.attribute(
        lm,
        p,
        target=" Mary",
        units=al.units.Heads(layers=[1], heads=[2]),
        method="dla",
        per_source=True,
    )
    df = r.to_pandas()
    toks = lm.to_str_tokens(lm.encode(p))
    assert list(df.columns) == ["layer", "head", "source", "token", "score"]
    assert df.token.tolist() == toks
    # independent check of one head: its output through the model's own final norm
    # (LayerNorm centring, frozen scale) onto the unembedding column
    _, cache = lm.run(p, cache=["blocks.1.attn.head_out", "final_norm.scale"])
    x = cache["blocks.1.attn.head_out"][0, -1, 2]
    ln = lm.adapter.final_norm()
    y = (x - x.mean()) * cache["final_norm.scale"][0, -1] * ln.weight
    want = (y @ lm.W_U()[:, lm.token_id(" Mary")]).item()
    assert df.score.sum() == pytest.approx(want, abs=1e-5)


def test_averaging_over_prompts_and_selection() -> None:
    lm = _lm("llama")
    t = al.targets.LogitDiff([" Mary", " Paris"], [" John", " Rome"])
    per = al.attribute(lm, PROMPTS, target=t, units="heads", method="dla", per_prompt=True)
    mean = al.attribute(lm, PROMPTS, target=t, units="heads", method="dla")
    assert torch.allclose(per.scores.mean(0), mean.scores, atol=1e-6)
    sel = al.attribute(
        lm, PROMPTS, target=t, units=al.units.Heads(layers=[1], heads=[0, 3]), method="dla"
    )
    assert sel.units == {"layer": [1, 1], "head": [0, 3]}
    df = mean.to_pandas()
    want = df[(df.layer == 1) & df["head"].isin([0, 3])].score.to_numpy()
    assert torch.allclose(sel.scores, torch.tensor(want, dtype=torch.float32), atol=1e-6)
    nsel = al.attribute(
        lm,
        PROMPTS[0],
        target=" Mary",
        method="dla",
        units=al.units.Neurons(layers=[0], neurons=[1, 2]),
    )
    assert nsel.units == {"layer": [0, 0], "neuron": [1, 2]}
    # rest + selected == everything
    full = al.attribute(
        lm, PROMPTS[0], target=" Mary", units="neurons", method="dla", complete=True
    )
    total = nsel.scores.sum().item() + nsel.diagnostics["rest"]
    assert total == pytest.approx(full.scores.sum().item(), abs=1e-4)


def test_softcap_documented_pre_cap() -> None:
    lm = _lm("gemma2")
    r = al.attribute(lm, PROMPTS[0], target=" Mary", units="heads", method="dla", complete=True)
    assert r.diagnostics["softcapped"] is True
    logits, cache = lm.run(PROMPTS[0], cache=["unembed"])
    pre = cache["unembed"][0, -1, lm.token_id(" Mary")].item()
    assert r.scores.sum().item() == pytest.approx(pre, abs=1e-4)
    cap = lm.cfg.final_logit_softcap
    assert logits[0, -1, lm.token_id(" Mary")].item() == pytest.approx(
        cap * torch.tanh(torch.tensor(pre / cap)).item(), abs=1e-5
    )


def test_bad_input() -> None:
    lm = _lm("gpt2")
    with pytest.raises(InputError, match="logit"):
        al.attribute(
            lm, PROMPTS[0], target=al.targets.LogProb(" Mary"), units="heads", method="dla"
        )
    with pytest.raises(MultiTokenTargetError):
        al.attribute(lm, PROMPTS[0], target=" Mary Smithson", units="heads", method="dla")
    with pytest.raises(InputError, match="per_source"):
        al.attribute(lm, PROMPTS[0], target=" Mary", units="neurons", method="dla", per_source=True)
    with pytest.raises(InputError, match="last position"):
        al.attribute(
            lm, PROMPTS[0], target=" Mary", units=al.units.Heads(per_position=True), method="dla"
        )
    with pytest.raises(al.errors.IndexRangeError):
        al.attribute(lm, PROMPTS[0], target=" Mary", units=al.units.Heads(layers=[7]), method="dla")


def test_per_source_needs_eager_attention() -> None:
    hf, tok = al.testing.tiny_model("llama", attn_implementation="sdpa")
    lm = al.wrap(hf, tok)
    ok = al.attribute(lm, PROMPTS[0], target=" Mary", units="heads", method="dla")
    assert len(ok) == lm.cfg.n_layers * lm.cfg.n_heads
    with pytest.raises(al.errors.SiteNotExposedError, match="eager"):
        al.attribute(lm, PROMPTS[0], target=" Mary", units="heads", method="dla", per_source=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapper_frozen_norms_are_the_models_norms(family: str) -> None:
    """DLA reads its norms from the wrapper (no adapter, no formula of its own):
    ``lm.frozen_norm`` with the scale it measured equals the model's own norm
    module on the same input, for the final norm and every post-attention /
    post-MLP norm; ``lm.frozen_norm_T`` is the transpose of its linear part."""
    lm = al.wrap(*al.testing.tiny_model(family, dtype=torch.float64, initializer_range=0.3))
    a = lm.adapter  # the test's oracle: the model's own modules
    norms = {"final_norm": a.final_norm()}
    for layer in range(lm.cfg.n_layers):
        for name, mod in (
            (f"blocks.{layer}.attn_out_norm", a.attn_out_norm(layer)),
            (f"blocks.{layer}.mlp_out_norm", a.mlp_out_norm(layer)),
        ):
            assert lm.has_norm(name) == (mod is not None)
            if mod is not None:
                norms[name] = mod
    gen = torch.Generator().manual_seed(0)
    d = lm.cfg.d_model
    x = 3.0 * torch.randn(4, d, generator=gen, dtype=torch.float64) + 0.5
    v = torch.randn(4, d, generator=gen, dtype=torch.float64)
    for name, mod in norms.items():
        s = lm.norm_scale(name, x)
        with torch.no_grad():
            torch.testing.assert_close(lm.frozen_norm(name, x, s), mod(x), atol=1e-5, rtol=1e-5)
        # transpose: (frozen(x) - frozen(0)) . v == x . frozen_norm_T(v), with s held fixed
        lin = lm.frozen_norm(name, x, s) - lm.frozen_norm(name, torch.zeros_like(x), s)
        torch.testing.assert_close(
            (lin * v).sum(-1), (x * lm.frozen_norm_T(name, v, s)).sum(-1), atol=1e-10, rtol=1e-10
        )
    with pytest.raises(InputError, match="unknown norm"):
        lm.has_norm("blocks.0.ln_1")
