"""Bad inputs to the model wrapper and loader get typed errors that say what to
pass: token ids of the wrong dtype / shape / range, None, out-of-vocabulary
batches and baselines, models on the meta device, and al.load on paths and
hub ids that hold no model (offline: no download is attempted)."""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest
import torch

import attrlab as al
from attrlab.errors import FileFormatError, InputError, TokenOutOfVocabError
from attrlab.model.wrapper import Batch


@functools.lru_cache(maxsize=1)
def _lm() -> al.LM:
    return al.wrap(*al.testing.tiny_model("gpt2"))


# ------------------------------------------------------------ id coercion
@pytest.mark.parametrize(
    "ids",
    [
        torch.tensor([[1.7, 2.2, 3.9]]),
        torch.rand(1, 4),
        torch.tensor([[True, False, True]]),
        np.array([[1.0, 2.0]]),
        [[1.5, 2, 3]],
        [[True, 2, 3]],
        [torch.tensor([1.0, 2.0])],
    ],
    ids=["float", "rand", "bool", "numpy-float", "list-float", "list-bool", "row-float"],
)
@pytest.mark.parametrize("entry", ["run", "attribute"])
def test_non_integer_ids_are_refused(ids, entry):
    lm = _lm()
    with pytest.raises(InputError, match="integer"):
        if entry == "run":
            lm.run(ids)
        else:
            al.attribute(lm, ids, target=1, method="occlusion")


def test_three_d_ids_are_refused_not_flattened():
    lm = _lm()
    ids = torch.ones(2, 3, 4, dtype=torch.long)
    with pytest.raises(InputError, match=r"1-D \[pos\].*2-D \[batch, pos\]"):
        lm.run(ids)
    with pytest.raises(InputError, match="2-D"):
        al.attribute(lm, ids, target=1, method="occlusion")


@pytest.mark.parametrize("ids", [[[1, 10**6]], torch.tensor([[1, -1]]), np.array([[474]])])
def test_out_of_vocab_ids_are_refused(ids):
    with pytest.raises(TokenOutOfVocabError, match="outside the vocabulary"):
        _lm().run(ids)


def test_integer_ids_of_every_integer_form_agree():
    lm = _lm()
    ref, _ = lm.run(torch.tensor([[5, 6, 7]]))
    for ids in (
        [[5, 6, 7]],
        torch.tensor([5, 6, 7]),
        torch.tensor([[5, 6, 7]], dtype=torch.int32),
        np.array([[5, 6, 7]]),
        [np.array([5, 6, 7])],
        [[np.int64(5), 6, torch.tensor(7)]],
    ):
        out, _ = lm.run(ids)
        torch.testing.assert_close(out, ref)


def test_none_and_other_objects_are_refused():
    lm = _lm()
    for bad in (None, 3, {"a": 1}, 2.5):
        with pytest.raises(InputError, match="string"):
            lm.run(bad)  # type: ignore[arg-type]


def test_batch_with_out_of_vocab_ids_is_refused():
    lm = _lm()
    b = Batch(torch.tensor([[1, 10**6]]), torch.ones(1, 2, dtype=torch.long), torch.arange(2)[None])
    with pytest.raises(TokenOutOfVocabError, match="outside the vocabulary"):
        lm.run(b)
    fb = Batch(
        torch.tensor([[1.0, 2.0]]), torch.ones(1, 2, dtype=torch.long), torch.arange(2)[None]
    )
    with pytest.raises(InputError, match="integer"):
        lm.run(fb)


def test_float_continuation_and_target_ids_are_refused():
    lm = _lm()
    with pytest.raises(InputError):
        al.attribute(lm, "a b", target=al.targets.ContinuationLogProb([1.9, 2.0]), method="ig")
    with pytest.raises(InputError, match="integer"):
        lm.token_id(torch.tensor(3.7))


# ------------------------------------------------------------- baselines
@pytest.mark.parametrize("method", ["ig", "occlusion"])
@pytest.mark.parametrize("baseline", [10**9, -1, "tensor"])
def test_out_of_vocab_baseline_ids_are_refused(method, baseline):
    lm = _lm()
    if baseline == "tensor":
        baseline = torch.tensor([0, 1, 10**9, 2])
    with pytest.raises(TokenOutOfVocabError, match="baseline"):
        al.attribute(lm, "a b c d", target=" a", method=method, baseline=baseline)


def test_in_vocab_integer_baseline_still_works():
    r = al.attribute(_lm(), "a b c d", target=" a", method="occlusion", baseline=0)
    assert torch.isfinite(r.scores).all()


# ------------------------------------------------------------ meta device
def test_wrap_refuses_a_model_on_the_meta_device():
    from transformers import AutoModelForCausalLM

    hf, tok = al.testing.tiny_model("gpt2")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf.config)
    with pytest.raises(InputError, match="meta device.*materialise"):
        al.wrap(meta, tok)


def test_run_refuses_weights_moved_to_meta_after_wrapping():
    lm = al.wrap(*al.testing.tiny_model("gpt2"))
    lm.model.to("meta")
    with pytest.raises(InputError, match="meta device"):
        lm.run("a b")


# ---------------------------------------------------------------- al.load
def test_load_uncached_hub_id_fails_fast_and_typed(tmp_path):
    t = time.monotonic()
    with pytest.raises(InputError, match="not in the local Hugging Face cache") as e:
        al.load("attrlab-nobody/no-such-model", cache_dir=str(tmp_path), local_files_only=True)
    assert "save_pretrained" in str(e.value) and "hf download" in str(e.value)
    assert time.monotonic() - t < 10


def test_load_uncached_hub_id_in_offline_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        al.load("attrlab-nobody/no-such-model", cache_dir=str(tmp_path))


def test_load_uncached_hub_id_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    from attrlab.model import loading

    monkeypatch.setattr(loading, "_offline", lambda hub: False)
    monkeypatch.setattr(loading, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(InputError, match="cannot be reached"):
        al.load("attrlab-nobody/no-such-model", cache_dir=str(tmp_path))


def test_load_empty_directory_and_plain_file(tmp_path):
    with pytest.raises(FileFormatError, match="no config.json"):
        al.load(tmp_path)
    f = tmp_path / "model.bin"
    f.write_bytes(b"not a model")
    with pytest.raises(FileFormatError, match="is a file"):
        al.load(f)
    with pytest.raises(InputError, match="does not exist"):
        al.load(tmp_path / "missing")


def test_load_directory_with_config_but_no_weights(tmp_path):
    hf, tok = al.testing.tiny_model("gpt2")
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(FileFormatError, match="weights"):
        al.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FileFormatError, match="config.json"):
        al.load(tmp_path)
