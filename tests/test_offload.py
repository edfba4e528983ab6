"""accelerate disk offload (``device_map`` with ``"disk"``): offloaded weights
sit on the meta device and load only inside their module's forward; methods
that read weights directly (DLA, EAP) must give the same scores as the plain
model, because the adapter materialises them from accelerate's weights map.
Every method family (DLA, exact patching, AtP*, IG, EAP, TRAK) gives the plain
model's scores within 1e-5 with blocks on disk, everything on disk, and layer 0
on the CPU with layer 1 on disk; GPT-2 and Llama (rotary, RMSNorm)."""

from __future__ import annotations

import warnings

import pytest
import torch

import attrlab as al
from attrlab import architectures as A

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
    "split": {
        "transformer.wte": "cpu",
        "transformer.wpe": "cpu",
        "transformer.drop": "cpu",
        "transformer.h.0": "cpu",
        "transformer.h.1": "disk",
        "transformer.ln_f": "cpu",
        "lm_head": "cpu",
    },
}
LLAMA_MAPS = {
    "all": {"model": "disk", "lm_head": "disk"},
    "split": {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "disk",
        "lm_head": "cpu",
    },
}
TARGET = (" Mary", " John")
#: one run of every method family on the units they are used for
RUNS = {
    "dla heads": dict(units="heads", method="dla"),
    "dla mlp": dict(units="mlp", method="dla"),
    "patch heads": dict(units="heads", method="patch", counterfactual=CF),
    "atp* heads": dict(units="heads", method="atp*", counterfactual=CF),
    "ig tokens": dict(units="tokens", method="ig"),
    "eap edges": dict(units="edges", method="eap", counterfactual=CF),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread


def _save(family, path, **overrides):
    hf, tok = al.testing.tiny_model(family, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return _save("gpt2", tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def saved_big(tmp_path_factory):
    """Larger init than HF's 0.02, so that effects are far above rounding."""
    return _save("gpt2", tmp_path_factory.mktemp("gpt2_big"), initializer_range=0.3)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    return _save("llama", tmp_path_factory.mktemp("llama"), initializer_range=0.3)


def _load(saved, tmp_path, where=None, maps=MAPS):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if where is None:
            return al.load(saved)
        return al.load(saved, device_map=maps[where], offload_folder=str(tmp_path))


def _same_scores(plain, off, runs):
    for name, kw in runs.items():
        a = al.attribute(plain, PROMPT, target=TARGET, **kw)  # type: ignore[arg-type]
        b = al.attribute(off, PROMPT, target=TARGET, **kw)  # type: ignore[arg-type]
        assert float(a.scores.abs().max()) > 1e-3, name  # a comparison of something
        torch.testing.assert_close(b.scores, a.scores, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("where", ["blocks", "all", "split"])
def test_every_method_family_equals_the_plain_model_under_disk_offload(saved_big, tmp_path, where):
    plain, off = _load(saved_big, tmp_path), _load(saved_big, tmp_path, where)
    assert any(p.device.type == "meta" for p in off.model.parameters())
    assert off.device.type == "cpu"
    _same_scores(plain, off, RUNS)


@pytest.mark.parametrize("where", ["all", "split"])
def test_llama_equals_the_plain_model_under_disk_offload(saved_llama, tmp_path, where):
    """Rotary embedding, RMSNorm, separate q/k/v projections: AtP*'s QK fix
    recomputes scores through the rotary module."""
    plain, off = _load(saved_llama, tmp_path), _load(saved_llama, tmp_path, where, LLAMA_MAPS)
    assert any(p.device.type == "meta" for p in off.model.parameters())
    _same_scores(plain, off, RUNS)


@pytest.mark.parametrize("where", ["blocks", "all", "split"])
def test_trak_equals_the_plain_model_under_disk_offload(saved_big, tmp_path, where):
    """Per-example gradients (torch.func) pass the parameters into the forward
    themselves: the offloaded weights are loaded around each batch, and the
    model is left as it was (weights back on meta, offload hooks on)."""
    import attrlab.data as ad

    plain, off = _load(saved_big, tmp_path), _load(saved_big, tmp_path / "off", where)
    docs = ["Paris is a city in France.", "Rome is a city in Italy.", "The cat sat on the mat."]
    meta = {n for n, p in off.model.named_parameters() if p.device.type == "meta"}
    assert ad.checkpoint_hash(off.model) == ad.checkpoint_hash(plain.model)
    scores = []
    for i, lm in enumerate((plain, off)):
        data = ad.Examples.from_texts(lm, docs, ids=["paris", "rome", "cat"])
        store = ad.featurize(
            lm, data, tmp_path / f"store{i}", proj_dim=16,
            modules=["transformer.h.1.mlp", "transformer.h.0.attn"],
        )  # fmt: skip
        units = al.units.TrainingExamples(store)
        for method in ("trak", "grad-dot"):
            r = al.attribute(
                lm, "The capital of France is", target=" Paris", units=units, method=method
            )
            scores.append(r.scores)
    assert {n for n, p in off.model.named_parameters() if p.device.type == "meta"} == meta
    for a, b in zip(scores[:2], scores[2:]):
        assert float(a.abs().max()) > 1e-3
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    _same_scores(plain, off, {"dla heads": RUNS["dla heads"]})  # still the same model


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


def test_cached_sites_go_to_the_input_device(monkeypatch):
    """A machine with one device cannot split a model, so the input device is
    pretended to be 'meta': every cached site then comes from a layer on
    another device, is copied to the input device (shape kept), and the run
    itself is unchanged."""
    from attrlab.model.hooks import HookSession

    lm = al.wrap(*al.testing.tiny_model("gpt2"))
    sites = ["blocks.0.resid_pre", "blocks.1.attn.head_out", "final_norm.scale"]
    plain, want = lm.run(PROMPT, cache=sites)
    init = HookSession.__init__

    def elsewhere(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.home = torch.device("meta")

    monkeypatch.setattr(HookSession, "__init__", elsewhere)
    logits, cache = lm.run(PROMPT, cache=sites)
    torch.testing.assert_close(logits, plain)
    assert {n: (t.device.type, t.shape) for n, t in cache.items()} == {
        n: ("meta", t.shape) for n, t in want.items()
    }


@pytest.fixture(scope="module")
def offloaded_matrix_model(tmp_path_factory):
    """The method x architecture matrix's GPT-2 (attrlab.architectures.model), saved
    and reloaded with layer 1 on disk and layer 0 on the CPU."""
    d = _save("gpt2", tmp_path_factory.mktemp("gpt2_matrix"), initializer_range=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = al.load(d, device_map=MAPS["split"], offload_folder=str(d / "offload"))
    assert any(p.device.type == "meta" for p in lm.model.parameters())
    return lm


@pytest.mark.parametrize("method", [c.method for c in A.CELLS])
def test_every_method_runs_and_keeps_its_invariant_under_disk_offload(
    offloaded_matrix_model, method
):
    """Every cell of the method x architecture matrix (each registered method,
    the lenses, routes and attribution graphs, with the method's own invariant)
    passes on an offloaded GPT-2, as GPT-2 must on one device."""
    torch.manual_seed(0)
    A.CELL[method].run(offloaded_matrix_model)
