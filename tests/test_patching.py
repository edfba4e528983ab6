"""Exact activation patching: the batched, layer-skipping sweep must equal one
plain full forward per patch; corruptions, metrics, directions and bad input."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import attrlab as al
from attrlab.errors import (
    CounterfactualLengthError,
    InputError,
    MultiTokenTargetError,
    SiteNotExposedError,
)
from attrlab.methods.patching import (
    Mean,
    Noise,
    PatchingWarning,
    PatchUnit,
    Resample,
    Zero,
    embedding_std,
    patch_sweep,
)
from attrlab.model.interventions import Intervention

PROMPT = "When Mary and John went to the store, John gave a drink to"
CF = "When Mary and John went to the store, Mary gave a drink to"
TARGET = (" Mary", " John")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread


@functools.cache
def _lm(family: str) -> al.LM:
    # larger init than HF's 0.02 so that patch effects are far above rounding
    return al.wrap(*al.testing.tiny_model(family, initializer_range=0.3))


def _brute(lm: al.LM, base: str, donor_cache: dict, u: PatchUnit, target) -> float:
    """One full forward of ``base`` with unit ``u`` taken from ``donor_cache``."""
    d = donor_cache[u.site]
    pos = None if u.position is None else [u.position]
    dsel = d if pos is None else d[:, pos]
    if u.kind == "mlp.neurons":

        def f(old, val=dsel[..., u.index]):
            new = old.clone()
            new[..., u.index] = val
            return new

        iv = Intervention(u.site, f, positions=pos)
    elif u.index is not None:
        iv = Intervention(u.site, dsel[:, :, [u.index]], positions=pos, heads=[u.index])
    else:
        iv = Intervention(u.site, dsel, positions=pos)
    b = lm.tokenize(base)
    logits, _ = lm.run(b, interventions=[iv])
    return float(target(logits, b))


CASES = [
    (al.units.Heads(per_position=True), "z"),
    (al.units.Heads(), "z"),
    (al.units.Heads(layers=[1], per_position=True), "k"),
    (al.units.Heads(layers=[0]), "v"),
    (al.units.Heads(layers=[1]), "q"),
    (al.units.Resid(), "z"),
    (al.units.AttnOut(per_position=True), "z"),
    (al.units.MlpOut(), "z"),
    (al.units.Neurons(layers=[1], neurons=[0, 5], per_position=True), "z"),
]


@pytest.mark.parametrize(
    "family,direction",
    [("gpt2", "noising"), ("llama", "noising"), ("gemma2", "denoising"), ("gpt_neox", "denoising")],
)
def test_sweep_equals_one_full_forward_per_patch(family: str, direction: str) -> None:
    lm = _lm(family)
    target = al.targets.resolve(TARGET, lm)
    base, donor = (PROMPT, CF) if direction == "noising" else (CF, PROMPT)
    n_checked = 0
    for units, site in CASES:
        sw = patch_sweep(
            lm, PROMPT, CF, TARGET, units, site=site, direction=direction, batch_size=13
        )
        sites = sorted({u.site for u in sw.units})
        _, donor_cache = lm.run(donor, cache=sites)
        step = max(1, len(sw.units) // 2)
        for j in range(0, len(sw.units), step):
            want = _brute(lm, base, donor_cache, sw.units[j], target)
            assert sw.patched[0, j].item() == pytest.approx(want, abs=1e-4)
            n_checked += 1
        assert torch.isfinite(sw.patched).all()
    assert n_checked >= 15


def test_effects_are_not_trivial() -> None:
    lm = _lm("gpt2")
    sw = patch_sweep(lm, PROMPT, CF, TARGET, al.units.Heads(per_position=True))
    assert sw.effects.abs().max() > 1e-2
    assert (sw.clean - sw.corrupt).abs().item() > 1e-2


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_whole_residual_patch_moves_all_the_way(family: str) -> None:
    lm = _lm(family)
    units = al.units.Resid(per_position=False)
    noise = patch_sweep(lm, PROMPT, CF, TARGET, units)
    deno = patch_sweep(lm, PROMPT, CF, TARGET, units, direction="denoising")
    # patching the whole residual stream at any layer gives the donor run exactly
    assert torch.allclose(noise.patched[0], noise.corrupt.expand(lm.cfg.n_layers), atol=1e-4)
    assert torch.allclose(deno.patched[0], deno.clean.expand(lm.cfg.n_layers), atol=1e-4)
    r = al.attribute(
        lm,
        PROMPT,
        target=TARGET,
        units=units,
        method="patch",
        counterfactual=CF,
        direction="denoising",
        metric="normalized",
    )
    assert torch.allclose(r.scores, torch.ones(lm.cfg.n_layers), atol=1e-4)
    r = al.attribute(
        lm,
        PROMPT,
        target=TARGET,
        units=units,
        method="patch",
        counterfactual=CF,
        metric="normalized",
    )
    assert torch.allclose(r.scores, torch.zeros(lm.cfg.n_layers), atol=1e-4)


def test_kl_logprob_prob_metrics() -> None:
    lm = _lm("gpt2")
    units = al.units.Resid(per_position=False)
    kl = al.attribute(
        lm, PROMPT, target=" Mary", units=units, method="patch", counterfactual=CF, metric="kl"
    )
    c, _ = lm.run(PROMPT)
    k, _ = lm.run(CF)
    p, q = c[0, -1].log_softmax(-1), k[0, -1].log_softmax(-1)
    want = float((p.exp() * (p - q)).sum())
    assert torch.allclose(kl.scores, torch.full((lm.cfg.n_layers,), want), atol=1e-4)
    mary = lm.token_id(" Mary")
    lp = al.attribute(
        lm, PROMPT, target=" Mary", units=units, method="patch", counterfactual=CF, metric="logprob"
    )
    # contribution: clean minus patched (the whole residual patched = the counterfactual run)
    assert torch.allclose(lp.scores, (p[mary] - q[mary]).expand(lm.cfg.n_layers), atol=1e-4)
    pr = al.attribute(
        lm, PROMPT, target=" Mary", units=units, method="patch", counterfactual=CF, metric="prob"
    )
    want_p = p[mary].exp() - q[mary].exp()
    assert torch.allclose(pr.scores, want_p.expand(lm.cfg.n_layers), atol=1e-5)


def test_noise_corruption_is_seeded_and_scaled() -> None:
    lm = _lm("gpt2")
    units = al.units.Resid()
    a = patch_sweep(lm, PROMPT, Noise(positions=[1, 2], seed=3), " Mary", units)
    b = patch_sweep(lm, PROMPT, Noise(positions=[1, 2], seed=3), " Mary", units)
    c = patch_sweep(lm, PROMPT, Noise(positions=[1, 2], seed=4), " Mary", units)
    assert torch.equal(a.patched, b.patched)
    assert not torch.equal(a.corrupt, c.corrupt)
    # positions after the noised ones at layer 0 carry no noise: patching them is a no-op
    col = {(u.layer, u.position): j for j, u in enumerate(a.units)}
    assert abs(a.effects[0, col[(0, 5)]].item()) < 1e-5
    # the default scale is 3 sigma of the embeddings: an explicit equal scale gives the same run
    s = 3 * embedding_std(lm)
    d = patch_sweep(lm, PROMPT, Noise(positions=[1, 2], scale=s, seed=3), " Mary", units)
    assert torch.allclose(a.patched, d.patched)
    emb = lm.adapter.token_embedding().weight
    assert embedding_std(lm) == pytest.approx(emb.double().std(unbiased=False).item(), rel=1e-6)
    # denoising from the noised run: restoring the whole residual recovers the clean value
    e = patch_sweep(
        lm,
        PROMPT,
        Noise(positions=[1, 2], seed=3),
        " Mary",
        al.units.Resid(per_position=False),
        direction="denoising",
    )
    assert torch.allclose(e.patched[0], e.clean.expand(lm.cfg.n_layers), atol=1e-4)


def test_zero_mean_resample_corruptions() -> None:
    lm = _lm("llama")
    units = al.units.Heads(per_position=True)
    cf = patch_sweep(lm, PROMPT, CF, TARGET, units)
    # mean over a single reference prompt of equal length = that prompt's activations
    mean = patch_sweep(lm, PROMPT, Mean([CF]), TARGET, units)
    assert torch.allclose(mean.patched, cf.patched, atol=1e-5)
    # resampling from a single reference = counterfactual patching with it
    rs = patch_sweep(lm, PROMPT, Resample([CF], seed=0), TARGET, units)
    assert torch.allclose(rs.patched, cf.patched, atol=1e-5)
    assert torch.allclose(rs.corrupt, cf.corrupt)
    # zero ablation of a head at one position, checked against a direct run
    z = patch_sweep(lm, PROMPT, Zero(), TARGET, [PatchUnit(1, "attn.z", 4, 2)])
    b = lm.tokenize(PROMPT)
    logits, _ = lm.run(
        b, interventions=[Intervention("blocks.1.attn.z", 0.0, positions=[4], heads=[2])]
    )
    assert z.patched[0, 0].item() == pytest.approx(
        float(al.targets.resolve(TARGET, lm)(logits, b)), abs=1e-5
    )
    assert torch.isnan(z.corrupt).all()
    # mean over references of another length: mean over their positions
    m2 = patch_sweep(lm, PROMPT, Mean(["a b", "c d e f"]), TARGET, al.units.MlpOut())
    assert torch.isfinite(m2.patched).all()
    with pytest.raises(InputError, match="noising"):
        patch_sweep(lm, PROMPT, Zero(), TARGET, units, direction="denoising")
    with pytest.raises(InputError, match="corrupted run"):
        al.attribute(
            lm,
            PROMPT,
            target=TARGET,
            units="heads",
            method="patch",
            corruption="zero",
            metric="normalized",
        )
    r = al.attribute(
        lm,
        PROMPT,
        target=TARGET,
        units="heads",
        method="patch",
        corruption="mean",
        reference=[CF, PROMPT],
    )
    assert len(r) == lm.cfg.n_layers * lm.cfg.n_heads


def test_batch_of_prompts_per_prompt_rows() -> None:
    lm = _lm("gpt2")
    prompts = [PROMPT, "When Tom and Anna went to the park, Anna gave a ball to"]
    cfs = [CF, "When Tom and Anna went to the park, Tom gave a ball to"]
    tgt = al.targets.LogitDiff([" Mary", " Tom"], [" John", " Anna"])
    units = al.units.Heads()
    both = patch_sweep(lm, prompts, cfs, tgt, units, batch_size=5)
    for i in range(2):
        one = patch_sweep(lm, [prompts[i]], [cfs[i]], (tgt.a.token[i], tgt.b.token[i]), units)
        # left padding may differ between the batch and the single prompt: compare effects
        assert torch.allclose(both.effects[i], one.effects[0], atol=1e-4)
    r = al.attribute(
        lm, prompts, target=tgt, units=units, method="patch", counterfactual=cfs, per_prompt=True
    )
    assert r.scores.shape == (2, len(both.units))
    r2 = al.attribute(lm, prompts, target=tgt, units=units, method="patch", counterfactual=cfs)
    assert torch.allclose(r2.scores, r.scores.mean(0), atol=1e-6)


def test_labels_and_result() -> None:
    lm = _lm("gpt2")
    r = al.attribute(
        lm,
        PROMPT,
        target=TARGET,
        units=al.units.Heads(per_position=True),
        method="patch",
        counterfactual=CF,
    )
    df = r.to_pandas()
    assert list(df.columns) == ["layer", "head", "position", "token", "score"]
    toks = lm.to_str_tokens(lm.encode(PROMPT))
    assert df["token"].tolist()[: len(toks)] == toks  # layer, head, position order
    r = al.attribute(lm, PROMPT, target=TARGET, units="resid", method="patch", counterfactual=CF)
    assert {"layer", "position", "token"} <= set(r.to_pandas().columns)
    assert r.extra["patched"].shape == (1, len(r))


def test_normalized_warns_instead_of_nan() -> None:
    lm = _lm("gpt2")
    with pytest.warns(PatchingWarning, match="same target value"):
        r = al.attribute(
            lm,
            PROMPT,
            target=TARGET,
            units="heads",
            method="patch",
            counterfactual=PROMPT,
            metric="normalized",
        )
    assert torch.isfinite(r.scores).all()
    assert r.diagnostics["normalized"] is False


def test_bad_input() -> None:
    lm = _lm("gpt2")
    with pytest.raises(CounterfactualLengthError) as e:
        al.attribute(
            lm,
            PROMPT,
            target=TARGET,
            units="heads",
            method="patch",
            counterfactual="When Mary went to the store",
        )
    assert "prompt 0" in str(e.value) and "counterfactual 0" in str(e.value)
    with pytest.raises(MultiTokenTargetError):
        al.attribute(
            lm,
            PROMPT,
            target=" Mary Smithson",
            units="heads",
            method="patch",
            counterfactual=CF,
            metric="logprob",
        )
    with pytest.raises(InputError, match="single-token"):
        al.attribute(
            lm,
            PROMPT,
            target=TARGET,
            units="heads",
            method="patch",
            counterfactual=CF,
            metric="prob",
        )
    with pytest.raises(SiteNotExposedError, match="read-only"):
        al.attribute(
            lm,
            PROMPT,
            target=TARGET,
            units="heads",
            method="patch",
            counterfactual=CF,
            site="pattern",
        )
    with pytest.raises(SiteNotExposedError):
        patch_sweep(lm, PROMPT, CF, TARGET, [PatchUnit(0, "attn.pattern", 1, 0)])
    with pytest.raises(InputError, match="counterfactual="):
        al.attribute(lm, PROMPT, target=TARGET, units="heads", method="patch")
    with pytest.raises(al.errors.IndexRangeError):
        patch_sweep(lm, PROMPT, CF, TARGET, [PatchUnit(0, "attn.z", 99, 0)])
    with pytest.raises(SiteNotExposedError, match="parallel"):
        patch_sweep(_lm("gpt_neox"), PROMPT, CF, TARGET, [PatchUnit(0, "resid_mid", 1)])


def test_unrequested_warnings_are_silent() -> None:
    lm = _lm("gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_sweep(lm, PROMPT, CF, TARGET, al.units.MlpOut(per_position=True))


def test_parity_with_transformer_lens() -> None:
    """Same GPT-2 weights in TransformerLens 2.x: per-head DLA, resid_pre patching by
    layer x position and head output patching by position agree within 1e-4.
    (Runs where transformer_lens is importable, e.g. the benchmark venv.)"""
    pytest.importorskip("transformer_lens")
    import sys
    from pathlib import Path

    from transformer_lens import patching

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _tl_gpt2 import hooked_gpt2  # the benchmarks' TransformerLens copy of a GPT-2

    hf, _ = al.testing.tiny_model("gpt2", initializer_range=0.3)
    lm = al.wrap(hf, _)
    tl = hooked_gpt2(hf)
    clean = torch.tensor([lm.encode(PROMPT)])
    corrupt = torch.tensor([lm.encode(CF)])
    a, b = lm.token_id(" Mary"), lm.token_id(" John")

    def metric(logits):
        return logits[0, -1, a] - logits[0, -1, b]

    with torch.no_grad():
        _, cache = tl.run_with_cache(clean)
        stack = cache.apply_ln_to_stack(
            cache.stack_head_results(layer=-1, pos_slice=-1), layer=-1, pos_slice=-1
        )
        tl_dla = ((stack * tl.ln_final.w) @ (tl.W_U[:, a] - tl.W_U[:, b]))[:, 0]
        tl_resid = patching.get_act_patch_resid_pre(tl, corrupt, cache, metric)
        tl_heads = patching.get_act_patch_attn_head_out_by_pos(tl, corrupt, cache, metric)
    L, H, P = lm.cfg.n_layers, lm.cfg.n_heads, clean.shape[1]
    dla = al.attribute(lm, clean, target=(a, b), units="heads", method="dla").scores
    assert torch.allclose(dla, tl_dla, atol=1e-4)
    resid = patch_sweep(lm, clean, corrupt, (a, b), al.units.Resid(), direction="denoising")
    assert torch.allclose(resid.patched[0].reshape(L, P), tl_resid, atol=1e-4)
    heads = patch_sweep(
        lm, clean, corrupt, (a, b), al.units.Heads(per_position=True), direction="denoising"
    )
    assert torch.allclose(heads.patched[0].reshape(L, P, H), tl_heads, atol=1e-4)
    assert (tl_heads - metric(tl(corrupt))).abs().max() > 1e-3  # effects are not all zero


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_prefix_reuse_is_exact(family: str) -> None:
    """Per-position patches reuse the base run's key/value cache of the earlier
    positions; the values equal full recomputation (also with left padding)."""
    lm = _lm(family)
    prompts = [PROMPT, "When Tom and Anna went to the park, Anna gave a ball to"]
    cfs = [CF, "When Tom and Anna went to the park, Tom gave a ball to"]
    tgt = al.targets.LogitDiff([" Mary", " Tom"], [" John", " Anna"])
    for units in (al.units.Heads(per_position=True), al.units.Resid()):
        for direction in ("noising", "denoising"):
            # 2 rows per prompt and forward: the tiny model's cost model would otherwise
            # join every position into one forward from position 0
            fast = patch_sweep(lm, prompts, cfs, tgt, units, direction=direction, batch_size=4)
            slow = patch_sweep(
                lm, prompts, cfs, tgt, units, direction=direction, reuse_prefix=False
            )
            assert fast.n_forwards > slow.n_forwards  # the prefix path was taken
            assert torch.allclose(fast.patched, slow.patched, atol=1e-5)


# docs/components.md, "Zoo IOI model": noising each head (all positions) with the
# counterfactual (S2 replaced by the IO name), 16 test examples (seed 0)
IOI_CLEAN, IOI_CORRUPT = 17.986, -18.458
IOI_TOP_HEADS = {(1, 0): -19.939, (0, 0): -13.490, (0, 3): -11.722, (0, 1): -5.728}


def _zoo_ioi_patch(units, **kw):
    """Exact patching on the zoo IOI model, 16 test prompts, S2 -> IO counterfactual."""
    lm = al.zoo.load("ioi")
    exs = al.zoo.task("ioi").examples(16, seed=0)
    tgt = al.targets.LogitDiff([e.answer for e in exs], [e.wrong for e in exs])
    r = al.attribute(
        lm,
        [e.prompt for e in exs],
        target=tgt,
        units=units,
        method="patch",
        counterfactual=[e.counterfactual for e in exs],
        **kw,
    )
    return r, exs


def test_zoo_ioi_effects_by_role_as_documented() -> None:
    """docs/components.md: per-prompt patching scores aligned by role (the IOI
    layouts differ) give L1H0 at END -19.94 and L0H0 at S2 -13.68."""
    r, exs = _zoo_ioi_patch(al.units.Heads(per_position=True), per_prompt=True)
    df = r.effect_of_patching().to_pandas()  # the documented numbers: patched - clean
    assert torch.equal(r.effect_of_patching().scores, -r.scores)
    role = {(i, p): k for i, e in enumerate(exs) for k, p in e.positions.items()}
    df["role"] = [role.get((i, p), "other") for i, p in zip(df["row"], df["position"])]
    by_role = df[df.role != "other"].groupby(["layer", "head", "role"])["score"].mean()
    assert by_role[(1, 0, "END")] == pytest.approx(-19.94, abs=0.01)
    assert by_role[(0, 0, "S2")] == pytest.approx(-13.68, abs=0.01)
    assert len({e.layout for e in exs}) > 1  # the prompts really mix layouts


def test_zoo_ioi_top_heads_move_logit_diff_as_documented() -> None:
    r, _ = _zoo_ioi_patch("heads")
    r = r.effect_of_patching()  # the documented numbers: patched - clean
    assert r.diagnostics["clean"] == pytest.approx(IOI_CLEAN, abs=0.01)
    assert r.diagnostics["corrupt"] == pytest.approx(IOI_CORRUPT, abs=0.01)
    top = r.to_pandas().sort_values("score").head(4)  # the most negative effects
    got = {(int(a), int(b)): float(s) for a, b, s in zip(top["layer"], top["head"], top["score"])}
    assert set(got) == set(IOI_TOP_HEADS)
    for head, effect in IOI_TOP_HEADS.items():
        assert got[head] == pytest.approx(effect, abs=0.01)
    # every other head moves the logit difference by less than 0.1
    assert (r.scores.abs() > 0.1).sum().item() == 4


def test_logit_columns_are_exact() -> None:
    """A logit-difference target reads two logits: the masked forwards compute
    only those columns of the unembedding; values equal the full computation."""
    lm = _lm("gpt2")
    tgt = al.targets.resolve((" Mary", " John"), lm)
    cols = tgt.logit_columns()
    assert cols is not None and len(cols) == 2
    full, _ = lm.run(PROMPT, last_only=True)
    part, _ = lm.run(PROMPT, last_only=True, logit_columns=cols)
    assert torch.allclose(part[..., cols], full[..., cols], atol=1e-5)
    others = torch.ones(full.shape[-1], dtype=torch.bool)
    others[cols] = False
    assert bool((part[..., others] == 0).all())
    a, b = int(cols[0]), int(cols[1])
    plain = al.targets.FnTarget(lambda lg, bt: lg[:, -1, a] - lg[:, -1, b], "diff")
    assert plain.logit_columns() is None
    for units in (al.units.Heads(per_position=True), al.units.Neurons(layers=[1])):
        fast = patch_sweep(lm, PROMPT, CF, tgt, units)
        slow = patch_sweep(lm, PROMPT, CF, plain, units)
        sign = 1.0 if a == tgt.a.ids else -1.0  # unique() sorts the columns
        assert torch.allclose(fast.patched, sign * slow.patched, atol=1e-5)
