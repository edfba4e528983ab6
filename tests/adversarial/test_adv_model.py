"""Adversarial cases for the model layer (area ``model``): hostile token ids,
batches, baselines, loads, meta / offloaded weights and continuation targets.

Each case is classified by assertion: a specific typed attrlab error whose
message names what to pass, or a correct result checked against an oracle.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import attrlab as al
from attrlab.errors import (
    EmptyPromptError,
    FileFormatError,
    InputError,
    TokenOutOfVocabError,
)
from attrlab.model.wrapper import Batch


@functools.lru_cache(maxsize=1)
def _lm() -> al.LM:
    return al.wrap(*al.testing.tiny_model("gpt2"))


def _batch(ids: Any) -> Batch:
    t = torch.as_tensor(ids)
    return Batch(t, torch.ones(t.shape, dtype=torch.long), torch.arange(t.shape[-1])[None])


def _meta_model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    hf, _ = al.testing.tiny_model("gpt2")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf.config)


# (case id, call, error class, regex the message must match)
ERRORS: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    ("run-float-ids", lambda: _lm().run(torch.tensor([[1.9, 2.1]])), InputError, "integer"),
    ("run-rand-ids", lambda: _lm().run(torch.rand(2, 5)), InputError, "integer"),
    ("run-bool-ids", lambda: _lm().run(torch.ones(1, 3, dtype=torch.bool)), InputError, "bool"),
    ("run-half-ids", lambda: _lm().run(torch.ones(1, 3, dtype=torch.half)), InputError, "integer"),
    ("run-3d-ids", lambda: _lm().run(torch.ones(1, 2, 3, dtype=torch.long)), InputError, "2-D"),
    ("run-0d-ids", lambda: _lm().run(torch.tensor(5)), InputError, "1-D"),
    ("run-none", lambda: _lm().run(None), InputError, "string"),  # type: ignore[arg-type]
    ("run-int", lambda: _lm().run(7), InputError, "string"),  # type: ignore[arg-type]
    ("run-flat-list", lambda: _lm().run([1, 2, 3]), InputError, r"\[\[id"),  # type: ignore[list-item]
    ("run-list-floats", lambda: _lm().run([[1.0, 2.0]]), InputError, "integers"),
    ("run-list-nan", lambda: _lm().run([[1, float("nan")]]), InputError, "integers"),
    ("run-list-str-ids", lambda: _lm().run([["1", "2"]]), InputError, "integers"),
    ("run-numpy-float", lambda: _lm().run(np.ones((1, 3))), InputError, "integer"),
    ("run-oov-id", lambda: _lm().run([[1, 2**40]]), TokenOutOfVocabError, "vocabulary"),
    ("run-negative-id", lambda: _lm().run(torch.tensor([[-5, 1]])), TokenOutOfVocabError, "0.."),
    ("run-empty-list", lambda: _lm().run([]), EmptyPromptError, "no prompts"),
    ("batch-oov", lambda: _lm().run(_batch([[1, 10**7]])), TokenOutOfVocabError, "vocabulary"),
    ("batch-float", lambda: _lm().run(_batch([[1.0, 2.0]])), InputError, "lm.tokenize"),
    (
        "batch-bad-mask",
        lambda: _lm().run(
            Batch(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 2), torch.ones(1, 3))
        ),
        InputError,
        "attention_mask",
    ),
    (
        "attribute-rand-ids",
        lambda: al.attribute(_lm(), torch.rand(1, 4), target=1, method="ig"),
        InputError,
        "integer",
    ),
    (
        "ig-oov-baseline",
        lambda: al.attribute(_lm(), "a b c", target=" a", method="ig", baseline=10**9),
        TokenOutOfVocabError,
        "baseline",
    ),
    (
        "occlusion-oov-baseline",
        lambda: al.attribute(_lm(), "a b c", target=" a", method="occlusion", baseline=-3),
        TokenOutOfVocabError,
        "baseline",
    ),
    (
        "occlusion-bool-baseline",
        lambda: al.attribute(
            _lm(),
            "a b c",
            target=" a",
            method="occlusion",
            baseline=torch.ones(3, dtype=torch.bool),
        ),
        InputError,
        "integer token ids",
    ),
    (
        "continuation-float-ids",
        lambda: al.attribute(
            _lm(), "a b", target=al.targets.ContinuationLogProb([2.5]), method="occlusion"
        ),
        InputError,
        "id",
    ),
    ("token-id-float-tensor", lambda: _lm().token_id(torch.tensor(2.5)), InputError, "integer"),
    ("wrap-meta-model", lambda: al.wrap(_meta_model()), InputError, "materialise"),
    (
        "load-uncached-hub-id",
        lambda: al.load("attrlab-adv/not-cached-anywhere", local_files_only=True),
        InputError,
        "not in the local Hugging Face cache",
    ),
]


@pytest.mark.parametrize("call,err,pattern", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_typed_error(call, err, pattern):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(err, match=pattern):
            call()


def test_load_empty_dir_and_plain_file(tmp_path):
    with pytest.raises(FileFormatError, match="config.json"):
        al.load(tmp_path)
    (tmp_path / "weights.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(FileFormatError, match="is a file"):
        al.load(tmp_path / "weights.safetensors")


# ----------------------------------------------------------- correct results
def _cont_logprob_direct(lm: al.LM, prompt: str, cont: str) -> float:
    ids = lm.encode(prompt) + lm.encode(cont)
    n = len(lm.encode(cont))
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0]
    logp = logits[-n - 1 : -1].double().log_softmax(-1)
    return float(logp.gather(-1, torch.tensor(ids[-n:])[:, None]).sum())


@pytest.mark.parametrize(
    "kw",
    [
        dict(corruption="zero"),
        dict(counterfactual="a c c d"),
        dict(corruption="resample", reference=["a c c d"]),
        dict(corruption="noise", noise_positions=[1]),
    ],
    ids=["zero", "counterfactual", "resample", "noise"],
)
def test_patch_continuation_clean_value_is_the_direct_logprob(kw):
    lm = _lm()
    t = al.targets.ContinuationLogProb(" b c")
    r = al.attribute(lm, "a b c d", target=t, units="resid", method="patch", **kw)
    assert r.diagnostics["clean"] == pytest.approx(
        _cont_logprob_direct(lm, "a b c d", " b c"), abs=1e-4
    )
    assert torch.isfinite(r.scores).all()


def test_numpy_int_ids_equal_tensor_ids():
    lm = _lm()
    a, _ = lm.run(np.array([[3, 4, 5]], dtype=np.int16))
    b, _ = lm.run(torch.tensor([[3, 4, 5]]))
    torch.testing.assert_close(a, b)


def test_prefix_cache_batch_still_accepted():
    """A Batch whose mask also covers a cached prefix (patching's fast path) is
    valid, and gives the same effects as recomputing the prefix."""
    from attrlab.methods.patching import patch_sweep

    lm = _lm()
    units = al.units.Resid(per_position=True)
    fast = patch_sweep(lm, "a b c d e", "a c c d e", " a", units, reuse_prefix=True)
    slow = patch_sweep(lm, "a b c d e", "a c c d e", " a", units, reuse_prefix=False)
    torch.testing.assert_close(fast.effects, slow.effects, atol=1e-5, rtol=1e-5)
