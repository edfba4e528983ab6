"""Component methods with a ContinuationLogProb target: the continuation is
appended to the prompt exactly once, and the numbers equal hand-made oracles
(the HF model run directly, with a forward hook doing the ablation / patch)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import attrlab as al
from attrlab.methods.patching import Mean, Resample, patch_sweep

PROMPT = "a b c d"
CF = "a c c d"
CONT = " b c"


@functools.lru_cache(maxsize=1)
def _lm() -> al.LM:
    return al.wrap(*al.testing.tiny_model("gpt2"))


def _ids(lm: al.LM, prompt: str) -> list[int]:
    return lm.encode(prompt) + lm.encode(CONT)


def _direct(lm: al.LM, ids: list[int], mlp_hook=None, layer: int = 0) -> float:
    """Continuation log-prob from the HF model itself (no attrlab), optionally
    with a forward hook on one block's MLP."""
    n = len(lm.encode(CONT))
    mlp = lm.model.transformer.h[layer].mlp
    handle = mlp.register_forward_hook(mlp_hook) if mlp_hook is not None else None
    try:
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids])).logits[0]
    finally:
        if handle is not None:
            handle.remove()
    logp = logits[-n - 1 : -1].double().log_softmax(-1)
    return float(logp.gather(-1, torch.tensor(ids[-n:])[:, None]).sum())


def _target() -> al.targets.ContinuationLogProb:
    return al.targets.ContinuationLogProb(CONT)


def _mlp_cache(lm: al.LM, ids: list[int], layer: int) -> torch.Tensor:
    seen = []
    h = lm.model.transformer.h[layer].mlp.register_forward_hook(
        lambda _m, _a, out: seen.append(out.detach().clone())
    )
    try:
        with torch.no_grad():
            lm.model(torch.tensor([ids]))
    finally:
        h.remove()
    return seen[0]


@pytest.mark.parametrize("layer", [0, 1])
def test_zero_ablation_clean_value_and_effect_equal_hand_made_hook(layer):
    lm = _lm()
    ids = _ids(lm, PROMPT)
    r = al.attribute(lm, PROMPT, target=_target(), units="mlp", method="patch", corruption="zero")
    clean = _direct(lm, ids)
    assert r.diagnostics["clean"] == pytest.approx(clean, abs=1e-4)
    ablated = _direct(lm, ids, lambda _m, _a, out: torch.zeros_like(out), layer)
    row = r.to_pandas().set_index("layer").loc[layer]
    assert float(row["score"]) == pytest.approx(clean - ablated, abs=1e-4)  # contribution


@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_counterfactual_patch_equals_hand_made_hook(direction):
    lm = _lm()
    clean_ids, cf_ids = _ids(lm, PROMPT), _ids(lm, CF)
    layer = 1
    base_ids, donor_ids = (clean_ids, cf_ids) if direction == "noising" else (cf_ids, clean_ids)
    donor = _mlp_cache(lm, donor_ids, layer)
    base = _direct(lm, base_ids)
    patched = _direct(lm, base_ids, lambda _m, _a, out: donor, layer)
    r = al.attribute(
        lm, PROMPT, target=_target(), units="mlp", method="patch", counterfactual=CF,
        direction=direction,
    )  # fmt: skip
    assert r.diagnostics["clean"] == pytest.approx(_direct(lm, clean_ids), abs=1e-4)
    assert r.diagnostics["corrupt"] == pytest.approx(_direct(lm, cf_ids), abs=1e-4)
    row = r.to_pandas().set_index("layer").loc[layer]
    # contribution: what the unit adds (noising: base - patched; denoising: patched - base)
    want = patched - base if direction == "denoising" else base - patched
    assert float(row["score"]) == pytest.approx(want, abs=1e-4)


def test_patch_sweep_prepares_counterfactual_and_references_once():
    lm = _lm()
    clean = _direct(lm, _ids(lm, PROMPT))
    sw = patch_sweep(lm, PROMPT, CF, _target(), al.units.MlpOut())
    assert float(sw.clean[0]) == pytest.approx(clean, abs=1e-4)
    assert float(sw.corrupt[0]) == pytest.approx(_direct(lm, _ids(lm, CF)), abs=1e-4)
    # Resample / Mean references get the continuation as the clean prompt does
    sw = patch_sweep(lm, PROMPT, Resample([CF]), _target(), al.units.MlpOut())
    assert float(sw.corrupt[0]) == pytest.approx(_direct(lm, _ids(lm, CF)), abs=1e-4)
    sw = patch_sweep(lm, PROMPT, Mean([PROMPT, CF]), _target(), al.units.MlpOut())
    assert sw.meta["n_positions"] == len(_ids(lm, PROMPT))


@pytest.mark.parametrize("method", ["atp", "atp*"])
def test_attribution_patching_metric_is_the_direct_continuation_logprob(method):
    lm = _lm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = al.attribute(
            lm, PROMPT, target=_target(), units="mlp", method=method, counterfactual=CF
        )
    if method == "atp":  # the gradient estimator reports the value it differentiated
        assert r.diagnostics["value"] == pytest.approx(_direct(lm, _ids(lm, PROMPT)), abs=1e-4)
        return
    assert r.diagnostics["metric_base"] == pytest.approx(_direct(lm, _ids(lm, PROMPT)), abs=1e-4)
    assert r.diagnostics["metric_source"] == pytest.approx(_direct(lm, _ids(lm, CF)), abs=1e-4)


def test_atp_star_verify_patches_with_the_continuation():
    """verify= re-patches the top units exactly: equals method='patch'."""
    lm = _lm()
    r = al.attribute(
        lm, PROMPT, target=_target(), units="mlp", method="atp*", counterfactual=CF, verify=2
    )
    exact = al.attribute(
        lm, PROMPT, target=_target(), units="mlp", method="patch", counterfactual=CF
    )
    torch.testing.assert_close(r.scores.double(), exact.scores.double(), atol=1e-4, rtol=0)


def test_eap_metric_is_the_direct_continuation_logprob():
    lm = _lm()
    r = al.attribute(lm, PROMPT, target=_target(), units="edges", method="eap", counterfactual=CF)
    assert r.diagnostics["value"] == pytest.approx(_direct(lm, _ids(lm, PROMPT)), abs=1e-4)


def test_dla_refuses_a_continuation_target_with_a_typed_error():
    lm = _lm()
    with pytest.raises(al.errors.InputError, match="next-token"):
        al.attribute(lm, PROMPT, target=_target(), units="heads", method="dla")
