"""accelerate disk offload (``device_map`` with ``"disk"``): offloaded weights
sit on the meta device and load only inside their module's forward; methods
that read weights directly (DLA, EAP) must give the same scores as the plain
model, because the adapter materialises them from accelerate's weights map."""

from __future__ import annotations

import warnings

import pytest
import torch

import attrlab as al

pytest.importorskip("accelerate")

PROMPT = "When Mary and John went to the store, John gave a drink to"
CF = "When Mary and John went to the store, Mary gave a drink to"

MAPS = {
    "blocks": {
        "transformer.wte": "cpu",
        "transformer.wpe": "cpu",
        "transformer.drop": "cpu",
        "transformer.h": "disk",
        "transformer.ln_f": "cpu",
        "lm_head": "cpu",
    },
    "all": {"transformer": "disk", "lm_head": "disk"},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    hf, tok = al.testing.tiny_model("gpt2")
    d = tmp_path_factory.mktemp("gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _load(saved, tmp_path, where=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if where is None:
            return al.load(saved)
        return al.load(saved, device_map=MAPS[where], offload_folder=str(tmp_path))


@pytest.mark.parametrize("where", ["blocks", "all"])
def test_dla_and_eap_equal_the_plain_model_under_disk_offload(saved, tmp_path, where):
    plain, off = _load(saved, tmp_path), _load(saved, tmp_path, where)
    assert any(p.device.type == "meta" for p in off.model.parameters())
    assert off.device.type == "cpu"
    runs = [
        dict(units="heads", method="dla"),
        dict(units="mlp", method="dla"),
        dict(units="edges", method="eap", counterfactual=CF),
    ]
    for kw in runs:
        a = al.attribute(plain, PROMPT, target=(" Mary", " John"), **kw)  # type: ignore[arg-type]
        b = al.attribute(off, PROMPT, target=(" Mary", " John"), **kw)  # type: ignore[arg-type]
        torch.testing.assert_close(b.scores, a.scores, atol=1e-6, rtol=1e-6)


def test_offloaded_weights_are_read_through_the_adapter(saved, tmp_path):
    plain, off = _load(saved, tmp_path), _load(saved, tmp_path, "all")
    torch.testing.assert_close(off.W_O(1), plain.W_O(1))
    torch.testing.assert_close(off.W_out(0), plain.W_out(0))
    torch.testing.assert_close(off.W_U(), plain.W_U())
    norm = off.adapter.final_norm()
    w, b = off.adapter.norm_affine(norm)
    w0, b0 = plain.adapter.norm_affine(plain.adapter.final_norm())
    torch.testing.assert_close(w, w0)
    torch.testing.assert_close(b, b0)


def test_sources_occlusion_equals_the_plain_model_with_the_embedding_offloaded(saved, tmp_path):
    """Source ablation runs the HF model itself: inputs must go to the
    embedding's execution device, not to the first parameter's ('meta')."""
    ctx = "Paris is the capital of France. Rome is the capital of Italy. Bob likes tea."
    plain, off = _load(saved, tmp_path), _load(saved, tmp_path, "all")
    kw = dict(units="sources", method="occlusion", target=" a")
    a = al.attribute(plain, ctx, **kw)  # type: ignore[arg-type]
    b = al.attribute(off, ctx, **kw)  # type: ignore[arg-type]
    torch.testing.assert_close(b.scores, a.scores, atol=1e-6, rtol=1e-6)
